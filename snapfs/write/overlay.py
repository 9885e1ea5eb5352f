"""A disk's local bytes: the overlay file of its written blocks and its copy-on-write files.

The overlay is a sparse file as large as the disk: block ``n`` lives at ``n * block_size``, so a
write is one ``pwrite`` and finding a block needs no map (which blocks are valid is the
``present`` set kept in ``state``). A block's bytes are written before it is marked present, so
a crash between the two leaves the block reading as before the write.

A copy-on-write file belongs to one closed generation: the contents that blocks of that
generation had at its closing, saved just before a later write overwrote them, appended in the
order they were saved (their offsets are kept in ``state``). It lives until the generation's
snapshot is stored.

A failed flush (``sync``). The kernel reports a lost writeback once, so after it every fsync
of the disk fails until the daemon restarts (``failed``). What a copy-on-write file held beyond
its last successful sync may be gone from the device, and reads of it return what the device
has once the kernel drops the pages: ``lost_from(gen)`` says from which offset, so that the
disk refuses those blocks to an upload or a reader rather than return other bytes. A new
start would not know (an fsync after a restart succeeds): the failure is written to
``ID.failed`` (JSON: the message, the time, and the offset from which each copy-on-write file
may be lost), best effort and synced, and read back at the next start (``failed_before``).
``forget_failure`` deletes it once no generation it names is still uploading.

Names (``dirsync``): a new overlay's name is made durable in its directory when it is created,
before the disk's record is stored; a new copy-on-write file's name at the next ``sync`` (an
fsync of the disk, or a closing), before the entries that point into it are made durable, so
never on the path of a write. Removals are not synced: a file whose removal a power cut undid
belongs to a disk or a generation the durable state no longer has, and the next start deletes
it (``DiskService.open``).

Blocking file I/O: call from worker threads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from snapfs.dirsync import fsync_dir, replace_durably
from snapfs.errors import NoSpace, SnapfsError

log = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"([0-9a-f]{16})\.(?:overlay|failed|cow-([0-9]+))")


def _io_error(what: str, e: OSError) -> SnapfsError:
    if e.errno == errno.ENOSPC:
        return NoSpace(f"{what}: no space left on the state directory's file system")
    return SnapfsError(f"{what}: {e.strerror}")


class Overlay:
    def __init__(self, directory: Path, disk_id: str, size: int,
                 make_room: Callable[[int], object] | None = None) -> None:
        self.dir = directory
        self.disk_id = disk_id
        #: called with the bytes a write may add before it adds them: the block cache on the
        #: same file system evicts to leave them free (``BlockCache.ensure_free``)
        self.make_room = make_room or (lambda nbytes: None)
        self.path = directory / f"{disk_id}.overlay"
        try:
            self.fd, created = _open_or_create(self.path)
        except OSError as e:
            raise _io_error(f"overlay {self.path}", e) from None
        try:
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
        except (OSError, OverflowError) as e:
            # a new disk larger than the state directory's file system allows (EFBIG): leave
            # no file behind (an overlay that exists already is a disk's, and is kept)
            os.close(self.fd)
            if size and not os.path.getsize(self.path):
                self.path.unlink(missing_ok=True)
            if isinstance(e, OverflowError):
                e = OSError(errno.EFBIG, os.strerror(errno.EFBIG))
            raise _io_error(f"overlay of {size} bytes in {directory}", e) from None
        if created:
            try:
                fsync_dir(directory)
            except OSError as e:
                os.close(self.fd)
                raise _io_error(f"overlay {self.path}", e) from None
        self._cow: dict[int, CowFile] = {}
        #: the error of the first flush that failed (``sync``)
        self.failed: SnapfsError | None = None
        self.failure_path = directory / f"{disk_id}.failed"
        #: generation -> offset of its copy-on-write file from which the contents may be lost
        self._lost_from: dict[int, int] = {}
        #: "TIME: MESSAGE" of a flush that failed before the daemon restarted (``ID.failed``)
        self.failed_before: str | None = None
        self._read_failure()

    def close(self) -> None:
        for cow in self._cow.values():
            cow.close()
        self._cow.clear()
        os.close(self.fd)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # a hole past the end of a file grown by ftruncate reads short
            data += bytes(length - len(data))
        return data

    def will_need(self, ranges: list[tuple[int, int]]) -> None:
        """Ask the kernel to start reading these (offset, length) ranges now, in parallel."""
        for offset, length in ranges:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            view = memoryview(data)
            while view:
                done = os.pwrite(self.fd, view, offset)
                view = view[done:]
                offset += done
        except OSError as e:
            raise _io_error(f"overlay {self.path}", e) from None

    def grow(self, size: int) -> None:
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)

    def clear(self) -> None:
        """Drop every byte, keeping the size (a rollback that resets the whole overlay)."""
        size = os.fstat(self.fd).st_size
        os.ftruncate(self.fd, 0)
        os.ftruncate(self.fd, size)

    def sync(self) -> None:
        """Make every write so far durable. Once a flush has failed, every later one fails
        too (``failed``): the kernel reports a lost writeback once, and an fsync after it that
        succeeded would acknowledge writes the device never got."""
        if self.failed is not None:
            raise self.failed
        try:
            os.fdatasync(self.fd)
            if os.fstat(self.fd).st_nlink == 0:
                self._deleted()
            named = []
            for cow in list(self._cow.values()):  # a write may open one meanwhile
                cow.sync()
                if not cow.name_synced:
                    named.append(cow)
            if named:  # new since the last sync: their names too, once
                fsync_dir(self.dir)
                for cow in named:
                    cow.name_synced = True
        except OSError as e:
            kind = NoSpace if e.errno == errno.ENOSPC else SnapfsError
            self.failed = kind(f"overlay {self.path}: a flush failed ({e.strerror}); writes "
                               "since the last fsync may be lost, and this disk's fsyncs fail "
                               "until the daemon restarts")
            log.error("%s", self.failed.message)
            self._note_failure()
            raise self.failed from None

    def _deleted(self) -> None:
        """The overlay's name is gone (its cache directory was removed under the daemon): its
        bytes live only as long as this open file, and the next start knows no such disk. A
        flush must not acknowledge them, now or later; they still read, to be copied out."""
        self.failed = SnapfsError(f"overlay {self.path} was deleted under the running daemon "
                                  "(its cache directory removed?): the disk's writes are lost "
                                  "when the daemon stops; copy the disk out before that")
        log.error("%s", self.failed.message)
        raise self.failed

    # -- a failed flush, and what it may have cost -------------------------------------------

    def lost_from(self, gen: int) -> int | None:
        """The offset of generation ``gen``'s copy-on-write file from which its contents may
        be lost to a failed flush (None: nothing of it is)."""
        if gen in self._lost_from:
            return self._lost_from[gen]
        if self.failed is not None:  # a file made since the failure: nothing of it synced
            cow = self._cow.get(gen)
            return cow.synced if cow is not None else 0
        return None

    def _note_failure(self) -> None:
        """Remember, beyond a restart, which copy-on-write contents the failed flush may have
        cost (best effort: the device may refuse this file too)."""
        assert self.failed is not None
        try:
            for gen, path in self._cow_files().items():
                cow = self._cow.get(gen)
                if gen not in self._lost_from:
                    # a file not opened since the last start was synced whole by it
                    self._lost_from[gen] = cow.synced if cow is not None else path.stat().st_size
            note = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "message": self.failed.message,
                    "lost_from": {str(g): at for g, at in self._lost_from.items()}}
            replace_durably(self.failure_path, json.dumps(note).encode(),
                            self.failure_path.with_suffix(".failed-new"))
        except OSError as e:
            log.error("overlay %s: could not record the failed flush (%s); after a restart "
                      "its snapshots still uploading are not known to have lost blocks",
                      self.path, e.strerror)

    def _read_failure(self) -> None:
        try:
            note = json.loads(self.failure_path.read_text())
            lost = {int(g): int(at) for g, at in note["lost_from"].items()}
            self.failed_before = f"{note['at']}: {note['message']}"
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            lost = {}  # unreadable: every copy-on-write content is suspect
            self.failed_before = (f"a flush failed before the restart (its record "
                                  f"{self.failure_path.name} is unreadable: {e})")
        for gen in self._cow_files():
            # a file the note does not name was made after the failure: nothing of it synced
            self._lost_from[gen] = lost.get(gen, 0)

    def forget_failure(self, uploading: set[int]) -> None:
        """Forget a failed flush once no generation in ``uploading`` (those still to upload)
        may have lost copy-on-write contents to it, and the daemon has restarted since."""
        if self.failed_before is None or any(g in self._lost_from for g in uploading):
            return
        self.failure_path.unlink(missing_ok=True)
        self.failed_before = None
        self._lost_from.clear()

    def sync_all(self) -> None:
        """``sync``, and every copy-on-write file of this disk, open here or not (after a
        restart: what a dead daemon appended may still be only in the kernel's cache)."""
        self.sync()
        for path in self._cow_files().values():
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.dir)  # the dead daemon's new names may not have been synced

    def _cow_files(self) -> dict[int, Path]:
        """This disk's copy-on-write files in its directory, open here or not, by generation."""
        files = {}
        for path in self.dir.glob(f"{self.disk_id}.cow-*"):
            m = _FILE_NAME.fullmatch(path.name)
            if m is not None and m.group(2) is not None:
                files[int(m.group(2))] = path
        return files

    def cow(self, gen: int) -> CowFile:
        cow = self._cow.get(gen)
        if cow is None:
            cow = self._cow[gen] = CowFile(self.dir / f"{self.disk_id}.cow-{gen}")
        return cow

    def drop_cow(self, gen: int) -> None:
        self._lost_from.pop(gen, None)
        cow = self._cow.pop(gen, None)
        if cow is not None:
            cow.close()
        try:
            (self.dir / f"{self.disk_id}.cow-{gen}").unlink()
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        """Delete every file of this disk (after ``close``)."""
        for path in self.dir.glob(f"{self.disk_id}.*"):
            path.unlink(missing_ok=True)


class CowFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd, created = _open_or_create(path)
            #: False until an fsync of its directory made its name durable (``Overlay.sync``)
            self.name_synced = not created
            self.end = os.fstat(self.fd).st_size
            #: ``end`` at the last successful ``sync`` (an existing file: the start syncs it)
            self.synced = self.end
        except OSError as e:
            raise _io_error(f"copy-on-write file {path}", e) from None

    def append(self, data: bytes) -> int:
        offset = self.end
        try:
            view = memoryview(data)
            at = offset
            while view:  # a short write, then ENOSPC once the file system is full
                done = os.pwrite(self.fd, view, at)
                if done <= 0:
                    raise OSError(errno.EIO, "short write")
                view = view[done:]
                at += done
        except OSError as e:
            raise _io_error(f"copy-on-write file {self.path}", e) from None
        self.end += len(data)
        return offset

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise SnapfsError(f"copy-on-write file {self.path} is truncated")
        return data

    def sync(self) -> None:
        end = self.end
        os.fdatasync(self.fd)
        self.synced = end

    def close(self) -> None:
        os.close(self.fd)


def _open_or_create(path: Path) -> tuple[int, bool]:
    """A read-write descriptor of ``path``, and whether this call created the file."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), True
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC), False


def leftover_files(directory: Path, disk_ids: set[str], uploading: set[tuple[str, int]]
                   ) -> list[Path]:
    """The files in ``directory`` of disks other than ``disk_ids``, and the copy-on-write files
    of generations other than ``uploading`` ((disk id, generation) of parts still to upload)."""
    out = []
    for path in directory.iterdir():
        m = _FILE_NAME.fullmatch(path.name)
        if m is None:
            continue
        disk, gen = m.group(1), m.group(2)
        if disk not in disk_ids or (gen is not None and (disk, int(gen)) not in uploading):
            out.append(path)
    return sorted(out)
