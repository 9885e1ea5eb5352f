"""The FUSE adapter: the kernel's requests, answered from a ``SnapshotCatalog``.

The tree it serves::

    /                      read-only directory
    /snapshots/            one NAME.img per snapshot of the repository (mode 0444, read-only),
                           and per snapshot of a disk still uploading (read from local data)
    /disks/                one NAME.img per writable disk (mode 0600, read-write, fixed size)

This module is a protocol adapter and nothing else: it turns names into inodes and inodes into
``ImageView``s (or pending snapshots, or ``Disk``s), and calls their ``read`` (and a disk's
``write`` and ``sync``). What an image is, how blocks are fetched and
cached, lives below it (``image``, ``hydration``); it must not grow business logic, and it never
blocks the trio thread.

The rules it keeps:

- One error boundary (``_errno_boundary``): only ``pyfuse3.FUSEError`` leaves a handler. A
  ``SnapfsError`` becomes EIO (``NoSpace``, a disk's state on a full file system: ENOSPC) and
  is logged with its message; anything else becomes EIO and is logged with its traceback. ``forget`` never raises.
- Snapshots are immutable, so open files get ``keep_cache`` and entries and attributes get long
  timeouts. A name can only come to mean another image if its snapshot is deleted and a new one
  takes the name; the catalog then hands out a new ``ImageView``, which gets a new inode, and the
  kernel's entry for the old one is invalidated by whichever catalog refresh finds it out (a
  listing, a lookup, or the background sweep's, at least every 30 s: the kernel keeps names for
  an hour and would not ask). pyfuse3 does that on its own thread, later; a control request
  (a command's refresh, a disk deleted) returns only once the kernel has forgotten them
  (``settle``).
- Inode numbers are never reused while mounted. An image's inode (and its view, which holds
  page caches worth freeing) is kept while the catalog lists it or the kernel still knows it
  (its lookup count, which ``forget`` lowers; an open file keeps it known), so a file opened
  before its snapshot was deleted stays readable, and a long-lived mount that sees snapshots
  come and go does not grow.
- Disks (``DiskService``) are not immutable: their attributes time out in a second, they are
  opened without ``keep_cache``, a write across the end writes what fits and returns that
  count (with O_DIRECT it fails whole), one at or past the end fails with ENOSPC, and their
  size cannot be changed (``truncate`` fails with EPERM). ``fsync`` returns once the disk's written data and
  changed-block marks are durable. Open handles are counted on the disk, so a disk that is in
  use is never deleted or rolled back. Disks created or deleted through the control socket
  appear and go at once (the service notifies us; we invalidate the kernel's entries).
- New snapshots appear without remounting: listing ``snapshots/`` and looking up a name that is
  not known refresh the catalog (which rate-limits itself). Failed lookups are not cached by the
  kernel (ENOENT, never a negative entry), so a name looked up too early appears later. If the
  store cannot be read, a listing shows the images already known (and logs why); a lookup of an
  unknown name fails with EIO rather than claim it does not exist, also within the catalog's
  interval after the refresh that failed.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyfuse3
import trio

from snapfs.errors import NoSpace, SnapfsError
from snapfs.image.view import ImageView

if TYPE_CHECKING:
    from snapfs.image.catalog import SnapshotCatalog
    from snapfs.write.disk import Disk
    from snapfs.write.service import DiskService


class ReadOnlyImage(Protocol):
    """A snapshot's image: stored (``ImageView``) or still uploading (``PendingSnapshot``)."""

    name: str
    snapshot_id: str
    size: int
    mtime_ns: int

    async def read(self, offset: int, length: int) -> bytes: ...

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
SNAPSHOTS_INODE = ROOT_INODE + 1
DISKS_INODE = ROOT_INODE + 2
FIRST_IMAGE_INODE = 16

SNAPSHOTS_DIR = b"snapshots"
DISKS_DIR = b"disks"

#: seconds the kernel may trust a name -> inode entry, and an inode's attributes
IMAGE_TIMEOUT = 3600.0
DIR_TIMEOUT = 60.0
DISK_TIMEOUT = 1.0
#: st_blksize: the preferred I/O size tools like cp and dd take from stat
IO_SIZE = 128 * 1024
UNSETTLED_KEPT = 256  # entries invalidated in the background that ``settle`` waits for, at most
STATFS_BLOCK = 4096
NAME_MAX = 255

Ops = TypeVar("Ops", bound="SnapshotFS")
P = ParamSpec("P")
R = TypeVar("R")


def _errno_boundary(
    handler: Callable[Concatenate[Ops, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Ops, P], Coroutine[Any, Any, R]]:
    """Let only ``FUSEError`` out of a handler; everything else is logged and becomes EIO."""

    @functools.wraps(handler)
    async def wrapper(self: Ops, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except SnapfsError as e:
            log.error("%s%r failed: %s", handler.__name__, args, e.message)
            # a disk whose state's file system is full says so, as a full disk would
            raise pyfuse3.FUSEError(errno.ENOSPC if isinstance(e, NoSpace) else errno.EIO) \
                from None
        except Exception as e:
            log.exception("%s%r failed unexpectedly: %s", handler.__name__, args, e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@dataclass
class _OpenDir:
    inode: int
    listing: list[tuple[bytes, int]] | None = None


class SnapshotFS(pyfuse3.Operations):
    """pyfuse3 operations over one ``SnapshotCatalog`` (read-only snapshots) and, when given,
    one ``DiskService`` (writable disks and snapshots still uploading)."""

    def __init__(self, catalog: SnapshotCatalog, disks: DiskService | None = None,
                 uid: int | None = None, gid: int | None = None) -> None:
        super().__init__()
        self._catalog = catalog
        self._disks = disks
        self._disk_inodes: dict[str, int] = {}  # disk name -> inode, for disks that exist
        self._disk_of: dict[int, Disk] = {}
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._created_ns = time.time_ns()
        self._views: dict[int, ReadOnlyImage] = {}  # inode -> view, while listed or known
        self._inode_of_view: dict[int, int] = {}  # id(view) -> inode, for the views above
        self._names: dict[bytes, int] = {}  # the catalog's current names -> inodes
        self._lookups: dict[int, int] = {}  # image inode -> the kernel's lookup count
        self._next_inode = FIRST_IMAGE_INODE
        self._open_files: dict[int, ReadOnlyImage] = {}
        self._open_disks: dict[int, Disk] = {}
        self._direct: set[int] = set()  # handles of disks opened with O_DIRECT
        if disks is not None:
            disks.changed.append(self._sync_disks)
        # a refresh by anyone (the sweep's, every half minute) retires the kernel's entries for
        # snapshots deleted since: a name deleted and made again must not keep the old image
        # behind a dentry that would otherwise live for IMAGE_TIMEOUT
        catalog.on_change.append(self._sync_names)
        self._open_dirs: dict[int, _OpenDir] = {}
        #: why the last listing could not refresh (logged once while it stays the same)
        self._listing_trouble: str | None = None
        self._next_handle = 1
        self._session_live = False
        #: entries given to ``invalidate_entry_async`` that ``settle`` has not waited for:
        #: (directory inode, name), the newest ``UNSETTLED_KEPT``
        self._unsettled: dict[tuple[int, bytes], None] = {}

    def snapshots_open(self) -> dict[str, dict[str, Any]]:
        """The snapshots someone holds open here (a browse's loop device, a copy, a reader),
        by id: their file name and open handles. ``snapshot delete`` and ``forget`` must not
        take them away from under their readers."""
        held: dict[str, dict[str, Any]] = {}
        for view in self._open_files.values():
            entry = held.setdefault(view.snapshot_id, {"name": view.name, "handles": 0})
            entry["handles"] += 1
        return held

    # -- names and inodes ----------------------------------------------------------------------

    def init(self) -> None:
        """Called by pyfuse3 once the session is up: from now on the kernel can be notified."""
        self._session_live = True

    def _images(self) -> dict[str, ReadOnlyImage]:
        images: dict[str, ReadOnlyImage] = {}
        if self._disks is not None:
            images.update(self._disks.pending_images())
        images.update(self._catalog.images())  # a stored snapshot wins over its pending view
        return images

    def _sync_names(self) -> None:
        """Map the current images to inodes, allocating inodes for new views."""
        names: dict[bytes, int] = {}
        for name, view in self._images().items():
            inode = self._inode_of_view.get(id(view))
            if inode is None:
                inode = self._next_inode
                self._next_inode += 1
                self._views[inode] = view
                self._inode_of_view[id(view)] = inode
            names[os.fsencode(name)] = inode
        stale = [(old, inode) for old, inode in self._names.items() if names.get(old) != inode]
        self._names = names
        for old, inode in stale:
            if self._session_live:
                self._forget_entry_soon(SNAPSHOTS_INODE, old)
            self._drop_if_unused(inode)

    def _forget_entry_soon(self, parent: int, name: bytes) -> None:
        """Have the kernel forget ``name`` in ``parent``, from pyfuse3's notify thread: not
        here, since we may be answering a request the kernel holds the directory for."""
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
        self._unsettled[(parent, name)] = None
        while len(self._unsettled) > UNSETTLED_KEPT:  # (the notify thread does them anyway)
            del self._unsettled[next(iter(self._unsettled))]

    async def settle(self) -> None:
        """Return once the kernel has forgotten the entries invalidated so far, which
        ``invalidate_entry_async`` does later, on its own thread. For a control request that
        changed names (a refresh after a snapshot was deleted, a deleted disk): the command
        that asked must not find the old name once it returns. Each is invalidated again,
        synchronously, on a worker thread, so that this thread stays free for the requests
        the kernel may finish first; the notify thread's own try then finds nothing."""
        while self._unsettled and self._session_live:
            parent, name = next(iter(self._unsettled))
            del self._unsettled[(parent, name)]
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
            except FileNotFoundError:
                pass  # the kernel had forgotten it already
            except OSError as e:  # it will time out in the kernel; nothing is served wrong
                log.debug("could not invalidate %r in inode %d: %s", name, parent, e)

    def _drop_if_unused(self, inode: int) -> None:
        if self._lookups.get(inode, 0) <= 0 and inode not in self._names.values():
            self._lookups.pop(inode, None)
            view = self._views.pop(inode, None)
            if view is not None:
                del self._inode_of_view[id(view)]

    def _sync_disks(self, rewritten: str | None = None) -> None:
        """Map the service's disks to inodes. The service calls this (never from inside a
        request handler) when disks come, go or change; ``rewritten`` names a disk whose
        contents changed under the kernel's page cache (a rollback, while nothing had it open)."""
        assert self._disks is not None
        current = self._disks.disks
        for name, inode in list(self._disk_inodes.items()):
            disk = self._disk_of[inode]
            if current.get(name) is not disk:
                del self._disk_inodes[name]
                if not disk.opens:
                    del self._disk_of[inode]
                if self._session_live:
                    self._forget_entry_soon(DISKS_INODE, os.fsencode(f"{name}.img"))
            elif self._session_live and rewritten == name:
                try:
                    pyfuse3.invalidate_inode(inode, attr_only=False)
                except FileNotFoundError:
                    pass  # the kernel has forgotten the inode: nothing cached to drop
        for name, disk in current.items():
            if name not in self._disk_inodes:
                inode = self._next_inode
                self._next_inode += 1
                self._disk_inodes[name] = inode
                self._disk_of[inode] = disk
        self._sync_names()

    async def _refresh(self, strict: bool = False) -> None:
        await self._catalog.refresh(strict=strict)
        self._sync_names()

    def _children(self, inode: int) -> list[tuple[bytes, int]]:
        """(name, inode) of a directory's entries, sorted by name."""
        if inode == ROOT_INODE:
            return [(DISKS_DIR, DISKS_INODE), (SNAPSHOTS_DIR, SNAPSHOTS_INODE)]
        if inode == SNAPSHOTS_INODE:
            return sorted(self._names.items())
        if inode == DISKS_INODE:
            return sorted((os.fsencode(f"{n}.img"), i) for n, i in self._disk_inodes.items())
        raise _fail(errno.ENOTDIR if inode in self._views or inode in self._disk_of
                    else errno.ENOENT)

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_rdev = 0
        attr.st_blksize = IO_SIZE
        disk = self._disk_of.get(inode)
        image = disk if disk is not None else self._views.get(inode)
        if image is not None:
            attr.st_mode = stat.S_IFREG | (0o600 if disk is not None else 0o444)
            attr.st_nlink = 1
            attr.st_size = image.size
            attr.st_blocks = -(-image.size // 512)
            mtime = image.mtime_ns
            attr.entry_timeout = attr.attr_timeout = (DISK_TIMEOUT if disk is not None
                                                      else IMAGE_TIMEOUT)
        elif inode in (ROOT_INODE, SNAPSHOTS_INODE, DISKS_INODE):
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 4 if inode == ROOT_INODE else 2
            attr.st_size = 0
            attr.st_blocks = 0
            mtime = self._created_ns
            attr.entry_timeout = attr.attr_timeout = DIR_TIMEOUT
        else:
            raise _fail(errno.ENOENT)
        attr.st_atime_ns = attr.st_ctime_ns = attr.st_mtime_ns = mtime
        return attr

    # -- metadata ------------------------------------------------------------------------------

    @_errno_boundary
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attributes(parent_inode)
        if name == b"..":
            return self._attributes(ROOT_INODE)
        if parent_inode == SNAPSHOTS_INODE:
            self._sync_names()
            if name not in self._names:
                await self._refresh(strict=True)

        for child, inode in self._children(parent_inode):
            if child == name:
                attr = self._attributes(inode)
                if inode in self._views:
                    self._lookups[inode] = self._lookups.get(inode, 0) + 1
                return attr
        raise _fail(errno.ENOENT)

    @_errno_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel dropped ``count`` references to each inode. Never raises."""
        try:
            for inode, count in inode_list:
                if inode in self._lookups:
                    self._lookups[inode] -= count
                    self._drop_if_unused(inode)
        except Exception:
            log.exception("forget%r failed", inode_list)

    @_errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self._sync_names()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = STATFS_BLOCK
        sizes = [self._views[i].size for i in self._names.values()]
        sizes += [self._disk_of[i].size for i in self._disk_inodes.values()]
        data.f_blocks = sum(-(-size // STATFS_BLOCK) for size in sizes)
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(sizes) + 3
        data.f_ffree = data.f_favail = 0
        data.f_namemax = NAME_MAX
        return data

    # -- directories ---------------------------------------------------------------------------

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    @_errno_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._children(inode)  # ENOTDIR / ENOENT
        handle = self._new_handle()
        self._open_dirs[handle] = _OpenDir(inode)
        return handle

    @_errno_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The listing is taken once per open directory (at offset 0), so a refresh between two
        # readdir calls of one listing cannot shift the offsets under it.
        directory = self._open_dirs.get(fh)
        if directory is None:
            raise _fail(errno.EBADF)
        if directory.listing is None or start_id == 0:
            if directory.inode == SNAPSHOTS_INODE:
                try:
                    await self._refresh()
                except SnapfsError as e:  # the images already known stay listable
                    if e.message != self._listing_trouble:  # not every 2 s while it lasts
                        log.warning("listing %s without refreshing: %s",
                                    SNAPSHOTS_DIR.decode(), e.message)
                        self._listing_trouble = e.message
                    self._sync_names()
                else:
                    if self._catalog.failure is None:
                        self._listing_trouble = None
            directory.listing = [(b".", directory.inode), (b"..", ROOT_INODE),
                                 *self._children(directory.inode)]
        for position in range(start_id, len(directory.listing)):
            name, child = directory.listing[position]
            if not pyfuse3.readdir_reply(token, name, self._attributes(child), position + 1):
                break

    @_errno_boundary
    async def releasedir(self, fh: int) -> None:
        self._open_dirs.pop(fh, None)

    # -- files ---------------------------------------------------------------------------------

    @_errno_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        disk = self._disk_of.get(inode)
        if disk is not None:
            if disk is not (self._disks.disks.get(disk.name) if self._disks else None):
                raise _fail(errno.ENOENT)  # deleted
            if flags & os.O_TRUNC:
                raise _fail(errno.EPERM)  # a disk's size is fixed
            handle = self._new_handle()
            self._open_disks[handle] = disk
            if flags & os.O_DIRECT:
                self._direct.add(handle)
            disk.handle_opened()
            return pyfuse3.FileInfo(fh=handle, keep_cache=False)
        view = self._views.get(inode)
        if view is None:
            self._attributes(inode)  # ENOENT for unknown inodes
            raise _fail(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _fail(errno.EROFS)
        handle = self._new_handle()
        self._open_files[handle] = view
        self._catalog.use(view.snapshot_id)
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @_errno_boundary
    async def read(  # type: ignore[override]  # pyfuse3 takes any contiguous buffer
        self, fh: int, off: int, size: int,
    ) -> bytes | memoryview:
        view: ReadOnlyImage | Disk | None = self._open_files.get(fh) or self._open_disks.get(fh)
        if view is None:
            raise _fail(errno.EBADF)
        if off >= view.size:
            return b""
        if isinstance(view, ImageView):
            # pyfuse3 replies from any contiguous buffer: a stored snapshot's read-ahead
            # buffer goes to the kernel without a copy
            return await view.read_buffer(off, size)
        return await view.read(off, size)

    @_errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        disk = self._open_disks.get(fh)
        if disk is None:
            raise _fail(errno.EBADF if fh not in self._open_files else errno.EROFS)
        if off >= disk.size:
            raise _fail(errno.ENOSPC)  # a disk does not grow by writing past its end
        if off + len(buf) > disk.size:
            # as a block device does: what fits is written and the short count says so (the
            # caller's next write, at the end, gets ENOSPC). Failing the whole request would
            # leave the disk's last bytes unwritten by a copy of a bigger image. Not for
            # O_DIRECT: the kernel turns a short reply to an asynchronous direct write into
            # EIO, which would say the disk failed; ENOSPC for the whole request is the truth.
            if fh in self._direct:
                raise _fail(errno.ENOSPC)
            buf = buf[: disk.size - off]
        return await disk.write(off, buf)

    @_errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        disk = self._open_disks.get(fh)
        if disk is not None:
            await disk.sync()

    @_errno_boundary
    async def flush(self, fh: int) -> None:
        pass  # every write reached the overlay before it was acknowledged; fsync makes it durable

    @_errno_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        disk = self._disk_of.get(inode)
        if disk is None:
            raise _fail(errno.EROFS if inode in self._views else errno.EPERM)
        if fields.update_size and attr.st_size != disk.size:
            raise _fail(errno.EPERM)  # a disk's size is fixed (``disk create --size``)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise _fail(errno.EPERM)
        return self._attributes(inode)  # times: accepted, not kept (the image's mtime is ours)

    # -- what the tree never allows: disks come and go with ``snapfs disk``, not with files ----

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise _fail(errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise _fail(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _fail(errno.EPERM)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise _fail(errno.EPERM)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise _fail(errno.EPERM)

    @_errno_boundary
    async def release(self, fh: int) -> None:
        self._open_files.pop(fh, None)
        self._direct.discard(fh)
        disk = self._open_disks.pop(fh, None)
        if disk is not None:
            disk.handle_released()
            if self._disks is not None and disk is not self._disks.disks.get(disk.name) \
                    and not disk.opens:
                self._disk_of = {i: d for i, d in self._disk_of.items() if d is not disk}
