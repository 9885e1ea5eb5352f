"""The hydrator and image views, without FUSE: exact bytes, one fetch per block, priorities,
corruption, read-ahead, hints and the background sweep, on a real local repository; and the
faults that must fail a read at worst, never the daemon (a pack that cannot be read, a store
that hangs, a cache that cannot store).

``CountingStore`` is a real LocalStore that also records every ranged GET, so tests can count
fetches; it changes no behaviour.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from diskimages import have_root, release_fifo_reader
from testkit import tmpfs, wait_until

from snapfs.cache import BlockCache
from snapfs.errors import CorruptBlock, SnapfsError, StoreUnavailable, UsageError
from snapfs.format.block import ZERO_ID
from snapfs.hydration.budget import MemoryBudget
from snapfs.hydration.scheduler import (
    AROUND_PROBE,
    AROUND_TRIAL,
    FAILED_MEMORY,
    HydrationConfig,
    Hydrator,
    Priority,
)
from snapfs.image.catalog import SnapshotCatalog
from snapfs.image.sweep import Sweeper
from snapfs.image.view import READAHEAD_AFTER
from snapfs.prefetch import parse_prefetch_list
from snapfs.repo.create import CreateOptions, create_snapshot
from snapfs.repo.repository import Repository, pack_key
from snapfs.store.local import LocalStore
from snapfs.store.simulated import SimulatedStore

BS = 16384


class CountingStore(LocalStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ranges: list[tuple[str, int, int]] = []

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.ranges.append((key, offset, length))
        return super().get_range(key, offset, length)


def make_image(path: Path, mib: int = 8, seed: int = 1) -> bytes:
    """Random-ish blocks with zero runs and repeated blocks, like a real disk."""
    rng = random.Random(seed)
    blocks = []
    for _ in range(mib * 1024 * 1024 // BS):
        kind = rng.random()
        if kind < 0.2:
            blocks.append(bytes(BS))
        elif kind < 0.3 and blocks:
            blocks.append(rng.choice(blocks))
        else:
            blocks.append(rng.randbytes(BS // 2) + bytes(BS // 2))
    data = b"".join(blocks)
    path.write_bytes(data)
    return data


@pytest.fixture
def repo_and_image(tmp_path: Path) -> Iterator[tuple[Repository, CountingStore, bytes, str]]:
    store = CountingStore(tmp_path / "repo")
    repo = Repository.init(store, block_size=BS, pack_size=256 << 10)
    data = make_image(tmp_path / "disk.img")
    result = trio.run(create_snapshot, repo, str(tmp_path / "disk.img"), CreateOptions(name="s1"))
    store.ranges.clear()
    yield repo, store, data, result.root.id


def open_cache(tmp_path: Path) -> BlockCache:
    return BlockCache(tmp_path / "cache", capacity=256 << 20)


async def with_hydrator(repo: Repository, cache: BlockCache, config: HydrationConfig, body):  # type: ignore[no-untyped-def]
    hydrator = Hydrator(repo, repo.load_index(), cache, config)
    catalog = SnapshotCatalog(repo, hydrator)
    await catalog.refresh(force=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(hydrator.run)
        result = await body(hydrator, catalog, nursery)
        nursery.cancel_scope.cancel()
    return result


def test_a_forced_refresh_reads_the_snapshots_after_it_was_asked(
        repo_and_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that made a snapshot asks the mount to refresh (``refresh(force=True)``)
    while another refresh is under way, one that listed the snapshots before the new one was
    stored. Waiting for that one was taken for done, and the new snapshot was missing until
    the next refresh."""
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    listed, release = threading.Event(), threading.Event()
    original = repo.list_snapshots_again
    calls = []

    def slow_first(previous):  # type: ignore[no-untyped-def]
        calls.append(previous)
        found = original(previous)
        if len(calls) == 2:  # (the first: with_hydrator's own)
            listed.set()
            release.wait(30)
        return found

    monkeypatch.setattr(repo, "list_snapshots_again", slow_first)
    image = tmp_path / "disk.img"

    def make_s2() -> None:
        with open(image, "r+b") as f:
            f.write(random.Random(5).randbytes(BS))
        trio.run(create_snapshot, repo, str(image), CreateOptions(name="s2"))

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        nursery.start_soon(catalog.refresh, True)  # under way, listing before s2
        await trio.to_thread.run_sync(listed.wait, 30)
        await trio.to_thread.run_sync(make_s2)
        trio.lowlevel.current_trio_token().run_sync_soon(release.set)
        await catalog.refresh(force=True)  # asked once s2 is stored
        return sorted(catalog.images())

    names = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)
    assert names == ["s1.img", "s2.img"]
    assert len(calls) == 3
    cache.close()


def test_random_concurrent_reads_return_the_source_bytes(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    rng = random.Random(7)
    ranges = [(rng.randrange(len(data)), rng.choice([1, 512, 4096, 131072, 300000])) for _ in range(300)]

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        assert view.size == len(data)
        results: dict[int, bytes] = {}

        async def reader(i: int, offset: int, length: int) -> None:
            results[i] = await view.read(offset, length)

        async with trio.open_nursery() as readers:
            for i, (offset, length) in enumerate(ranges):
                readers.start_soon(reader, i, offset, length)
        return results, hydrator.counters

    results, stats = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)
    for i, (offset, length) in enumerate(ranges):
        assert results[i] == data[offset : offset + length], (offset, length)
    # every block was fetched at most once, however many readers wanted it
    fetched = [(k, o) for k, o, _ in store.ranges]
    assert stats.blocks_fetched <= len({bytes(data[i : i + BS]) for i in range(0, len(data), BS)})
    assert len(fetched) == stats.requests
    cache.close()


def test_two_readers_of_one_missing_block_cause_one_fetch(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    offset = next(i for i in range(0, len(data), BS) if data[i : i + BS] != bytes(BS))

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        out = []

        async def read() -> None:
            out.append(await view.read(offset, 4096))

        async with trio.open_nursery() as n:
            for _ in range(10):
                n.start_soon(read)
        return out

    out = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)
    assert out == [data[offset : offset + 4096]] * 10
    data_gets = [r for r in store.ranges if r[0].startswith("packs/")]
    page_gets = 1  # the manifest page is a blob too
    assert len(data_gets) == 1 + page_gets
    cache.close()


def test_cache_is_reused_by_the_next_daemon(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image

    async def read_all(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        return b"".join([await view.read(o, 1 << 20) for o in range(0, len(data), 1 << 20)])

    cache = open_cache(tmp_path)
    assert trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), read_all) == data
    cache.close()
    store.ranges.clear()
    cache = open_cache(tmp_path)
    assert trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), read_all) == data
    assert store.ranges == []  # everything, pages included, came from the cache
    cache.close()


def test_waiting_read_goes_before_queued_background_work(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    config = HydrationConfig(fetchers=2, reserved=1, background=False)
    # a store with 300 ms of latency, so a background GET is still running when ours queues
    repo = Repository(SimulatedStore(store, latency=0.3), repo.config)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        ids = [b for b in dict.fromkeys(await view.block_ids(0, view.nblocks)) if b != ZERO_ID]
        store.ranges.clear()
        target = ids[-1]
        hydrator.prefetch(ids[:-1], Priority.BACKGROUND)
        await wait_until(lambda: len(store.ranges) >= 1, 10)  # a background GET is under way
        started = len(store.ranges)
        got = await hydrator.read_blob(target)
        loc = hydrator.index.locate(target)
        # the GETs started after ours was asked for (a background GET under way may span the
        # target's bytes too when it bridges a gap in the same pack: it does not deliver it)
        later = store.ranges[started:]
        return got, later, loc

    try:
        got, later, loc = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        cache.close()
    assert got == next(data[i : i + BS] for i in range(0, len(data), BS)
                       if repo.keyer.block_id(data[i : i + BS]) == repo.keyer.block_id(got))
    # one background fetch is under way in its one slot; ours takes the reserved slot at once,
    # ahead of the hundreds still queued (queued neighbours in its pack may ride along): the
    # very next GET is ours
    key, offset, length = later[0]
    assert key == pack_key(loc.pack) and offset <= loc.offset < offset + length


def test_reads_of_blocks_queued_for_the_background_fetch_each_block_once(
        repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    # one background slot, background runs of a pack at most, 200 ms per GET: the
    # first run is in flight while the others wait
    config = HydrationConfig(fetchers=2, reserved=1, background=False, max_background_run=256 << 10)
    repo = Repository(SimulatedStore(store, latency=0.2), repo.config)
    blocks = {repo.keyer.block_id(data[i : i + BS]): data[i : i + BS] for i in range(0, len(data), BS)}

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        ids = [b for b in dict.fromkeys(await view.block_ids(0, view.nblocks)) if b != ZERO_ID]
        store.ranges.clear()
        pages = hydrator.counters.blocks_fetched  # the manifest's, for block_ids
        assert hydrator.prefetch(ids, Priority.BACKGROUND) == len(ids)
        await wait_until(lambda: len(store.ranges) >= 1, 10)
        in_flight = ids[0]  # in the first run
        first_pack = hydrator.index.locate(in_flight).pack
        queued = next(b for b in reversed(ids) if hydrator.index.locate(b).pack != first_pack)
        got = {}

        async def read(bid: bytes) -> None:
            got[bid] = await hydrator.read_blob(bid)

        async with trio.open_nursery() as readers:
            readers.start_soon(read, in_flight)
            readers.start_soon(read, queued)
        locs = [hydrator.index.locate(b) for b in (in_flight, queued)]
        # every block cached (in the fetch's worker thread), and every run ended (back on
        # trio's: its blocks counted; under load the counting came after the body returned)
        await wait_until(lambda: not cache.missing(ids) and hydrator.stats()["queued"] == 0, 30)
        return got, locs, hydrator.counters, len(ids), pages

    try:
        got, (in_flight, queued), stats, n, pages = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        cache.close()
    assert got == {b: blocks[b] for b in got} and len(got) == 2
    # the waiter of the background run got its block's own bytes, not a view that would keep
    # the buffer of the run's every block alive
    assert all(type(v) is bytes for v in got.values())

    def covering(loc):  # type: ignore[no-untyped-def]
        return [i for i, (key, offset, length) in enumerate(store.ranges)
                if key == pack_key(loc.pack) and offset <= loc.offset < offset + length]

    # the read of a block whose run was in flight waited for that run; the block of a queued
    # run left it and was fetched on its own (in the reserved slot), next
    assert covering(in_flight) == [0]
    assert covering(queued)[0] == 1
    assert stats.blocks_fetched - pages == n  # each block once, whoever asked
    assert stats.background_blocks == n - 1


def test_corrupt_block_fails_its_read_and_is_never_cached(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    index = repo.load_index()
    offset = next(i for i in range(0, len(data), BS) if data[i : i + BS] != bytes(BS))
    bad_id = repo.keyer.block_id(data[offset : offset + BS])
    loc = index.locate(bad_id)
    path = store.root / pack_key(loc.pack)
    raw = bytearray(path.read_bytes())
    raw[loc.offset + loc.length - 5] ^= 0x55
    path.write_bytes(bytes(raw))
    cache = open_cache(tmp_path)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        with pytest.raises(CorruptBlock):
            await view.read(offset, 4096)
        other = next(i for i in range(0, len(data), BS)
                     if data[i : i + BS] != bytes(BS) and repo.keyer.block_id(data[i : i + BS]) != bad_id
                     and hydrator.index.locate(repo.keyer.block_id(data[i : i + BS])).pack != loc.pack)
        assert await view.read(other, 4096) == data[other : other + 4096]
        return hydrator.counters.corrupt_blocks

    corrupt = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)
    assert corrupt == 1
    assert not cache.contains(bad_id)
    cache.close()


def test_sequential_reads_trigger_readahead(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        out = []
        for offset in range(0, len(data), 131072):  # the kernel's 128 KiB reads
            out.append(await view.read(offset, 131072))
            await trio.sleep(0.01)  # a reader that does something with its data
        return b"".join(out), hydrator.counters

    got, stats = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)
    assert got == data
    # after the stream is detected, read-ahead has the blocks in the cache before they are read
    assert stats.cache_hits > stats.waiting_reads
    cache.close()


def test_sweep_hydrates_everything_and_reports_progress(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    config = HydrationConfig(background=True)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        catalog.use(view.root.id)  # opened: the sweep hydrates it
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        await wait_until(lambda: view.data_blocks is not None and not view.pending, 60)
        return view.stats()

    stats = trio.run(with_hydrator, repo, cache, config, body)
    assert stats["hydrated_fraction"] == 1.0
    assert stats["bytes_missing"] == 0 and stats["eta_seconds"] == 0.0
    ids = {repo.keyer.block_id(data[i : i + BS]) for i in range(0, len(data), BS)
           if data[i : i + BS] != bytes(BS)}
    assert stats["data_blocks"] == len(ids)
    assert cache.missing(sorted(ids)) == []
    cache.close()


def test_access_profile_is_stored_and_used_as_hints(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, snap_id = repo_and_image
    cache = open_cache(tmp_path)
    offsets = [5 * BS, 100 * BS, 3 * BS]

    async def first_mount(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        for o in offsets:
            await view.read(o, 100)
        return list(view.profile)

    profile = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), first_mount)
    assert profile == [5, 100, 3]
    repo.write_profile(snap_id, profile)
    assert repo.read_profile(snap_id) == [5, 100, 3]
    cache.close()

    cache = BlockCache(tmp_path / "cache2", capacity=256 << 20)  # another host: empty cache
    config = HydrationConfig(background=False)

    async def second_mount(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        catalog.use(view.root.id)  # opened: the sweep hydrates it
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        wanted = [b for b in await view.block_ids(0, view.nblocks)]
        hinted = {wanted[n] for n in profile if wanted[n] != ZERO_ID}
        await wait_until(lambda: not cache.missing(sorted(hinted)), 30)
        return hinted

    hinted = trio.run(with_hydrator, repo, cache, config, second_mount)
    assert hinted and cache.missing(sorted(hinted)) == []
    cache.close()


def test_an_unopened_image_is_hinted_with_the_head_of_its_profile_only(
        repo_and_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount that read a whole image left a profile of all of it: the next mount fetched it
    all as hints, for the newest snapshot of every lineage, opened or not. Unopened, an image
    is hinted with the head of its profile (``HINTS_UNOPENED`` blocks, 6 here); the rest
    follows once it is opened."""
    import snapfs.image.sweep as sweep

    monkeypatch.setattr(sweep, "HINTS_UNOPENED", 6)
    repo, store, data, s1 = repo_and_image
    nblocks = len(data) // BS
    profile = list(range(nblocks - 1, -1, -1))  # all of it, from the end
    repo.write_profile(s1, profile)
    ids = [repo.keyer.block_id(data[n * BS : (n + 1) * BS]) for n in range(nblocks)]
    zero = repo.keyer.block_id(bytes(BS))
    data_ids = [ids[n] for n in profile if ids[n] != zero]
    head = list(dict.fromkeys(ids[n] for n in profile[:6] if ids[n] != zero))
    cache = open_cache(tmp_path)
    config = HydrationConfig(background=False)

    async def mount(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        await wait_until(lambda: not cache.missing(head), 30)
        await trio.sleep(0.5)  # the rest would have followed by now
        unopened = len(set(data_ids)) - len(cache.missing(sorted(set(data_ids))))
        catalog.use(catalog.images()["s1.img"].root.id)
        await wait_until(lambda: not cache.missing(sorted(set(data_ids))), 30)
        return unopened

    unopened = trio.run(with_hydrator, repo, cache, config, mount)
    assert head and unopened == len(head)
    cache.close()


def test_a_long_profile_is_queued_a_batch_at_a_time(
        repo_and_image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An opened image whose profile covers all of it (a mount read it whole): its hints were
    queued at once, a fetch object each (the daemon held 240 MB for a 1 GiB image). They are
    queued ``HINT_BATCH`` at a time (8 here), the next batch once fewer than that are left
    queued, and every one of them is fetched."""
    import snapfs.image.sweep as sweep

    monkeypatch.setattr(sweep, "HINT_BATCH", 8)
    repo, store, data, s1 = repo_and_image
    nblocks = len(data) // BS
    profile = list(range(nblocks - 1, -1, -1))
    repo.write_profile(s1, profile)
    zero = repo.keyer.block_id(bytes(BS))
    ids = {repo.keyer.block_id(data[n * BS : (n + 1) * BS]) for n in range(nblocks)} - {zero}
    assert len(ids) > 4 * 8
    cache = open_cache(tmp_path)
    config = HydrationConfig(background=False)

    async def mount(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        catalog.use(catalog.images()["s1.img"].root.id)
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        await wait_until(lambda: not cache.missing(sorted(ids)), 30)  # every one fetched
        return hydrator.hints_queued_most

    try:
        most = trio.run(with_hydrator, repo, cache, config, mount)
    finally:
        cache.close()
    assert 8 <= most < 2 * 8, most


def test_the_newest_snapshot_without_a_profile_is_hinted_from_its_ancestors(
        repo_and_image, tmp_path: Path) -> None:
    """No mount has read s3 (s1 -> s2 -> s3) yet: it is hinted with the blocks its nearest
    ancestor's profile names (s1's), in its own version of them; s2, which s3 follows, borrows
    nothing (every older snapshot would fetch the set again)."""
    repo, store, data, s1 = repo_and_image
    image = tmp_path / "disk.img"
    profile = [5, 100, 3, 200]
    rng = random.Random(7)
    for name in ("s2", "s3"):  # each writes the profiled blocks anew: its own blocks there
        with open(image, "r+b") as f:
            for n in profile:
                f.seek(n * BS)
                f.write(rng.randbytes(BS))
        trio.run(create_snapshot, repo, str(image), CreateOptions(name=name))
    repo.write_profile(s1, profile)
    cache = open_cache(tmp_path)
    config = HydrationConfig(background=False)

    async def mount(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        views = catalog.images()
        at = {name: await views[f"{name}.img"].block_ids(0, views[f"{name}.img"].nblocks)
              for name in ("s1", "s2", "s3")}
        hinted = {name: sorted({at[name][n] for n in profile} - {ZERO_ID}) for name in at}
        assert cache.missing(hinted["s1"] + hinted["s2"] + hinted["s3"])  # nothing yet
        catalog.use(views["s1.img"].root.id)  # opened: hinted by its own profile
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        # newest first: once s1's own hints are in, s2's turn has passed
        await wait_until(lambda: not cache.missing(hinted["s3"] + hinted["s1"]), 30)
        return hinted

    hinted = trio.run(with_hydrator, repo, cache, config, mount)
    assert len(hinted["s3"]) == len(hinted["s2"]) == len(profile)
    assert cache.missing(hinted["s3"]) == []
    assert cache.missing(hinted["s2"]) == hinted["s2"]
    cache.close()


def test_the_sweep_hydrates_only_the_images_in_use(repo_and_image, tmp_path: Path) -> None:
    """A mount of a repository with many snapshots, made to restore one file, must not
    download them all: the sweep fetches nothing of an image nobody opened, and hydrates one
    once it is opened (``SnapshotCatalog.use``), and that one alone."""
    repo, store, data, s1 = repo_and_image
    other = make_image(tmp_path / "other.img", seed=2)
    trio.run(create_snapshot, repo, str(tmp_path / "other.img"), CreateOptions(name="other"))
    others = {repo.keyer.block_id(other[i : i + BS]) for i in range(0, len(other), BS)
              if other[i : i + BS] != bytes(BS)}
    others -= {repo.keyer.block_id(data[i : i + BS]) for i in range(0, len(data), BS)}
    assert others
    store.ranges.clear()
    cache = open_cache(tmp_path)
    config = HydrationConfig(background=True)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        await trio.sleep(1.0)
        untouched = list(store.ranges)  # nothing in use: no block, no block-map page fetched
        view, other_view = catalog.images()["s1.img"], catalog.images()["other.img"]
        catalog.use(view.root.id)
        await wait_until(lambda: view.data_blocks is not None and not view.pending, 60)
        await trio.sleep(1.0)  # the old sweep scanned the next image at once
        return untouched, view.stats(), other_view.stats()

    untouched, stats, other_stats = trio.run(with_hydrator, repo, cache, config, body)
    assert untouched == []
    assert stats["hydrated_fraction"] == 1.0
    assert other_stats["hydrated_fraction"] is None and other_stats["data_blocks"] is None
    assert sorted(cache.missing(sorted(others))) == sorted(others)
    cache.close()


def test_a_read_never_waits_on_the_hydrate_rate(repo_and_image, tmp_path: Path) -> None:
    """``--hydrate-rate`` paces background GETs; a read that needs a block of one waiting for
    its turn (a sweep's run, or a block-map page the scan loads) must not wait for that turn.
    At 1 KB/s here, each of those GETs would wait for minutes."""
    repo, store, data, _ = repo_and_image
    ids = list(dict.fromkeys(repo.keyer.block_id(data[i : i + BS]) for i in range(0, len(data), BS)
                             if data[i : i + BS] != bytes(BS)))
    cache = open_cache(tmp_path)
    config = HydrationConfig(background=True, hydrate_rate=1000)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        got = {}
        # a run of the sweep, taken by a fetch slot and waiting for its turn
        hydrator.prefetch(ids[:-8], Priority.BACKGROUND)
        await wait_until(lambda: any(r.taken for r in hydrator._in_runs.values()), 10)
        in_taken = next(b for b, r in hydrator._in_runs.items() if r.taken)
        with trio.fail_after(10):
            got[in_taken] = (await hydrator.read_blocks([in_taken]))[0]
        # blocks the scan loads at BACKGROUND priority (as block-map pages), then a read of one
        last = ids[-8:]
        nursery.start_soon(lambda: hydrator.read_blocks(last, priority=Priority.BACKGROUND))
        await trio.sleep(0.3)
        with trio.fail_after(10):
            got[last[0]] = (await hydrator.read_blocks([last[0]]))[0]
        return got

    got = trio.run(with_hydrator, repo, cache, config, body)
    for bid, plain in got.items():
        assert repo.keyer.block_id(plain) == bid
    cache.close()


def test_prefetch_list_parsing(tmp_path: Path) -> None:
    good = tmp_path / "list"
    good.write_text("# comment\ns1.img\ns2.img 4K 1M\n\n")
    assert parse_prefetch_list(str(good)) == {"s1.img": [(0, None)], "s2.img": [(4096, 1 << 20)]}
    # a name may hold spaces and '#' (it was cut at the '#', or split into too many words)
    spaced = tmp_path / "spaced"
    spaced.write_text("  web 2 #3.img \nweb 2 #3.img 0 16K\n")
    assert parse_prefetch_list(str(spaced)) == {"web 2 #3.img": [(0, None), (0, 16384)]}
    for n, text in enumerate(("s1.img 12\n", "s1 0 4K\n", "s1.img 0 4K x\n")):
        bad = tmp_path / f"bad{n}"
        bad.write_text(text)
        with pytest.raises(UsageError, match=f"bad{n}:1: expected"):
            parse_prefetch_list(str(bad))


def test_a_prefetch_list_that_is_not_text_is_a_usage_error(tmp_path: Path) -> None:
    # a binary file given by mistake: one clear line, not "the mount daemon failed
    # (UnicodeDecodeError)"
    binary = tmp_path / "binary"
    binary.write_bytes(b"s1.img\n\xff\xfe\x00\x81\n")
    with pytest.raises(UsageError, match=r"binary:2: not UTF-8 text"):
        parse_prefetch_list(str(binary))


class CountingCache(BlockCache):
    """A real BlockCache that counts its lookups and writes (it changes no behaviour)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.get_many_calls = 0
        self.put_many_calls: list[int] = []

    def get_many(self, block_ids: list[bytes]) -> list[bytes | None]:
        self.get_many_calls += 1
        return super().get_many(block_ids)

    def read_into(self, block_ids, targets) -> list[bool]:  # type: ignore[no-untyped-def]
        self.get_many_calls += 1  # a lookup too
        return super().read_into(block_ids, targets)

    def put_many(self, items, checksums=None) -> bool:  # type: ignore[no-untyped-def]
        self.put_many_calls.append(len(items))
        return super().put_many(items, checksums)


def read_sequentially(view, size: int, piece: int = 131072):  # type: ignore[no-untyped-def]
    """The kernel's 128 KiB reads of a sequential reader, each a separate request."""
    async def run() -> bytes:
        out = []
        for offset in range(0, size, piece):
            await trio.lowlevel.checkpoint()
            out.append(await view.read(offset, piece))
        return b"".join(out)
    return run()


def test_a_fetched_run_is_cached_in_one_write(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = CountingCache(tmp_path / "cache", capacity=256 << 20)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        return await read_sequentially(view, len(data)), hydrator.counters

    got, stats = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)
    assert got == data
    data_gets = [r for r in store.ranges if r[0].startswith("packs/")]
    assert len(cache.put_many_calls) == stats.requests == len(data_gets)
    assert sum(cache.put_many_calls) == stats.blocks_fetched
    assert max(cache.put_many_calls) > 1  # read-ahead coalesced neighbours into runs
    cache.close()


def test_warm_sequential_reads_come_from_the_read_ahead_buffer(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = CountingCache(tmp_path / "cache", capacity=256 << 20)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        return await read_sequentially(view, len(data)), hydrator

    assert trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)[0] == data
    store.ranges.clear()
    cache.get_many_calls = 0
    got, hydrator = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)
    assert got == data
    assert store.ranges == []
    reads = len(data) // 131072
    # a fill looks up 1 MiB (8 reads) at a time; only the first reads of the stream miss
    assert cache.get_many_calls <= reads // 4
    assert hydrator.counters.cache_hits >= len({data[i : i + BS] for i in range(0, len(data), BS)
                                                if data[i : i + BS] != bytes(BS)})
    assert hydrator.buffers.used <= hydrator.config.readahead_memory
    cache.close()


def test_read_ahead_buffers_share_one_memory_budget(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    limit = 3 << 20
    config = HydrationConfig(background=False, readahead_memory=limit)
    streams = 6
    part = len(data) // streams // 131072 * 131072

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        results: dict[int, bytes] = {}
        peak = 0

        async def reader(i: int) -> None:
            nonlocal peak
            out = []
            for offset in range(i * part, (i + 1) * part, 131072):
                await trio.lowlevel.checkpoint()
                out.append(await view.read(offset, 131072))
                peak = max(peak, hydrator.buffers.used)
            results[i] = b"".join(out)

        async with trio.open_nursery() as readers:
            for i in range(streams):
                readers.start_soon(reader, i)
        return results, peak

    for _ in range(2):  # cold, then warm
        results, peak = trio.run(with_hydrator, repo, cache, config, body)
        assert all(results[i] == data[i * part : (i + 1) * part] for i in range(streams))
        assert 0 < peak <= limit
    cache.close()


def test_memory_budget_sheds_the_least_recently_served_holder() -> None:
    class Holder:
        def __init__(self) -> None:
            self.shed_count = 0

        def shed(self) -> None:
            self.shed_count += 1

    budget = MemoryBudget(100)
    a, b, c = Holder(), Holder(), Holder()
    assert budget.take(a, 40) and budget.take(b, 40)
    assert budget.take(a, 10)  # a is now the most recently served
    assert budget.take(c, 30)  # sheds b (least recent), not a
    assert (a.shed_count, b.shed_count, c.shed_count) == (0, 1, 0)
    assert budget.used == 80 and budget.held(b) == 0
    budget.give_back(a, 50)
    assert budget.used == 30 and budget.held(a) == 0
    assert not budget.take(c, 200)  # more than the whole budget: refused, nothing shed
    assert budget.used == 30
    budget.release(c)
    assert budget.used == 0


def test_corrupt_block_in_a_stream_fails_only_its_read(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    index = repo.load_index()
    piece = 131072
    # a data block well into the image, whose content occurs only once
    blocks = [data[i : i + BS] for i in range(0, len(data), BS)]
    n = next(k for k in range(len(blocks) // 2, len(blocks))
             if blocks[k] != bytes(BS) and blocks.count(blocks[k]) == 1)
    bad_id = repo.keyer.block_id(blocks[n])
    loc = index.locate(bad_id)
    path = store.root / pack_key(loc.pack)
    raw = bytearray(path.read_bytes())
    raw[loc.offset + loc.length - 5] ^= 0x55
    path.write_bytes(bytes(raw))
    cache = open_cache(tmp_path)
    bad_read = n * BS // piece

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        for k in range(len(data) // piece):
            await trio.lowlevel.checkpoint()
            if k == bad_read:
                with pytest.raises(CorruptBlock):
                    await view.read(k * piece, piece)
            else:
                assert await view.read(k * piece, piece) == data[k * piece : (k + 1) * piece], k
        return hydrator.counters.corrupt_blocks

    assert trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body) >= 1
    assert not cache.contains(bad_id)
    cache.close()


def test_background_sweep_fetches_whole_packs_in_few_gets(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    config = HydrationConfig(background=True)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        catalog.use(view.root.id)  # opened: the sweep hydrates it
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        await wait_until(lambda: view.data_blocks is not None and not view.pending, 60)
        return hydrator.counters

    stats = trio.run(with_hydrator, repo, cache, config, body)
    index = repo.load_index()
    ids = {repo.keyer.block_id(data[i : i + BS]) for i in range(0, len(data), BS)
           if data[i : i + BS] != bytes(BS)}
    packs = {index.locate(b).pack for b in ids}
    data_gets = [r for r in store.ranges if r[0].startswith("packs/")]
    # the sweep queues far enough ahead that each pack's blocks go in one run, not 32 at a time
    assert len(data_gets) <= len(packs) + 2  # (+ manifest pages, which are blobs in packs)
    assert stats.background_blocks >= len(ids)  # (manifest pages are loaded in the background too)
    cache.close()


def test_a_fetch_that_ends_during_a_cache_lookup_is_joined_not_repeated(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    index = repo.load_index()
    ids = [repo.keyer.block_id(data[i : i + BS]) for i in range(0, len(data), BS)
           if data[i : i + BS] != bytes(BS)]
    x = ids[0]
    y = next(b for b in ids if index.locate(b).pack != index.locate(x).pack)

    class GatedCache(BlockCache):
        """Holds the lookup of ``y`` until the test opens the gate (no other change)."""

        gate = threading.Event()

        def get_many(self, block_ids: list[bytes]) -> list[bytes | None]:
            if y in block_ids:
                assert self.gate.wait(30)
            return super().get_many(block_ids)

    cache = GatedCache(tmp_path / "cache", capacity=256 << 20)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        hydrator.prefetch([x], Priority.READAHEAD)  # x is being fetched ...
        got: list[bytes] = []

        async def reader() -> None:
            got.extend(await hydrator.read_blocks([x, y]))  # ... joins x, looks y up

        nursery.start_soon(reader)
        await wait_until(lambda: hydrator.counters.blocks_fetched == 1, 10)  # x is done
        GatedCache.gate.set()
        await wait_until(lambda: len(got) == 2, 10)
        return got, hydrator.counters

    # (no read-around: x's GET would bring its neighbours, which this does not count)
    config = HydrationConfig(background=False, read_around=0)
    got, stats = trio.run(with_hydrator, repo, cache, config, body)
    blocks = {repo.keyer.block_id(data[i : i + BS]): data[i : i + BS] for i in range(0, len(data), BS)}
    assert got == [blocks[x], blocks[y]]
    assert stats.blocks_fetched == 2  # x once, whoever wanted it
    cache.close()


def test_a_block_cached_while_the_scan_looks_it_up_is_not_counted_missing(
        repo_and_image, tmp_path: Path) -> None:
    """The scan asks the cache on a worker thread which blocks of a page it lacks; a block a
    reader fetched and cached meanwhile was then counted missing for ever (``stats`` showed
    the image short of hydrated with nothing left to fetch, and the sweep fetched it again)."""
    repo, store, data, _ = repo_and_image
    x = repo.keyer.block_id(next(data[i : i + BS] for i in range(0, len(data), BS)
                                 if data[i : i + BS] != bytes(BS)))

    class GatedCache(BlockCache):
        """Holds the scan's lookup (the first one of ``x``) until the test opens the gate,
        after it has looked: the interleaving, which a real run meets only by chance (no
        other change)."""

        asked = threading.Event()
        gate = threading.Event()

        def missing(self, block_ids: list[bytes]) -> list[bytes]:
            found = super().missing(block_ids)
            if x in block_ids and not self.asked.is_set():
                self.asked.set()
                assert self.gate.wait(30)
            return found

    cache = GatedCache(tmp_path / "cache", capacity=256 << 20)
    config = HydrationConfig(background=False, read_around=0)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        cached: set[bytes] = set()
        hydrator.on_cached.append(cached.update)
        view = catalog.images()["s1.img"]
        catalog.use(view.root.id)  # opened: the sweep hydrates it
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        await wait_until(GatedCache.asked.is_set, 30)  # the scan found x missing ...
        await hydrator.read_blocks([x])  # ... a reader fetches it, and it is cached
        await wait_until(lambda: x in cached, 10)
        GatedCache.gate.set()
        await wait_until(lambda: view.data_blocks is not None, 10)
        pending = list(view.pending)
        return pending, await trio.to_thread.run_sync(cache.missing, pending)

    try:
        pending, lacking = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        GatedCache.gate.set()
        cache.close()
    assert x not in pending, "a block the cache holds is counted missing"
    assert lacking == pending  # (and the others are missing indeed)


def test_memory_budget_never_hands_out_a_buffer_someone_still_views() -> None:
    budget = MemoryBudget(1 << 20)
    buf, fresh = budget.buffer(4096)
    assert fresh and buf == bytearray(4096)
    buf[:5] = b"hello"
    view = memoryview(buf)[:5]  # a reader still holds this
    budget.recycle(buf)
    other, fresh = budget.buffer(4096)
    assert fresh and other is not buf
    assert bytes(view) == b"hello"
    view.release()
    again, fresh = budget.buffer(4096)
    assert again is buf and not fresh and len(again) == 4096


def test_buffered_reads_hand_out_the_read_ahead_buffer_itself(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    cache = open_cache(tmp_path)
    piece = 131072

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        out = []
        views = 0
        for offset in range(0, len(data), piece):
            await trio.lowlevel.checkpoint()
            got = await view.read_buffer(offset, piece)
            views += isinstance(got, memoryview)
            if isinstance(got, memoryview):
                assert got.readonly
            out.append(bytes(got))
        # an unaligned read, and one that ends past the image, through the same stream
        tail = await view.read(len(data) - 5000, 10000)
        return b"".join(out), views, tail

    for warm in (False, True):
        got, views, tail = trio.run(with_hydrator, repo, cache, HydrationConfig(background=False), body)
        assert got == data and tail == data[-5000:]
        if warm:  # all but the first reads of the stream came from the buffer, uncopied
            assert views >= (len(data) - READAHEAD_AFTER) // piece - 2
    cache.close()


def read_around_case(repo: Repository, data: bytes, window: int,
                     ) -> tuple[dict[bytes, bytes], bytes, list[bytes]]:
    """The plain bytes of every data block, a block with at least six neighbours in its pack
    within ``window`` bytes on either side, and those neighbours (in pack order)."""
    plain = {repo.keyer.block_id(data[i : i + BS]): data[i : i + BS]
             for i in range(0, len(data), BS) if data[i : i + BS] != bytes(BS)}
    index = repo.load_index()

    def around(bid: bytes) -> list[bytes]:
        loc = index.locate(bid)
        return [n for n, _ in index.neighbours(bid, loc.offset - window, loc.offset + loc.length + window)
                if n != bid]

    target = next(b for b in plain if len(around(b)) >= 6 and index.locate(b).offset > window)
    return plain, target, around(target)


def test_a_waiting_read_brings_its_neighbours_in_the_pack_with_the_same_get(
        repo_and_image, tmp_path: Path) -> None:  # fmt: skip
    repo, store, data, _ = repo_and_image
    window = 48 << 10
    plain, target, neighbours = read_around_case(repo, data, window)
    had = neighbours[0]  # the lowest in the pack, cached already: the GET starts after it
    cache = open_cache(tmp_path)
    cache.put(had, plain[had])

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        got = await hydrator.read_blocks([target])  # handed over before the neighbours are
        await wait_until(lambda: not hydrator._inflight, 10)  # decoded and cached
        first = (list(store.ranges), hydrator.counters.read_around_blocks)
        rest = await hydrator.read_blocks(neighbours)
        return got, first, rest, hydrator.counters

    config = HydrationConfig(background=False, read_around=window)
    got, (gets, around), rest, stats = trio.run(with_hydrator, repo, cache, config, body)
    assert got == [plain[target]]
    index = repo.load_index()
    fetched = [index.locate(b) for b in [target, *neighbours[1:]]]
    assert [(key, offset, offset + length) for key, offset, length in gets] == [
        (pack_key(fetched[0].pack), min(loc.offset for loc in fetched),
         max(loc.offset + loc.length for loc in fetched))]
    assert around == len(neighbours) - 1
    # the neighbours are cached, verified: reading them costs no GET
    assert rest == [plain[n] for n in neighbours]
    assert len(store.ranges) == 1
    assert stats.read_around_blocks == len(neighbours) - 1
    assert stats.blocks_fetched == len(neighbours)
    assert cache.missing([target, *neighbours]) == []
    cache.close()


def test_a_read_of_a_neighbour_in_flight_waits_for_that_get(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    window = 48 << 10
    plain, target, neighbours = read_around_case(repo, data, window)
    joined, had = neighbours[-1], neighbours[0]
    cache = open_cache(tmp_path)
    cache.put(had, plain[had])  # found cached on the worker thread: who joined it reads the cache
    slow = Repository.open(SimulatedStore(store, 0.2))  # time to ask while the GET is under way
    store.ranges.clear()

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        out: dict[str, list[bytes]] = {}

        async def first() -> None:
            out["target"] = await hydrator.read_blocks([target])

        nursery.start_soon(first)
        await wait_until(lambda: joined in hydrator._inflight and had in hydrator._inflight, 10)
        gets = len(store.ranges)
        out["later"] = await hydrator.read_blocks([joined, had])
        await wait_until(lambda: "target" in out, 10)
        return out, gets, hydrator.counters

    config = HydrationConfig(background=False, read_around=window)
    out, gets, stats = trio.run(with_hydrator, slow, cache, config, body)
    assert out == {"target": [plain[target]], "later": [plain[joined], plain[had]]}
    assert gets == 1 and len(store.ranges) == 1  # the later read made no GET of its own
    assert stats.read_around_blocks == len(neighbours) - 1
    cache.close()


def test_read_around_stops_while_its_neighbours_go_unread_and_comes_back(
        repo_and_image, tmp_path: Path) -> None:  # fmt: skip
    repo, store, data, _ = repo_and_image
    window = 16 << 10
    index = repo.load_index()
    plain = {repo.keyer.block_id(data[i : i + BS]): data[i : i + BS]
             for i in range(0, len(data), BS) if data[i : i + BS] != bytes(BS)}
    in_order = sorted(plain, key=lambda b: (index.locate(b).pack, index.locate(b).offset))
    # blocks so far apart that no GET's window reaches another's
    apart: list[bytes] = []
    for bid in in_order:
        loc = index.locate(bid)
        last = index.locate(apart[-1]) if apart else None
        if last is None or last.pack != loc.pack or loc.offset > last.offset + last.length + 3 * window:
            apart.append(bid)
    random_reads = apart[:40]
    assert len(random_reads) == 40
    cache = open_cache(tmp_path)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        for bid in random_reads:  # one at a time, as a database would
            assert await hydrator.read_blocks([bid]) == [plain[bid]]
        random_gets = hydrator.counters.read_around_gets
        gets = len(store.ranges)
        walked = [b for b in in_order if b not in random_reads]
        half = len(walked) // 2
        for bid in walked[:half]:  # then a walk through the disk, block after block
            assert await hydrator.read_blocks([bid]) == [plain[bid]]
        before = (len(store.ranges), hydrator.counters.read_around_gets)
        for bid in walked[half:]:
            assert await hydrator.read_blocks([bid]) == [plain[bid]]
        after = (len(store.ranges), hydrator.counters.read_around_gets)
        return random_gets, gets, len(walked) - half, before, after

    config = HydrationConfig(background=False, read_around=window)
    random_gets, gets, second_half, before, after = trio.run(with_hydrator, repo, cache, config, body)
    assert gets == 40
    # the trial, then only a probe every AROUND_PROBE waiting GETs
    assert random_gets == AROUND_TRIAL + (40 - AROUND_TRIAL) // AROUND_PROBE
    # the probes of the walk paid: read-around came back (in the walk's second half, for every
    # GET whose window held a block not read yet: the last of a pack's has none), and each GET
    # brought the next block or more
    assert after[1] - before[1] >= 0.8 * (after[0] - before[0])
    assert after[0] - before[0] <= second_half * 0.6
    cache.close()


# -- faults of the store and of the cache: a failed read at worst, never the daemon ------------


def data_blocks_by_pack(repo: Repository, data: bytes) -> dict[str, dict[bytes, bytes]]:
    """pack -> {block ID: plain bytes} of the image's data blocks (not its manifest pages)."""
    index = repo.load_index()
    out: dict[str, dict[bytes, bytes]] = {}
    for i in range(0, len(data), BS):
        plain = data[i : i + BS]
        if plain != bytes(BS):
            bid = repo.keyer.block_id(plain)
            out.setdefault(index.locate(bid).pack, {})[bid] = plain
    return out


def test_a_pack_that_fails_to_read_fails_its_reads_and_only_them(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    packs = data_blocks_by_pack(repo, data)
    bad, good = list(packs)[:2]
    path = store.root / pack_key(bad)
    path.rename(path.with_name(path.name + ".aside"))
    path.mkdir()  # it opens, then the read fails (EISDIR here, EIO from a bad sector)
    cache = open_cache(tmp_path)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        with pytest.raises(StoreUnavailable) as failed:
            await hydrator.read_blob(next(iter(packs[bad])))
        got = await hydrator.read_blocks(list(packs[good]))
        return str(failed.value), got, hydrator.counters.failed_requests

    config = HydrationConfig(background=False, attempts=2, retry_delay=0.01)
    try:
        message, got, failed = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        cache.close()
    assert message == f"store unavailable: {store.url}: {pack_key(bad)}: Is a directory"
    assert got == list(packs[good].values())
    assert failed == 2


def test_a_hung_store_fails_reads_after_bounded_retries(repo_and_image, tmp_path: Path) -> None:
    repo, store, data, _ = repo_and_image
    packs = data_blocks_by_pack(repo, data)
    hung, other = list(packs)[:2]
    path = store.root / pack_key(hung)
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    os.mkfifo(path)  # opening it blocks until a writer comes: a dead NFS server
    cache = open_cache(tmp_path)
    # two fetch slots: both end up held by the hung calls they abandon (module docstring)
    config = HydrationConfig(fetchers=2, reserved=1, background=False, attempts=2,
                             retry_delay=0.05, store_timeout=0.5)

    async def timed_failure(hydrator: Hydrator, bid: bytes) -> float:
        started = trio.current_time()
        with pytest.raises(StoreUnavailable, match="no answer in 0.5 s"):
            await hydrator.read_blob(bid)
        return trio.current_time() - started

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        waited = [await timed_failure(hydrator, next(iter(packs[hung])))]
        assert hydrator._store_limiter.borrowed_tokens == 2  # the two hung calls hold both
        # a pack that would answer waits for a slot, within its own timeout, and fails too
        waited.append(await timed_failure(hydrator, next(iter(packs[other]))))
        assert release_fifo_reader(path)  # the "server" answers: both hung calls return
        await wait_until(lambda: hydrator._store_limiter.borrowed_tokens == 0, 10)
        await trio.sleep(FAILED_MEMORY)  # until then, a read of a block that just failed fails
        got_other = await hydrator.read_blocks(list(packs[other]))
        path.unlink()
        aside.rename(path)
        got_hung = await hydrator.read_blocks(list(packs[hung]))
        return waited, got_other, got_hung, hydrator.counters.failed_requests

    try:
        waited, got_other, got_hung, failed = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        cache.close()
        if path.is_fifo():
            release_fifo_reader(path)
            path.unlink()
            aside.rename(path)
    # two attempts of 0.5 s and a backoff of 0.05 s each: bounded, seconds at most
    assert all(1.0 < w < 3.0 for w in waited), waited
    assert failed == 4
    assert got_other == list(packs[other].values())
    assert got_hung == list(packs[hung].values())


class RetryingStore(CountingStore):
    """A local store that says each of its calls makes 3 tries, as S3's does (it makes one:
    only what the hydrator does with the claim is tested)."""

    attempts = 3


@pytest.mark.parametrize("retrying", [False, True], ids=["one-try-calls", "retrying-calls"])
def test_retries_do_not_multiply_and_a_failure_is_not_waited_for_twice(
        repo_and_image, tmp_path: Path, retrying: bool) -> None:
    """A fetch makes ``attempts`` tries of the store in all: calls to a store that retries
    inside each call are made once. A read of a block whose fetch just failed (the kernel's
    retry of a failed read) fails at once without a call; after ``FAILED_MEMORY`` it fetches
    again. A background fetch makes one call whatever the store."""
    repo, _, data, _ = repo_and_image
    packs = data_blocks_by_pack(repo, data)
    bad, good = list(packs)[:2]
    store = (RetryingStore if retrying else CountingStore)(tmp_path / "repo")
    repo = Repository(store, repo.config)
    path = store.root / pack_key(bad)
    path.rename(path.with_name(path.name + ".aside"))
    path.mkdir()  # every read of it fails (EISDIR)
    cache = open_cache(tmp_path)
    bad_ids = list(packs[bad])

    def calls() -> int:
        return [key for key, _, _ in store.ranges].count(pack_key(bad))

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        counts = []
        for priority in (Priority.WAITING, Priority.BACKGROUND):
            with pytest.raises(StoreUnavailable):
                await hydrator.read_blob(bad_ids[0], priority)
            counts.append(calls())
            await trio.sleep(FAILED_MEMORY)
        with pytest.raises(StoreUnavailable):
            await hydrator.read_blob(bad_ids[1])
        before = calls()
        with pytest.raises(StoreUnavailable):  # at once, no call
            await hydrator.read_blob(bad_ids[1])
        again = calls() - before, hydrator.counters.failed_again
        await trio.sleep(FAILED_MEMORY)
        with pytest.raises(StoreUnavailable):  # forgotten: tried again
            await hydrator.read_blob(bad_ids[1])
        got = await hydrator.read_blocks(list(packs[good]))  # other packs are not concerned
        return counts, again, calls() - before, got

    config = HydrationConfig(background=False, attempts=3, retry_delay=0.01)
    try:
        counts, again, after, got = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        cache.close()
    waiting = 1 if retrying else 3
    assert counts == [waiting, waiting + 1]  # background: one call
    assert again == (0, 1)
    assert after == waiting
    assert got == list(packs[good].values())


class SlowStore(CountingStore):
    """A local store whose ranged GETs take ``delay`` seconds: a slow transfer that moves."""

    delay = 0.6

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        threading.Event().wait(self.delay)
        return super().get_range(key, offset, length)


@pytest.mark.parametrize("bounded", [False, True], ids=["no-stall-timeout", "stall-timeout"])
def test_store_timeout_is_for_stores_that_do_not_bound_their_stalls(
        repo_and_image, tmp_path: Path, bounded: bool) -> None:
    """``store_timeout`` is a total per try: it cuts a call to a store that has no stall
    timeout of its own, never one to a store that has (S3: a transfer that moves is not cut
    short, one that stops fails in the store)."""
    repo, _, data, _ = repo_and_image
    packs = data_blocks_by_pack(repo, data)
    pack = next(iter(packs))
    store = SlowStore(tmp_path / "repo")
    if bounded:
        store.stall_timeout = 5.0
    repo = Repository(store, repo.config)
    cache = open_cache(tmp_path)
    config = HydrationConfig(background=False, attempts=1, store_timeout=0.2)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        try:
            return await hydrator.read_blocks(list(packs[pack]))
        except StoreUnavailable as e:
            return e

    try:
        got = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        cache.close()
    if bounded:
        assert got == list(packs[pack].values())
    else:
        assert isinstance(got, StoreUnavailable) and "no answer in 0.2 s" in str(got)


class UnwrappedErrorStore(CountingStore):
    """A local store whose reads of one pack raise a bare OSError: a store that does not wrap
    an error in a StoreError. None does since LocalStore.get_range wraps its pread, so this
    stands for the next one that does not (it cannot be caused for real)."""

    broken = ""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if key == pack_key(self.broken):
            self.ranges.append((key, offset, length))
            raise OSError(errno.EIO, "Input/output error")
        return super().get_range(key, offset, length)


def test_an_unexpected_error_in_a_fetch_fails_its_reads_not_the_daemon(
        repo_and_image, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo, _, data, _ = repo_and_image
    packs = data_blocks_by_pack(repo, data)
    bad, good = list(packs)[:2]
    store = UnwrappedErrorStore(tmp_path / "repo")
    store.broken = bad
    repo = Repository(store, repo.config)
    cache = open_cache(tmp_path)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        with pytest.raises(SnapfsError) as failed:
            await hydrator.read_blob(next(iter(packs[bad])))
        return failed.value, await hydrator.read_blocks(list(packs[good]))

    config = HydrationConfig(background=False, attempts=3, retry_delay=0.01)
    try:
        error, got = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        cache.close()
    assert str(error) == f"fetch from pack {bad[:12]} failed: OSError(5, 'Input/output error')"
    assert got == list(packs[good].values())
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in logged] == [f"fetch from pack {bad[:12]} failed"]
    assert logged[0].exc_info is not None  # with its traceback: a bug to fix
    assert [key for key, _, _ in store.ranges].count(pack_key(bad)) == 1  # not retried


@pytest.mark.root
@pytest.mark.skipif(not have_root(), reason="needs root (tmpfs)")
def test_a_cache_that_cannot_store_costs_no_read_and_no_false_progress(
        repo_and_image, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo, store, data, _ = repo_and_image
    ids = sorted({repo.keyer.block_id(data[i : i + BS]) for i in range(0, len(data), BS)
                  if data[i : i + BS] != bytes(BS)})
    config = HydrationConfig(background=True, sweep_retry=3600)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        catalog.use(view.root.id)  # opened: the sweep hydrates it
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        await wait_until(lambda: view.data_blocks is not None, 30)
        # the sweep fetches every block once (and the manifest pages): then it is done
        await wait_until(lambda: hydrator.counters.background_blocks
                         >= len(ids) + len(view.root.pages) and hydrator.background_idle(), 60)
        stats = view.stats()
        pending = set(view.pending)
        uncached = set(await trio.to_thread.run_sync(hydrator.cache.missing, ids))
        # (reads may cache some of them: the cache evicts its older blocks to make room)
        got = b"".join([await view.read(o, 1 << 20) for o in range(0, len(data), 1 << 20)])
        return stats, pending, uncached, got

    with tmpfs(tmp_path / "small", "1M") as small:  # fills up long before 8 MiB are cached
        cache = BlockCache(small / "cache", capacity=256 << 20)
        try:
            stats, pending, uncached, got = trio.run(with_hydrator, repo, cache, config, body)
        finally:
            cache.close()
    assert got == data
    # progress says what the cache holds: the blocks it could not store are still missing
    assert len(uncached) > len(ids) // 2
    assert pending == uncached and stats["blocks_missing"] == len(uncached)
    # it evicted and paused by turns to keep its reserve free (whether it is paused at the end
    # depends on the timing of its last eviction), and may have met ENOSPC on the way
    assert cache.bad == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # ENOSPC once per kind at most (a segment write, an lmdb commit, the commit marking a
    # segment closed); a pause once each time it pauses
    assert len([w for w in warnings if "No space left on device" in w]) <= 3, warnings
    assert all("No space left on device" in w or "cannot keep" in w for w in warnings), warnings


class FlakyLookupCache(BlockCache):
    """A real BlockCache whose first ``missing`` raises: stands for a bug in what the sweep
    runs (its real trigger, an lmdb error from a damaged index, is a miss now and cannot
    reach the sweep any more)."""

    failed = False

    def missing(self, block_ids: list[bytes]) -> list[bytes]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug")
        return super().missing(block_ids)


def test_an_unexpected_error_in_the_sweep_is_logged_and_tried_again(
        repo_and_image, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo, store, data, _ = repo_and_image
    cache = FlakyLookupCache(tmp_path / "cache", capacity=256 << 20)
    config = HydrationConfig(background=True, sweep_retry=0.1)

    async def body(hydrator, catalog, nursery):  # type: ignore[no-untyped-def]
        view = catalog.images()["s1.img"]
        catalog.use(view.root.id)  # opened: the sweep hydrates it
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        await wait_until(lambda: view.data_blocks is not None and not view.pending, 60)
        return view.stats()

    try:
        stats = trio.run(with_hydrator, repo, cache, config, body)
    finally:
        cache.close()
    assert stats["hydrated_fraction"] == 1.0
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in logged] == ["background work for s1.img failed"]
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is RuntimeError
