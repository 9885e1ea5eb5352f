"""Writing a snapshot back out as a raw image file or onto a block device.

To a file: the image is written to ``OUT.snapfs-partial`` beside it (``partial_path``; zero
blocks left as holes), fsynced, then renamed to OUT, so OUT is either absent, the old file
(untouched unless ``force``), or the complete, verified image. Any error (a missing or corrupt
block, a full disk) removes the partial file. To a block device: only with ``force`` (it is
overwritten, whatever it held), opened exclusively (a mounted device, or one another program
holds so, is refused), and written in place (zero blocks written as zeros, since a device keeps
old contents), after checking the device is large enough.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time
from collections import defaultdict
from typing import Any

import trio

from snapfs.errors import (
    IntegrityError,
    MissingBlock,
    NoSpace,
    SnapfsError,
    SnapshotNotFound,
    UsageError,
)
from snapfs.format.block import ZERO_ID
from snapfs.format.manifest import SnapshotRoot
from snapfs.progress import NO_PROGRESS, Progress
from snapfs.repo.parallel import map_in_threads, single_error
from snapfs.repo.readplan import Run, RunReader, plan_runs
from snapfs.repo.repository import Repository

PARTIAL_SUFFIX = ".snapfs-partial"
IOV_MAX = os.sysconf("SC_IOV_MAX")  # pieces one pwritev takes


def partial_path(path: str) -> str:
    """Where an image file is written before it is renamed to ``path``: ``path.snapfs-partial``,
    or, where that is too long for a file name (OUT itself may have 255 bytes), OUT's name cut
    short with 8 hex digits of its hash (two exports to long names that begin alike must not
    share one)."""
    directory, name = os.path.split(path)
    encoded = os.fsencode(name)
    try:
        longest = os.pathconf(directory or ".", "PC_NAME_MAX")
    except OSError:  # (no such directory: opening the file says so)
        longest = 255
    if len(encoded) + len(PARTIAL_SUFFIX) <= longest:
        return path + PARTIAL_SUFFIX
    tag = hashlib.sha256(encoded).hexdigest()[:8]
    kept = encoded[: longest - len(PARTIAL_SUFFIX) - len(tag) - 1]
    return os.path.join(directory, f"{os.fsdecode(kept)}-{tag}{PARTIAL_SUFFIX}")


class _Target:
    def __init__(self, path: str, size: int, force: bool) -> None:
        self.path = path
        self.is_device = False
        if not path or path.endswith("/"):
            # "" wrote the whole image to ./.snapfs-partial, then failed to rename it with a
            # traceback; "DIR/" to DIR/.snapfs-partial
            raise UsageError(f"{path!r} is not a file name: export writes an image file (or "
                             "onto a block device)")
        if path == "-":  # (standard output for restic dump and borg export-tar)
            raise UsageError("export cannot write to standard output ('-'): it writes an image "
                             "file (or onto a block device); for a file named '-', give ./-")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise SnapfsError(f"cannot use {path}: {e.strerror}") from None
        if st is not None and stat.S_ISBLK(st.st_mode):
            if not force:
                raise SnapfsError(f"{path} is a block device; use --force to overwrite it")
            self.is_device = True
            self.write_path = path
            flags = os.O_WRONLY | os.O_EXCL  # EBUSY if mounted or held exclusively
        elif st is not None and not stat.S_ISREG(st.st_mode):
            raise SnapfsError(f"{path} is neither a regular file nor a block device")
        else:
            if st is not None and not force:
                raise SnapfsError(f"{path} exists; use --force to replace it")
            self.write_path = partial_path(path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = os.open(self.write_path, flags | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if self.is_device and e.errno == errno.EBUSY:
                raise SnapfsError(f"{path} is in use (mounted, or held by another program); "
                                  "not writing to it") from None
            raise SnapfsError(f"cannot write {self.write_path}: {e.strerror}") from None
        try:
            if self.is_device:
                have = os.lseek(self.fd, 0, os.SEEK_END)
                if have < size:
                    raise SnapfsError(f"{path} holds {have} bytes; the snapshot needs {size}")
            else:
                os.ftruncate(self.fd, size)
        except OSError as e:
            self.abort()
            raise self.error(e) from None
        except SnapfsError:
            self.abort()
            raise

    def error(self, e: OSError) -> SnapfsError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(f"no space left on device writing {self.path}; nothing was exported")
        return SnapfsError(f"writing {self.path}: {e.strerror}")

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.pwritev([data], offset)

    def pwritev(self, pieces: list[bytes | memoryview], offset: int) -> None:
        """Write ``pieces`` one after another from ``offset``, in one call where the kernel
        takes them all."""
        views = [memoryview(p) for p in pieces]
        while views:
            try:
                n = os.pwritev(self.fd, views[:IOV_MAX], offset)
            except OSError as e:
                raise self.error(e) from None
            offset += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise self.error(e) from None
        os.close(self.fd)
        if not self.is_device:
            os.rename(self.write_path, self.path)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        if not self.is_device:
            try:
                os.unlink(self.write_path)
            except FileNotFoundError:
                pass


async def export_snapshot(
    repo: Repository,
    root: SnapshotRoot,
    out: str,
    force: bool = False,
    progress: Progress = NO_PROGRESS,
) -> dict[str, Any]:
    try:
        return await _export(repo, root, out, force, progress)
    except MissingBlock:  # (its manifest page too, gone from the index that was read after)
        if await trio.to_thread.run_sync(repo.store.exists, f"snapshots/{root.id}"):
            raise
        # not lost data: a delete or forget elsewhere took the snapshot, and its blocks, meanwhile
        raise SnapshotNotFound(f"snapshot {root.name} ({root.id}) was deleted while it was "
                               "exported") from None


async def _export(repo: Repository, root: SnapshotRoot, out: str, force: bool,
                  progress: Progress) -> dict[str, Any]:
    started = time.monotonic()
    limiter = trio.CapacityLimiter(repo.store.concurrency)
    index = await trio.to_thread.run_sync(repo.load_index, limiter=limiter)
    reader = RunReader(repo, index)
    block_map = await trio.to_thread.run_sync(repo.block_map, index, root, reader.read_page,
                                              limiter=limiter)
    bs = root.block_size
    where: dict[bytes, list[int]] = defaultdict(list)
    zero_blocks = []
    for n, bid in enumerate(block_map):
        if bid == ZERO_ID:
            zero_blocks.append(n)
        else:
            where[bid].append(n)
    runs = plan_runs(where, index)
    written = 0

    def fetch(job: tuple[str, Run]) -> int:
        pack, run = job
        assert target is not None  # opened before the first job
        placed: list[tuple[int, bytes | memoryview]] = []
        for bid, plain in reader.read(pack, run, copy=False):
            if isinstance(plain, IntegrityError):
                raise plain
            placed.extend((n, plain) for n in where[bid])
        # blocks that follow each other on the disk in one write (a run usually holds many:
        # a snapshot stores a disk's blocks in their order), not a write each
        placed.sort(key=lambda p: p[0])
        nbytes = 0
        first = 0
        for i in range(1, len(placed) + 1):
            if i == len(placed) or placed[i][0] != placed[i - 1][0] + 1 \
                    or len(placed[i - 1][1]) != bs:
                pieces = [plain for _, plain in placed[first:i]]
                target.pwritev(pieces, placed[first][0] * bs)
                nbytes += sum(len(p) for p in pieces)
                first = i
        return nbytes

    def done(_job: tuple[str, Run], nbytes: int) -> None:
        nonlocal written
        written += nbytes
        progress.advance(nbytes)

    target: _Target | None = None
    try:
        target = _Target(out, root.size, force)
        progress.start("export",
                       sum(loc.raw_length * len(where[b]) for _, run in runs for b, loc in run))
        with single_error():
            await map_in_threads(fetch, runs, limiter, done)
            if target.is_device:
                zero = bytes(bs)
                for n in zero_blocks:
                    length = min(bs, root.size - n * bs)
                    await trio.to_thread.run_sync(target.pwrite, zero[:length], n * bs)
            await trio.to_thread.run_sync(target.commit)
    except BaseException as e:
        if target is not None:
            target.abort()
        elif not isinstance(e, SnapfsError):
            # a stop (^C, SIGTERM) that landed while the target was being opened: its partial
            # file may be there already, and nobody else would remove it
            with contextlib.suppress(OSError):
                os.unlink(partial_path(out))
        raise
    return {
        "snapshot": root.id,
        "output": out,
        "size": root.size,
        "bytes_written": written,
        "blocks_fetched": len(where),
        "requests": len(runs),
        "seconds": round(time.monotonic() - started, 3),
    }
