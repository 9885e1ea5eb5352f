"""The FUSE adapter called directly, without the kernel: names, attributes, the read-only rule
and the error boundary, over a catalog whose images the test controls. (``test_mount`` covers
the same adapter through a real mount.)"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any

import pyfuse3
import pytest
import trio

from snapfs.errors import IntegrityError, StoreUnavailable
from snapfs.fuse_ops import DISKS_INODE, ROOT_INODE, SNAPSHOTS_INODE, SnapshotFS

CTX: Any = None  # the handlers never look at the request context


class FakeView:
    def __init__(self, name: str, data: bytes, mtime_ns: int = 1_700_000_000_000_000_000) -> None:
        self.name = name
        self.snapshot_id = f"id-of-{name}"
        self.data = data
        self.size = len(data)
        self.mtime_ns = mtime_ns
        self.fail: BaseException | None = None

    async def read(self, offset: int, length: int) -> bytes:
        if self.fail is not None:
            raise self.fail
        return self.data[offset : offset + length]

    def stats(self) -> dict[str, Any]:
        return {}


class FakeCatalog:
    """Images appear on ``refresh`` (like snapshots created after mounting)."""

    def __init__(self, *views: FakeView) -> None:
        self.views = {v.name: v for v in views}
        self.upcoming: dict[str, FakeView] = {}
        self.refreshes = 0
        self.fail: Exception | None = None
        self.failure: Exception | None = None  # the last refresh's error, as the real one's
        self.on_change: list[Any] = []
        self.in_use: set[str] = set()

    def use(self, snapshot_id: str) -> None:
        self.in_use.add(snapshot_id)

    async def refresh(self, force: bool = False, strict: bool = False) -> None:
        """Reads the repository every time (the real catalog at most every 2 s: ``strict``
        then raises the last error, which this one raises anyway)."""
        self.refreshes += 1
        self.failure = self.fail
        if self.fail is not None:
            raise self.fail
        changed = bool(self.upcoming)
        self.views.update(self.upcoming)
        self.upcoming.clear()
        if changed:
            for callback in self.on_change:
                callback()

    def images(self) -> dict[str, FakeView]:
        return self.views


def run(fn: Any) -> Any:
    return trio.run(fn)


def fuse_errno(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return excinfo.value.errno


@pytest.fixture
def catalog() -> FakeCatalog:
    return FakeCatalog(FakeView("vm-1.img", b"0123456789" * 1000))


@pytest.fixture
def fs(catalog: FakeCatalog) -> SnapshotFS:
    return SnapshotFS(catalog, uid=1234, gid=5678)  # type: ignore[arg-type]


def test_tree_and_attributes(fs: SnapshotFS) -> None:
    async def body() -> None:
        root = await fs.getattr(ROOT_INODE, CTX)
        assert stat.S_ISDIR(root.st_mode) and root.st_mode & 0o777 == 0o555
        snaps = await fs.lookup(ROOT_INODE, b"snapshots", CTX)
        disks = await fs.lookup(ROOT_INODE, b"disks", CTX)
        assert (snaps.st_ino, disks.st_ino) == (SNAPSHOTS_INODE, DISKS_INODE)
        image = await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)
        assert stat.S_ISREG(image.st_mode) and image.st_mode & 0o777 == 0o444
        assert image.st_size == 10000 and image.st_mtime_ns == 1_700_000_000_000_000_000
        assert (image.st_uid, image.st_gid) == (1234, 5678)
        assert image.entry_timeout >= 600 and image.attr_timeout >= 600  # immutable
        assert (await fs.getattr(image.st_ino, CTX)).st_size == 10000
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.lookup(DISKS_INODE, b"vm-1.img", CTX)
        assert fuse_errno(e) == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.getattr(999, CTX)
        assert fuse_errno(e) == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.opendir(image.st_ino, CTX)
        assert fuse_errno(e) == errno.ENOTDIR
        statfs = await fs.statfs(CTX)
        assert statfs.f_blocks * statfs.f_frsize >= 10000 and statfs.f_bfree == 0

    run(body)


def test_unknown_name_refreshes_the_catalog(fs: SnapshotFS, catalog: FakeCatalog) -> None:
    async def body() -> None:
        catalog.upcoming["vm-2.img"] = FakeView("vm-2.img", b"x" * 50)
        attr = await fs.lookup(SNAPSHOTS_INODE, b"vm-2.img", CTX)
        assert attr.st_size == 50 and catalog.refreshes == 1
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.lookup(SNAPSHOTS_INODE, b"nope.img", CTX)
        assert fuse_errno(e) == errno.ENOENT

    run(body)


def test_a_replaced_image_gets_a_new_inode_and_open_files_keep_the_old(
    fs: SnapshotFS, catalog: FakeCatalog
) -> None:
    async def body() -> None:
        old = await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)
        fh = (await fs.open(old.st_ino, os.O_RDONLY, CTX)).fh
        catalog.upcoming["vm-1.img"] = FakeView("vm-1.img", b"new")  # deleted, name reused
        with pytest.raises(pyfuse3.FUSEError):  # any unknown name refreshes the catalog
            await fs.lookup(SNAPSHOTS_INODE, b"other.img", CTX)
        new = await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)
        assert new.st_ino != old.st_ino and new.st_size == 3
        assert await fs.read(fh, 0, 4) == b"0123"
        assert (await fs.getattr(old.st_ino, CTX)).st_size == 10000

    run(body)


def test_a_refresh_by_anyone_retires_the_kernels_entry_for_a_reused_name(
    fs: SnapshotFS, catalog: FakeCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel keeps a snapshot's name for IMAGE_TIMEOUT and asks nothing meanwhile: when
    a refresh that is not ours (the sweep's) finds the snapshot deleted and its name reused,
    the name's entry is invalidated at once. (The kernel's side cannot be watched without a
    mount and half a minute of the sweep: the call into pyfuse3 is recorded instead.)"""
    invalidated: list[tuple[int, bytes]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async",
                        lambda parent, name, **kw: invalidated.append((parent, name)))

    async def body() -> None:
        old = await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)
        fs._session_live = True  # as once pyfuse3.main runs
        catalog.upcoming["vm-1.img"] = FakeView("vm-1.img", b"new")
        await catalog.refresh()  # the sweep's
        assert invalidated == [(SNAPSHOTS_INODE, b"vm-1.img")]
        new = await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)
        assert new.st_ino != old.st_ino and new.st_size == 3

    run(body)


def test_readdir_lists_refreshes_and_survives_a_store_outage(
    fs: SnapshotFS, catalog: FakeCatalog, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replies: list[tuple[bytes, int]] = []

    def readdir_reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes,
                      next_id: int) -> bool:
        replies.append((name, next_id))
        return len(replies) < 3  # the kernel's buffer holds three entries

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)

    async def listing(start: int = 0) -> list[tuple[bytes, int]]:
        replies.clear()
        fh = await fs.opendir(SNAPSHOTS_INODE, CTX)
        await fs.readdir(fh, start, CTX)
        await fs.releasedir(fh)
        return list(replies)

    async def body() -> None:
        catalog.upcoming["vm-2.img"] = FakeView("vm-2.img", b"x")
        assert await listing() == [(b".", 1), (b"..", 2), (b"vm-1.img", 3)]
        assert await listing(3) == [(b"vm-2.img", 4)]
        catalog.fail = StoreUnavailable("store unavailable: connection refused")
        with caplog.at_level(logging.WARNING, logger="snapfs.fuse_ops"):
            assert await listing(2) == [(b"vm-1.img", 3), (b"vm-2.img", 4)]
        assert "connection refused" in caplog.text
        with pytest.raises(pyfuse3.FUSEError) as e:  # an unknown name: can't say it's absent
            await fs.lookup(SNAPSHOTS_INODE, b"vm-3.img", CTX)
        assert fuse_errno(e) == errno.EIO

    run(body)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
def test_write_opens_are_refused(fs: SnapshotFS, flags: int) -> None:
    async def body() -> None:
        ino = (await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)).st_ino
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.open(ino, flags, CTX)
        assert fuse_errno(e) == errno.EROFS

    run(body)


def test_open_read_release(fs: SnapshotFS, catalog: FakeCatalog) -> None:
    async def body() -> None:
        ino = (await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)).st_ino
        assert catalog.in_use == set()  # looked up, not opened: the sweep leaves it be
        info = await fs.open(ino, os.O_RDONLY, CTX)
        assert info.keep_cache
        assert catalog.in_use == {"id-of-vm-1.img"}  # opened: the sweep hydrates it
        assert await fs.read(info.fh, 9995, 100) == b"56789"
        assert await fs.read(info.fh, 10000, 100) == b""
        await fs.release(info.fh)
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.read(info.fh, 0, 10)
        assert fuse_errno(e) == errno.EBADF

    run(body)


@pytest.mark.parametrize("failure, traceback", [
    (IntegrityError("blob 0123abcd in pack 4567: checksum mismatch"), False),
    (StoreUnavailable("store unavailable: connection refused"), False),
    (ValueError("a bug"), True),
])
def test_errors_become_eio_and_are_logged(fs: SnapshotFS, catalog: FakeCatalog,
                                          caplog: pytest.LogCaptureFixture,
                                          failure: Exception, traceback: bool) -> None:
    async def body() -> None:
        ino = (await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)).st_ino
        fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
        catalog.views["vm-1.img"].fail = failure
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.read(fh, 0, 4096)
        assert fuse_errno(e) == errno.EIO

    with caplog.at_level(logging.ERROR, logger="snapfs.fuse_ops"):
        run(body)
    [record] = caplog.records
    assert str(failure) in record.getMessage()
    assert (record.exc_info is not None) == traceback


def test_cancellation_is_not_an_error(fs: SnapshotFS, catalog: FakeCatalog) -> None:
    async def body() -> None:
        ino = (await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)).st_ino
        fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh

        async def slow(offset: int, length: int) -> bytes:
            await trio.sleep_forever()
            raise AssertionError

        catalog.views["vm-1.img"].read = slow  # type: ignore[method-assign]
        with trio.move_on_after(0.01) as scope:
            await fs.read(fh, 0, 10)
        assert scope.cancelled_caught

    run(body)


def test_a_deleted_image_lives_until_the_kernel_forgets_it(
    fs: SnapshotFS, catalog: FakeCatalog
) -> None:
    async def body() -> None:
        catalog.views["vm-2.img"] = FakeView("vm-2.img", b"never looked up")
        ino = (await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)).st_ino
        await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)  # two references now
        fh = (await fs.open(ino, os.O_RDONLY, CTX)).fh
        catalog.views.clear()  # both snapshots deleted
        with pytest.raises(pyfuse3.FUSEError):  # a lookup miss refreshes
            await fs.lookup(SNAPSHOTS_INODE, b"vm-1.img", CTX)
        assert (await fs.getattr(ino, CTX)).st_size == 10000
        assert await fs.read(fh, 0, 2) == b"01"
        await fs.release(fh)
        await fs.forget([(ino, 1)])
        assert (await fs.getattr(ino, CTX)).st_size == 10000  # one reference left
        await fs.forget([(ino, 1)])
        with pytest.raises(pyfuse3.FUSEError) as e:
            await fs.getattr(ino, CTX)
        assert fuse_errno(e) == errno.ENOENT
        assert len(fs._views) == 0  # vm-2, which the kernel never knew, went at once

    run(body)


def test_forget_never_raises(fs: SnapshotFS) -> None:
    run(lambda: fs.forget([(ROOT_INODE, 1), (12345, 7), (-1, 0)]))
