"""Writable disks against a model: a long random history of writes, snapshots, groups, new disks
from snapshots, rollbacks, deletions, prunes, restarts and kill -9 of the daemon, after each
step compared with plain bytes.

The model is a ``bytearray`` per disk and a ``bytes`` per snapshot, changed only by what a file
or a block device would do with the same calls. Each step of the history is drawn from a seeded
generator, so a failure names its seed and step, and runs again the same way. The test writes
through the mounted ``disks/NAME.img`` with ``os.pwrite`` (unaligned, across blocks, across the
disk's end, zeros over data), reads back through the same files and through
``snapshots/NAME.img``, and at the end exports every snapshot and compares the files.

It is the test that answers "does my disk come back exactly as it was" for histories nobody
wrote down by hand. Before a kill -9 every disk is fsync'd (only fsync promises durability),
and sometimes a snapshot is closed but not yet uploaded, which the next daemon must store.
The tests in ``test_disks.py`` check each rule on its own, with the kernel and ext4 in between.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mountutil import MOUNTS, Served, make_env, mounted
from testkit import Snapfs

pytestmark = MOUNTS
BS = 16 * 1024  # the repository's block size (snapfs init's default)
SIZE = 40 * BS + 3 * 512  # a short last block, as an image of any size in sectors has
STEPS = 70


def palette_image(rng: random.Random) -> bytes:
    """Blocks drawn from a few contents (so the store deduplicates them), some zero."""
    palette = [bytes(BS)] + [rng.randbytes(BS) for _ in range(5)]
    data = b"".join(rng.choice(palette) for _ in range(-(-SIZE // BS)))
    return data[:SIZE]


def some_bytes(rng: random.Random, n: int) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return bytes(n)  # zeros over data: the block may become a zero block again
    if kind < 0.3:
        return bytes([rng.randrange(256)]) * n
    return rng.randbytes(n)


class History:
    """The disks and snapshots as the model says they are, and the steps that change both."""

    def __init__(self, served: Served, rng: random.Random, tmp: Path) -> None:
        self.s = served
        self.rng = rng
        self.tmp = tmp
        self.disks: dict[str, bytearray] = {}
        self.snapshots: dict[str, bytes] = {}
        # the snapshots each disk was made from, rolled back to or snapshotted as: the only ones
        # `snapshot delete` may refuse to delete (a disk's base or parent)
        self.related: dict[str, set[str]] = {}
        self.pending: str | None = None  # a snapshot closed, then the daemon killed
        self.crashed = False
        self.count = 0  # names made so far
        self.steps = 0
        self.log: list[str] = []

    def note(self, what: str) -> None:
        self.log.append(what)

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    # -- steps -----------------------------------------------------------------------------

    def write(self) -> None:
        name = self.rng.choice(sorted(self.disks))
        model = self.disks[name]
        size = len(model)
        length = self.rng.choice([1, 17, BS - 1, BS, BS + 1, 3 * BS + 7,
                                  self.rng.randrange(1, 4 * BS)])
        if self.rng.random() < 0.3:
            offset = self.rng.randrange(0, -(-size // BS)) * BS  # block-aligned
        elif self.rng.random() < 0.1:
            offset = max(0, size - self.rng.randrange(1, 2 * BS))  # across the end
        else:
            offset = self.rng.randrange(0, size)
        data = some_bytes(self.rng, length)
        sync = self.rng.random() < 0.3
        fd = os.open(self.s.disk(name), os.O_RDWR)
        try:
            written = os.pwrite(fd, data, offset)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        # a disk's size is fixed: a write across its end writes what fits, as a device does
        assert written == min(length, size - offset), (name, offset, length, written)
        model[offset : offset + written] = data[:written]
        self.note(f"write {name} {offset}+{length} ({written} written){' fsync' if sync else ''}")

    def write_past_end(self) -> None:
        name = self.rng.choice(sorted(self.disks))
        fd = os.open(self.s.disk(name), os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x" * 10, len(self.disks[name]) + self.rng.randrange(0, BS))
        finally:
            os.close(fd)
        assert e.value.errno == errno.ENOSPC
        self.note(f"write past the end of {name}: ENOSPC")

    def read(self) -> None:
        name = self.rng.choice(sorted(self.disks))
        model = self.disks[name]
        offset = self.rng.randrange(0, len(model))
        length = self.rng.randrange(1, 5 * BS)
        with open(self.s.disk(name), "rb") as f:
            f.seek(offset)
            got = f.read(length)
        assert got == bytes(model[offset : offset + length]), \
            f"disk {name} at {offset}+{length} after: {self.log[-8:]}"

    def snapshot(self) -> None:
        names = sorted(self.disks)
        group = self.rng.sample(names, 2) if len(names) > 1 and self.rng.random() < 0.3 \
            else [self.rng.choice(names)]
        label = self.fresh("s")
        args: list[Any] = ["--name", label]
        for name in group:
            args += ["--disk", name]
        task = self.s.snapshot(*args)
        assert task["state"] == "accomplished", task
        made = {part["name"]: part for part in task["parts"]}
        for name in group:
            snap = label if len(group) == 1 else f"{label}-{name}"
            assert snap in made, (snap, made)
            self.snapshots[snap] = bytes(self.disks[name])
            self.related[name].add(snap)
        self.note(f"snapshot {group} as {sorted(made)}")

    def create(self) -> None:
        if len(self.disks) >= 4:
            return
        source = self.rng.choice(sorted(self.snapshots))
        name = self.fresh("d")
        args: list[Any] = ["disk", "create", name, "--from", source]
        content = bytearray(self.snapshots[source])
        if self.rng.random() < 0.3:
            grown = len(content) + 512 * self.rng.randrange(1, 96)  # whole sectors
            args += ["--size", str(grown)]
            content += bytes(grown - len(content))
        self.s.snapfs.ok(*args)
        self.disks[name] = content
        self.related[name] = {source}
        self.note(f"create {name} from {source} ({len(content)} bytes)")

    def rollback(self) -> None:
        name = self.rng.choice(sorted(self.disks))
        target = self.rng.choice(sorted(self.snapshots))
        self.s.snapfs.ok("disk", "rollback", name, target, "--yes")
        content = self.snapshots[target]
        model = self.disks[name]
        # a disk never shrinks: past the end of a smaller snapshot it reads zeros
        size = max(len(model), len(content))
        self.disks[name] = bytearray(content) + bytearray(size - len(content))
        self.related[name].add(target)
        self.note(f"rollback {name} to {target}")

    def delete_snapshot(self) -> None:
        if len(self.snapshots) < 2:
            return
        snap = self.rng.choice(sorted(self.snapshots))
        result = self.s.snapfs("snapshot", "delete", snap)
        if result.returncode == 0:
            del self.snapshots[snap]
            self.note(f"delete snapshot {snap}")
            return
        # refused: only for a snapshot some disk needs, and said so in one line
        assert any(snap in related for related in self.related.values()), \
            (snap, result.stderr, self.log[-12:])
        assert result.stderr.count("\n") == 1 and "disk" in result.stderr, result.stderr
        self.note(f"delete snapshot {snap}: refused")

    def prune(self) -> None:
        self.s.snapfs.ok("prune")
        self.note("prune")

    def delete_disk(self) -> None:
        if len(self.disks) < 2:
            return
        name = self.rng.choice(sorted(self.disks))
        self.s.snapfs.ok("disk", "delete", name)
        del self.disks[name], self.related[name]
        assert not self.s.disk(name).exists()
        self.note(f"delete disk {name}")

    def crash(self, closing: bool | None = None) -> None:
        """kill -9 of the daemon, with every disk fsync'd before it and, if ``closing`` (by
        default at random), a snapshot of one closed but not uploaded (``--no-wait``): what the
        next daemon must find."""
        pending = None
        if closing or (closing is None and self.rng.random() < 0.5):
            name = self.rng.choice(sorted(self.disks))
            pending = self.fresh("s")
            self.s.snapfs.ok("snapshot", "create", "--disk", name, "--name", pending, "--no-wait")
            self.snapshots[pending] = bytes(self.disks[name])
            self.related[name].add(pending)
        for name in self.disks:
            fd = os.open(self.s.disk(name), os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.s.daemon.kill()
        # what a user does next: umount detaches the dead mount point
        self.s.snapfs.ok("umount", self.s.mountpoint)
        self.pending = pending
        self.note(f"kill -9 of the daemon{f' (snapshot {pending} closed)' if pending else ''}")

    def settle(self) -> None:
        """After a restart: a snapshot closed before a crash is uploaded by the new daemon."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        deadline = time.monotonic() + 60
        while (state := self.s.snapshots()[pending]["state"]) != "accomplished":
            assert state == "progressing" and time.monotonic() < deadline, (pending, state)
            time.sleep(0.2)

    def compare_all(self) -> None:
        for name, model in self.disks.items():
            got = self.s.disk(name).read_bytes()
            assert len(got) == len(model), (name, len(got), len(model))
            if got != model:
                bad = next(i for i in range(len(got)) if got[i] != model[i])
                raise AssertionError(f"disk {name} differs from byte {bad} (block {bad // BS}) "
                                     f"after: {self.log[-12:]}")

    def compare_snapshots(self) -> None:
        # a listing reads the snapshot list again at most every --refresh-interval (2 s): a
        # snapshot deleted just now may still be listed until then
        deadline = time.monotonic() + 10
        while (served := {p.name.removesuffix(".img")
                          for p in (self.s.mountpoint / "snapshots").iterdir()}) \
                != set(self.snapshots) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert served == set(self.snapshots), (served, self.log)
        for snap, content in self.snapshots.items():
            got = self.s.image(snap).read_bytes()
            assert got == content, f"snapshot {snap} as mounted differs; history: {self.log}"


@contextmanager
def serving(snapfs: Snapfs, tmp: Path, *args: Any) -> Iterator[Served]:
    with mounted(snapfs, tmp / "mnt", tmp / "cache", *args) as daemon:
        yield Served(snapfs, daemon, tmp)


def test_a_random_history_of_disks_reads_back_as_its_model(
        store_url: str, store_endpoint: str | None, tmp_path: Path, runtime_dir: Path,
        request: pytest.FixtureRequest) -> None:
    s3 = store_url.startswith("s3://")
    seed = 2 if s3 else 1  # a history of its own for each store
    rng = random.Random(seed)
    snapfs = Snapfs(store_url, store_endpoint, make_env(runtime_dir, request, s3))
    snapfs.ok("init")
    image = tmp_path / "base.img"
    image.write_bytes(palette_image(rng))
    snapfs.ok("snapshot", "create", image, "--name", "s0")
    # the lazy path (only what is read is fetched) in one seed, the background sweep in the other
    options = ("--no-background",) if seed % 2 else ()
    steps = [("write", 40), ("read", 12), ("snapshot", 10), ("create", 6), ("rollback", 6),
             ("write_past_end", 2), ("delete_snapshot", 4), ("prune", 2), ("delete_disk", 2),
             ("compare_all", 5), ("restart", 2), ("crash", 2)]
    kinds = [k for k, _ in steps]
    weights = [w for _, w in steps]
    history: History | None = None
    while True:
        with serving(snapfs, tmp_path, *options) as served:
            if history is None:
                history = History(served, rng, tmp_path)
                history.snapshots["s0"] = image.read_bytes()
                history.create()  # the first disk, from s0
            history.s = served
            history.compare_all()  # after a restart: every byte as before it
            history.settle()
            while history.steps < STEPS:
                kind = rng.choices(kinds, weights)[0]
                if kind == "crash" or history.steps == STEPS // 2 and not history.crashed:
                    history.crashed = True
                    history.crash(closing=kind != "crash" or None)
                    break
                if kind == "restart":
                    history.note("restart of the daemon")
                    break
                getattr(history, kind)()
                history.steps += 1
            else:
                history.compare_all()
                history.compare_snapshots()
                break
            history.steps += 1
    # every snapshot stored, and exported from the store alone (no cache, no daemon) as modelled
    for snap, content in history.snapshots.items():
        out = tmp_path / f"export-{snap}.img"
        snapfs.ok("export", snap, out)
        assert out.read_bytes() == content, f"export of {snap}; history: {history.log}"
        out.unlink()
    listed = {s["name"] for s in snapfs.json("snapshot", "list")}
    assert listed == set(history.snapshots)
    snapfs.ok("verify")
