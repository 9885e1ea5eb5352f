"""The hydrator and image views, without FUSE: exact bytes, one fetch per block, priorities,
corruption, read-ahead, hints and the background sweep, on a real local repository.

``CountingStore`` is a real LocalStore that also records every ranged GET, so tests can count
fetches; it changes no behaviour.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from snapfs.cache import BlockCache
from snapfs.errors import CorruptBlock
from snapfs.format.block import ZERO_ID
from snapfs.hydration.scheduler import HydrationConfig, Hydrator, Priority
from snapfs.image.catalog import SnapshotCatalog
from snapfs.image.sweep import Sweeper, parse_prefetch_list
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


async def wait_until(condition: Callable[[], bool], seconds: float) -> None:
    """Poll ``condition`` (state owned by other tasks) until it holds; fail after ``seconds``."""
    with trio.fail_after(seconds):
        while True:
            if condition():
                return
            await trio.sleep(0.05)


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
        got = await hydrator.read_blob(target)
        loc = hydrator.index.locate(target)
        ours = next(i for i, (key, offset, length) in enumerate(store.ranges)
                    if key == pack_key(loc.pack) and offset <= loc.offset < offset + length)
        return got, ours, loc

    got, ours, loc = trio.run(with_hydrator, repo, cache, config, body)
    assert got == next(data[i : i + BS] for i in range(0, len(data), BS)
                       if repo.keyer.block_id(data[i : i + BS]) == repo.keyer.block_id(got))
    # one background fetch is under way in its one slot; ours takes the reserved slot at once,
    # ahead of the hundreds still queued (queued neighbours in its pack may ride along)
    assert ours == 1
    cache.close()


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
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        view = catalog.images()["s1.img"]
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
        nursery.start_soon(Sweeper(catalog, hydrator, config).run)
        view = catalog.images()["s1.img"]
        wanted = [b for b in await view.block_ids(0, view.nblocks)]
        hinted = {wanted[n] for n in profile if wanted[n] != ZERO_ID}
        await wait_until(lambda: not cache.missing(sorted(hinted)), 30)
        return hinted

    hinted = trio.run(with_hydrator, repo, cache, config, second_mount)
    assert hinted and cache.missing(sorted(hinted)) == []
    cache.close()


def test_prefetch_list_parsing(tmp_path: Path) -> None:
    good = tmp_path / "list"
    good.write_text("# comment\ns1.img\ns2.img 4K 1M\n\n")
    assert parse_prefetch_list(str(good)) == {"s1.img": [(0, None)], "s2.img": [(4096, 1 << 20)]}
    bad = tmp_path / "bad"
    bad.write_text("s1.img 12\n")
    with pytest.raises(Exception, match="bad:1"):
        parse_prefetch_list(str(bad))
