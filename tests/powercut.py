"""Cutting a file system's power without rebooting: the rig ``test_powercut`` uses.

::

    TMP/outer.img ─ loop ─ XFS (reflink=1) ─┬ inner.img ─ loop ─ ext4 ─ the daemon's state, repo
                                            └ cut-N.img: FICLONE of inner.img at instant N

The loop driver hands what ext4 sends its device to ``inner.img`` (into XFS's page cache), and
XFS writes a file's dirty pages back before it clones it, so ``cut-N.img`` holds exactly what
the inner device had received at the instant of the clone: what an fsync flushed and what
writeback sent, never what sat only in the inner ext4's page cache. ``Rig.opened`` attaches a
cut to a loop device of its own and mounts it (ext4 replays its journal): the file system as
the machine would find it after a reboot.

``write_back`` does what the kernel's flusher may do at any moment (every 5 s for pages dirty
for 30 s, under memory pressure, for another process's sync): send some dirty pages of a file
to the device, without a journal commit or a cache flush. A cut in the middle of writeback is
the cut that finds unsynced structures half on the device; waiting for the flusher to be caught
at it would make tests slow and their outcome luck.

Everything the rig attaches or mounts is undone in ``finally`` blocks, innermost first.

``failing_writes`` is the other fault a machine's storage has, made for real: writes to chosen
blocks of a file that the device refuses, so that writeback and fsync fail with an I/O error
while the file system goes on (device-mapper's error targets are not available here)::

    tmpfs ─ device.img (every page allocated) ─ loop ─ ext4
                       └ holes punched under chosen blocks of a file on the ext4; tmpfs full

The loop driver writes what ext4 sends it into ``device.img``: a write to a page the tmpfs holds
already needs no memory, one into a hole needs a page the full tmpfs cannot give, and fails
(ENOSPC). The chosen blocks are allocated in ext4 first as unwritten extents (read as zeros,
whatever the device holds under them), so no other file ever lands on a hole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT = 1 | 4  # before and after: the pages are on the device when it returns

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def have_tools() -> bool:
    return all(shutil.which(t) for t in ("mkfs.xfs", "mkfs.ext4", "losetup", "mount"))


def run(*cmd: str | Path) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True,
                          text=True).stdout.strip()


@contextlib.contextmanager
def loop_mounted(image: Path, where: Path, *options: str) -> Iterator[Path]:
    """``image`` on a loop device of its own, mounted at ``where``; both undone afterwards."""
    loop = run("losetup", "-f", "--show", image)
    try:
        where.mkdir(parents=True, exist_ok=True)
        run("mount", *(["-o", ",".join(options)] if options else []), loop, where)
        try:
            yield where
        finally:
            unmount(where)
    finally:
        run("losetup", "-d", loop)


def unmount(where: Path) -> None:
    """umount, trying again for a few seconds while the file system is busy (a process that
    used it may take a moment to be gone)."""
    deadline = time.monotonic() + 10
    while True:
        result = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline or "busy" not in result.stderr:
            raise AssertionError(f"umount {where}: {result.stderr.strip()}")
        time.sleep(0.2)


def reflink(src: Path, dst: Path) -> None:
    """``dst`` becomes a clone of ``src`` (FICLONE: shared extents, no copying)."""
    fd_src = os.open(src, os.O_RDONLY)
    try:
        fd_dst = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.ioctl(fd_dst, FICLONE, fd_src)
        finally:
            os.close(fd_dst)
    finally:
        os.close(fd_src)


def write_back(path: Path, start: int = 0, length: int = 0) -> None:
    """Send the dirty pages of ``path`` in ``start .. start + length`` (0: to the end) to the
    device and wait for them, as the flusher would: no fsync, no journal commit."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.sync_file_range(fd, start, length,
                                 SYNC_FILE_RANGE_WAIT | SYNC_FILE_RANGE_WRITE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sync_file_range {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Rig:
    """An ext4 file system (``inner``) whose power can be cut (``cut``)."""

    def __init__(self, outer: Path, inner: Path) -> None:
        self.outer = outer
        self.inner = inner
        self.cuts = 0

    @property
    def device_file(self) -> Path:
        return self.outer / "inner.img"

    def cut(self, *writeback: tuple[Path, int, int]) -> Path:
        """What the device holds now, after writing back ``(path, start, length)`` pages of
        files on it: a file of the device's bytes."""
        for path, start, length in writeback:
            write_back(path, start, length)
        self.cuts += 1
        clone = self.outer / f"cut-{self.cuts}.img"
        reflink(self.device_file, clone)
        return clone

    @contextlib.contextmanager
    def opened(self, clone: Path, where: Path) -> Iterator[Path]:
        """The file system of a cut, as the next boot finds it (journal replayed) at
        ``where``; the cut is deleted afterwards."""
        try:
            with loop_mounted(clone, where):
                yield where
        finally:
            clone.unlink(missing_ok=True)


@contextlib.contextmanager
def rig(base: Path, outer_size: str = "4G", inner_size: str = "1G") -> Iterator[Rig]:
    """An XFS with reflink on a loop device over ``base/outer.img``, holding an ext4 image
    mounted on its own loop device at ``base/inner``."""
    base.mkdir(parents=True, exist_ok=True)
    outer_img = base / "outer.img"
    run("truncate", "-s", outer_size, outer_img)
    try:
        run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", outer_img)
        with loop_mounted(outer_img, base / "outer") as outer:
            inner_img = outer / "inner.img"
            run("truncate", "-s", inner_size, inner_img)
            run("mkfs.ext4", "-q", "-F", "-b", "4096", inner_img)
            with loop_mounted(inner_img, base / "inner") as inner:
                yield Rig(outer, inner)
    finally:
        outer_img.unlink(missing_ok=True)


class FailingFs:
    """An ext4 file system (``root``) whose writes to chosen ranges of a file fail."""

    def __init__(self, root: Path, device_file: Path, tmpfs: Path) -> None:
        self.root = root
        self.device_file = device_file
        self.ballast = tmpfs / "ballast"

    def starve(self, path: Path, offset: int, length: int) -> None:
        """From now on, writeback of ``path`` (a file on ``root``) in ``offset .. offset +
        length``, a range it has never written, fails on the device."""
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, offset, length)  # unwritten extents: read as zeros
        finally:
            os.close(fd)
        extents = unwritten_extents(path)
        assert extents, f"no unwritten extent in {path}"
        for physical, blocks in extents:
            run("fallocate", "--punch-hole", "--offset", str(physical * 4096),
                "--length", str(blocks * 4096), self.device_file)
        with open(self.ballast, "ab", buffering=0) as f:  # the tmpfs filled: a short write,
            for chunk in (bytes(1 << 20), bytes(4096)):  # then ENOSPC
                try:
                    while f.write(chunk) == len(chunk):
                        pass
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise

    def relieve(self) -> None:
        """Let writes succeed again (the device's file system has room for its holes)."""
        self.ballast.unlink(missing_ok=True)


def unwritten_extents(path: Path) -> list[tuple[int, int]]:
    """(first physical 4 KiB block, blocks) of the unwritten extents of ``path`` on ext4."""
    out = run("filefrag", "-v", "-b4096", path)
    found = []
    for line in out.splitlines():
        m = re.match(r"\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+):.*unwritten",
                     line)
        if m:
            found.append((int(m.group(1)), int(m.group(3))))
    return found


@contextlib.contextmanager
def failing_writes(base: Path, size_mib: int = 64) -> Iterator[FailingFs]:
    """An ext4 of ``size_mib`` on a loop device over a fully allocated file on a tmpfs at
    ``base``, mounted at ``base/fs``; ``FailingFs.starve`` makes chosen writes fail."""
    tmpfs = base / "tmpfs"
    tmpfs.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size_mib + 16}M", "tmpfs", tmpfs)
    try:
        device = tmpfs / "device.img"
        with open(device, "wb") as f:  # zeros written, not a sparse file: every page held
            for _ in range(size_mib):
                f.write(bytes(1 << 20))
        # nothing punched back into holes: no discard, no zeroing by fallocate, nothing left
        # for the kernel to initialise lazily (it would write into the device later)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096",
                        "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", str(device)],
                       check=True, capture_output=True, env=dict(os.environ, UNIX_IO_NOZEROOUT="1"))
        assert os.stat(device).st_blocks * 512 == size_mib << 20, "mkfs punched holes"
        with loop_mounted(device, base / "fs") as root:
            yield FailingFs(root, device, tmpfs)
    finally:
        unmount(tmpfs)
