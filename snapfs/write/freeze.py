"""Freezing a mounted file system for the instant a snapshot closes (FIFREEZE / FITHAW).

``frozen(mountpoint, timeout)`` freezes (the kernel first writes back the file system's dirty
data and journal, so the disk below is consistent) and always thaws on the way out, even on
error or Ctrl-C. If the block inside it runs longer than ``timeout``, a timer thread thaws
early, so applications are never stopped for longer than that; ``Freeze.thawed_early`` then
tells the caller that the snapshot is only crash-consistent.

Needs CAP_SYS_ADMIN. Freezing a file system that lives on a snapfs disk served by the same
process would deadlock (its write-back needs the daemon): the CLI does this, never the daemon.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from snapfs.errors import SnapfsError, UsageError

log = logging.getLogger(__name__)

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


class Freeze:
    def __init__(self, mountpoint: str, fd: int) -> None:
        self.mountpoint = mountpoint
        self.fd = fd
        self.thawed_early = False
        self.frozen_seconds = 0.0
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._thawed = False

    def thaw(self, early: bool = False) -> None:
        with self._lock:
            if self._thawed:
                return
            self._thawed = True
            self.thawed_early = early
            self.frozen_seconds = time.monotonic() - self._started
            try:
                fcntl.ioctl(self.fd, FITHAW, 0)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: not frozen (someone thawed it)
                    log.error("thawing %s failed: %s", self.mountpoint, e.strerror)
            if early:  # the command says so once it ends (``consistency``: crash)
                log.debug("%s stayed frozen for %.3f s, longer than allowed: thawed",
                          self.mountpoint, self.frozen_seconds)


def check_mountpoint(path: str) -> str:
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise UsageError(f"cannot freeze {path}: not a directory")
    if not os.path.ismount(real):
        raise UsageError(f"cannot freeze {path}: not a mount point")
    return real


def distinct_mountpoints(paths: list[str]) -> list[str]:
    """``paths`` checked (``check_mountpoint``), one per file system: one given twice (by two
    paths, or mounted at two places: a bind mount) is frozen once, not refused as "frozen
    already" by its second freeze."""
    by_fs: dict[int, str] = {}
    for path in paths:
        real = check_mountpoint(path)
        by_fs.setdefault(os.stat(real).st_dev, real)
    return list(by_fs.values())


@contextmanager
def frozen(mountpoint: str, timeout: float) -> Iterator[Freeze]:
    real = check_mountpoint(mountpoint)
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            reasons = {errno.EOPNOTSUPP: "its file system cannot be frozen",
                       errno.EBUSY: "it is frozen already",
                       errno.EPERM: "freezing needs root (CAP_SYS_ADMIN)"}
            reason = reasons.get(e.errno or 0, e.strerror or str(e))
            raise SnapfsError(f"cannot freeze {mountpoint}: {reason}") from None
        freeze = Freeze(real, fd)
        timer = threading.Timer(timeout, freeze.thaw, kwargs={"early": True})
        timer.daemon = True
        timer.start()
        try:
            yield freeze
        finally:
            timer.cancel()
            freeze.thaw()
    finally:
        os.close(fd)
