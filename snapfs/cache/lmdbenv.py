"""Opening an lmdb environment on a file system that may be full, without dying of it.

lmdb makes its lock file ``lock.mdb`` by extending it with ``ftruncate`` (no blocks allocated)
and then writes into it through a shared mapping: on a file system with no free block, that
first write is a SIGBUS, which kills the whole process (a mount daemon, with every mount and
disk it serves) rather than raising. So the lock file's blocks are allocated first
(``posix_fallocate``), where a full file system is an ordinary ``ENOSPC``; lmdb maps a lock file
larger than it would have made as it is (room for more readers). Its data file is written with
``pwrite``, whose failures are errors already.

A new environment's directory and data file are made durable in their parents (``dirsync``)
before ``open_env`` returns, so before its first commit: lmdb syncs its data file at a commit,
never the directory that names it.

Used by the block cache's index and by the disks' state and journal; imports only ``dirsync``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import lmdb

from snapfs.dirsync import fsync_dir, make_dirs

#: bytes of lock file allocated ahead of lmdb: its header and 126 readers take about 8 KiB
LOCK_FILE_BYTES = 64 << 10


def open_env(path: str | os.PathLike[str], **options: Any) -> lmdb.Environment:
    """``lmdb.open(path, **options)`` (a directory environment), its lock file's blocks
    allocated first (those of a lock file in use already as far as they can be). Raises
    OSError (``ENOSPC`` when the file system is full) or lmdb.Error."""
    directory = Path(path)
    make_dirs(directory)
    new = not (directory / "data.mdb").exists()
    fd = os.open(directory / "lock.mdb", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size or LOCK_FILE_BYTES)
        except OSError as e:
            # a lock file in use already has the pages lmdb wrote (its header, its readers so
            # far): it goes on; a new one must be whole
            if not size and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                os.unlink(directory / "lock.mdb")
                raise
    finally:
        os.close(fd)
    env = lmdb.open(str(directory), **options)
    if new:
        try:
            fsync_dir(directory)
        except OSError:
            env.close()
            raise
    return env
