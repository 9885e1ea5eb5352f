"""BlockCache: verified reads, persistence across restarts, eviction by segment (also racing
writes and lookups), bad directories, and its own faults (a full file system, a damaged or
truncated index, an unreadable segment), which must cost misses, never a failed read."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash
from diskimages import have_root
from testkit import tmpfs

from snapfs.cache import BlockCache
from snapfs.cache.blockcache import SEG, SEGINFO
from snapfs.errors import SnapfsError


def block(n: int, size: int = 16384) -> tuple[bytes, bytes]:
    data = os.urandom(size)
    return n.to_bytes(32, "big"), data


def test_put_get_and_miss(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    bid, data = block(1)
    assert cache.get(bid) is None
    cache.put(bid, data)
    assert cache.get(bid) == data
    assert cache.contains(bid)
    assert cache.missing([bid, block(2)[0]]) == [block(2)[0]]
    assert (cache.hits, cache.misses) == (1, 1)
    cache.close()


def test_survives_restart(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    items = [block(i) for i in range(50)]
    for bid, data in items:
        cache.put(bid, data)
    cache.close()
    again = BlockCache(tmp_path / "c", capacity=64 << 20)
    assert all(again.get(bid) == data for bid, data in items)
    bid, data = block(99)
    again.put(bid, data)  # appends after what was there
    assert again.get(bid) == data and again.get(items[0][0]) == items[0][1]
    again.close()


def test_corrupt_bytes_are_a_miss_never_a_wrong_read(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    bid, data = block(1)
    cache.put(bid, data)
    cache.flush()
    seg = next((tmp_path / "c").glob("seg-*.dat"))
    with open(seg, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cache.get(bid) is None
    assert cache.bad == 1
    assert not cache.contains(bid)  # dropped, so the next read refetches
    cache.close()


def test_truncated_segment_after_crash_is_a_miss(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    items = [block(i) for i in range(4)]
    for bid, data in items:
        cache.put(bid, data)
    cache.close()
    seg = next((tmp_path / "c").glob("seg-*.dat"))
    os.truncate(seg, 16384 * 2 + 10)  # as if the last writes never reached the disk
    again = BlockCache(tmp_path / "c", capacity=64 << 20)
    got = [again.get(bid) for bid, _ in items]
    assert got[:2] == [items[0][1], items[1][1]]
    assert got[2:] == [None, None]
    again.close()


def test_eviction_keeps_size_under_capacity(tmp_path: Path) -> None:
    capacity = 4 << 20
    cache = BlockCache(tmp_path / "c", capacity=capacity, segment_size=1 << 20)
    items = [block(i) for i in range(1024)]  # 16 MiB through a 4 MiB cache
    for bid, data in items:
        cache.put(bid, data)
    assert cache.size <= capacity + (1 << 20)
    files = list((tmp_path / "c").glob("seg-*.dat"))
    assert sum(f.stat().st_size for f in files) <= capacity + (1 << 20)
    # the newest blocks are there, the oldest are gone, and nothing returned is wrong
    assert cache.get(items[-1][0]) == items[-1][1]
    assert cache.get(items[0][0]) is None
    for bid, data in items:
        got = cache.get(bid)
        assert got is None or got == data
    assert cache.entries() == sum(1 for bid, _ in items if cache.contains(bid))
    cache.close()


def test_concurrent_readers_and_writers(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=8 << 20, segment_size=1 << 20)
    items = [block(i, 4096) for i in range(2000)]
    errors: list[str] = []

    def writer(part: list[tuple[bytes, bytes]]) -> None:
        for bid, data in part:
            cache.put(bid, data)

    def reader() -> None:
        for bid, data in items:
            got = cache.get(bid)
            if got is not None and got != data:
                errors.append(bid.hex())

    threads = [threading.Thread(target=writer, args=(items[i::3],)) for i in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    cache.close()


def test_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(SnapfsError, match="not writable"):
        BlockCache(blocker / "cache", capacity=1 << 20)


WRITER = """
import sys, hashlib
from snapfs.cache import BlockCache
cache = BlockCache(sys.argv[1], capacity=int(sys.argv[2]), segment_size=1 << 20)
tag, count = sys.argv[3], int(sys.argv[4])
for i in range(count):
    data = hashlib.sha256(f"{tag}-{i}".encode()).digest() * 512  # 16 KiB, reproducible
    cache.put(hashlib.sha256(f"id-{tag}-{i}".encode()).digest(), data)
if sys.argv[5] == "close":
    cache.close()
else:
    import os
    os._exit(0)  # dies without closing: its last segment stays marked open
"""


def expected(tag: str, i: int) -> tuple[bytes, bytes]:
    return (hashlib.sha256(f"id-{tag}-{i}".encode()).digest(),
            hashlib.sha256(f"{tag}-{i}".encode()).digest() * 512)


def run_writers(directory: Path, capacity: int, specs: list[tuple[str, int, str]]) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(capacity),
                               tag, str(count), how]) for tag, count, how in specs]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(procs)


def test_processes_share_one_cache(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    run_writers(directory, 256 << 20, [("a", 300, "close"), ("b", 300, "close")])
    cache = BlockCache(directory, capacity=256 << 20)
    for tag in "ab":
        for i in range(300):
            bid, data = expected(tag, i)
            assert cache.get(bid) == data
    assert cache.size == 600 * 16384
    assert cache.entries() == 600
    # no two processes ever appended to one segment file
    assert len(list(directory.glob("seg-*.dat"))) >= 2 * 5
    cache.close()


def test_eviction_reaches_segments_of_other_and_dead_processes(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    capacity = 4 << 20
    run_writers(directory, 64 << 20, [("old", 128, "close"), ("dead", 64, "die")])
    cache = BlockCache(directory, capacity=capacity, segment_size=1 << 20)
    assert cache.size == 192 * 16384
    for i in range(256):  # 4 MiB more: the old segments must go
        bid, data = expected("new", i)
        cache.put(bid, data)
    assert cache.size <= capacity + (1 << 20)
    on_disk = sum(f.stat().st_size for f in directory.glob("seg-*.dat"))
    assert on_disk <= capacity + (1 << 20)
    gone = [expected(t, i) for t, n in (("old", 128), ("dead", 64)) for i in range(n)]
    assert all(cache.get(bid) is None for bid, _ in gone)
    assert cache.get(expected("new", 255)[0]) == expected("new", 255)[1]
    cache.close()


def test_put_many_is_one_append_and_get_many_checks_each_block(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    items = [block(i) for i in range(64)]
    cache.put_many(items)
    cache.put_many([])  # nothing to do
    assert cache.entries() == 64
    assert cache.size == 64 * 16384
    assert [p.stat().st_size for p in (tmp_path / "c").glob("seg-*.dat")] == [64 * 16384]
    ids = [bid for bid, _ in items]
    assert cache.get_many(ids) == [data for _, data in items]
    cache.flush()
    # one bad block in the middle of a run is a miss; its neighbours are still served
    seg = next((tmp_path / "c").glob("seg-*.dat"))
    with open(seg, "r+b") as f:
        f.seek(10 * 16384 + 7)
        byte = f.read(1)
        f.seek(10 * 16384 + 7)
        f.write(bytes([byte[0] ^ 1]))
    got = cache.get_many([*ids, block(99)[0]])
    assert got[10] is None and got[64] is None
    assert [g for i, g in enumerate(got[:64]) if i != 10] == [d for i, (_, d) in enumerate(items) if i != 10]
    assert cache.bad == 1 and not cache.contains(ids[10])
    cache.close()
    again = BlockCache(tmp_path / "c", capacity=64 << 20)
    assert again.get(ids[63]) == items[63][1]
    again.put_many([block(100)])  # appends after what was there
    assert again.get(block(100)[0]) is not None and again.get(ids[0]) == items[0][1]
    again.close()


def test_put_many_of_a_block_cached_elsewhere_keeps_one_entry(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20, segment_size=1 << 20)
    items = [block(i) for i in range(70)]  # more than one segment
    cache.put_many(items[:64])
    cache.put_many(items[60:])  # 60..63 again, now in the next segment
    assert cache.entries() == 70
    assert cache.get_many([bid for bid, _ in items]) == [data for _, data in items]
    cache.close()


def test_read_into_reads_neighbours_together_and_checks_each_block(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20, segment_size=1 << 20)
    items = [block(i) for i in range(70)]  # two segments
    cache.put_many(items[:40])
    cache.put_many(items[40:])
    ids = [bid for bid, _ in items]
    # out of order, one ID twice, one not cached, one target of the wrong length
    order = [5, 4, 6, 7, 69, 68, 3, 3, 0]
    wanted = [ids[i] for i in order] + [block(99)[0], ids[1]]
    buf = bytearray(len(wanted) * 16384)
    view = memoryview(buf)
    targets = [view[k * 16384 : (k + 1) * 16384] for k in range(len(order) + 1)] + [view[:100]]
    preadvs = 0
    real_preadv = os.preadv

    def counting_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal preadvs
        preadvs += 1
        return real_preadv(fd, buffers, offset)

    os.preadv = counting_preadv  # type: ignore[assignment]
    try:
        ok = cache.read_into(wanted, targets)
    finally:
        os.preadv = real_preadv
    assert ok == [True] * len(order) + [False, False]
    assert [bytes(targets[k]) for k in range(len(order))] == [items[i][1] for i in order]
    # 3..7 lie end to end in one segment; 68..69 in the other; 0 and the second 3 alone
    assert preadvs == 4
    cache.flush()
    # a block whose bytes changed on disk is not marked read (whatever its target holds now)
    # and is dropped; its neighbours in the same preadv are still good
    seg = sorted((tmp_path / "c").glob("seg-*.dat"))[0]
    with open(seg, "r+b") as f:
        f.seek(5 * 16384 + 99)
        byte = f.read(1)
        f.seek(5 * 16384 + 99)
        f.write(bytes([byte[0] ^ 1]))
    targets = [memoryview(bytearray(16384)) for _ in range(3)]
    assert cache.read_into(ids[4:7], targets) == [True, False, True]
    assert bytes(targets[0]) == items[4][1] and bytes(targets[2]) == items[6][1]
    assert cache.bad == 1 and not cache.contains(ids[5])
    cache.close()


def test_read_into_a_torn_segment_is_a_miss(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    items = [block(i) for i in range(4)]
    cache.put_many(items)
    cache.flush()
    seg = next((tmp_path / "c").glob("seg-*.dat"))
    os.truncate(seg, 2 * 16384 + 5)  # a crash before the last writes reached the disk
    targets = [memoryview(bytearray(16384)) for _ in items]
    assert cache.read_into([bid for bid, _ in items], targets) == [True, True, False, False]
    assert bytes(targets[1]) == items[1][1]
    assert cache.missing([bid for bid, _ in items]) == [items[2][0], items[3][0]]
    cache.close()


def test_put_many_records_the_checksums_it_is_given(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    (a, data_a), (b, data_b) = block(1), block(2)
    cache.put_many([(a, data_a), (b, data_b)], [xxhash.xxh3_128_digest(data_a), bytes(16)])
    assert cache.get(a) == data_a
    assert cache.get(b) is None  # a checksum that does not match the bytes is never served
    cache.close()


# -- eviction racing writes and lookups ------------------------------------------------------------


def segment_records(cache: BlockCache) -> dict[int, tuple[int, int, int]]:
    """segment -> (bytes, writer pid, open) as the index records them."""
    with cache._env.begin() as txn:
        return {SEG.unpack(k)[0]: SEGINFO.unpack(v) for k, v in txn.cursor(db=cache._segments)}


def test_writers_under_eviction_pressure_keep_their_files_and_the_accounting(tmp_path: Path) -> None:
    # what the fetch workers of a daemon with a small --cache-size do: each write may start a
    # segment and evict the oldest while other threads still write into theirs
    directory = tmp_path / "c"
    cache = BlockCache(directory, capacity=4 << 20)
    errors: list[str] = []
    wrong: list[bytes] = []
    refused: list[int] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                items = [(rng.randbytes(32), rng.randbytes(16384)) for _ in range(8)]
                if not cache.put_many(items):
                    refused.append(seed)
                got = cache.get_many([bid for bid, _ in items])
                wrong.extend(bid for (bid, data), g in zip(items, got, strict=True)
                             if g is not None and g != data)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == [] and refused == []
    assert (cache.bad, cache.errors) == (0, 0)  # nothing was corrupt: no block may fail its check
    records = segment_records(cache)
    files = {int(p.name[4:12]): p.stat().st_size for p in directory.glob("seg-*.dat")}
    # every segment the index names has its file, of the size it records, and only this
    # process's current segment is still open
    assert {seg: size for seg, (size, _, _) in records.items()} == files
    assert [seg for seg, (_, _, is_open) in records.items() if is_open] == [cache._current]
    assert cache.size == sum(files.values()) <= 4 << 20
    cache.close()
    again = BlockCache(directory, 4 << 20)
    assert all(not is_open for _, _, is_open in segment_records(again).values())  # all sealed
    again.close()


class RacingCache(BlockCache):
    """A real BlockCache that runs ``between`` once, right after a lookup has read where its
    blocks lie and before it reads them: the moment an eviction by another thread hurts."""

    between: Callable[[], None] | None = None

    def _locate(self, block_ids):  # type: ignore[no-untyped-def]
        where = super()._locate(block_ids)
        between, self.between = self.between, None
        if between is not None:
            between()
        return where


@pytest.mark.parametrize("lookup", ["get_many", "read_into"])
def test_a_lookup_racing_an_eviction_is_a_miss_and_keeps_the_newer_entry(
        tmp_path: Path, lookup: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = RacingCache(tmp_path / "c", capacity=2 << 20, segment_size=1 << 20)
    items = [block(i) for i in range(64)]  # segment 1, full
    cache.put_many(items)
    x, data = items[0]
    fresh = [block(i) for i in range(100, 164)]

    def evict_and_cache_again() -> None:
        cache.put_many([(x, data), *fresh[:63]])  # segment 2, with x again
        cache.put_many(fresh[63:])  # segment 3: 2 MiB + 16 KiB, so segment 1 goes
        assert not (tmp_path / "c" / "seg-00000001.dat").exists()

    cache.between = evict_and_cache_again
    if lookup == "get_many":
        assert cache.get_many([x]) == [None]
    else:
        assert cache.read_into([x], [memoryview(bytearray(16384))]) == [False]
    assert (cache.bad, cache.misses) == (0, 1)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    assert cache.get(x) == data  # its entry in segment 2 was not dropped
    cache.close()


def test_a_segment_whose_record_was_evicted_while_it_was_written_caches_nothing(tmp_path: Path) -> None:
    # another process may evict a segment of ours, judging us dead (a pid it cannot see):
    # then what we were writing into it must not be recorded, nor its record recreated
    cache = RacingCache(tmp_path / "c", capacity=64 << 20)
    cache.put_many([block(1)])
    seg = cache._current
    with cache._env.begin(write=True) as txn:  # what that process's eviction does
        txn.delete(SEG.pack(seg), db=cache._segments)
        txn.put(b"total-bytes", (0).to_bytes(8, "little"), db=cache._meta)
    bid, data = block(2)
    assert cache.put_many([(bid, data)]) is False
    assert cache.get(bid) is None and cache.missing([bid]) == [bid]
    assert seg not in segment_records(cache) and cache.size == 0
    cache.close()


# -- the cache's own faults: never a failed read --------------------------------------------------


def zero_leaf_pages_of_blocks(index: Path) -> int:
    """Zero every leaf page of the cache index's "blocks" database (32-byte keys and entries),
    as a bad sector or a torn write would; how many there were."""
    data = index / "data.mdb"
    zeroed = 0
    with open(data, "r+b") as f:
        for page in range(2, data.stat().st_size // 4096):
            f.seek(page * 4096)
            raw = f.read(4096)
            if not struct.unpack_from("<H", raw, 10)[0] & 2:  # P_LEAF
                continue
            node = struct.unpack_from("<H", raw, 16)[0]
            if struct.unpack_from("<H", raw, node)[0] == 32 == struct.unpack_from("<H", raw, node + 6)[0]:
                f.seek(page * 4096)
                f.write(bytes(4096))
                zeroed += 1
    return zeroed


def test_a_damaged_index_page_costs_misses_not_errors(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    cache = BlockCache(tmp_path / "c", capacity=1 << 30)
    ids = [i.to_bytes(32, "big") for i in range(3000)]
    for k in range(0, 3000, 100):
        cache.put_many([(b, b"x" * 100) for b in ids[k : k + 100]])
    cache.close()
    assert zero_leaf_pages_of_blocks(tmp_path / "c" / "index.lmdb") > 1
    cache = BlockCache(tmp_path / "c", capacity=1 << 30)  # opens: the damage is deeper
    for _ in range(3):
        assert cache.missing(ids) == ids
        assert cache.get_many(ids[:5]) == [None] * 5
        assert cache.read_into(ids[:2], [memoryview(bytearray(100))] * 2) == [False, False]
        assert cache.put_many([(ids[7], b"y" * 100)]) is False
    assert not cache.contains(ids[0])
    assert cache.misses == 3 * 7 and cache.bad == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings  # once per kind: a lookup, a write
    assert "cannot look blocks up (mdb_get: MDB_CORRUPTED" in warnings[0]
    assert "cannot cache blocks (mdb_put: MDB_CORRUPTED" in warnings[1]
    cache.close()


def test_an_unreadable_segment_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    items = [block(i) for i in range(4)]
    cache.put_many(items)
    cache.close()
    seg = next((tmp_path / "c").glob("seg-*.dat"))
    seg.unlink()
    seg.mkdir()  # open() of it fails with EISDIR, as a failing disk fails with EIO
    cache = BlockCache(tmp_path / "c", capacity=64 << 20)
    ids = [bid for bid, _ in items]
    assert cache.get_many(ids) == [None] * 4
    assert cache.read_into(ids, [memoryview(bytearray(16384)) for _ in ids]) == [False] * 4
    assert (cache.misses, cache.bad, cache.errors) == (8, 0, 2)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"cache {tmp_path / 'c'}: cannot read a segment ([Errno 21] Is a directory: '{seg}'); "
        "those blocks are read from the store"]
    bid, data = block(9)
    assert cache.put_many([(bid, data)]) and cache.get(bid) == data  # its own segments work
    cache.close()


@pytest.mark.root
@pytest.mark.skipif(not have_root(), reason="needs root (tmpfs)")
def test_a_cache_file_system_that_runs_out_leaves_blocks_uncached(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC that no free-space check foresees: a tmpfs with room for bytes but for seven
    files (its root, the cache's directory and index, lmdb's two files, the marker of the
    process that has it open, one segment)."""
    with tmpfs(tmp_path / "small", "2M", inodes=7) as small:
        cache = BlockCache(small / "c", capacity=1 << 30, segment_size=1 << 20)
        try:  # (closed whatever happens: an open cache would keep the tmpfs busy)
            runs = [[block(64 * r + i) for i in range(16)] for r in range(16)]  # 16 x 256 KiB
            stored = [cache.put_many(run) for run in runs]
            assert stored == [True] * 4 + [False] * 12  # one segment's worth, then no file
            for run, ok in zip(runs, stored, strict=True):
                # what was stored reads back; what was not is not there (nor recorded, nor
                # half-read)
                want = [data for _, data in run] if ok else [None] * len(run)
                assert cache.get_many([bid for bid, _ in run]) == want
            assert cache.bad == 0
            warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
            assert warnings[0].endswith("blocks are served without being cached")
        finally:
            cache.close()


def fill(cache: BlockCache, first: int, count: int) -> tuple[list[list[tuple[bytes, bytes]]],
                                                             list[bool]]:
    """``count`` runs of 16 blocks (256 KiB) put into ``cache``, and whether each was cached."""
    runs = [[block(64 * r + i) for i in range(16)] for r in range(first, first + count)]
    return runs, [cache.put_many(run) for run in runs]


def cached(cache: BlockCache, run: list[tuple[bytes, bytes]]) -> bool:
    got = cache.get_many([bid for bid, _ in run])
    assert got in ([data for _, data in run], [None] * len(run))  # whole runs, right bytes
    return got[0] is not None


@pytest.mark.root
@pytest.mark.skipif(not have_root(), reason="needs root (tmpfs)")
def test_a_cache_larger_than_its_file_system_keeps_the_reserve_free_and_keeps_caching(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "small", "8M") as small:
        cache = BlockCache(small / "c", capacity=1 << 30, reserve=2 << 20)
        try:
            assert cache.segment_size == 1 << 20  # a sixteenth of the file system (at least 1M)
            frees = []
            runs, stored = [], []
            for r in range(64):  # 16 MiB through an 8 MiB file system
                more, ok = fill(cache, r, 1)
                runs += more
                stored += ok
                frees.append(cache.free_space())
            assert all(stored)
            # the reserve stays free (less at most lmdb's growth in the put that checked it)
            assert min(frees) >= (2 << 20) - (256 << 10), frees
            assert not cache.short_of_space and cache.errors == 0
            held = [cached(cache, run) for run in runs]
            assert held[-8:] == [True] * 8  # the newest stay, the oldest went
            assert held[:16] == [False] * 16
            assert 2 << 20 < cache.size <= 6 << 20
            assert not [r for r in caplog.records if r.levelno >= 30]
        finally:
            cache.close()


@pytest.mark.root
@pytest.mark.skipif(not have_root(), reason="needs root (tmpfs)")
def test_caching_pauses_while_others_hold_the_space_and_resumes_once_it_is_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="snapfs.cache")
    with tmpfs(tmp_path / "small", "8M") as small:
        cache = BlockCache(small / "c", capacity=1 << 30, reserve=2 << 20)
        try:
            ballast = small / "ballast"  # someone else's: room for half a run beyond the reserve
            ballast.write_bytes(b"x" * (cache.free_space() - (2 << 20) - (128 << 10)))
            runs, ok = fill(cache, 0, 4)
            assert ok == [False] * 4 and cache.short_of_space
            assert not any(cached(cache, run) for run in runs)
            assert cache.free_space() >= 2 << 20  # it never ate the reserve
            warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
            assert len(warnings) == 1, warnings
            assert "cannot keep 2.0 MiB of its file system free" in warnings[0]
            ballast.unlink()
            runs, ok = fill(cache, 4, 4)
            assert all(ok) and all(cached(cache, run) for run in runs)
            assert not cache.short_of_space
            assert any("caching resumed" in r.getMessage() for r in caplog.records)
        finally:
            cache.close()


@pytest.mark.root
@pytest.mark.skipif(not have_root(), reason="needs root (tmpfs)")
def test_ensure_free_evicts_the_oldest_segments_for_a_disk(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "16M") as small:
        cache = BlockCache(small / "c", capacity=1 << 30, reserve=1 << 20)
        try:
            runs, ok = fill(cache, 0, 40)  # 10 MiB
            assert all(ok)
            assert cache.ensure_free(1 << 20)  # there is room: nothing goes
            assert all(cached(cache, run) for run in runs)
            assert cache.ensure_free(9 << 20)
            assert cache.free_space() >= 10 << 20
            held = [cached(cache, run) for run in runs]
            assert held[-4:] == [True] * 4 and held[0] is False
            assert held == sorted(held)  # oldest first
            assert not cache.ensure_free(64 << 20)  # more than the file system has
            assert cache.size == 1 << 20 or cache.size < 2 << 20  # all but the open segment
        finally:
            cache.close()


# -- a damaged index at open ----------------------------------------------------------------------


OPEN_AND_READ = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from snapfs.cache import BlockCache
cache = BlockCache(sys.argv[1], capacity=1 << 30)
ids = [i.to_bytes(32, "big") for i in range(3000)]
print(len(cache.missing(ids)), cache.get_many(ids[:2]))
cache.put(b"n" * 32, b"new" * 100)
print(cache.get(b"n" * 32) == b"new" * 100, cache.entries())
cache.close()
"""


def test_a_truncated_index_is_moved_aside_not_a_sigbus(tmp_path: Path) -> None:
    # sync=False: a power loss may leave data.mdb shorter than the pages its meta page names;
    # lmdb maps the file and a lookup of a page past its end is SIGBUS, on every mount
    directory = tmp_path / "c"
    cache = BlockCache(directory, capacity=1 << 30)
    ids = [i.to_bytes(32, "big") for i in range(3000)]
    for k in range(0, 3000, 100):
        cache.put_many([(b, b"x" * 100) for b in ids[k : k + 100]])
    cache.close()
    data = directory / "index.lmdb" / "data.mdb"
    os.truncate(data, data.stat().st_size // 3)
    result = subprocess.run([sys.executable, "-c", OPEN_AND_READ, str(directory)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stderr)  # -7 was SIGBUS
    assert result.stdout == "3000 [None, None]\nTrue 1\n"
    assert result.stderr.startswith(f"WARNING cache index {directory / 'index.lmdb'} unusable "
                                    "(its data file is truncated: "), result.stderr
    assert result.stderr.count("\n") == 1
    assert len(list(directory.glob("index.lmdb.broken-*"))) == 1
    assert [p.name for p in directory.glob("seg-*.dat")] == ["seg-00000001.dat"]  # a new one


def test_an_index_left_open_in_another_boot_is_set_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A process that dies (kill -9) leaves the index whole, since its pages were in the
    kernel's cache; one that had it open when the machine went down may have left it torn
    (test_powercut cuts the power for real), so the next boot starts an empty cache."""
    directory = tmp_path / "c"

    def die_writing(tag: str, boot: str) -> None:
        env = dict(os.environ, SNAPFS_BOOT_ID=boot)
        proc = subprocess.run([sys.executable, "-c", WRITER, str(directory), str(64 << 20), tag,
                               "40", "die"], env=env, timeout=120)
        assert proc.returncode == 0

    die_writing("a", "boot-1")
    monkeypatch.setenv("SNAPFS_BOOT_ID", "boot-1")  # the same boot: kill -9
    cache = BlockCache(directory, capacity=64 << 20)
    assert cache.get(expected("a", 39)[0]) == expected("a", 39)[1]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    assert len(list(directory.glob("running-*"))) == 1  # its own; the dead one's is gone
    cache.close()
    assert list(directory.glob("running-*")) == []

    die_writing("b", "boot-1")
    monkeypatch.setenv("SNAPFS_BOOT_ID", "boot-2")  # the machine went down meanwhile
    cache = BlockCache(directory, capacity=64 << 20)
    assert cache.entries() == 0 and cache.get(expected("b", 0)[0]) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "had it open when the machine went down" in warning
    assert list(directory.glob("seg-*.dat")) == []
    cache.put(*expected("c", 0))
    cache.close()
    cache = BlockCache(directory, capacity=64 << 20)  # closed cleanly: kept
    assert cache.get(expected("c", 0)[0]) == expected("c", 0)[1]
    cache.close()
