"""Making the names in a directory durable: the one place that fsyncs directories.

POSIX makes a file's new name (or a rename, or a removal) durable only once its directory is
fsync'd; an fsync of the file itself covers its bytes. ext4 happens to commit a new name with the
file's own fsync (one journal), other file systems (XFS without it, btrfs in some cases, network
file systems) need not: after a power cut a file fsync'd many times may be gone.

Callers fsync a directory where a name is made that later state relies on (a disk's overlay at
its creation, a copy-on-write file before the first fsync that makes its entries durable, an
lmdb environment when it is created), never on a path every write takes. ``replace_durably``
writes a whole file that way: all of it or, after a crash, none of it.

Blocking: call from worker threads. Imports nothing of snapfs.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names in directory ``path`` as they are now durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike[str]) -> None:
    """``mkdir -p path``, each directory it creates made durable in its parent."""
    missing = []
    at = Path(path)
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # made meanwhile by another process: synced all the same
            if not directory.is_dir():
                raise
        fsync_dir(directory.parent)


def replace_durably(path: Path, data: bytes, tmp: Path, *, keep_cached: bool = True) -> None:
    """Make ``path`` hold ``data``, durably and whole: written to ``tmp`` (in the same
    directory), fsync'd, renamed over ``path``, and the rename made durable. On an error
    ``tmp`` is removed and the error raised; ``path`` is then as it was, or already new.
    ``keep_cached=False``: once fsync'd, its pages leave the page cache (a file written for
    keeping, not for reading back soon)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            if not keep_cached:  # clean now: the kernel drops them at once
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
