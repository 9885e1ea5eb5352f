"""The host's index cache (``snapfs.repo.indexcache``) against real repositories on the local store.

Every load through the cache is compared with a load from the store alone (``load_index()``):
the same blobs at the same locations, the same packs and entries, the same index object names.
Which index objects were fetched is counted at the store, so "only the new ones" is checked as a
fact, not inferred from timing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from diskimages import random_image, write_at

from snapfs.format.index import IndexFile
from snapfs.format.pack import KIND_DATA, KIND_PAGE, PackEntry
from snapfs.repo.create import CreateOptions, create_snapshot
from snapfs.repo.gc import delete_snapshots
from snapfs.repo.indexcache import IndexCache, PackedIndex
from snapfs.repo.repository import BlobIndex, Location, Repository
from snapfs.store import LocalStore

BS = 4096


class CountingStore(LocalStore):
    """A local store that remembers which index objects were read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.index_gets: list[str] = []

    def get(self, key: str) -> bytes:
        if key.startswith("index/"):
            self.index_gets.append(key.rpartition("/")[2])
        return super().get(key)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(CountingStore(tmp_path / "repo"), block_size=BS)


def snapshot(repo: Repository, source: Path, name: str) -> str:
    result = trio.run(create_snapshot, repo, str(source), CreateOptions(name=name))
    return result.root.id


def fetched(repo: Repository) -> list[str]:
    store = repo.store
    assert isinstance(store, CountingStore)
    names, store.index_gets = store.index_gets, []
    return names


def assert_same(cached: BlobIndex, reference: BlobIndex) -> None:
    assert len(cached) == len(reference)
    for bid, loc in reference.blobs.items():
        assert bid in cached
        assert cached.locate(bid) == loc
    assert cached.index_names == reference.index_names
    assert cached.packs == reference.packs
    assert cached.blobs == reference.blobs


def neighbours_by_hand(index: BlobIndex, bid: bytes, start: int, end: int) -> list[tuple[bytes, Location]]:
    """What ``neighbours`` must answer, from the plain pack lists."""
    loc = index.locate(bid)
    return [(e.blob_id, Location(loc.pack, e.offset, e.length, e.raw_length, e.kind))
            for e in index.packs[loc.pack]
            if e.kind == loc.kind and start <= e.offset and e.offset + e.length <= end]


def image(tmp_path: Path, name: str, seed: int, size: int = 64 * BS) -> Path:
    return random_image(tmp_path / name, size, seed)


def test_miss_then_hit_loads_the_same_index_without_fetching(repo: Repository, tmp_path: Path) -> None:
    snapshot(repo, image(tmp_path, "a.img", 1), "a")
    snapshot(repo, image(tmp_path, "b.img", 2), "b")
    reference = repo.load_index()
    assert len(reference.index_names) == 2
    fetched(repo)

    miss = repo.load_index(IndexCache(tmp_path / "cache"))
    assert sorted(fetched(repo)) == sorted(reference.index_names)
    assert_same(miss, reference)
    files = list((tmp_path / "cache" / "index").iterdir())
    assert [f.name for f in files] == [IndexCache(tmp_path / "cache").path_for(repo).name]

    # a new process (nothing in memory) reads the file, and fetches no index object
    hit = repo.load_index(IndexCache(tmp_path / "cache"))
    assert fetched(repo) == []
    assert_same(hit, reference)


def test_snapshots_and_index_are_a_listing_then_a_load(repo: Repository, tmp_path: Path) -> None:
    """What a mount reads before it is ready, in one call: the same roots as ``snapshots`` and
    the same index as ``load_index`` (which it fills the host's cache with)."""
    for seed, name in ((1, "a"), (2, "b"), (3, "c")):
        snapshot(repo, image(tmp_path, f"{name}.img", seed), name)
    reference = repo.load_index()
    fetched(repo)

    listing, index = repo.snapshots_and_index(IndexCache(tmp_path / "cache"))
    assert listing.roots == repo.snapshots() and listing.unreadable == []
    assert [r.name for r in listing.roots] == ["a", "b", "c"]
    assert sorted(fetched(repo)) == sorted(reference.index_names)
    assert_same(index, reference)
    _, again = repo.snapshots_and_index(IndexCache(tmp_path / "cache"))
    assert fetched(repo) == []  # from the host's cache now
    assert_same(again, reference)


class StaleListing(LocalStore):
    """A store whose listing still names objects deleted since (as another host's ``snapshot
    delete`` or ``gc`` can make it, between a LIST and its GETs)."""

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        yield from super().list(prefix)
        yield f"{prefix}0123456789abcdef", 100


def test_objects_deleted_after_the_listing_are_left_out(tmp_path: Path) -> None:
    repo = Repository.init(StaleListing(tmp_path / "repo"), block_size=BS)
    for seed, name in ((1, "a"), (2, "b")):
        snapshot(repo, image(tmp_path, f"{name}.img", seed), name)
    assert [r.name for r in repo.snapshots()] == ["a", "b"]
    listing, index = repo.snapshots_and_index()
    assert [r.name for r in listing.roots] == ["a", "b"] and listing.unreadable == []
    assert len(index.index_names) == 2 and "0123456789abcdef" not in index.index_names


def test_new_index_objects_are_fetched_alone_and_merged(repo: Repository, tmp_path: Path) -> None:
    cache = IndexCache(tmp_path / "cache")
    snapshot(repo, image(tmp_path, "a.img", 1), "a")
    repo.load_index(cache)
    before = set(repo.list_index_names())

    # an incremental snapshot (some blocks shared with "a") and another disk: two new objects
    changed = image(tmp_path, "a.img", 1)
    write_at(changed, 5 * BS, b"\x01" * (3 * BS))
    snapshot(repo, changed, "a2")
    snapshot(repo, image(tmp_path, "c.img", 3, size=300 * BS), "c")
    new = set(repo.list_index_names()) - before
    assert len(new) == 2

    fetched(repo)  # creating a snapshot loads the index from the store too
    merged = repo.load_index(cache)  # from memory, plus the new objects
    assert set(fetched(repo)) == new
    reference = repo.load_index()
    fetched(repo)
    assert_same(merged, reference)

    # and the file written after the merge says the same to a new process
    again = repo.load_index(IndexCache(tmp_path / "cache"))
    assert fetched(repo) == []
    assert_same(again, reference)

    # the blobs beside one in its pack (read-around): the same from the cache file, from the
    # merge (a file plus new objects) and from the store's objects, and what the lists say
    merged_too = repo.load_index(IndexCache(tmp_path / "other"))  # file written, then merged
    checked = 0
    for bid, loc in list(reference.blobs.items())[::7]:
        for before, after in ((0, 0), (3000, 5000), (40000, 0), (1 << 30, 1 << 30)):
            start, end = loc.offset - before, loc.offset + loc.length + after
            expected = neighbours_by_hand(reference, bid, start, end)
            assert (bid, loc) in expected
            for index in (again, merged, merged_too, reference):
                assert index.neighbours(bid, start, end) == expected
            checked += len(expected) > 1
    assert checked > 10
    assert reference.neighbours(b"\x07" * 32, 0, 1 << 30) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "other-repo"])
def test_a_bad_cache_file_is_ignored_and_rebuilt(repo: Repository, tmp_path: Path, damage: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    snapshot(repo, image(tmp_path, "a.img", 1), "a")
    repo.load_index(IndexCache(tmp_path / "cache"))
    path = IndexCache(tmp_path / "cache").path_for(repo)
    data = path.read_bytes()
    if damage == "flip":
        broken = bytearray(data)
        broken[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(broken))
    elif damage == "truncate":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid file, of another repository, where this one's belongs
        other = Repository.init(LocalStore(tmp_path / "other"), block_size=BS)
        snapshot(other, image(tmp_path, "o.img", 9), "o")
        other_cache = IndexCache(tmp_path / "other-cache")
        other.load_index(other_cache)
        path.write_bytes(other_cache.path_for(other).read_bytes())
    fetched(repo)

    with caplog.at_level(logging.WARNING, logger="snapfs.repo.indexcache"):
        index = repo.load_index(IndexCache(tmp_path / "cache"))
    assert "index cache" in caplog.text
    reference = repo.load_index()
    assert set(fetched(repo)) == set(reference.index_names)  # from the store again
    assert_same(index, reference)
    rebuilt = PackedIndex.decode(path.read_bytes())
    assert rebuilt.repo_id == repo.config.id and rebuilt.names == set(reference.index_names)


def test_index_objects_superseded_by_gc_are_dropped(repo: Repository, tmp_path: Path) -> None:
    cache = IndexCache(tmp_path / "cache")
    a = snapshot(repo, image(tmp_path, "a.img", 1), "a")
    snapshot(repo, image(tmp_path, "b.img", 2), "b")
    old = repo.load_index(cache)
    old_names = set(old.index_names)
    b_packs = set(old.packs)

    # deleting "a" writes one index superseding both objects, then deletes them and a's packs
    trio.run(delete_snapshots, repo, [repo.resolve(a)])
    reference = repo.load_index()
    assert not old_names & set(reference.index_names)
    fetched(repo)
    after = repo.load_index(cache)
    assert fetched(repo) == reference.index_names
    assert_same(after, reference)
    assert set(after.packs) < b_packs | set(reference.packs)
    assert all(repo.store.exists(f"packs/{p[:2]}/{p}") for p in after.packs)

    # the same from the file alone
    assert_same(repo.load_index(IndexCache(tmp_path / "cache")), reference)
    assert fetched(repo) == []


def test_a_new_index_superseding_cached_ones_rebuilds_while_the_old_are_still_listed(
    repo: Repository, tmp_path: Path
) -> None:
    """As after a gc that wrote its new index but died before deleting the old ones."""
    cache = IndexCache(tmp_path / "cache")
    snapshot(repo, image(tmp_path, "a.img", 1), "a")
    snapshot(repo, image(tmp_path, "b.img", 2), "b")
    old = repo.load_index(cache)

    # the union of both, in one object that supersedes them (what gc step 2 writes)
    repo.write_index(IndexFile(packs=dict(old.packs), supersedes=list(old.index_names)))
    fetched(repo)
    index = repo.load_index(cache)
    reference = repo.load_index()
    assert len(reference.index_names) == 3  # the new one first, then the two superseded
    assert_same(index, reference)
    fetched(repo)
    assert_same(repo.load_index(IndexCache(tmp_path / "cache")), reference)
    assert fetched(repo) == []


# -- the table alone ---------------------------------------------------------------------------


def entry(n: int, kind: int = KIND_DATA, offset: int = 0) -> PackEntry:
    return PackEntry(n.to_bytes(4, "big") * 8, kind, offset, 100 + n, 200 + n)


def test_table_lookups_duplicates_and_growth() -> None:
    packs = [("aa" * 32, [entry(1), entry(2, KIND_PAGE, 100)]), ("bb" * 32, [entry(2, offset=7)])]
    table = PackedIndex.build("cd" * 16, ["01" * 16], [], packs)
    assert len(table) == 2
    assert table.get(entry(1).blob_id) == Location("aa" * 32, 0, 101, 201, KIND_DATA)
    assert table.get(entry(2).blob_id) == Location("aa" * 32, 100, 102, 202, KIND_PAGE)  # first wins
    assert table.get(entry(3).blob_id) is None
    assert table.unpack() == dict(packs)

    # merging past the table's room rehashes it; everything stays findable, old places kept
    many = [(f"{n:064x}", [entry(1000 + n * 10 + i, offset=i) for i in range(10)]) for n in range(50)]
    bigger = table.merged(["02" * 16], ["03" * 16], [*many, ("cc" * 32, [entry(1, offset=9)])])
    assert len(bigger.slots) > len(table.slots)
    assert len(bigger) == 2 + 500
    assert bigger.get(entry(1).blob_id) == table.get(entry(1).blob_id)
    for pack, entries in many:
        for e in entries:
            assert bigger.get(e.blob_id) == Location(pack, e.offset, e.length, e.raw_length, e.kind)
    assert bigger.names == {"01" * 16, "02" * 16} and bigger.superseded == {"03" * 16}

    decoded = PackedIndex.decode(bigger.encode())
    assert decoded.unpack() == bigger.unpack()
    assert len(decoded) == len(bigger) and decoded.names == bigger.names
    assert all(decoded.get(e.blob_id) == bigger.get(e.blob_id)
               for entries in bigger.unpack().values() for e in entries)


def test_neighbours_keep_to_the_pack_the_kind_and_the_range() -> None:
    a, b = "aa" * 32, "bb" * 32
    in_a = [entry(1), entry(2, KIND_PAGE, 101), entry(3, offset=203), entry(4, offset=306)]
    in_b = [entry(5), entry(6, offset=105)]
    table = PackedIndex.build("cd" * 16, ["01" * 16], [], [(a, in_a), (b, in_b)])
    plain = BlobIndex()
    plain.add_pack(a, in_a)
    plain.add_pack(b, in_b)

    def found(pack: str, *entries: PackEntry) -> list[tuple[bytes, Location]]:
        return [(e.blob_id, Location(pack, e.offset, e.length, e.raw_length, e.kind)) for e in entries]

    for index in (table.index(), plain):
        third = entry(3).blob_id
        assert index.neighbours(third, 0, 1000) == found(a, in_a[0], in_a[2], in_a[3])
        assert index.neighbours(third, 1, 410) == found(a, in_a[2], in_a[3])  # the first starts at 0
        assert index.neighbours(third, 0, 409) == found(a, in_a[0], in_a[2])  # the last ends at 410
        assert index.neighbours(entry(2).blob_id, 0, 1000) == found(a, in_a[1])  # pages only
        assert index.neighbours(entry(6).blob_id, 0, 1000) == found(b, *in_b)
        assert index.neighbours(entry(9).blob_id, 0, 1000) == []
