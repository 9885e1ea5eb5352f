"""The read path against a model: a long random history of snapshots made, deleted, forgotten
and pruned while mounts of the repository come and go (two daemons at once on one cache
directory, a cache small enough to evict, with and without the background sweep, kill -9 and
a new mount on the dead one's cache), read in every way a reader reads an image (unaligned,
past the end, sequential streams, threads and processes at once, and while a delete, forget
or prune moves blocks between packs), with faults caused for real, and after each read
compared with plain bytes. A snapshot held open is neither deleted nor forgotten.

The promise under test: ``MOUNT/snapshots/NAME.img`` reads exactly the bytes of its source
image, or fails with EIO when (and only when) the store cannot give a verified block of it; it
never returns other bytes, never hangs, and reads succeed again once the cause is gone.

The model is a ``bytearray`` per image file and a ``bytes`` per snapshot (with the image's
mtime the mount shows for it: a name deleted and taken again must come to mean the new
snapshot), and, while a fault lasts, the blocks that no read may return (their stored copy is
damaged or out of reach, and no cache holds them) and those that may or may not come back.
A read's outcome is judged against it: the right bytes, a short read that stops where such a
block begins, or EIO where one is. What a cache holds is asked of the cache's lmdb index, which
every daemon on the host shares; the kernel's page cache is passed by with ``O_DIRECT`` where
it matters.

Faults, for real: a stored block's bytes (or a snapshot's block map) damaged in its pack file
(found through the repository's index, as the corruption tests do) while fresh daemons serve
it, then put back; on S3, the server killed and started again while mounts read (and a lookup
of a snapshot taken just before, which they have not listed, fails with EIO, not ENOENT).
README promises nothing that heals a damaged block (``repair index`` rebuilds the index, and a
new snapshot of the same bytes deduplicates against the damaged copy), so the cause goes away
when the byte is put back.

At the end every snapshot is read whole through a mount, ``verify`` passes, and a fresh
cache's ``stats --json`` figures agree with the model (each block fetched once: no fewer
fetches than distinct blocks read, no more besides the read-around's neighbours).

Each step is drawn from a seeded generator, so a failure names its seed and step, and runs
again the same way. ``SNAPFS_HISTORY_SEEDS`` (``1-40`` or ``3,7``) and
``SNAPFS_HISTORY_STEPS`` run other and longer histories by hand.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import lmdb
import pytest
from mountutil import MOUNTS, MountedDaemon, make_env, mounted, pid_running, pread, wait_for
from testkit import (
    EXIT_INTEGRITY,
    EXIT_USAGE,
    Snapfs,
    first_difference,
    flip_byte,
    one_error,
    reap,
    wait_until_packs_read,
)

from snapfs.cache.blockcache import MAP_SIZE
from snapfs.format.block import HEADER_SIZE, ZERO_ID
from snapfs.repo.repository import Repository, pack_key
from snapfs.store import ObjectStore

pytestmark = MOUNTS
BS = 16 * 1024  # the repository's block size (snapfs init's default)
SECTOR = 512
MiB = 1 << 20
STEPS = 60
LABELS = ("root", "data", "logs")
#: how far past a buffered read's own bytes the kernel may have asked the daemon for more
#: (its read-ahead, which the daemon sets to 1 MiB): a block out of reach there may fail it
KERNEL_READ_AHEAD = MiB
#: seconds after which a read that has not returned is taken for hung
HUNG = 120

#: reads ``[path, offset, length, direct]`` pairs from stdin, prints ``[n, sha256]`` or
#: ``[-errno, null]`` for each: a reader in a process of its own
READER = r"""
import hashlib, json, os, sys
out = []
for path, offset, length, direct in json.load(sys.stdin):
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        out.append([len(data), hashlib.sha256(data).hexdigest()])
    except OSError as e:
        out.append([-e.errno, None])
json.dump(out, sys.stdout)
"""


def seeds(default: int) -> list[int]:
    """The seeds to run: ``SNAPFS_HISTORY_SEEDS`` (``1-40``, ``3,7``), else ``default``."""
    spec = os.environ.get("SNAPFS_HISTORY_SEEDS")
    if not spec:
        return [default]
    out: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        out += range(int(first), int(last or first) + 1)
    return out


def mtime_ns(created: str) -> int:
    """The mtime a mount gives the image of a snapshot created at ``created`` (ISO 8601)."""
    return int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() * 1e9)


def cached(cache_dir: Path, ids: Iterable[bytes]) -> set[bytes]:
    """Those of ``ids`` that the block cache at ``cache_dir`` holds, as its lmdb index says
    (opened read-only, beside the daemons that share it)."""
    path = cache_dir / "index.lmdb"
    if not (path / "data.mdb").exists():
        return set()
    env = lmdb.open(str(path), readonly=True, max_dbs=4, map_size=MAP_SIZE, readahead=False)
    try:
        blocks = env.open_db(b"blocks", create=False)
        with env.begin() as txn:
            return {bid for bid in ids if txn.get(bid, db=blocks) is not None}
    finally:
        env.close()


def some_image(rng: random.Random, palette: list[bytes], size: int) -> bytearray:
    """Blocks of zeros, of a palette that every image shares (deduplicated across them), of
    fresh random bytes, and half-zero ones; cut to ``size``."""
    parts = []
    for _ in range(-(-size // BS)):
        kind = rng.random()
        if kind < 0.2:
            parts.append(bytes(BS))
        elif kind < 0.5:
            parts.append(rng.choice(palette))
        elif kind < 0.9:
            parts.append(rng.randbytes(BS))
        else:
            parts.append(rng.randbytes(BS // 2) + bytes(BS // 2))
    return bytearray(b"".join(parts)[:size])


def abandon(proc: subprocess.Popen[str]) -> None:
    """``reap`` a reader process, and close its pipes."""
    reap(proc)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def blocks_of(content: bytes) -> list[bytes]:
    """The plain bytes of each block of an image (the last one may be short)."""
    return [content[off : off + BS] for off in range(0, len(content), BS)]


def is_zero(block: bytes) -> bool:
    return block.count(0) == len(block)


@dataclasses.dataclass
class Snap:
    label: str
    content: bytes
    mtime_ns: int


@dataclasses.dataclass
class Mount:
    slot: str
    daemon: MountedDaemon
    stack: ExitStack
    options: tuple[str, ...]
    #: a daemon that evicts ran beside this one: what this one fetched may be gone from the
    #: cache and still be in its memory (its recent blocks, its kernel page cache)
    near_eviction: bool = False

    @property
    def evicts(self) -> bool:
        """Whether this daemon may evict blocks that others cached (its cap is small)."""
        return "--cache-size" in self.options

    def image(self, name: str) -> Path:
        return self.daemon.images / f"{name}.img"


@dataclasses.dataclass
class Read:
    """One read of a snapshot through a mount, and what came of it."""

    mount: Mount
    name: str
    offset: int
    length: int
    direct: bool
    got: int | None = None  # bytes returned, or None with ``error``
    right: bool = False  # they are the model's
    error: int | None = None  # errno

    def __str__(self) -> str:
        how = "O_DIRECT" if self.direct else "buffered"
        return f"{how} read of {self.name} at {self.offset}+{self.length} on {self.mount.slot}"


class History:
    """The images, snapshots and mounts as the model says they are, and the steps on them."""

    def __init__(self, snapfs: Snapfs, store: ObjectStore, rng: random.Random, tmp: Path,
                 seaweed: Any | None) -> None:
        self.snapfs = snapfs
        self.store = store
        self.repo = Repository.open(store)
        self.rng = rng
        self.tmp = tmp
        self.seaweed = seaweed  # the session's SeaweedFS, on S3: stopped and started
        self.cache_dir = tmp / "cache"
        self.palette = [rng.randbytes(BS) for _ in range(6)]
        self.images: dict[str, bytearray] = {}
        self.paths: dict[str, Path] = {}
        self.snaps: dict[str, Snap] = {}  # by name, oldest first
        self.gone: list[str] = []  # names deleted: a later snapshot may take one again
        self.mounts: dict[str, Mount] = {}
        #: blocks (plain bytes) that no read may return while a fault lasts, and blocks that
        #: may or may not come back; snapshots whose block map may not come back
        self.unreadable: set[bytes] = set()
        self.unsure: set[bytes] = set()
        self.unsure_maps: set[str] = set()
        self.unreadable_maps: set[str] = set()
        self.anything_may_fail = False
        #: snapshots that a mount may not list yet: taken just before the store went down
        self.unlisted: set[str] = set()
        #: the cache's index is asked again before a read that returned such a block fails
        #: the test: it may have been on its way into the cache when the store went down
        self.recheck: Callable[[bytes], bool] | None = None
        self.count = 0
        self.steps = 0
        self.faults: dict[str, int] = {"damage": 0, "outage": 0}  # how many of each so far
        self.last_reads: list[Read] = []
        self.log: list[str] = []
        for label in LABELS:
            path = tmp / f"{label}.img"
            self.images[label] = some_image(rng, self.palette,
                                            rng.randrange(2 * MiB, 4 * MiB, SECTOR))
            path.write_bytes(self.images[label])
            self.paths[label] = path

    def note(self, what: str) -> None:
        self.log.append(f"{self.steps}: {what}")

    def history(self) -> str:
        return "history:\n  " + "\n  ".join(self.log)


    # -- the image files -------------------------------------------------------------------

    def change(self) -> None:
        label = self.rng.choice(LABELS)
        model = self.images[label]
        size = len(model)
        kind = self.rng.choice(["write", "write", "zeros", "copy", "fresh", "resize"])
        if kind == "resize":  # by whole sectors, between 1 and 5 MiB
            new = self.rng.randrange(MiB, 5 * MiB, SECTOR)
            if new > size:
                model.extend(some_image(self.rng, self.palette, new - size))
            else:
                del model[new:]
            self.paths[label].write_bytes(model)
            self.note(f"resize {label} to {new}")
            return
        if kind == "copy":  # a block of any image, here too: deduplicated
            source = self.images[self.rng.choice(LABELS)]
            start = self.rng.randrange(0, len(source) // BS) * BS
            data = bytes(source[start : start + BS])
            offset = self.rng.randrange(0, size // BS) * BS
        elif kind == "fresh":  # a block no snapshot has yet
            data = self.rng.randbytes(BS)
            offset = self.rng.randrange(0, size // BS) * BS
        else:
            offset = self.rng.randrange(0, size)
            length = self.rng.choice([1, 17, BS - 1, BS + 1, self.rng.randrange(1, 8 * BS)])
            data = bytes(length) if kind == "zeros" else self.rng.randbytes(length)
        data = data[: size - offset]
        with open(self.paths[label], "r+b") as f:
            f.seek(offset)
            f.write(data)
        model[offset : offset + len(data)] = data
        self.note(f"{kind} {label} {offset}+{len(data)}")

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self, label: str | None = None) -> str:
        label = label or self.rng.choice(LABELS)
        if self.gone and self.rng.random() < 0.3:  # a name deleted before, taken again
            name = self.gone.pop(self.rng.randrange(len(self.gone)))
        else:
            self.count += 1
            name = f"s{self.count}"
        made = self.snapfs.json("snapshot", "create", self.paths[label], "--disk", label,
                                "--name", name)
        assert (made["name"], made["size"]) == (name, len(self.images[label])), made
        self.snaps[name] = Snap(label, bytes(self.images[label]), mtime_ns(made["created"]))
        self.note(f"snapshot {label} as {name}")
        return name

    def delete(self) -> None:
        names = self.some_to_delete()
        if not names:
            return
        if self.mounts and self.rng.random() < 0.3:
            self.delete_held(names[0])
        self.do_delete(names)

    def some_to_delete(self) -> list[str]:
        """One or two snapshots, never the last one."""
        if len(self.snaps) < 2:
            return []
        return self.rng.sample(sorted(self.snaps),
                               min(len(self.snaps) - 1, self.rng.choice([1, 1, 2])))

    def do_delete(self, names: list[str]) -> None:
        self.snapfs.ok("snapshot", "delete", *names)
        for name in names:
            self.forgotten(name)
        self.note(f"delete {names}")

    def delete_held(self, name: str) -> None:
        """A snapshot whose image a process holds open on a mount is not deleted: one line,
        exit 2, nothing deleted. Once it is closed (the kernel tells the daemon after
        ``close`` returns: waited for), it is."""
        mount = self.settled(self.rng.choice(sorted(self.mounts)))
        fd = os.open(mount.image(name), os.O_RDONLY)
        try:
            line = one_error(self.snapfs("snapshot", "delete", name), EXIT_USAGE)
            assert f"snapshot {name} is open at {mount.image(name)}" in line, line
        finally:
            os.close(fd)
        wait_for(lambda: not mount.daemon.snapshots_open(), 30,
                 f"{mount.slot} to learn that {name} was closed")
        self.note(f"delete {name} while it is open on {mount.slot}: refused")

    def forgotten(self, name: str) -> None:
        del self.snaps[name]
        self.gone.append(name)

    def forget(self) -> None:
        label, keep, doomed = self.forget_plan()
        if not (doomed and self.mounts and self.rng.random() < 0.3):
            self.do_forget(label, keep, doomed)
            return
        # a snapshot whose image a process holds open on a mount is kept
        mount = self.settled(self.rng.choice(sorted(self.mounts)))
        fd = os.open(mount.image(doomed[0]), os.O_RDONLY)
        try:
            self.do_forget(label, keep, doomed[1:])
        finally:
            os.close(fd)
        wait_for(lambda: not mount.daemon.snapshots_open(), 30,
                 f"{mount.slot} to learn that {doomed[0]} was closed")
        self.note(f"(kept {doomed[0]}: open on {mount.slot})")

    def forget_plan(self) -> tuple[str, int, list[str]]:
        """A disk, how many of its snapshots to keep, and those the model forgets."""
        label = self.rng.choice(LABELS)
        keep = self.rng.choice([1, 2, 3])
        mine = [n for n, s in self.snaps.items() if s.label == label]
        return label, keep, mine[: max(0, len(mine) - keep)]

    def do_forget(self, label: str, keep: int, doomed: list[str]) -> None:
        if not any(s.label == label for s in self.snaps.values()):
            return  # (forget would say that it has no snapshots of that disk)
        report = self.snapfs.json("snapshot", "forget", "--keep-last", keep, "--disk", label)
        assert sorted(d["name"] for d in report["snapshots"] if not d["keep"]) == sorted(doomed), \
            (report, self.history())
        for name in doomed:
            self.forgotten(name)
        self.note(f"forget --keep-last {keep} --disk {label}: {doomed}")

    def prune(self) -> None:
        self.snapfs.ok("prune")
        self.note("prune")

    # -- mounts ----------------------------------------------------------------------------

    def mount(self, slot: str | None = None, options: list[str] | None = None) -> Mount | None:
        free = [s for s in ("mnt0", "mnt1") if s not in self.mounts]
        if not free:
            return None
        slot = slot or self.rng.choice(free)
        if options is None:
            options = []
            if self.rng.random() < 0.4:
                options += ["--cache-size", "16M"]  # the smallest: eviction under these images
            if self.rng.random() < 0.5:
                options.append("--no-background")
            if self.rng.random() < 0.2:
                options += ["--read-around", "0"]
            options += ["--refresh-interval", self.rng.choice(["0.2", "0.5", "2"])]
        if self.seaweed is None:  # a slow link before the local store widens the races
            options += ["--simulate-latency", self.rng.choice(["2ms", "5ms"])]
        stack = ExitStack()
        daemon = stack.enter_context(
            mounted(self.snapfs, self.tmp / slot, self.cache_dir, *options))
        mount = Mount(slot, daemon, stack, tuple(options))
        for other in self.mounts.values():
            mount.near_eviction |= other.evicts
            other.near_eviction |= mount.evicts
        mount.near_eviction |= mount.evicts
        self.mounts[slot] = mount
        self.note(f"mount {slot} {' '.join(options)} (pid {daemon.pid})")
        return mount

    def umount(self, slot: str | None = None) -> None:
        if not self.mounts:
            return
        mount = self.mounts.pop(slot or self.rng.choice(sorted(self.mounts)))
        out = self.snapfs.ok("umount", mount.daemon.mountpoint)
        assert out == f"unmounted {mount.daemon.mountpoint}\n", out
        assert not pid_running(mount.daemon.pid)
        mount.stack.close()
        self.note(f"umount {mount.slot}")

    def kill(self) -> None:
        """kill -9 of a daemon; ``umount`` detaches its dead mount, and a new daemon on the
        same mount point (most often) serves from the cache it filled."""
        if not self.mounts:
            return
        mount = self.mounts.pop(self.rng.choice(sorted(self.mounts)))
        mount.daemon.kill()
        self.snapfs.ok("umount", mount.daemon.mountpoint)
        mount.stack.close()
        self.note(f"kill -9 of {mount.slot}")
        if self.rng.random() < 0.7:
            self.mount(mount.slot)

    def any_mount(self) -> Mount:
        if not self.mounts:
            self.mount()
        return self.settled(self.rng.choice(sorted(self.mounts)))

    def settled(self, slot: str) -> Mount:
        """``slot``'s mount once it serves exactly the model's snapshots: new ones appear and
        deleted ones go at its next refresh, which a listing asks for. A name taken again
        must mean the new snapshot (its mtime says which)."""
        mount = self.mounts[slot]
        want = {f"{name}.img": snap.mtime_ns for name, snap in self.snaps.items()}
        known = {k: v for k, v in want.items() if k.removesuffix(".img") not in self.unlisted}

        def served() -> dict[str, int]:
            with os.scandir(mount.daemon.images) as entries:
                return {e.name: e.stat().st_mtime_ns for e in entries}

        try:
            wait_for(lambda: served() in (want, known), 30,
                     f"{slot} to serve the model's snapshots")
        except AssertionError:
            raise AssertionError(f"{slot} serves {sorted(served())}, the model has "
                                 f"{sorted(want)}; {self.history()}") from None
        return mount

    # -- reading ---------------------------------------------------------------------------

    def some_read(self, mount: Mount, name: str | None = None,
                  direct: bool | None = None) -> Read:
        """A read of a random kind: unaligned, across blocks, past the end, small or large."""
        name = name or self.rng.choice(sorted(self.snaps.keys() - self.unlisted))
        size = len(self.snaps[name].content)
        kind = self.rng.random()
        if kind < 0.3:
            offset = self.rng.randrange(0, -(-size // BS)) * BS
        elif kind < 0.4:
            offset = max(0, size - self.rng.randrange(1, 2 * BS))  # across the end
        elif kind < 0.45:
            offset = size + self.rng.randrange(0, BS)  # past it
        else:
            offset = self.rng.randrange(0, size)
        length = self.rng.choice([1, 511, 4096, BS - 1, BS, BS + 1, 3 * BS + 7,
                                  self.rng.randrange(1, 8 * BS), self.rng.randrange(1, 2 * MiB)])
        if direct is None:
            direct = self.rng.random() < 0.5
        return Read(mount, name, offset, length, direct)

    def run_here(self, read: Read) -> Read:
        """Do ``read`` in this process."""
        try:
            data = pread(read.mount.image(read.name), read.offset, read.length, read.direct)
        except OSError as e:
            read.error = e.errno
            return read
        read.got = len(data)
        read.right = data == self.snaps[read.name].content[read.offset : read.offset + len(data)]
        return read

    def run_threads(self, batches: list[list[Read]]) -> None:
        """Each batch on a thread of its own, all at once; a read that never returns fails."""
        def run(batch: list[Read]) -> None:
            for read in batch:
                self.run_here(read)

        # daemon threads: a read that hangs must not hold up the test's exit as well
        threads = [threading.Thread(target=run, args=(batch,), daemon=True) for batch in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(HUNG)
            assert not thread.is_alive(), f"a read hung; {self.history()}"

    def start_process(self, reads: list[Read]) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", READER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps([[str(r.mount.image(r.name)), r.offset, r.length, r.direct]
                                     for r in reads]))
        proc.stdin.close()
        return proc

    def finish_process(self, proc: subprocess.Popen[str], reads: list[Read]) -> None:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                proc.wait(HUNG)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a read hung; {self.history()}") from None
            out, err = proc.stdout.read(), proc.stderr.read()
            assert proc.returncode == 0, err
        finally:
            abandon(proc)
        for read, (got, digest) in zip(reads, json.loads(out), strict=True):
            if got < 0:
                read.error = -got
            else:
                content = self.snaps[read.name].content
                read.got = got
                read.right = digest == hashlib.sha256(
                    content[read.offset : read.offset + got]).hexdigest()

    def blocks_in(self, name: str, start: int, end: int) -> list[bytes]:
        content = self.snaps[name].content
        first, stop = max(0, start) // BS, -(-min(end, len(content)) // BS)
        return [content[n * BS : (n + 1) * BS] for n in range(first, stop)]

    def may_fail(self, name: str, start: int, end: int) -> bool:
        """Whether a read of bytes ``start`` .. ``end`` may fail: it needs a block that cannot
        or may not come back."""
        if self.anything_may_fail or name in self.unsure_maps | self.unreadable_maps:
            return True
        return any(b in self.unreadable or b in self.unsure
                   for b in self.blocks_in(name, start, end) if not is_zero(b))

    def must_fail(self, name: str, start: int, end: int) -> bytes | None:
        """A block that no read of bytes ``start`` .. ``end`` may return, if there is one
        (empty: the block map)."""
        if name in self.unreadable_maps and start < min(end, len(self.snaps[name].content)):
            return b""
        return next((b for b in self.blocks_in(name, start, end)
                     if b in self.unreadable and not is_zero(b)), None)

    def judge(self, read: Read) -> None:
        """The outcome of ``read`` against the model (see the module docstring)."""
        content = self.snaps[read.name].content
        end = min(len(content), read.offset + read.length)
        want = max(0, end - read.offset)
        # a buffered read also fails where the kernel's read-ahead around it did
        reach = 0 if read.direct else KERNEL_READ_AHEAD
        where = f"{read}; {self.history()}"
        if read.error is not None:
            assert read.error == errno.EIO, f"{errno.errorcode[read.error]} from {where}"
            assert self.may_fail(read.name, read.offset - reach, end + reach), \
                f"EIO from {where}, where every block can be read"
            return
        assert read.got is not None
        assert read.right, f"wrong bytes from {where}"
        assert read.got <= want, f"{read.got} bytes from {where}"
        lost = self.must_fail(read.name, read.offset, read.offset + read.got)
        while lost is not None:
            assert self.recheck is not None and self.recheck(lost), \
                f"{where} returned a block that no cache holds and the store cannot give"
            lost = self.must_fail(read.name, read.offset, read.offset + read.got)
        if read.got < want:
            assert self.may_fail(read.name, read.offset + read.got, end + reach), \
                f"{read.got} bytes of {want} from {where}, where every block can be read"

    def read_random(self) -> None:
        mount = self.any_mount()
        reads = [self.run_here(self.some_read(mount)) for _ in range(6)]
        for read in reads:
            self.judge(read)
        self.note(f"6 random reads on {mount.slot}")

    def read_stream(self) -> None:
        """A sequential reader (buffered: the daemon's read-ahead buffers serve it) from a
        random place to the end, in pieces of one size."""
        mount = self.any_mount()
        name = self.rng.choice(sorted(self.snaps))
        content = self.snaps[name].content
        start = self.rng.choice([0, 0, self.rng.randrange(0, len(content))])
        piece = self.rng.choice([4096, 65536 + 512, 128 * 1024, MiB, 3 * MiB])
        with open(mount.image(name), "rb", buffering=0) as f:
            f.seek(start)
            at = start
            while chunk := f.read(piece):
                assert chunk == content[at : at + len(chunk)], \
                    f"stream of {name} on {mount.slot} from {start}: wrong at {at}; {self.history()}"
                at += len(chunk)
        assert at == len(content), (name, at, len(content))
        self.note(f"stream {name} on {mount.slot} from {start} by {piece}")

    def read_concurrent(self) -> None:
        """Threads and processes reading at once, through every mount."""
        if len(self.mounts) < 2 and self.rng.random() < 0.5:
            self.mount()
        mounts = [self.any_mount()] + [self.settled(s) for s in sorted(self.mounts)]
        threads = [[self.some_read(self.rng.choice(mounts)) for _ in range(5)] for _ in range(3)]
        procs = [[self.some_read(self.rng.choice(mounts)) for _ in range(5)] for _ in range(2)]
        started = [self.start_process(batch) for batch in procs]
        self.run_threads(threads)
        for proc, batch in zip(started, procs, strict=True):
            self.finish_process(proc, batch)
        for read in [r for batch in threads + procs for r in batch]:
            self.judge(read)
        self.note(f"3 threads and 2 processes reading on {sorted(self.mounts)}")

    def read_during(self) -> None:
        """Readers in processes of their own while a command changes the repository under
        the mounts: a snapshot, or a delete, forget or prune, whose garbage collection
        rewrites mostly-dead packs and deletes the old ones (a daemon reads their blocks
        where they went)."""
        mounts = [self.any_mount()] + [self.settled(s) for s in sorted(self.mounts)]
        action = self.rng.choice(["delete", "forget", "prune", "snapshot"])
        plan = self.forget_plan() if action == "forget" else None
        doomed = plan[2] if plan else self.some_to_delete() if action == "delete" else []
        survivors = [n for n in self.snaps if n not in doomed]
        batches = [[self.some_read(self.rng.choice(mounts), self.rng.choice(survivors))
                    for _ in range(6)] for _ in range(3)]
        procs = [self.start_process(batch) for batch in batches]
        try:
            if plan:
                self.do_forget(*plan)
            elif doomed:
                self.do_delete(doomed)
            elif action == "snapshot":
                self.snapshot()
            else:
                self.prune()
        except BaseException:
            for proc in procs:
                abandon(proc)
            raise
        for proc, batch in zip(procs, batches, strict=True):
            self.finish_process(proc, batch)
        for read in [r for batch in batches for r in batch]:
            self.judge(read)
        self.note(f"3 processes read {survivors} meanwhile")

    # -- faults ----------------------------------------------------------------------------

    def fault(self) -> None:
        if self.seaweed is not None and self.rng.random() < 0.6:
            self.outage()
        else:
            self.damage()

    def block_id(self, plain: bytes) -> bytes:
        return self.repo.keyer.block_id(plain)

    def fresh_block(self) -> tuple[str, bytes, list[int]]:
        """A block no snapshot has, written at one or two places of an image: which image,
        the block, and the places (block numbers)."""
        label = self.rng.choice(LABELS)
        fresh = self.rng.randbytes(BS)
        model = self.images[label]
        places = self.rng.sample(range(len(model) // BS), self.rng.choice([1, 2]))
        with open(self.paths[label], "r+b") as f:
            for n in places:
                f.seek(n * BS)
                f.write(fresh)
                model[n * BS : (n + 1) * BS] = fresh
        self.note(f"fresh block at {places} of {label}")
        return label, fresh, places

    def damage(self) -> None:
        """One stored block (or the block map of a snapshot) damaged in its pack, while fresh
        daemons serve it: reads that need it fail, every other read is right, ``verify``
        names each snapshot that needs it; once the byte is put back, the same reads are
        right."""
        self.faults["damage"] += 1
        for slot in sorted(self.mounts):
            self.umount(slot)  # no daemon holds the block in memory: only the cache could
        label, fresh, places = self.fresh_block()
        name = self.snapshot(label)
        in_map = self.rng.random() < 0.3  # its block map (it has no other snapshot's)
        victims = [fresh]
        # and, at times, a block the cache holds: read from there all the same
        by_id = {self.block_id(b): b for s in self.snaps.values() for b in blocks_of(s.content)
                 if not is_zero(b)}
        held = sorted(cached(self.cache_dir, by_id))
        pick = self.rng.random()  # drawn whatever the cache holds: the history stays the same
        if held and pick < 0.5:
            victims.append(by_id[held[int(pick * 2 * len(held))]])
        assert not cached(self.cache_dir, [self.block_id(fresh)])
        index = self.repo.load_index()
        flipped = []
        page = bytes.fromhex(self.repo.resolve(name).pages[0])
        for blob in [page if in_map else self.block_id(fresh)] + \
                [self.block_id(plain) for plain in victims[1:]]:
            loc = index.locate(blob)
            flipped.append((pack_key(loc.pack), loc.offset + HEADER_SIZE + loc.length // 2))
            flip_byte(self.store, *flipped[-1])
        for _ in range(self.rng.choice([1, 2])):
            self.mount()
        small = any(m.near_eviction for m in self.mounts.values())
        if in_map:
            self.unreadable_maps = {name}
        else:
            self.unreadable = {fresh}
        self.unsure = set(victims[1:]) if small else set()
        self.note(f"damage {'the block map of ' + name if in_map else 'a block of ' + name}"
                  f"{' and a cached block' if victims[1:] else ''}")
        exact = [Read(m, name, n * BS, BS, direct=True) for m in self.mounts.values()
                 for n in places]
        try:
            for read in exact:  # the damaged block itself, on every mount: EIO
                assert self.run_here(read).error == errno.EIO, f"{read}; {self.history()}"
            self.fault_reads()
            result = self.snapfs("verify", "--json")
            assert result.returncode == EXIT_INTEGRITY, (result.stdout, result.stderr)
            report = json.loads(result.stdout)
            named = {re.match(r"snapshot (\S+) \(", p).group(1)  # type: ignore[union-attr]
                     for p in report["problems"]}
            assert named == {n for n, s in self.snaps.items()
                             if set(victims) & set(blocks_of(s.content))}, \
                (report["problems"], self.history())
            for mount in self.mounts.values():
                assert mount.daemon.stats()["hydrator"]["corrupt_blocks"] >= 1, self.history()
        finally:
            for key, offset in flipped:
                flip_byte(self.store, key, offset)  # the same byte again: as it was
        self.unreadable, self.unsure, self.unreadable_maps = set(), set(), set()
        self.note("damage undone")
        for read in exact:
            self.judge(self.run_here(dataclasses.replace(read, error=None)))
        self.fault_reads()

    def outage(self) -> None:
        """SeaweedFS killed while mounts read: what a cache holds reads on, what none holds
        fails with EIO in bounded time, and once the server is back every read is right."""
        assert self.seaweed is not None
        self.faults["outage"] += 1
        if not self.mounts:
            self.mount()
        for slot in sorted(self.mounts):
            self.settled(slot)
        for _ in range(3):  # something in the cache to read on with
            self.judge(self.run_here(self.some_read(self.any_mount(), direct=False)))
        # a snapshot the mounts serve whose new blocks are in no cache (unless a sweep is
        # quick), and one they have not listed yet
        label, _, listed_at = self.fresh_block()
        listed = self.snapshot(label)
        for slot in sorted(self.mounts):
            self.settled(slot)
        label, _, places = self.fresh_block()
        new = self.snapshot(label)
        self.unlisted = {new}
        listing = {root.name: root for root in self.repo.list_snapshots().roots}
        pages = {name: {bytes.fromhex(p) for p in listing[name].pages} - {ZERO_ID}
                 for name in self.snaps}
        by_id = {self.block_id(b): b for s in self.snaps.values() for b in blocks_of(s.content)
                 if not is_zero(b)}
        self.seaweed.crash()
        self.note("SeaweedFS killed")
        try:
            held = cached(self.cache_dir, {*by_id, *(p for ids in pages.values() for p in ids)})
            lacking = {by_id[b] for b in by_id.keys() - held}
            if any(m.near_eviction for m in self.mounts.values()):
                # an eviction may take what a read needs, and a daemon keeps what it
                # fetched lately in memory: anything may or may not come back
                self.anything_may_fail = True
                self.unsure = lacking
            else:
                self.unreadable = lacking
                self.unsure_maps = {n for n, ids in pages.items() if not ids <= held}
                self.recheck = self.moved_in
            self.note(f"{len(lacking)} blocks in no cache"
                      f"{' (and others may be evicted)' if self.anything_may_fail else ''}")
            self.fault_reads()
            for mount in self.mounts.values():
                for n in listed_at:
                    self.judge(self.run_here(Read(mount, listed, n * BS, BS, direct=True)))
                if self.look_up_unlisted(mount, new):  # listed before the store went down
                    for n in places:
                        self.judge(self.run_here(Read(mount, new, n * BS, BS, direct=True)))
            for mount in self.mounts.values():  # up, and answering
                assert pid_running(mount.daemon.pid)
                assert mount.daemon.stats()["hydrator"]["failed_requests"] >= 0
        finally:
            self.seaweed.restart()
            wait_until_packs_read(self.store)
        # Fetches that failed while the server came back are remembered for half a second
        # (README): until the reads that failed work again, any read may still fail.
        self.unreadable, self.unsure_maps, self.unlisted = set(), set(), set()
        self.anything_may_fail = True
        self.recheck = None
        failed = [r for r in self.last_reads if r.error is not None]
        wait_for(lambda: all(self.again(r).error is None for r in failed), 30,
                 "the reads that failed to work again")
        self.anything_may_fail = False
        self.note(f"SeaweedFS back; {len(failed)} reads that failed work again")
        for read in failed:
            self.again(read)
        self.fault_reads()

    def look_up_unlisted(self, mount: Mount, name: str) -> bool:
        """While the store is down, a name the mount does not serve is not said not to exist:
        a lookup fails with EIO (ENOENT only within the refresh interval of a refresh that
        succeeded, which the lookup does not repeat), or finds it (listed before): whether
        it did."""
        def looked_up() -> int:
            try:
                os.stat(mount.image(name))
            except OSError as e:
                return e.errno
            return 0

        wait_for(lambda: looked_up() != errno.ENOENT, 30,
                 f"a lookup of {name} on {mount.slot} to fail otherwise than with ENOENT")
        got = looked_up()
        assert got in (0, errno.EIO), f"{errno.errorcode[got]}; {self.history()}"
        return got == 0

    def again(self, read: Read) -> Read:
        """``read`` once more, judged."""
        read = dataclasses.replace(read, got=None, right=False, error=None)
        self.run_here(read)
        self.judge(read)
        return read

    def moved_in(self, plain: bytes) -> bool:
        """A block that a read returned while the model had it out of reach: it must have been
        on its way into the cache when the store went down (the cache holds it now)."""
        if not cached(self.cache_dir, [self.block_id(plain)]):
            return False
        self.unreadable.discard(plain)
        return True

    def fault_reads(self) -> None:
        """Reads while a fault lasts (or just after): about half of them where a block is out
        of reach, the rest anywhere, on a thread and in a process at once."""
        mounts = [self.settled(s) for s in sorted(self.mounts)]
        spots = [(name, n * BS) for name, snap in self.snaps.items()
                 for n, b in enumerate(blocks_of(snap.content))
                 if b in self.unreadable or b in self.unsure or name in self.unreadable_maps]
        reads = []
        for _ in range(12):
            read = self.some_read(self.rng.choice(mounts))
            aim, shift = self.rng.random(), self.rng.randrange(-BS, BS)
            if spots and aim < 0.5:
                name, at = spots[int(aim * 2 * len(spots))]
                if name not in self.unlisted:
                    read.name, read.offset = name, max(0, at + shift)
            reads.append(read)
        here, there = reads[:6], reads[6:]
        proc = self.start_process(there)
        self.run_threads([here])
        self.finish_process(proc, there)
        for read in reads:
            self.judge(read)
        self.last_reads = reads
        self.note(f"12 reads during the fault: {sum(r.error is not None for r in reads)} failed")

    # -- the end ---------------------------------------------------------------------------

    def read_all(self, mount: Mount) -> None:
        self.settled(mount.slot)
        for name, snap in self.snaps.items():
            got = mount.image(name).read_bytes()
            if got != snap.content:
                bad = first_difference(got, snap.content)
                raise AssertionError(f"{name} on {mount.slot} ({len(got)} bytes, modelled "
                                     f"{len(snap.content)}) differs from byte {bad}; "
                                     + self.history())

    def check_figures(self) -> None:
        """A fresh cache, one daemon without the sweep, every snapshot read whole: its
        figures against the model's distinct blocks and block maps."""
        self.cache_dir = self.tmp / "fresh-cache"
        mount = self.mount("mnt0", ["--no-background", "--refresh-interval", "0.5"])
        assert mount is not None
        self.read_all(mount)
        images = {name: blocks_of(s.content) for name, s in self.snaps.items()}
        data = {b for blocks in images.values() for b in blocks if not is_zero(b)}
        maps = {tuple(None if is_zero(b) else b for b in blocks) for blocks in images.values()}
        maps = {m for m in maps if any(m)}  # a map of holes alone is no stored page
        distinct = len(data) + len(maps)  # every image fits one page of the block map
        doc = self.snapfs.json("stats", mount.daemon.mountpoint)
        hydrator = doc["hydrator"]
        fetched, around = hydrator["blocks_fetched"], hydrator["read_around_blocks"]
        where = f"{hydrator}; {len(data)} data blocks, {len(maps)} pages; {self.history()}"
        assert fetched >= distinct, where  # every block read came from the store once ...
        assert fetched - around <= distinct, where  # ... and only once
        assert (hydrator["corrupt_blocks"], hydrator["failed_requests"]) == (0, 0), where
        assert set(doc["images"]) == {f"{n}.img" for n in self.snaps}, where

        def scanned() -> bool:
            images_now = mount.daemon.stats()["images"]
            return all(i["data_blocks"] is not None and i["blocks_missing"] == 0
                       for i in images_now.values())

        try:
            wait_for(scanned, 60, "every image scanned and hydrated")
        except AssertionError:
            raise AssertionError(f"not every image scanned and hydrated: "
                                 f"{mount.daemon.stats()['images']}; {self.history()}") from None
        for name, stats in mount.daemon.stats()["images"].items():
            blocks = images[name.removesuffix(".img")]
            assert stats["size"] == sum(len(b) for b in blocks), (name, stats)
            assert stats["data_blocks"] == len({b for b in blocks if not is_zero(b)}), \
                (name, stats, self.history())
        self.umount("mnt0")


STEP_WEIGHTS = [("change", 10), ("snapshot", 10), ("delete", 4), ("forget", 2), ("prune", 2),
                ("mount", 5), ("umount", 2), ("kill", 2), ("read_random", 12),
                ("read_stream", 5), ("read_concurrent", 4), ("read_during", 4), ("fault", 2)]


def run_history(snapfs: Snapfs, store: ObjectStore, seed: int, tmp: Path, steps: int,
                seaweed: Any | None) -> None:
    rng = random.Random(seed)
    history = History(snapfs, store, rng, tmp, seaweed)
    kinds = [k for k, _ in STEP_WEIGHTS]
    weights = [w for _, w in STEP_WEIGHTS]
    try:
        for label in LABELS:
            history.snapshot(label)
        while history.steps < steps:
            kind = rng.choices(kinds, weights)[0]
            if history.steps == steps // 2:  # every history has one fault at least: on S3,
                # an outage
                if seaweed is not None and not history.faults["outage"]:
                    kind = "outage"
                elif not any(history.faults.values()):
                    kind = "damage"
            getattr(history, kind)()
            history.steps += 1
        if not history.mounts:
            history.mount()
        for mount in list(history.mounts.values()):
            history.read_all(mount)
        for slot in sorted(history.mounts):
            history.umount(slot)
        report = snapfs.json("verify")
        assert report["ok"] is True, report
        listed = [s["name"] for s in snapfs.json("snapshot", "list")]
        assert listed == list(history.snaps), (listed, history.history())
        history.check_figures()
    finally:
        for mount in history.mounts.values():
            mount.stack.close()


def test_a_random_history_of_mounts_reads_back_as_its_model(
        store_url: str, store_endpoint: str | None, make_store: Callable[..., ObjectStore],
        tmp_path: Path, runtime_dir: Path, request: pytest.FixtureRequest) -> None:
    s3 = store_url.startswith("s3://")
    snapfs = Snapfs(store_url, store_endpoint, make_env(runtime_dir, request, s3))
    seaweed = request.getfixturevalue("seaweed") if s3 else None
    steps = int(os.environ.get("SNAPFS_HISTORY_STEPS", STEPS))
    # a history of its own for each store: locally a damaged block that a cache holds too,
    # on S3 an outage while 78 blocks are in no cache
    for seed in seeds(22 if s3 else 2):
        url = f"{store_url}-{seed}"
        run = snapfs.with_repo(url)
        run.ok("init")
        tmp = tmp_path / f"seed-{seed}"
        tmp.mkdir()
        try:
            run_history(run, make_store(url), seed, tmp, steps, seaweed)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}") from None
