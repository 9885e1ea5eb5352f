"""Power cuts, for real: what a host's snapfs state keeps when the machine loses power.

kill -9 (``test_disks``) keeps the kernel's page cache; a power cut loses everything that had
not reached the device. Here the mount daemon's cache directory (block cache and disk state)
and its repository live on an ext4 file system whose device is a loop device over a file on
XFS with reflink (``powercut.Rig``). A cut clones that file (FICLONE) while the daemon and the
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
- a snapshot whose upload was cut completes after the restart, or is reported failed; the
  repository ``verify``s clean; and nothing is half stored.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from diskimages import random_image
from mountutil import MOUNTS, mounted
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


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[Path]:
    path = Path(f"/tmp/snapfs-pc-run-{os.getpid()}")  # short: a socket path fits 108 bytes
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Host:
    """A repository and a cache directory on the rig's file system (``root``)."""

    root: Path
    env: dict[str, str]

    def snapfs(self, root: Path | None = None) -> Snapfs:
        return Snapfs(str((root or self.root) / "repo"), None, self.env)

    def cache(self, root: Path | None = None) -> Path:
        return (root or self.root) / "cache"

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
            yield Served(snapfs, daemon.mountpoint, where, daemon.log)


@dataclasses.dataclass
class Served:
    snapfs: Snapfs
    mountpoint: Path
    tmp: Path
    log: Path

    def disk(self, name: str) -> Path:
        return self.mountpoint / "disks" / f"{name}.img"

    def disks(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.snapfs.json("disk", "list")}

    def snapshots(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.snapfs.json("snapshot", "list")}

    def export(self, snap: str) -> Path:
        out = self.tmp / f"export-{snap}.img"
        self.snapfs.ok("export", snap, out, "--force")
        return out

    def copy(self, name: str, label: str) -> Path:
        out = self.tmp / f"copy-{name}-{label}.img"
        shutil.copyfile(self.disk(name), out)
        return out


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
