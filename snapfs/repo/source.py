"""Reading a disk to snapshot: an image file or a block device.

Holes of sparse files are found with SEEK_DATA/SEEK_HOLE and never read. ``check_unchanged``
compares the source's identity, size and modification time with what they were when it was
opened, so a snapshot of an image file that was written meanwhile is refused rather than stored
torn. (A block device has no modification time: only its size is checked; snapshot a device
that is not being written, or a disk snapfs serves.)
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from snapfs.errors import NotFoundError, SourceChanged, SourceError

SECTOR = 512


class Source:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below);
            # it changes nothing for reads of regular files and block devices.
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:  # named and not there: exit code 3, as a missing snapshot
            raise SourceError(f"source {path} does not exist",
                              NotFoundError.exit_code) from None
        except OSError as e:
            raise SourceError(f"cannot open source {path}: {e.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode):
                self.is_device = False
                self.size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                self.is_device = True
                self.size = os.lseek(self.fd, 0, os.SEEK_END)
            else:
                raise SourceError(f"source {path} is neither an image file nor a block device")
            if self.size == 0:
                raise SourceError(f"source {path} is empty")
            if self.size % SECTOR:
                raise SourceError(
                    f"source {path} is {self.size} bytes, not a multiple of {SECTOR}: not a disk image"
                )
            self._identity = self._stat_identity(st)
            if not self.is_device:
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self.fd)
            raise

    def _stat_identity(self, st: os.stat_result) -> tuple[int, ...]:
        if self.is_device:
            return (st.st_rdev, self.size)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """(start, end) byte ranges that may hold data; holes are left out."""
        if self.is_device:
            yield 0, self.size
            return
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole remains
                    return
                if e.errno == errno.EINVAL:  # filesystem without SEEK_DATA: all data
                    yield pos, self.size
                    return
                raise
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            yield start, end
            pos = end

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise SourceError(f"reading {self.path} at {offset}: {e.strerror}") from None
        if len(data) != length:
            raise SourceChanged(f"source {self.path} became shorter while it was read")
        return data

    def check_unchanged(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            raise SourceChanged(f"source {self.path} vanished during the snapshot") from None
        size = st.st_size
        if self.is_device:
            try:
                size = os.lseek(self.fd, 0, os.SEEK_END)
            except OSError as e:
                raise SourceError(f"cannot size {self.path}: {e.strerror}") from None
        now = (st.st_rdev, size) if self.is_device else (st.st_dev, st.st_ino, size, st.st_mtime_ns)
        if now != self._identity:
            raise SourceChanged(
                f"source {self.path} changed during the snapshot; nothing was recorded, try again "
                "when it is not being written"
            )

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
