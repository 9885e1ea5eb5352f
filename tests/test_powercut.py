"""Power cuts, for real: what a host's snapfs state keeps when the machine loses power.

kill -9 (``test_disks``) keeps the kernel's page cache; a power cut loses everything that had
not reached the device. Here the mount daemon's cache directory (block cache and disk state)
and its repository (a local directory store, so that it is cut at the same instant) live on an
ext4 file system whose device is a loop device over a file on XFS with reflink
(``powercut.Rig``). A cut clones that file (FICLONE) while the daemon and the
writers run; the clone holds what the device had received, neither more nor less: everything
an fsync flushed and whatever writeback sent, nothing that sat only in ext4's page cache
(``test_a_cut_keeps_what_was_flushed_and_loses_what_was_not`` checks that on every run: a
write fsync'd before the clone is in it, one neither fsync'd nor written back is not). That is
a power cut as seen by a device that keeps every write it received (one with a volatile cache
may also lose writes it was never told to flush, which is ext4's journal's and fsync's part to
cover, not snapfs's). Writeback that was under way at the cut is made on purpose
(``powercut.write_back``, what the flusher does to a file: pages to the device, no journal
commit), since the kernel may write any dirty page back at any moment, in any order.

Each cut is mounted on a loop device of its own (ext4 replays its journal), and a fresh daemon
is started on it as after a reboot (``SNAPFS_BOOT_ID``: the state must believe the machine
rebooted). Then the promise is checked there:

- every write an fsync acknowledged before the cut reads back (each 4 KiB unit of the disks
  carries its number and a version; a later write that was not acknowledged may be there too,
  whole, and nothing else: never zeros or the bytes of another unit);
- the changed blocks are not lost: the next snapshot of the disks is byte for byte the disks
  as they read (``export``), so everything written since their base is in it;
- the block cache serves nothing wrong: the base snapshot's image reads as the source image;
- a snapshot whose upload was cut (at its closing, in the middle, the moment its root was
  stored with the daemon stopped right there, and after its end) is stored whole after the
  restart, exactly once, and the daemon knows it (the disk's next snapshot is incremental to
  it); the repository ``verify``s clean, and holds no other snapshot.

Each of these found a loss before the fixes that came with them (see git log): blocks that
read as zeros after a cut because another disk's fsync made their marks durable before their
bytes, a snapshot closed with ``--no-wait`` that vanished, a stored snapshot reported failed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from diskimages import random_image, same_bytes, write_blocks
from mountutil import MOUNTS, Served, mounted, wait_for
from powercut import Rig, have_tools, rig
from testkit import Snapfs

pytestmark = [*MOUNTS, pytest.mark.skipif(not have_tools(), reason="needs mkfs.xfs (xfsprogs)")]

MiB = 1 << 20
BS = 16 * 1024  # the repository's block size
UNIT = 4096  # what a writer writes and versions: a quarter of a block
MAGIC = b"pcut-unt"
BASE_SIZE = 8 * MiB


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def power(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with rig(tmp_path_factory.mktemp("power")) as r:
        yield r


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 MiB of random bytes with a few zero blocks: every unit a writer has not written reads
    as something no writer writes."""
    path = random_image(tmp_path_factory.mktemp("pc-base") / "base.img", BASE_SIZE, seed=71)
    with open(path, "r+b") as f:
        for n in (3, 40, 41, 300):
            f.seek(n * BS)
            f.write(bytes(BS))
    return path


@dataclasses.dataclass
class Host:
    """A repository and a cache directory on the rig's file system (``root``)."""

    root: Path
    env: dict[str, str]

    def snapfs(self) -> Snapfs:
        return Snapfs(str(self.root / "repo"), None, self.env)

    def cache(self) -> Path:
        return self.root / "cache"

    def state_files(self) -> list[Path]:
        """The data files of the disks' lmdb environments (state, and journal if any)."""
        return sorted((self.cache() / "disks").glob("*/*.lmdb/data.mdb"))

    def cache_index(self) -> Path:
        return self.cache() / "index.lmdb" / "data.mdb"


@pytest.fixture
def host(power: Rig, base_image: Path, runtime_dir: Path) -> Iterator[Host]:
    """A repository holding ``base_image`` as ``vm-1``, on the rig; removed afterwards."""
    root = power.inner / uuid.uuid4().hex[:8]
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SNAPFS_"))}
    env["SNAPFS_RUNTIME_DIR"] = str(runtime_dir)
    h = Host(root, env)
    h.snapfs().ok("init")
    h.snapfs().ok("snapshot", "create", base_image, "--name", "vm-1")
    try:
        yield h
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def rebooted(power: Rig, host: Host, clone: Path, where: Path, *args: Any) -> Iterator[Served]:
    """A daemon started on the file system of ``clone`` as after a reboot."""
    env = dict(host.env, SNAPFS_BOOT_ID=f"after-{clone.name}-{uuid.uuid4().hex}")
    with power.opened(clone, where / "fs") as fs:
        root = fs / host.root.name
        snapfs = Snapfs(str(root / "repo"), None, env)
        with mounted(snapfs, where / "mnt", root / "cache", *args) as daemon:
            yield Served(snapfs, daemon, where)


# -- versioned writes --------------------------------------------------------------------------


def unit_bytes(unit: int, version: int) -> bytes:
    """What version ``version`` (1, 2, ...) of 4 KiB unit ``unit`` holds."""
    head = MAGIC + struct.pack("<II", unit, version)
    return head + random.Random(unit << 32 | version).randbytes(UNIT - len(head))


@dataclasses.dataclass
class Versions:
    """Per unit of one disk: the last version written (``issued``) and the last one an fsync
    acknowledged (``acked``)."""

    issued: dict[int, int] = dataclasses.field(default_factory=dict)
    acked: dict[int, int] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def copy(self) -> tuple[dict[int, int], dict[int, int]]:
        with self.lock:
            return dict(self.issued), dict(self.acked)


class VersionedWriter(threading.Thread):
    """Writes new versions of random units of a disk (single units, and sometimes the four of
    one block in one write), and fsyncs every ``fsync_every`` writes."""

    def __init__(self, path: Path, units: int, fsync_every: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.units = units
        self.fsync_every = fsync_every
        self.rng = random.Random(seed)
        self.versions = Versions()
        self.writes = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            unsynced: dict[int, int] = {}
            while not self._halt.is_set():
                if self.rng.random() < 0.25:  # a whole block
                    first = self.rng.randrange(self.units // 4) * 4
                    units = list(range(first, first + 4))
                else:
                    units = [self.rng.randrange(self.units)]
                with self.versions.lock:
                    new = {u: self.versions.issued.get(u, 0) + 1 for u in units}
                    self.versions.issued.update(new)
                data = b"".join(unit_bytes(u, v) for u, v in new.items())
                assert os.pwrite(fd, data, units[0] * UNIT) == len(data)
                unsynced.update(new)
                self.writes += 1
                if self.writes % self.fsync_every == 0:
                    os.fsync(fd)
                    with self.versions.lock:
                        self.versions.acked.update(unsynced)
                    unsynced.clear()
        except BaseException as e:  # noqa: B036 - reported by stop()
            self.error = e
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._halt.set()
        self.join(60)
        assert not self.is_alive(), "the writer hangs"
        assert self.error is None, self.error


def check_units(image: bytes, base: bytes, acked: dict[int, int], issued: dict[int, int],
                where: str) -> int:
    """Every unit of a disk's bytes holds its base bytes (if no version was acknowledged) or a
    whole version between the acknowledged one and the last one issued. Returns how many hold
    a version that was issued but not acknowledged before the cut."""
    assert len(image) == len(base)
    later = 0
    for u in range(len(image) // UNIT):
        got = image[u * UNIT : (u + 1) * UNIT]
        low = acked.get(u, 0)
        if got[: len(MAGIC)] != MAGIC:
            assert low == 0, f"{where}: unit {u}: version {low} was acknowledged, it reads base bytes"
            assert got == base[u * UNIT : (u + 1) * UNIT], \
                f"{where}: unit {u} reads neither a version written nor its base bytes" + (
                    " but zeros" if got == bytes(UNIT) else "")
            continue
        unit, version = struct.unpack_from("<II", got, len(MAGIC))
        assert unit == u, f"{where}: unit {u} holds unit {unit}'s version {version}"
        assert got == unit_bytes(u, version), f"{where}: unit {u}: version {version} is torn"
        assert low <= version <= issued.get(u, 0), \
            f"{where}: unit {u}: version {version}, acknowledged {low}, issued {issued.get(u, 0)}"
        later += version > low
    return later


@dataclasses.dataclass
class Cut:
    clone: Path
    acked: dict[str, dict[int, int]]  # per disk, before the clone began
    issued: dict[str, dict[int, int]]  # per disk, once it was taken


def cut_now(power: Rig, writers: dict[str, VersionedWriter], *writeback: tuple[Path, int, int]
            ) -> Cut:
    acked = {name: w.versions.copy()[1] for name, w in writers.items()}
    clone = power.cut(*writeback)
    issued = {name: w.versions.copy()[0] for name, w in writers.items()}
    return Cut(clone, acked, issued)


# -- the rig itself ----------------------------------------------------------------------------


def test_a_cut_keeps_what_was_flushed_and_loses_what_was_not(power: Rig, tmp_path: Path) -> None:
    d = power.inner / f"probe-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        kept, sent = d / "kept", d / "sent"
        for path in (kept, sent):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, b"A" * 8192, 0)
                os.fsync(fd)
                os.pwrite(fd, (b"B" if path == kept else b"C") * 4096, 4096)
            finally:
                os.close(fd)
        (d / "never-flushed").write_bytes(b"D" * 4096)
        clone = power.cut((sent, 0, 0))  # the flusher got to this file only
        with power.opened(clone, tmp_path / "fs") as fs:
            assert (fs / d.name / "kept").read_bytes() == b"A" * 8192
            assert (fs / d.name / "sent").read_bytes() == b"A" * 4096 + b"C" * 4096
            assert not (fs / d.name / "never-flushed").exists()
    finally:
        shutil.rmtree(d)


# -- disks written through a cut ---------------------------------------------------------------


def test_fsynced_writes_and_their_changed_blocks_survive_power_cuts_while_disks_are_written(
    power: Rig, host: Host, base_image: Path, tmp_path: Path
) -> None:
    """Two disks, one fsync'd often and one seldom, written while the daemon hydrates their
    base in the background; cut three times: as it is, in the middle of writing back the disk
    state and the cache index (their data pages reached the device, their first pages, lmdb's
    meta pages, not), and with only those first pages and half of an overlay written back."""
    base = base_image.read_bytes()
    snapfs = host.snapfs()
    cuts: list[Cut] = []
    with mounted(snapfs, tmp_path / "mnt", host.cache(), "--hydrate-rate", "2") as daemon:
        snapfs.ok("disk", "create", "a", "--from", "vm-1")
        snapfs.ok("disk", "create", "b", "--from", "vm-1")
        disks = daemon.mountpoint / "disks"
        writers = {"a": VersionedWriter(disks / "a.img", BASE_SIZE // UNIT, 200, seed=1),
                   "b": VersionedWriter(disks / "b.img", BASE_SIZE // UNIT, 7, seed=2)}
        for w in writers.values():
            w.start()
        try:
            overlay = next((host.cache() / "disks").glob("*/*.overlay"))
            lmdbs = [*host.state_files(), host.cache_index()]
            head = 2 * 4096  # lmdb's two meta pages
            for delay, writeback in [
                (0.8, []),
                (0.6, [(f, head, 0) for f in lmdbs]),
                (0.6, [*((f, 0, head) for f in lmdbs), (overlay, 0, BASE_SIZE // 2)]),
            ]:
                time.sleep(delay)
                cuts.append(cut_now(power, writers, *writeback))
        finally:
            for w in writers.values():
                w.stop()
        assert all(w.writes > 10 for w in writers.values()), {n: w.writes for n, w in writers.items()}

    for i, cut in enumerate(cuts):
        with rebooted(power, host, cut.clone, tmp_path / f"cut{i}") as s:
            listed = s.disks()
            assert set(listed) == {"a", "b"}
            for name in ("a", "b"):
                check_units(s.disk(name).read_bytes(), base, cut.acked[name], cut.issued[name],
                            f"cut {i}, disk {name}")
            assert s.mountpoint.joinpath("snapshots", "vm-1.img").read_bytes() == base
            log = s.daemon.log.read_text()
            assert "starting an empty cache" in log  # the daemon had it open: maybe torn
            assert "compares checksums instead" in log  # marks since the last fsync: gone
            copies = {name: s.copy(name, "now") for name in ("a", "b")}
            task = s.snapfs.json("snapshot", "create", "--disk", "a", "--disk", "b",
                                 "--name", "after")
            assert task["state"] == "accomplished", task
            assert {p["snapshot"]["source"] for p in task["parts"]} == {"checksum comparison"}
            for name in ("a", "b"):
                assert same_bytes(s.export(f"after-{name}"), copies[name]), (i, name)
            s.snapfs.ok("verify")


# -- an upload cut -----------------------------------------------------------------------------


def test_a_snapshot_whose_upload_is_cut_is_stored_after_the_restart(
    power: Rig, host: Host, tmp_path: Path
) -> None:
    """A snapshot of a disk, with blocks written again (copy-on-write) after its closing; cut at
    once after the closing was acknowledged (``--no-wait``), in the middle of its upload, the
    moment its root was stored (the daemon stopped there: its state does not know), and after
    it was stored and another file's fsync committed ext4's journal (which holds the removal of
    its copy-on-write file). After each, the snapshot is stored whole, the disk keeps the
    writes after the closing, and the repository verifies clean."""
    snapfs = host.snapfs()
    nblocks = 512
    first = {n: random.Random(n).randbytes(BS) for n in range(nblocks - 12)}
    later = {n: random.Random(1000 + n).randbytes(BS) for n in (0, 5, 300)}
    cuts: list[tuple[Path, dict[int, bytes]]] = []
    with mounted(snapfs, tmp_path / "mnt", host.cache(), "--no-background",
                 "--simulate-bandwidth", "2MB/s") as daemon:
        snapfs.ok("disk", "create", "d", "--size", f"{nblocks * BS // MiB}M")
        disk = daemon.mountpoint / "disks" / "d.img"
        write_blocks(disk, first)
        at_closing = tmp_path / "at-closing.img"
        shutil.copyfile(disk, at_closing)
        task = snapfs.json("snapshot", "create", "--disk", "d", "--name", "up", "--no-wait")
        assert task["state"] == "progressing"
        cuts.append((power.cut(), {}))
        write_blocks(disk, later)

        def progress() -> dict[str, Any]:
            (doc,) = snapfs.json("snapshot", "list", "--disk", "d")
            return doc

        wait_for(lambda: (progress()["progress"] or {}).get("blocks_done", 0) > 0, 30,
                 "the upload to read blocks")
        cuts.append((power.cut(), later))
        root = host.root / "repo" / "snapshots" / task["parts"][0]["snapshot_id"]
        deadline = time.monotonic() + 60
        while not root.exists():  # polled closely: the daemon records it milliseconds later
            assert time.monotonic() < deadline, "the snapshot's root is not stored"
            time.sleep(0.0005)
        os.kill(daemon.pid, signal.SIGSTOP)  # before it records that (a durable commit)
        try:
            commit_journal(host.root)  # what the daemon's fsync of the directory did
            stored_root = root.read_bytes()
            cuts.append((power.cut(), later))
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        wait_for(lambda: progress()["state"] == "accomplished", 60, "the upload to end")
        commit_journal(host.root)
        cuts.append((power.cut(), later))

    for i, (clone, acked) in enumerate(cuts):
        with rebooted(power, host, clone, tmp_path / f"cut{i}") as s:
            wait_for(lambda s=s, i=i: stored(s, "up", f"cut {i}"), 60,
                     f"cut {i}: the snapshot to be stored")
            assert set(s.snapshots()) == {"vm-1", "up"}
            # and the daemon knows: the disk's next snapshot is incremental to it
            wait_for(lambda: not s.disks()["d"]["uploading"], 30, f"cut {i}: the upload's end")
            assert s.disks()["d"]["parent"] == s.snapshots()["up"]["id"], i
            if i == 2:  # taken as it was stored: a root is never written again
                assert "stored already" in s.daemon.log.read_text()  # the cut came before its end
                again = Path(s.snapfs.repo or "") / "snapshots" / root.name
                assert again.read_bytes() == stored_root
            assert same_bytes(s.export("up"), at_closing), i
            now = s.disk("d").read_bytes()
            for n, data in acked.items():
                assert now[n * BS : (n + 1) * BS] == data, (i, n)
            s.snapfs.ok("verify")


def stored(s: Served, name: str, where: str) -> bool:
    """Whether snapshot ``name`` is stored; it must be known, and must not have failed."""
    doc = s.snapshots().get(name)
    assert doc is not None, f"{where}: the snapshot closed before the cut is gone"
    assert doc["state"] != "failed", (where, doc)
    return bool(doc["state"] == "accomplished")


def commit_journal(directory: Path) -> None:
    """Commit the running transaction of ext4's journal (as any fsync on it does), and write
    nothing else back: an fsync of a small file of our own."""
    other = directory / "other"
    other.write_bytes(b"x")
    fd = os.open(other, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


