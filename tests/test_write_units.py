"""The pieces of writable disks without FUSE: ``Bitmap`` against a set, ``DiskState`` (lmdb)
transactions and trust, and a ``Disk`` over a real snapshot (real repository on a local store,
real hydrator and block cache) written, closed, copied on write and uploaded under trio, checked
against a bytearray model of the disk."""

from __future__ import annotations

import dataclasses
import os
import random
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from snapfs.cache import BlockCache
from snapfs.format.block import ZERO_ID
from snapfs.format.manifest import SnapshotRoot
from snapfs.hydration.scheduler import HydrationConfig, Hydrator
from snapfs.image.catalog import SnapshotCatalog
from snapfs.image.view import ImageView
from snapfs.repo.create import CreateOptions, create_snapshot
from snapfs.repo.repository import Repository
from snapfs.store.local import LocalStore
from snapfs.write.bitmap import Bitmap
from snapfs.write.disk import ClosedGeneration, Disk, PendingSnapshot
from snapfs.write.overlay import Overlay, leftover_files
from snapfs.write.service import encode_staged, stage_blocks
from snapfs.write.state import DiskRecord, DiskState, SnapshotPart, SnapshotTask, _gen_key
from snapfs.write.uploader import UploadProgress, upload_generation

BS = 16 * 1024


# -- Bitmap --------------------------------------------------------------------------------------


def test_bitmap_behaves_as_a_set_of_block_numbers() -> None:
    rng = random.Random(1)
    size = 5000
    bitmap, model = Bitmap(size), set()
    for _ in range(20000):
        n = rng.randrange(size)
        if rng.random() < 0.6:
            assert bitmap.add(n) == (n not in model)
            model.add(n)
        else:
            assert bitmap.discard(n) == (n in model)
            model.discard(n)
    assert len(bitmap) == len(model)
    assert list(bitmap) == sorted(model)
    assert all((n in bitmap) == (n in model) for n in range(size))
    assert -1 not in bitmap and size not in bitmap and "3" not in bitmap
    copy = bitmap.copy()
    copy.add(next(n for n in range(size) if n not in model))
    assert len(bitmap) == len(model) and len(copy) == len(model) + 1
    small = bitmap.resized(100)
    assert (small.size, list(small)) == (100, sorted(n for n in model if n < 100))
    assert list(Bitmap(10, [9, 0, 9])) == [0, 9] and len(Bitmap(10, [9, 0, 9])) == 2


# -- DiskState -----------------------------------------------------------------------------------


def record(name: str, disk_id: str, size: int = 64 * BS) -> DiskRecord:
    return DiskRecord(name=name, id=disk_id, size=size, block_size=BS, base=None, parent=None,
                      source=None, created="2026-01-01T00:00:00Z")


def started_state(tmp_path: Path, *records: DiskRecord) -> DiskState:
    """A disk state at ``tmp_path/state`` started in boot ``boot-1``, holding ``records``."""
    state = DiskState(tmp_path / "state")
    state.start("boot-1")
    for r in records:
        state.put_disk(r)
    return state


def test_disk_state_keeps_blocks_per_disk_and_generation(tmp_path: Path) -> None:
    state = DiskState(tmp_path / "state")
    a, b = record("a", "00000000000000aa"), record("b", "00000000000000ab")
    for r in (a, b):
        state.put_disk(r)
    state.mark(a, 1, present=[1, 2, 3], changed=[1, 2, 3])
    state.mark(a, 2, present=[4], changed=[2, 4])
    state.mark(b, 1, present=[7], changed=[7])
    state.put_cow(a, 1, [(2, 0), (3, BS)])
    assert state.present(a) == [1, 2, 3, 4] and state.present(b) == [7]
    assert state.changed(a) == {1: [1, 2, 3], 2: [2, 4]}
    assert state.cow(a, 1) == {2: 0, 3: BS} and state.cow(a, 2) == {}

    # a failed upload of generation 1: in one commit with the task stored failed, its blocks
    # count as changed in 2 (those the journal holds too) and its cow entries go
    state.journal.put([("changed", _gen_key(a.key, 1, 5)), ("cow", _gen_key(a.key, 1, 6))])
    failed = SnapshotTask(id="t0", state="failed", created="2026-01-01T00:00:00Z",
                          parts=[SnapshotPart("a", a.id, 1, "s0", "a-0", None, a.size, blocks=3)],
                          reason="the store refused")
    state.fail_task(failed, [(a, 1, 2)])
    assert state.changed(a) == {2: [1, 2, 3, 4, 5]} and state.cow(a, 1) == {}
    assert state.tasks() == [failed]
    assert not state.journal.keys("changed", a.key + (1).to_bytes(4, "big"))
    state.delete_task("t0")

    task = SnapshotTask(id="t1", state="progressing", created="2026-01-01T00:00:01Z",
                        parts=[SnapshotPart("a", a.id, 2, "s1", "a-1", None, a.size, blocks=4)])
    advanced = dataclasses.replace(a, gen=3)
    state.put_task(task, [advanced])
    assert state.tasks() == [task]
    assert {r.name: r.gen for r in state.disks()} == {"a": 3, "b": 1}
    state.delete_task("t1")
    assert state.tasks() == []

    # rollback: forget some overlay blocks and generations, store the record, at once
    state.rollback(dataclasses.replace(advanced, gen=4), unpresent=[4], drop_gens=[2],
                   clear_present=False)
    assert state.present(a) == [1, 2, 3] and state.changed(a) == {}
    state.delete_disk(a)
    assert [r.name for r in state.disks()] == ["b"]
    assert state.present(a) == [] and state.changed(b) == {1: [7]}  # b untouched
    state.close()


def test_disk_state_is_distrusted_only_after_an_unclean_stop_in_another_boot(
    tmp_path: Path,
) -> None:
    def start(boot: str, stop: bool) -> bool:
        state = DiskState(tmp_path / "state")
        trusted = state.start(boot)
        if stop:
            state.stop()
        state.close()
        return trusted

    assert start("boot-1", stop=False) is True  # fresh
    assert start("boot-1", stop=True) is True  # killed, but in the same boot: page cache kept
    assert start("boot-2", stop=False) is True  # the last one stopped cleanly
    assert start("boot-3", stop=True) is False  # a reboot after an unclean stop


def test_marks_are_durable_only_after_their_bytes_and_a_journal_is_read_only_in_its_boot(
    tmp_path: Path,
) -> None:
    """Marks go to the journal; ``sync`` folds them into the durable state after ``flush``
    (the disk's bytes), never before; a journal of another boot is deleted unread. (What a
    power cut does to it: test_powercut.)"""
    a, b = record("a", "00000000000000aa"), record("b", "00000000000000ab")
    state = started_state(tmp_path, a, b)
    state.mark(a, 1, present=[1, 2], changed=[1, 2])
    state.mark(b, 1, present=[7], changed=[7])

    def durable(r: DiskRecord) -> list[int]:
        with state._env.begin(db=state._present) as txn:
            return [struct.unpack(">Q", k[8:])[0] for k, _ in txn.cursor() if k[:8] == r.key]

    seen_at_flush: list[list[int]] = []
    state.sync(a, lambda: seen_at_flush.append(durable(a)))
    assert seen_at_flush == [[]] and durable(a) == [1, 2]
    assert durable(b) == [] and state.present(b) == [7]  # b's bytes were not flushed
    state.mark(a, 1, present=[3], changed=[3])
    state.close()

    state = DiskState(tmp_path / "state")
    assert state.start("boot-1") is True  # kill -9: the journal is whole
    assert state.present(a) == [1, 2, 3] and state.present(b) == [7]
    state.close()

    state = DiskState(tmp_path / "state")
    assert state.start("boot-2") is False  # a power loss: only what was synced
    assert state.present(a) == [1, 2] and state.changed(a) == {1: [1, 2]}
    assert state.present(b) == [] and state.changed(b) == {}
    state.stop()
    state.close()


def test_a_start_drops_what_deleted_disks_and_ended_uploads_left(tmp_path: Path) -> None:
    """What a kill -9 or a power cut can leave after the durable commit of a ``disk delete``
    (the disk's journal entries, its files) or of an upload's end (its generation's
    copy-on-write entries and file) is found and dropped; the rest is untouched."""
    a, b = record("a", "00000000000000aa"), record("b", "00000000000000ab")
    state = started_state(tmp_path, a, b)
    state.mark(a, 1, present=[1, 2], changed=[1, 2])
    state.mark(b, 1, present=[3], changed=[3])
    state.put_cow(a, 1, [(1, 0)])
    state.put_cow(a, 2, [(2, 0)])
    for r in (a, b):
        state.sync(r, lambda: None)  # durable
    state.mark(a, 3, present=[4], changed=[4])  # journaled
    state.put_cow(a, 2, [(4, BS)])
    state.mark(b, 1, present=[5], changed=[5])
    with state._env.begin(write=True, db=state._disks) as txn:
        txn.delete(b"b")  # b deleted, the rest of its deletion cut
    # b: 2 durable, 2 journaled; a's generation 2 (its upload ended): 1 and 1
    assert state.drop_leftovers({a.id}, {(a.id, 1)}) == 6
    assert state.present(a) == [1, 2, 4] and state.changed(a) == {1: [1, 2], 3: [4]}
    assert state.cow(a, 1) == {1: 0} and state.cow(a, 2) == {}
    assert state.present(b) == [] and state.changed(b) == {}
    assert state.drop_leftovers({a.id}, {(a.id, 1)}) == 0
    assert state.drop_leftovers(set(), set()) == 7  # and then nothing is left of a either
    assert state.present(a) == [] and state.changed(a) == {} and state.cow(a, 1) == {}
    state.close()

    for name in ("00000000000000aa.overlay", "00000000000000aa.cow-1", "00000000000000aa.cow-2",
                 "00000000000000ab.overlay", "00000000000000ab.cow-1", "lock"):
        (tmp_path / "state" / name).write_bytes(b"")
    assert [p.name for p in leftover_files(tmp_path / "state", {a.id}, {(a.id, 1)})] == [
        "00000000000000aa.cow-2", "00000000000000ab.cow-1", "00000000000000ab.overlay"]


def test_new_files_of_a_disks_state_get_durable_names_and_no_write_syncs_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new name survives a power cut only once its directory is fsync'd: the state's
    directories and lmdb environments when they are made, an overlay when its disk is created,
    a copy-on-write file at the first sync after it was made (before the entries pointing into
    it are made durable), and nothing on the path of a write."""
    # A spy on os.fsync, not a fault: a name lost to a power cut cannot be caused on ext4 (it
    # commits a new name with the file's own fsync), so which directories are fsync'd is watched.
    synced: list[str] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    where = tmp_path / "disks" / "repo-id"
    state = DiskState(where)  # new directories, a new environment and its data file
    assert synced == [str(tmp_path), str(tmp_path / "disks"), str(where), f"{where}/state.lmdb"]
    try:
        synced.clear()
        overlay = Overlay(where, "00000000000000aa", 64 * BS)
        assert synced == [str(where)]
        overlay.close()
        synced.clear()
        overlay = Overlay(where, "00000000000000aa", 64 * BS)  # a restart: nothing new
        assert synced == []
        try:
            overlay.pwrite(0, b"x" * BS)
            overlay.cow(2).append(b"y" * BS)  # a write that saves a closed block first
            overlay.cow(2).append(b"z" * BS)
            assert synced == []
            overlay.sync()
            assert synced == [str(where)]
            overlay.pwrite(BS, b"x" * BS)
            overlay.cow(2).append(b"w" * BS)
            overlay.sync()  # the file's name is durable already
            assert synced == [str(where)]
        finally:
            overlay.close()
    finally:
        state.close()


def test_an_unreadable_record_of_a_failed_flush_makes_every_kept_content_suspect(
    tmp_path: Path,
) -> None:
    """``ID.failed`` (see ``overlay``) names the offsets from which copy-on-write files may be
    lost; one that cannot be read (torn by the failing device, say) must not be taken for no
    failure: every copy-on-write file then counts as lost from its start, until no upload that
    it concerns is left."""
    disk_id = "00000000000000aa"
    overlay = Overlay(tmp_path, disk_id, 64 * BS)
    overlay.cow(3).append(b"y" * BS)
    overlay.sync()
    overlay.close()
    assert Overlay(tmp_path, disk_id, 64 * BS).lost_from(3) is None  # no failure: all good
    (tmp_path / f"{disk_id}.failed").write_text('{"at": "2026-12-06T')
    overlay = Overlay(tmp_path, disk_id, 64 * BS)
    try:
        assert overlay.failed_before is not None and "unreadable" in overlay.failed_before
        assert overlay.lost_from(3) == 0
        assert overlay.lost_from(4) is None  # a generation closed after the restart
        overlay.forget_failure({3})  # its upload is still to come
        assert (tmp_path / f"{disk_id}.failed").exists()
        overlay.drop_cow(3)
        overlay.forget_failure(set())
        assert not (tmp_path / f"{disk_id}.failed").exists()
        assert overlay.failed_before is None and overlay.lost_from(3) is None
    finally:
        overlay.close()


# -- a Disk over a real snapshot -----------------------------------------------------------------


@pytest.fixture
def repo_with_snapshot(tmp_path: Path) -> tuple[Repository, bytes]:
    data = bytearray(random.Random(2).randbytes(40 * BS))
    data[10 * BS : 14 * BS] = bytes(4 * BS)  # some zero blocks
    (tmp_path / "base.img").write_bytes(data)
    repo = Repository.init(LocalStore(tmp_path / "repo"), block_size=BS, pack_size=256 << 10)
    trio.run(create_snapshot, repo, str(tmp_path / "base.img"), CreateOptions(name="base"))
    return repo, bytes(data)


def test_a_disk_written_closed_and_uploaded_is_its_contents_at_the_closing(
    repo_with_snapshot: tuple[Repository, bytes], tmp_path: Path
) -> None:
    repo, base = repo_with_snapshot
    size = 48 * BS  # grown past its base (whose size is a multiple of the block size)
    run_over_base(repo, tmp_path, lambda hydrator, view: scenario(repo, hydrator, view, size,
                                                                   base, tmp_path))


def run_over_base(repo: Repository, tmp_path: Path,
                  body: Callable[[Hydrator, ImageView], Awaitable[None]]) -> None:
    """``body`` under trio, with a running hydrator and the view of the snapshot ``base``."""

    async def main() -> None:
        cache = BlockCache(tmp_path / "cache", capacity=64 << 20)
        hydrator = Hydrator(repo, repo.load_index(), cache, HydrationConfig(background=False))
        catalog = SnapshotCatalog(repo, hydrator)
        await catalog.refresh(force=True)
        view = catalog.images()["base.img"]
        async with trio.open_nursery() as nursery:
            await nursery.start(hydrator.run)
            await body(hydrator, view)
            nursery.cancel_scope.cancel()
        cache.close()

    trio.run(main)


async def upload_closed(repo: Repository, hydrator: Hydrator, view: ImageView, disk: Disk,
                        closed: ClosedGeneration, name: str, size: int,
                        kept: list[tuple[bytes, bytes]] | None = None) -> SnapshotRoot:
    """Upload generation 1 of ``disk`` (closed as ``closed``) as snapshot ``name`` of ``view``;
    the pages it hands the cache go to ``kept``."""
    part = SnapshotPart("d", disk.record.id, 1, closed.snapshot_id, name, view.root.id, size,
                        blocks=len(closed.blocks))

    async def parent_pages_of(ps: list[int]) -> list[list[bytes]]:
        return [await view.page(p) for p in ps]

    async def keep_pages(pages: list[tuple[bytes, bytes]]) -> None:
        if kept is not None:
            kept.extend(pages)

    root, _packs, _index_name = await upload_generation(
        repo, hydrator.index, disk, closed, part, view.root, parent_pages_of,
        group=None, tags=[], progress=UploadProgress(), keep_pages=keep_pages)
    return root


async def stored_bytes(repo: Repository, root: SnapshotRoot) -> bytes:
    """The stored snapshot ``root``, read back from the repository alone."""
    index = await trio.to_thread.run_sync(repo.load_index)
    ids = await trio.to_thread.run_sync(repo.block_map, index, root)
    return b"".join(bytes(BS) if bid == ZERO_ID else repo.read_blob(index, bid) for bid in ids)


async def scenario(repo: Repository, hydrator: Hydrator, view: ImageView, size: int, base: bytes,
                   tmp_path: Path) -> None:
    state = DiskState(tmp_path / "state")
    rec = dataclasses.replace(record("d", "00000000000000d1", size), base=view.root.id,
                              parent=view.root.id)
    state.put_disk(rec)
    overlay = Overlay(tmp_path / "state", rec.id, size)
    disk = Disk(rec, state, overlay, view, Bitmap(rec.nblocks), Bitmap(rec.nblocks))
    model = bytearray(base + bytes(size - len(base)))
    rng = random.Random(3)

    async def write(offset: int, data: bytes) -> None:
        assert await disk.write(offset, data) == len(data)
        model[offset : offset + len(data)] = data

    assert await disk.read(0, size) == model
    await write(3 * BS + 100, rng.randbytes(50))  # inside one block
    await write(5 * BS - 10, rng.randbytes(BS + 20))  # across three blocks, partly
    await write(20 * BS, rng.randbytes(2 * BS))  # whole blocks
    await write(44 * BS + 7, rng.randbytes(9))  # past the base's end
    changed = {3, 4, 5, 6, 20, 21, 44}
    assert set(disk.changed) == changed == set(disk.present)
    assert await disk.read(0, size) == model
    await disk.sync()

    # close generation 1, as DiskService.snapshot does (under the write lock)
    async with disk.write_lock:
        disk.record = dataclasses.replace(disk.record, gen=2)
        closed = disk.close_generation("t1", "0000000000000051")
    at_closing = bytes(model)
    pending = PendingSnapshot(disk, closed, view, "s1.img", "0000000000000051", size)

    # writes after the closing: to closed blocks (kept for the snapshot), and to others
    await write(4 * BS, rng.randbytes(BS))
    await write(3 * BS + 200, rng.randbytes(10))
    await write(30 * BS, rng.randbytes(BS))
    assert disk.counters.blocks_copied_on_write == 2
    assert set(disk.changed) == {3, 4, 30}
    assert await disk.read(0, size) == model
    assert await pending.read(0, size) == at_closing
    assert await pending.read(4 * BS - 5, 10) == at_closing[4 * BS - 5 : 4 * BS + 5]

    kept: list[tuple[bytes, bytes]] = []
    root = await upload_closed(repo, hydrator, view, disk, closed, "s1", size, kept)
    assert root.stats["blocks_read"] == len(changed)
    # its one page, rewritten, handed on for the cache: the stored page's ID and bytes
    assert [pid.hex() for pid, _ in kept] == root.pages
    index = await trio.to_thread.run_sync(repo.load_index)
    assert [repo.read_blob(index, pid) for pid, _ in kept] == [plain for _, plain in kept]
    assert disk.counters.snapshot_blocks_read == len(changed)
    stored = await stored_bytes(repo, root)
    assert len(stored) == size
    assert stored == at_closing
    state.close()


class Killed(BaseException):
    """The daemon's death (kill -9) at the instant a write's bytes reached the overlay."""


class DyingOverlay(Overlay):
    """An overlay whose process dies right after the next pwrite, once ``die`` is set."""

    die = False

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        super().pwrite(offset, data)
        if self.die:
            raise Killed


def test_a_write_killed_after_its_bytes_is_in_the_changed_set(
    repo_with_snapshot: tuple[Repository, bytes], tmp_path: Path
) -> None:
    """kill -9 between a write's pwrite into the overlay and its marks: the disk reads the new
    bytes (its block was present already), so the changed set must have the block, or the next
    snapshot differs from the disk there (found by killing a daemon at random instants)."""
    repo, _base = repo_with_snapshot

    async def body(hydrator: Hydrator, view: ImageView) -> None:
        size = 48 * BS
        state = DiskState(tmp_path / "state")
        state.start("boot-1")
        rec = dataclasses.replace(record("d", "00000000000000d2", size), base=view.root.id,
                                  parent=view.root.id)
        state.put_disk(rec)
        overlay = DyingOverlay(tmp_path / "state", rec.id, size)
        disk = Disk(rec, state, overlay, view, Bitmap(rec.nblocks), Bitmap(rec.nblocks))
        await disk.write(7 * BS, bytes([1]) * BS)
        await disk.sync()
        async with disk.write_lock:  # a snapshot closes generation 1
            disk.record = dataclasses.replace(disk.record, gen=2)
            disk.close_generation("t1", "0000000000000052")
        overlay.die = True
        with pytest.raises(Killed):
            await disk.write(7 * BS, bytes([2]) * BS)  # present: the disk reads it now
        with pytest.raises(Killed):
            await disk.write(9 * BS, bytes([3]) * BS)  # not present: it reads the base
        overlay.close()
        state.close()

        state = DiskState(tmp_path / "state")  # the next daemon, in the same boot
        assert state.start("boot-1") is True
        assert state.present(rec) == [7]
        assert 7 in state.changed(rec).get(2, [])
        state.close()

    run_over_base(repo, tmp_path, body)


# -- staging ahead of a snapshot -----------------------------------------------------------------


class ReadCountingDisk(Disk):
    """A real Disk that also records which blocks the uploader read (changes no behaviour)."""

    closed_reads: list[int]

    async def read_closed(self, closed, blocks):  # type: ignore[no-untyped-def]
        self.closed_reads.extend(blocks)
        return await super().read_closed(closed, blocks)


def test_staged_blocks_go_into_the_snapshot_as_they_were_at_the_closing(
    repo_with_snapshot: tuple[Repository, bytes], tmp_path: Path
) -> None:
    repo, base = repo_with_snapshot
    run_over_base(repo, tmp_path, lambda hydrator, view: staging_scenario(
        repo, hydrator, view, len(base), base, tmp_path))


async def staging_scenario(repo: Repository, hydrator: Hydrator, view: ImageView, size: int,
                           base: bytes, tmp_path: Path) -> None:
    state = DiskState(tmp_path / "state")
    rec = dataclasses.replace(record("d", "00000000000000d2", size), base=view.root.id,
                              parent=view.root.id)
    state.put_disk(rec)
    overlay = Overlay(tmp_path / "state", rec.id, size)
    disk = ReadCountingDisk(rec, state, overlay, view, Bitmap(rec.nblocks), Bitmap(rec.nblocks))
    disk.closed_reads = []
    model = bytearray(base)
    rng = random.Random(4)

    async def write(offset: int, data: bytes) -> None:
        assert await disk.write(offset, data) == len(data)
        model[offset : offset + len(data)] = data

    twin = rng.randbytes(BS)
    for n in range(2, 9):
        await write(n * BS, rng.randbytes(BS))
    await write(20 * BS, twin)  # the same new contents twice
    await write(21 * BS, twin)
    await write(22 * BS, bytes(BS))  # a hole
    await write(23 * BS, base[:BS])  # contents the repository holds already
    changed = {2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23}

    # blocks written since the previous pass are not candidates yet; then all are
    assert disk.stage_candidates(100) == []
    assert disk.stage_candidates(100) == sorted(changed)
    await stage_blocks(repo, hydrator.index, disk, [2, 3, 4, 20, 21, 22, 23])
    assert set(disk.staged) == {2, 3, 4, 20, 21, 22, 23}
    assert disk.staged[22].bid == ZERO_ID and disk.staged[22].blob is None
    assert disk.staged[23].blob is None  # held by the repository: hashed, not compressed
    assert disk.staged[20].bid == disk.staged[21].bid and disk.staged[20].blob is not None
    assert disk.stage_candidates(100) == [5, 6, 7, 8]

    # a write racing a staging read: what was read of the written block is thrown away
    contents = await disk.read_for_staging([5, 6])
    await write(6 * BS + 100, b"raced")
    disk.stage([5, 6], await encode_staged(repo, hydrator.index, contents))
    assert 5 in disk.staged and 6 not in disk.staged
    # a write after staging forgets the staged block
    await write(3 * BS + 7, b"rewritten")
    assert 3 not in disk.staged
    staged_at_closing = set(disk.staged)
    assert staged_at_closing == {2, 4, 5, 20, 21, 22, 23}
    assert disk.stage_candidates(100) == [7, 8]  # 3 and 6 were written since the last call

    async with disk.write_lock:
        disk.record = dataclasses.replace(disk.record, gen=2)
        closed = disk.close_generation("t1", "0000000000000052")
    at_closing = bytes(model)
    assert disk.staged == {} and set(closed.staged) == staged_at_closing
    await write(2 * BS, rng.randbytes(BS))  # after the closing, to a staged block: copied on write
    await write(9 * BS, rng.randbytes(BS))

    root = await upload_closed(repo, hydrator, view, disk, closed, "s2", size)
    assert sorted(disk.closed_reads) == sorted(changed - staged_at_closing)
    assert root.stats["blocks_staged"] == len(staged_at_closing)
    assert root.stats["blocks_read"] == len(changed) == disk.counters.snapshot_blocks_read
    # new data: 2..8 and one copy of the twin; the hole and the base block are not uploaded
    assert root.stats["blocks_uploaded"] == 8

    assert await stored_bytes(repo, root) == at_closing
    assert await disk.read(0, size) == model
    state.close()


def rewrite_pages(tmp_path: Path, old_pages: list[list[bytes]], changed: dict[int, bytes],
                  stored: list[tuple[bytes, bytes]] | None = None,
                  ) -> tuple[Repository, SnapshotRoot, list[list[int]], list[bytes], int, int]:
    """``_pages`` over a parent whose pages hold ``old_pages`` (block IDs), after ``changed``
    (block number -> new ID): the repository, the parent's root, the pages asked of the
    parent (a list a call), then the page IDs, entries changed and pages written. The pages
    put in packs go to ``stored`` (ID, encoded blob), in order."""
    from snapfs.format.manifest import encode_page
    from snapfs.repo.packer import PackAssembler
    from snapfs.write.uploader import _pages

    repo = Repository.init(LocalStore(tmp_path / "repo"), block_size=BS)
    per_page = len(old_pages[0])
    nblocks = per_page * len(old_pages)
    parent = SnapshotRoot(id="p", name="p", disk="d", parent=None, size=nblocks * BS,
                          block_size=BS, created="2026-01-01T00:00:00Z",
                          entries_per_page=per_page,
                          pages=[repo.keyer.block_id(encode_page(e)).hex() for e in old_pages])
    asked: list[list[int]] = []

    async def parent_pages_of(ps: list[int]) -> list[list[bytes]]:
        asked.append(list(ps))
        return [list(old_pages[p]) for p in ps]

    async def main() -> tuple[list[bytes], int, int]:
        send, receive = trio.open_memory_channel[object](100)
        assembler = PackAssembler(1 << 20)
        result = await _pages(repo, changed, nblocks, per_page, parent, parent_pages_of,
                              repo.load_index(), assembler, send)
        send.close()
        packs = [pack async for pack in receive] + assembler.flush()
        if stored is not None:
            for pack in packs:
                _name, data, entries = pack.finish()
                stored.extend((e.blob_id, data[e.offset : e.offset + e.length]) for e in entries)
        return result

    pages, blocks_changed, written = trio.run(main)
    return repo, parent, asked, pages, blocks_changed, written


def test_the_parents_pages_a_snapshot_rewrites_are_loaded_together(tmp_path: Path) -> None:
    """An incremental snapshot rewrites each manifest page its changes touch, from the
    parent's page: loaded one after another, each cost a GET's round trip when not cached
    (14 of them for the benchmark's 1% change). They are asked for together now, a window of
    ``PAGE_WINDOW`` at a time (one GET a run of them, one look in the cache); the pages are
    what they were."""
    from snapfs.format.manifest import encode_page

    per_page, nblocks = 4, 40
    old = [bytes([n + 1]) * 32 for n in range(nblocks)]  # the parent's block IDs
    old_pages = [old[p : p + per_page] for p in range(0, nblocks, per_page)]
    changed = {5: b"\xa5" * 32, 13: b"\xad" * 32, 21: b"\xb5" * 32, 30: ZERO_ID}
    touched = sorted({n // per_page for n in changed})
    repo, parent, asked, pages, blocks_changed, written = rewrite_pages(tmp_path, old_pages,
                                                                        changed)
    assert asked == [touched]
    new = list(old)
    for n, bid in changed.items():
        new[n] = bid
    assert pages == [repo.keyer.block_id(encode_page(new[p : p + per_page]))
                     for p in range(0, nblocks, per_page)]
    assert [p for p in range(len(pages)) if pages[p].hex() != parent.pages[p]] == touched
    assert blocks_changed == len(changed) and written == len(touched)


def test_a_window_of_the_parents_pages_is_loaded_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many touched pages (a large change): asked for ``PAGE_WINDOW`` at a time, in order,
    each once, so that no more than a window of them is held at once."""
    import snapfs.write.uploader as uploader

    monkeypatch.setattr(uploader, "PAGE_WINDOW", 3)
    old_pages = [[bytes([p + 1]) * 32] * 2 for p in range(10)]
    changed = {n: bytes([200 + n]) * 32 for n in range(0, 20, 2) if n != 8}  # not page 4
    _repo, parent, asked, pages, blocks_changed, written = rewrite_pages(tmp_path, old_pages,
                                                                         changed)
    assert asked == [[0, 1, 2], [3, 5, 6], [7, 8, 9]]
    assert pages[4].hex() == parent.pages[4]
    assert blocks_changed == len(changed) and written == 9


def test_new_pages_are_stored_once_each_whatever_the_window(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new pages are encoded a window at a time (one worker call): every one is stored,
    in order, once, whole, even a page that two places of the manifest hold (stored once) and
    one that fills a window's last place."""
    import snapfs.write.uploader as uploader
    from snapfs.format.manifest import decode_page, encode_page

    monkeypatch.setattr(uploader, "PAGE_WINDOW", 3)
    old_pages = [[bytes([p + 1]) * 32] * 2 for p in range(8)]
    same = b"\xee" * 32
    changed = {n: bytes([200 + n]) * 32 for n in range(0, 16, 2)}
    changed.update({2: same, 3: same, 10: same, 11: same})  # pages 1 and 5: the same page
    stored: list[tuple[bytes, bytes]] = []
    repo, _parent, _asked, pages, _changed, written = rewrite_pages(tmp_path, old_pages, changed,
                                                                    stored)
    new_ids = list(dict.fromkeys(pages))
    assert len(new_ids) == 7 and pages[1] == pages[5]
    assert written == 7
    assert [pid for pid, _blob in stored] == new_ids
    for pid, blob in stored:
        plain = repo.codec.decode(blob)
        assert repo.keyer.block_id(plain) == pid
        p = pages.index(pid)
        assert decode_page(plain) == [changed.get(2 * p + i, old_pages[p][i]) for i in range(2)]
        assert plain == encode_page(decode_page(plain))
