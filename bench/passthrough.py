#!/usr/bin/env python3
"""The trivial FUSE reference for the mount benchmark: one local file, served read-only.

    .venv/bin/python bench/passthrough.py SOURCE MOUNTPOINT

Mounts a pyfuse3 file system at MOUNTPOINT whose root holds one read-only file, named like
SOURCE, whose reads are ``os.pread`` on SOURCE, straight on the trio thread: no cache, no
threads, no checks. It is what "FUSE in Python" costs without any of snapfs's work (block map,
cache, decoding, hydration), with the same mount options as snapfs (``ro``,
``default_permissions``, ``keep_cache`` on open) so that the kernel side is the same.

Prints ``ready`` on stdout once mounted; SIGTERM or SIGINT unmounts and exits. The benchmark
runner (``run_mount.py``) starts it, reads the file and stops it by its pid.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1


class Passthrough(pyfuse3.Operations):
    def __init__(self, source: str) -> None:
        super().__init__()
        self.fd = os.open(source, os.O_RDONLY)
        self.name = os.fsencode(os.path.basename(source))
        self.st = os.fstat(self.fd)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_blksize = 128 * 1024
        attr.entry_timeout = attr.attr_timeout = 3600.0
        ns = self.st.st_mtime_ns
        attr.st_atime_ns = attr.st_ctime_ns = attr.st_mtime_ns = ns
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
        elif inode == FILE_INODE:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = self.st.st_size
            attr.st_blocks = -(-self.st.st_size // 512)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)


async def _serve(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(watch_signals)
        print("ready", flush=True)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: passthrough.py SOURCE MOUNTPOINT", file=sys.stderr)
        return 2
    source, mountpoint = sys.argv[1], sys.argv[2]
    ops = Passthrough(source)
    options = {"fsname=passthrough", "subtype=passthrough", "ro", "default_permissions"}
    pyfuse3.init(ops, mountpoint, options)
    try:
        trio.run(_serve, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
