"""The repository library against both stores (a local directory and SeaweedFS's S3): snapshots of
real ext4 images, export, verify, delete with garbage collection, and what goes wrong.

Claims are checked against independent measures, never against snapfs's word alone: images are
compared block by block in the test to know which blocks changed and which contents are new; what
a snapshot wrote is counted by listing the store and decoding the new index objects and packs;
exports are compared byte for byte with their source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import blake3
import pytest
import trio
from diskimages import (
    MiB,
    block_hashes,
    changed_blocks,
    copy_image,
    distinct_nonzero,
    have_root,
    nonzero_blocks,
    random_image,
    release_fifo_reader,
    same_bytes,
    sha256_file,
    standard_images,
    write_at,
)
from testkit import flip_byte

import snapfs.repo.create as create_module
from snapfs.errors import (
    AmbiguousSnapshot,
    CorruptBlock,
    DuplicateName,
    FormatError,
    IntegrityError,
    MissingBlock,
    RepositoryExists,
    RepositoryLocked,
    RepositoryNotFound,
    RootsUnreadable,
    SnapfsError,
    SnapshotNotFound,
    SourceChanged,
    SourceError,
    StoreUnavailable,
)
from snapfs.format.block import HEADER_SIZE, ZERO_ID
from snapfs.format.index import IndexFile
from snapfs.format.manifest import SnapshotRoot
from snapfs.format.pack import KIND_DATA, KIND_PAGE, read_trailer
from snapfs.repo.create import CreateOptions, CreateResult, create_snapshot
from snapfs.repo.export import PARTIAL_SUFFIX, export_snapshot
from snapfs.repo.gc import collect_garbage, delete_snapshots
from snapfs.repo.repository import BlobIndex, Repository, pack_key
from snapfs.repo.verify import VerifyReport, verify_snapshots
from snapfs.store import ObjectStore
from snapfs.store.local import LocalStore

MakeStore = Callable[..., ObjectStore]
T = TypeVar("T")

needs_root = pytest.mark.skipif(not have_root(), reason="changing an ext4 image needs a loop mount")


# -- images, built once per module -------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    base: Path  # 64 MiB ext4 with ~24 MiB of real files
    changed: Path  # base with ~1% of its file data changed through the filesystem
    other: Path  # another ext4 image, other files


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    if not have_root():
        pytest.skip("changing an ext4 image needs root (loop mount)")
    return Images(*standard_images(tmp_path_factory.getbasetemp()))


# -- calling the library -----------------------------------------------------------------------


def create(repo: Repository, source: Path, progress: Any = None, **options: Any) -> CreateResult:
    if progress is None:
        return trio.run(create_snapshot, repo, str(source), CreateOptions(**options))
    return trio.run(create_snapshot, repo, str(source), CreateOptions(**options), progress)


def export(repo: Repository, root: SnapshotRoot, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = trio.run(export_snapshot, repo, root, str(out))
    return result


def verify(repo: Repository, roots: list[SnapshotRoot] | None = None) -> VerifyReport:
    report: VerifyReport = trio.run(verify_snapshots, repo, repo.snapshots() if roots is None else roots)
    return report


def delete(repo: Repository, *roots: SnapshotRoot, progress: Any = None) -> dict[str, Any]:
    if progress is None:
        stats: dict[str, Any] = trio.run(delete_snapshots, repo, list(roots))
    else:
        stats = trio.run(lambda: delete_snapshots(repo, list(roots), progress=progress))
    return stats


class Phases:
    """A progress sink that records every phase: label, unit, total, and the amount advanced
    (from worker threads too)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, int]] = []
        self.advanced: list[int] = []
        self._lock = threading.Lock()

    def start(self, label: str, total: int, unit: str | None = None) -> None:
        with self._lock:
            self.seen.append((label, unit, total))
            self.advanced.append(0)

    def advance(self, amount: int) -> None:
        with self._lock:
            self.advanced[-1] += amount

    def finished(self) -> list[tuple[str, str | None, int]]:
        """The phases, each checked to have advanced exactly to its total."""
        assert self.advanced == [total for _, _, total in self.seen], (self.seen, self.advanced)
        return self.seen


# -- looking at the store directly -------------------------------------------------------------


def objects(store: ObjectStore, prefix: str = "") -> dict[str, int]:
    return dict(store.list(prefix))


def pack_names(store: ObjectStore) -> dict[str, int]:
    return {key.rpartition("/")[2]: size for key, size in store.list("packs/")}


def stored_index(store: ObjectStore) -> dict[str, IndexFile]:
    return {key: IndexFile.decode(store.get(key)) for key, _ in store.list("index/")}


def keyed_ids(repo: Repository, plain_blocks: Iterable[bytes]) -> set[bytes]:
    """Block IDs computed by the test from plain bytes and the repository's secret."""
    secret = repo.config.secret_bytes
    return {blake3.blake3(b, key=secret).digest() for b in plain_blocks}





def check_written(
    repo: Repository, before: dict[str, int], result: CreateResult, new_plain: Iterable[bytes]
) -> None:
    """What one create stored, read back from the store: exactly one root, one index object
    naming exactly the new packs, and in those packs exactly one copy of each new block."""
    store = repo.store
    after = objects(store)
    assert before.items() <= after.items(), "a create changed or removed an existing object"
    written = {k: s for k, s in after.items() if k not in before}
    kinds = {k.split("/")[0] for k in written}
    assert kinds <= {"packs", "index", "snapshots"}, written
    assert [k for k in written if k.startswith("snapshots/")] == [f"snapshots/{result.root.id}"]
    new_packs = {k.rpartition("/")[2] for k in written if k.startswith("packs/")}
    new_index = [k for k in written if k.startswith("index/")]
    expected = {hashlib.sha256(b).digest() for b in new_plain}

    stored_data: list[bytes] = []
    pages = 0
    if new_packs:
        assert len(new_index) == 1
        index_file = IndexFile.decode(store.get(new_index[0]))
        assert set(index_file.packs) == new_packs
        for name in new_packs:
            data = store.get(pack_key(name))
            assert blake3.blake3(data).hexdigest() == name
            assert read_trailer(data) == index_file.packs[name]
            for e in index_file.packs[name]:
                plain = repo.codec.decode(data[e.offset : e.offset + e.length])
                assert repo.keyer.block_id(plain) == e.blob_id
                if e.kind == KIND_DATA:
                    stored_data.append(hashlib.sha256(plain).digest())
                else:
                    assert e.kind == KIND_PAGE
                    pages += 1
    else:
        assert new_index == []

    assert len(stored_data) == len(set(stored_data)), "a block was stored twice"
    assert set(stored_data) == expected
    stats = result.stats
    assert stats["blocks_uploaded"] == len(expected)
    assert stats["pages_written"] == pages
    assert stats["objects_written"] == len(written)
    # every object written, the root included (or, by another reasonable definition, without
    # the root, whose size depends on this very number)
    root_size = written[f"snapshots/{result.root.id}"]
    assert stats["bytes_uploaded"] in (sum(written.values()), sum(written.values()) - root_size)


# -- full and incremental snapshots ------------------------------------------------------------


@needs_root
def test_full_and_incremental_snapshots_export_identical_and_store_only_new_blocks(
    store_url: str, make_store: MakeStore, images: Images, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url))
    bs = repo.block_size
    base, changed = nonzero_blocks(images.base, bs), nonzero_blocks(images.changed, bs)
    base_hashes, changed_hashes = block_hashes(images.base, bs), block_hashes(images.changed, bs)
    nblocks = os.path.getsize(images.base) // bs

    before = objects(repo.store)
    full = create(repo, images.base, disk="vm", name="vm-monday")
    check_written(repo, before, full, base.values())
    distinct_base = distinct_nonzero(images.base, bs)
    assert full.stats["blocks_uploaded"] == len(distinct_base)
    assert full.stats["blocks_total"] == nblocks
    assert full.stats["blocks_data"] == len(base)
    assert full.stats["blocks_zero"] == nblocks - len(base)
    assert "blocks_changed" not in full.stats
    assert full.root.parent is None
    # Holes are not read: a 64 MiB image with ~24 MiB of files. (Allocated is the bound, not
    # SEEK_DATA's extents now: ext4 reports unwritten extents as data until written back.)
    allocated = os.stat(images.base).st_blocks * 512
    assert full.stats["bytes_read"] <= allocated + MiB < nblocks * bs * 0.7

    before = objects(repo.store)
    incremental = create(repo, images.changed, disk="vm", name="vm-tuesday")
    new_contents = {h: b for h, b in distinct_nonzero(images.changed, bs).items() if h not in distinct_base}
    changed_at = changed_blocks(base_hashes, changed_hashes)
    check_written(repo, before, incremental, new_contents.values())
    assert incremental.root.parent == full.root.id
    assert incremental.stats["blocks_changed"] == len(changed_at)
    assert incremental.stats["blocks_uploaded"] == len(new_contents) <= len(changed_at)
    assert 0 < len(changed_at) < nblocks // 10, "a 1% change touched a few blocks"
    assert incremental.stats["blocks_data"] == len(changed)

    for root, source in ((full.root, images.base), (incremental.root, images.changed)):
        out = tmp_path / f"{root.name}.img"
        result = export(repo, root, out)
        assert sha256_file(out) == sha256_file(source)
        assert result["size"] == os.path.getsize(source)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(PARTIAL_SUFFIX)) == []

    report = verify(repo)
    assert report.ok, report.problems
    assert report.snapshots == 2
    # every distinct block of both images, plus one manifest page each
    assert report.blobs_checked == len(distinct_base) + len(new_contents) + 2


def test_sparse_disk_reads_only_data_and_stores_no_zero_blocks(
    store_url: str, make_store: MakeStore, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url))
    bs = repo.block_size
    size = (1 << 30) + 1536  # 1 GiB and a short last block of 3 sectors
    source = tmp_path / "sparse.img"
    with open(source, "wb") as f:
        f.truncate(size)
    words = b"snapfs keeps block-level snapshots of disks in object storage. " * 20_000
    pieces = [
        (0, random_bytes(1 * MiB, 1)),
        (400 * MiB + 4096, random_bytes(2 * MiB, 2)),  # not aligned to the 16K block
        (700 * MiB, bytes(512 * 1024)),  # zeros that are allocated: read, but not stored
        ((1 << 30) - MiB, words[:MiB]),
        (1 << 30, random_bytes(1536, 3)),
    ]
    for offset, data in pieces:
        write_at(source, offset, data)
    written = sum(len(d) for _, d in pieces)
    distinct = distinct_nonzero(source, bs)

    before = objects(repo.store)
    result = create(repo, source, disk="sparse")
    check_written(repo, before, result, distinct.values())
    stats = result.stats
    assert written <= stats["bytes_read"] <= written + 2 * bs * len(pieces)
    assert stats["blocks_total"] == -(-size // bs)
    assert stats["blocks_data"] == len(nonzero_blocks(source, bs))
    assert stats["blocks_zero"] == stats["blocks_total"] - stats["blocks_data"]
    assert stats["bytes_uploaded"] < written

    out = tmp_path / "restored.img"
    export(repo, result.root, out)
    assert os.path.getsize(out) == size
    assert same_bytes(out, source)
    assert os.stat(out).st_blocks * 512 < written + 2 * MiB, "the export kept the holes"
    assert verify(repo).ok


def test_a_disk_that_grew_or_shrank_is_snapshotted_against_its_parent(
    store_url: str, make_store: MakeStore, tmp_path: Path
) -> None:
    """An image resized since its last snapshot (``qemu-img resize``, ``truncate``): the
    parent's last page holds another number of blocks. Comparing with it used to read it as
    if it had the new length, and every later snapshot of the disk failed with "manifest page
    … names 64 blocks, not 4096" (exit 4, as if the repository were damaged)."""
    repo = Repository.init(make_store(store_url))
    bs = repo.block_size
    disk = random_image(tmp_path / "disk.img", MiB, seed=40)  # 64 blocks of page 0
    copies = []
    first = create(repo, disk, disk="d")
    copies.append(sha256_file(disk))

    os.truncate(disk, 66 * MiB)  # grown into a second page of 4096 blocks
    write_at(disk, 65 * MiB, random_bytes(MiB, 41))
    grown = create(repo, disk, disk="d")
    copies.append(sha256_file(disk))
    assert grown.root.parent == first.root.id and len(grown.root.pages) == 2
    assert grown.stats["blocks_changed"] == MiB // bs  # the new blocks; zeros are no change

    write_at(disk, 0, random_bytes(bs, 42))
    os.truncate(disk, MiB // 2)  # shrunk back into part of page 0
    shrunk = create(repo, disk, disk="d")
    copies.append(sha256_file(disk))
    assert shrunk.root.parent == grown.root.id and len(shrunk.root.pages) == 1
    assert shrunk.stats["blocks_changed"] == 1

    for n, result in enumerate((first, grown, shrunk)):
        out = tmp_path / f"out-{n}.img"
        export(repo, result.root, out)
        assert sha256_file(out) == copies[n]
    assert verify(repo).ok


def test_a_page_that_became_holes_counts_its_blocks_as_changed(
    store_url: str, make_store: MakeStore, tmp_path: Path
) -> None:
    """A range of an image cut off and grown back (``truncate``), or punched (``fallocate``,
    a TRIM passed through), that covers a whole manifest page: that page is never read, so
    its blocks were never compared with the parent's and ``blocks_changed`` said 0 for data
    that had become zeros (a snapshot of a wholly punched image: 0 changed of everything)."""
    repo = Repository.init(make_store(store_url))
    bs = repo.block_size
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    os.truncate(disk, 66 * MiB)  # two pages of 4096 blocks, the second short
    write_at(disk, 0, random_bytes(MiB, 50))
    write_at(disk, 65 * MiB, random_bytes(MiB, 51))
    first = create(repo, disk, disk="d")

    os.truncate(disk, 64 * MiB)
    os.truncate(disk, 66 * MiB)  # the second page: nothing but a hole
    second = create(repo, disk, disk="d")
    assert second.root.parent == first.root.id
    assert second.stats["blocks_changed"] == MiB // bs

    os.truncate(disk, 0)
    os.truncate(disk, 66 * MiB)  # the whole image
    third = create(repo, disk, disk="d")
    assert third.stats["blocks_changed"] == MiB // bs
    assert third.stats["blocks_data"] == 0
    out = tmp_path / "out.img"
    export(repo, third.root, out)
    assert os.path.getsize(out) == 66 * MiB and os.stat(out).st_blocks == 0


def random_bytes(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


@needs_root
def test_same_blocks_are_stored_once_across_disks(
    store_url: str, make_store: MakeStore, images: Images, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url))
    bs = repo.block_size
    first = create(repo, images.base, disk="alpha")
    assert first.stats["blocks_uploaded"] == len(distinct_nonzero(images.base, bs))

    # the same disk content under another disk's name: nothing but a root is stored
    before = objects(repo.store)
    clone = create(repo, images.base, disk="beta")
    assert clone.root.parent is None
    assert clone.stats["blocks_uploaded"] == 0
    assert clone.stats["pages_written"] == 0
    assert set(objects(repo.store)) - set(before) == {f"snapshots/{clone.root.id}"}
    check_written(repo, before, clone, [])

    # a third disk, first snapshot (no parent), that is mostly the first disk's content
    before = objects(repo.store)
    third = create(repo, images.changed, disk="gamma")
    assert third.root.parent is None
    assert "blocks_changed" not in third.stats
    seen = distinct_nonzero(images.base, bs)
    new = {h: b for h, b in distinct_nonzero(images.changed, bs).items() if h not in seen}
    check_written(repo, before, third, new.values())
    assert third.stats["blocks_uploaded"] < third.stats["blocks_data"] // 10

    out = tmp_path / "beta.img"
    export(repo, clone.root, out)
    assert sha256_file(out) == sha256_file(images.base)


# -- delete and garbage collection -------------------------------------------------------------


@dataclass
class GcExpectation:
    kept: set[str]
    repacked: dict[str, set[bytes]]  # pack -> its live blobs, to be copied into new packs
    emptied: set[str]


def expect_gc(index: BlobIndex, live: set[bytes]) -> GcExpectation:
    """What the documented rule says collection does to each pack: none live -> deleted, live
    bytes below half -> repacked, otherwise kept whole."""
    every = [e.blob_id for entries in index.packs.values() for e in entries]
    assert len(every) == len(set(every)), "a blob in two packs: the expectation below is wrong"
    out = GcExpectation(set(), {}, set())
    for pack, entries in index.packs.items():
        total = sum(e.length for e in entries)
        live_here = {e.blob_id for e in entries if e.blob_id in live}
        live_bytes = sum(e.length for e in entries if e.blob_id in live)
        if not live_here:
            out.emptied.add(pack)
        elif live_bytes < total / 2:
            out.repacked[pack] = live_here
        else:
            out.kept.add(pack)
    return out


def live_blobs(repo: Repository, remaining: dict[str, Path]) -> set[bytes]:
    """Every blob the remaining snapshots (root id -> source image) need, computed from the
    images themselves and the roots' page lists."""
    live = set()
    roots = {r.id: r for r in repo.snapshots()}
    assert set(roots) == set(remaining)
    for root_id, image in remaining.items():
        live |= keyed_ids(repo, nonzero_blocks(image, repo.block_size).values())
        live |= {bytes.fromhex(p) for p in roots[root_id].pages} - {ZERO_ID}
    return live


def delete_and_check(
    repo: Repository, victim: SnapshotRoot, remaining: dict[str, Path], progress: Any = None,
) -> tuple[dict[str, Any], GcExpectation]:
    store = repo.store
    index_before = repo.load_index()
    packs_before = pack_names(store)
    assert set(index_before.packs) == set(packs_before)
    stats = delete(repo, victim, progress=progress)
    assert not store.exists(f"snapshots/{victim.id}")
    live = live_blobs(repo, remaining)
    want = expect_gc(index_before, live)

    packs_after = pack_names(store)
    new_packs = set(packs_after) - set(packs_before)
    assert want.kept <= set(packs_after)
    assert not (want.emptied | set(want.repacked)) & set(packs_after)
    assert set(packs_after) == want.kept | new_packs
    assert stats["packs_deleted"] == len(want.emptied)
    assert stats["packs_repacked"] == len(want.repacked)
    assert stats["bytes_freed"] == sum(packs_before.values()) - sum(packs_after.values())

    index_after = repo.load_index()
    assert len(stored_index(store)) == 1, "collection leaves one index object"
    assert set(index_after.packs) == set(packs_after), "every stored pack is indexed, no orphans"
    moved = {e.blob_id for p in new_packs for e in index_after.packs[p]}
    assert moved == set().union(*want.repacked.values())
    assert live <= set(index_after.blobs)
    for pack in want.kept:
        assert index_after.packs[pack] == index_before.packs[pack]
    dead_in_kept = {e.blob_id for p in want.kept for e in index_before.packs[p]} - live
    assert set(index_after.blobs) == live | dead_in_kept

    report = verify(repo)
    assert report.ok, report.problems
    assert report.blobs_checked == len(live)
    return stats, want


@needs_root
def test_delete_frees_exactly_the_blobs_no_snapshot_needs(
    store_url: str, make_store: MakeStore, images: Images, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url), pack_size=256 * 1024)
    a = create(repo, images.base, disk="vm").root
    after_a = pack_names(repo.store)
    b = create(repo, images.changed, disk="vm").root
    after_b = pack_names(repo.store)
    c = create(repo, images.other, disk="other").root
    c_packs = set(pack_names(repo.store)) - set(after_b)
    assert len(after_a) > 10

    # B's own blocks and page are in the packs B wrote; A's and C's packs are all live
    stats, want = delete_and_check(repo, b, {a.id: images.base, c.id: images.other})
    assert set(after_a) | c_packs <= set(pack_names(repo.store)), "a pack B did not write went"
    assert want.emptied and want.emptied <= set(after_b) - set(after_a)
    assert stats["bytes_freed"] > 0

    # A's blocks that C does not share
    stats, _ = delete_and_check(repo, a, {c.id: images.other})
    assert stats["bytes_freed"] > 0
    out = tmp_path / "other.img"
    export(repo, c, out)
    assert sha256_file(out) == sha256_file(images.other)

    # the last one: nothing is left but the config and one empty index
    delete_and_check(repo, c, {})
    assert pack_names(repo.store) == {}
    assert set(objects(repo.store)) == {"config", *stored_index(repo.store)}
    assert all(f.packs == {} for f in stored_index(repo.store).values())


def test_mostly_dead_pack_is_repacked_and_dead_packs_deleted(
    store_url: str, make_store: MakeStore, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url), pack_size=1 << 20)
    bs = repo.block_size
    disk = random_image(tmp_path / "disk.img", 4 * MiB, seed=10)  # 256 incompressible blocks
    a = create(repo, disk, disk="d").root
    index = repo.load_index()
    where = {repo.keyer.block_id(b): n for n, b in nonzero_blocks(disk, bs).items()}
    assert len(where) == 256
    data_packs = sorted((p for p, es in index.packs.items() if es[0].kind == KIND_DATA),
                        key=lambda p: -len(index.packs[p]))
    assert len(data_packs) >= 3 and len(index.packs[data_packs[1]]) >= 8
    mostly, wholly = data_packs[0], data_packs[1]
    mostly_blocks = [where[e.blob_id] for e in index.packs[mostly]]
    wholly_blocks = [where[e.blob_id] for e in index.packs[wholly]]
    # rewrite three quarters of one pack's blocks and all of another's
    rewrite = mostly_blocks[: len(mostly_blocks) * 3 // 4] + wholly_blocks
    for i, n in enumerate(rewrite):
        write_at(disk, n * bs, random_bytes(bs, 1000 + i))
    b = create(repo, disk, disk="d").root
    assert b.stats["blocks_changed"] == len(rewrite)
    assert b.stats["blocks_uploaded"] == len(rewrite)
    index_objects = len(stored_index(repo.store))
    assert index_objects == 2  # one per create

    phases = Phases()
    stats, want = delete_and_check(repo, a, {b.id: disk}, phases)
    assert set(want.repacked) == {mostly}
    assert want.repacked[mostly] == {e.blob_id for e in index.packs[mostly]
                                     if where[e.blob_id] not in rewrite}
    assert wholly in want.emptied
    assert stats["packs_repacked"] == 1
    assert stats["bytes_repacked"] > 0
    # what a terminal's bar shows, phase by phase: each counted, and each run to its end
    assert phases.finished() == [
        ("deleting snapshots", "snapshot", 1),
        ("reading index", "object", index_objects),
        ("reading snapshots", "snapshot", 1),
        ("reading manifests", "page", len(b.pages)),
        ("repacking", "pack", 1),
        ("deleting index", "object", index_objects),
        ("deleting packs", "pack", len(want.emptied) + 1),  # the repacked one too
    ]
    assert stats["packs_deleted"] == len(want.emptied) >= 1

    # nothing left to collect: one index object, no pack to repack or delete
    phases = Phases()
    stats = trio.run(collect_garbage, repo, phases)
    assert (stats["packs_deleted"], stats["packs_repacked"]) == (0, 0)
    assert phases.finished() == [
        ("reading index", "object", 1), ("reading snapshots", "snapshot", 1),
        ("reading manifests", "page", len(b.pages)), ("repacking", "pack", 0),
        ("deleting index", "object", 1), ("deleting packs", "pack", 0)]
    out = tmp_path / "b.img"
    export(repo, b, out)
    assert sha256_file(out) == sha256_file(disk)


def test_export_and_verify_follow_blobs_a_collection_moved_meanwhile(
    store_url: str, make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Export and verify hold no lock: a delete, forget or prune elsewhere may repack the packs
    they read after they read the index. They read the blobs where they went, rather than end
    with "pack … is missing" (exit 4: missing data) about a snapshot that is whole; a pack that
    is gone with its blobs is still missing."""
    repo = Repository.init(make_store(store_url), pack_size=1 << 20)
    bs = repo.block_size
    disk = random_image(tmp_path / "disk.img", 4 * MiB, seed=30)
    a = create(repo, disk, disk="d").root
    for n in range(256):  # three blocks in four change: A's packs are mostly A's alone
        if n % 4:
            write_at(disk, n * bs, random_bytes(bs, 2000 + n))
    b = create(repo, disk, disk="d").root
    stale = repo.load_index()  # as export and verify read it, just before the collection
    assert delete(repo, a)["packs_repacked"] >= 1
    real_load_index = repo.load_index
    load_index, loads = stale_first(stale, real_load_index)
    monkeypatch.setattr(repo, "load_index", load_index)
    out = tmp_path / "b.img"
    export(repo, b, out)
    assert sha256_file(out) == sha256_file(disk)
    assert len(loads) == 2  # the stale index, then once more for the packs that went
    loads.clear()
    report = verify(repo, [b])
    assert report.problems == [] and report.blobs_checked == 256 + len(b.pages)

    # a pack deleted outside garbage collection: its blobs are nowhere else
    loads.clear()
    index = real_load_index()
    lost = index.locate(repo.keyer.block_id(nonzero_blocks(disk, bs)[1])).pack
    repo.store.delete(pack_key(lost))
    with pytest.raises(MissingBlock, match=f"pack {lost[:12]} is missing"):
        export(repo, b, tmp_path / "again.img")
    assert not (tmp_path / "again.img").exists()


def stale_first(stale: T, fresh: Callable[[], T]) -> tuple[Callable[[], T], list[T]]:
    """A stand-in for a repository read that a collection elsewhere overtakes: its first call
    answers ``stale`` (what the read saw before the collection; the race itself cannot be
    timed for real), later ones ``fresh()``. The list holds each answer."""
    answers: list[T] = []

    def read() -> T:
        answers.append(stale if not answers else fresh())
        return answers[-1]

    return read, answers


def test_an_export_whose_snapshot_is_deleted_meanwhile_says_so(
    store_url: str, make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete (or forget) elsewhere took the snapshot being exported, and its blocks: the
    export said "pack … is missing" (exit 4), as if the repository had lost data."""
    repo = Repository.init(make_store(store_url))
    a = create(repo, random_image(tmp_path / "a.img", MiB, seed=31), disk="a").root
    stale = repo.load_index()  # as the export read it, just before the delete
    delete(repo, a)
    monkeypatch.setattr(repo, "load_index", lambda *args: stale)
    out = tmp_path / "a.out"
    with pytest.raises(SnapshotNotFound) as caught:
        export(repo, a, out)
    assert str(caught.value) == f"snapshot {a.name} ({a.id}) was deleted while it was exported"
    assert list(tmp_path.glob("a.out*")) == []


def test_an_index_read_across_a_collection_is_listed_again(
    store_url: str, make_store: MakeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index objects were listed, then a collection elsewhere superseded and deleted them
    all before they were read: the index came out empty, and an export (or verify) of an
    intact snapshot found every block missing."""
    repo = Repository.init(make_store(store_url))
    source = random_image(tmp_path / "a.img", MiB, seed=32)
    a = create(repo, source, disk="a").root
    b = create(repo, random_image(tmp_path / "b.img", MiB, seed=33), disk="b").root
    stale = repo.list_index_names()  # as the export listed them, just before the delete
    delete(repo, b)
    assert not stale & repo.list_index_names()  # one new object superseded them all
    list_index_names, listings = stale_first(stale, repo.list_index_names)
    monkeypatch.setattr(repo, "list_index_names", list_index_names)
    out = tmp_path / "a.out"
    export(repo, a, out)
    assert sha256_file(out) == sha256_file(source)
    assert len(listings) == 2


def test_many_mostly_dead_packs_are_repacked_a_few_at_a_time(
    store_url: str, make_store: MakeStore, tmp_path: Path
) -> None:
    """More packs to repack than the store reads at once: they are read and repacked in turns
    (what is held in memory is one turn's live blobs), and every live blob lands in a new
    pack."""
    repo = Repository.init(make_store(store_url), pack_size=1 << 18)
    bs = repo.block_size
    disk = random_image(tmp_path / "disk.img", 8 * MiB, seed=11)  # 512 incompressible blocks
    a = create(repo, disk, disk="d").root
    index = repo.load_index()
    data_packs = [p for p, es in index.packs.items() if es[0].kind == KIND_DATA]
    assert len(data_packs) > repo.store.concurrency  # two turns at least
    where = {repo.keyer.block_id(b): n for n, b in nonzero_blocks(disk, bs).items()}
    # three quarters of every data pack's blocks rewritten: each is mostly dead once A goes
    rewrite = [where[e.blob_id] for p in data_packs
               for i, e in enumerate(index.packs[p]) if i % 4 != 0]
    for i, n in enumerate(rewrite):
        write_at(disk, n * bs, random_bytes(bs, 2000 + i))
    b = create(repo, disk, disk="d").root
    stats, want = delete_and_check(repo, a, {b.id: disk})
    assert set(want.repacked) == set(data_packs)
    assert stats["packs_repacked"] == len(data_packs)
    out = tmp_path / "b.img"
    export(repo, b, out)
    assert sha256_file(out) == sha256_file(disk)


# -- damage: a flipped byte, a missing pack ----------------------------------------------------


def single_use_block(repo: Repository, root: SnapshotRoot) -> tuple[bytes, int]:
    """A data block used at exactly one place of ``root``: (its id, its block number)."""
    block_map = repo.block_map(repo.load_index(), root)
    uses: dict[bytes, list[int]] = {}
    for n, bid in enumerate(block_map):
        if bid != ZERO_ID:
            uses.setdefault(bid, []).append(n)
    # one in the middle of the disk, not the first
    once = [(ns[0], bid) for bid, ns in uses.items() if len(ns) == 1]
    n, bid = sorted(once)[len(once) // 2]
    return bid, n


@needs_root
def test_flipped_byte_is_reported_by_verify_and_export_writes_nothing(
    store_url: str, make_store: MakeStore, images: Images, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url))
    root = create(repo, images.base, disk="vm", name="vm-1").root
    other = create(repo, images.other, disk="other", name="other-1").root
    bid, n = single_use_block(repo, root)
    loc = repo.load_index().locate(bid)
    flip_byte(repo.store, pack_key(loc.pack), loc.offset + HEADER_SIZE + loc.length // 3)

    report = verify(repo)
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert f"snapshot vm-1 ({root.id}): block at offset {n * repo.block_size}" in problem
    assert verify(repo, [other]).ok  # the other snapshot does not use that block

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(IntegrityError) as caught:
        export(repo, root, out_dir / "vm.img")
    assert isinstance(caught.value, CorruptBlock)
    assert bid.hex()[:16] in str(caught.value)
    assert list(out_dir.iterdir()) == [], "no output and no partial file"


def test_verify_names_every_snapshot_and_offset_a_bad_blob_serves(
    store_url: str, make_store: MakeStore, tmp_path: Path
) -> None:
    """A blob shared by two blocks of each of two snapshots: its damage is reported for both
    snapshots, with both offsets (an operator must not take the second one for intact)."""
    repo = Repository.init(make_store(store_url))
    bs = repo.block_size
    rng = random.Random(77)
    shared, other = rng.randbytes(bs), rng.randbytes(bs)
    image = tmp_path / "twice.img"
    image.write_bytes(shared + other + shared + rng.randbytes(bs))
    v1 = create(repo, image, disk="a", name="v1").root
    v2 = create(repo, image, disk="b", name="v2").root
    bid = repo.keyer.block_id(shared)
    loc = repo.load_index().locate(bid)
    flip_byte(repo.store, pack_key(loc.pack), loc.offset + HEADER_SIZE + loc.length // 3)

    report = verify(repo)
    assert len(report.problems) == 2, report.problems
    for root in (v1, v2):
        assert any(p.startswith(f"snapshot {root.name} ({root.id}): block at offsets 0, "
                                f"{2 * bs}: ") for p in report.problems), report.problems
    assert report.blobs_checked == 3 + 1  # three distinct blocks and one page, each once


@needs_root
def test_missing_pack_is_reported_by_verify_and_export_writes_nothing(
    store_url: str, make_store: MakeStore, images: Images, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url), pack_size=1 << 20)
    root = create(repo, images.base, disk="vm", name="vm-1").root
    index = repo.load_index()
    block_map = repo.block_map(index, root)
    victim = next(p for p, es in index.packs.items() if es[0].kind == KIND_DATA)
    lost = {e.blob_id for e in index.packs[victim]}
    repo.store.delete(pack_key(victim))

    report = verify(repo)
    assert len(report.problems) == len(lost)
    assert all(p.startswith(f"snapshot vm-1 ({root.id}): block at offset ") for p in report.problems)
    assert all("missing" in p for p in report.problems)
    first_lost = min(n for n, bid in enumerate(block_map) if bid in lost)
    assert any(f"offset {first_lost * repo.block_size}:" in p for p in report.problems)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(MissingBlock, match=victim[:12]):
        export(repo, root, out_dir / "vm.img")
    assert list(out_dir.iterdir()) == []

    # collection refuses to run over a broken snapshot rather than delete more
    with pytest.raises(IntegrityError):
        trio.run(collect_garbage, repo)
    assert set(pack_names(repo.store)) == set(index.packs) - {victim}


# -- crashes and sources that change -----------------------------------------------------------


class OnProgress:
    """A progress sink that does something real, once, as soon as a chunk has been processed
    and ``when()`` holds."""

    def __init__(self, action: Callable[[], None], when: Callable[[], bool] = lambda: True) -> None:
        self.action = action
        self.when = when
        self.done = False

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        if not self.done and self.when():
            self.done = True
            self.action()


@needs_root
@pytest.mark.parametrize("change", ["write", "truncate", "unlink"])
def test_source_changed_during_snapshot_records_nothing(
    store_url: str, make_store: MakeStore, images: Images, tmp_path: Path, change: str
) -> None:
    repo = Repository.init(make_store(store_url), pack_size=1 << 20)
    good = create(repo, images.other, disk="other").root
    packs_good = pack_names(repo.store)
    source = copy_image(images.base, tmp_path / "vm.img")

    def act() -> None:
        if change == "write":
            write_at(source, 0, b"written during the snapshot")
        elif change == "truncate":
            os.truncate(source, 8 * MiB)
        else:
            os.unlink(source)

    with pytest.raises(SourceChanged) as caught:
        create(repo, source, OnProgress(act), disk="vm")
    assert str(source) in str(caught.value)
    assert [r.id for r in repo.snapshots()] == [good.id]
    assert objects(repo.store, "locks/") == {}
    assert verify(repo).ok

    stats = trio.run(collect_garbage, repo)
    assert pack_names(repo.store) == packs_good, "the orphan packs are collected"
    assert stats["packs_repacked"] == 0
    if change == "unlink":
        return
    copy_image(images.base, source)
    again = create(repo, source, disk="vm").root
    out = tmp_path / "again.img"
    export(repo, again, out)
    assert sha256_file(out) == sha256_file(images.base)


@needs_root
def test_interrupted_create_leaves_no_snapshot_and_orphans_are_collected(
    store_url: str, make_store: MakeStore, images: Images, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url), pack_size=256 * 1024)
    good = create(repo, images.other, disk="other").root
    packs_good = pack_names(repo.store)

    def has_orphans() -> bool:
        return len(pack_names(repo.store)) > len(packs_good)

    async def interrupted() -> bool:
        with trio.CancelScope() as scope:
            await create_snapshot(repo, str(images.base), CreateOptions(disk="vm"),
                                  OnProgress(scope.cancel, has_orphans))
        return scope.cancelled_caught

    assert trio.run(interrupted)
    orphans = set(pack_names(repo.store)) - set(packs_good)
    assert orphans, "the interrupted create had stored packs"
    assert [r.id for r in repo.snapshots()] == [good.id]
    assert objects(repo.store, "locks/") == {}
    assert verify(repo).ok

    redo = create(repo, images.base, disk="vm").root
    # Packs are named by their content: the redo may have stored (and indexed) some of the very
    # packs the interrupted run left behind. The rest are orphans, and only they go.
    indexed = set(repo.load_index().packs)
    stats = trio.run(collect_garbage, repo)
    assert stats["packs_deleted"] == len(orphans - indexed)
    assert stats["packs_repacked"] == 0
    assert set(pack_names(repo.store)) == indexed
    out = tmp_path / "redo.img"
    export(repo, redo, out)
    assert sha256_file(out) == sha256_file(images.base)
    assert verify(repo).ok


# -- bad input ---------------------------------------------------------------------------------


def test_open_where_there_is_no_repository(store_url: str, make_store: MakeStore) -> None:
    # a local directory that does not exist; an S3 prefix with nothing under it
    with pytest.raises(RepositoryNotFound, match="no repository at|is not a snapfs repository"):
        Repository.open(make_store(store_url))
    store = make_store(store_url)
    store.ensure_container()
    store.put("holiday-photos/1.jpg", b"\xff\xd8 not a repository")
    with pytest.raises(RepositoryNotFound, match="is not a snapfs repository"):
        Repository.open(store)
    store.put("config", b"[core]\nbare = false\n")  # someone else's config
    with pytest.raises(RepositoryNotFound, match="is not a snapfs repository"):
        Repository.open(store)


def test_unknown_format_version_is_refused(store_url: str, make_store: MakeStore) -> None:
    store = make_store(store_url)
    Repository.init(store)
    doc = json.loads(store.get("config"))
    doc["version"] = 99
    changed = json.dumps(doc).encode()
    store.put("config", changed)
    with pytest.raises(FormatError, match="version 99"):
        Repository.open(store)
    with pytest.raises(RepositoryExists):
        Repository.init(store)
    assert store.get("config") == changed


def test_init_never_overwrites(store_url: str, make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(store_url)
    repo = Repository.init(store)
    source = random_image(tmp_path / "d.img", MiB, seed=5)
    create(repo, source, disk="d")
    everything = {k: store.get(k) for k, _ in store.list("")}
    with pytest.raises(RepositoryExists, match="already a snapfs repository"):
        Repository.init(make_store(store_url))
    assert {k: store.get(k) for k, _ in store.list("")} == everything

    other = make_store(store_url + "-notempty")
    other.ensure_container()
    other.put("data/keep-me", b"precious")
    with pytest.raises(RepositoryExists, match="not empty"):
        Repository.init(other)
    assert dict(other.list("")) == {"data/keep-me": 8}


def test_unknown_and_ambiguous_snapshot_references(store_url: str, make_store: MakeStore,
                                                   tmp_path: Path) -> None:
    repo = Repository.init(make_store(store_url))
    source = random_image(tmp_path / "d.img", MiB, seed=6)
    root = create(repo, source, disk="d", name="monday").root
    assert repo.resolve("monday").id == root.id
    assert repo.resolve(root.id).id == root.id
    assert repo.resolve(root.id[:6]).id == root.id
    with pytest.raises(SnapshotNotFound, match="'tuesday'"):
        repo.resolve("tuesday")
    with pytest.raises(SnapshotNotFound):
        repo.resolve(root.id[:3])  # too short to be a prefix
    # two roots whose ids share a prefix, and two with one name (as two hosts racing could make)
    for suffix, name in (("01", "twin"), ("02", "twin")):
        twin = dataclasses.replace(root, id="abcdef" + suffix * 5, name=name)
        repo.write_root(twin)
    with pytest.raises(AmbiguousSnapshot, match="abcdef0101010101"):
        repo.resolve("abcdef")
    with pytest.raises(AmbiguousSnapshot, match="'twin' is ambiguous"):
        repo.resolve("twin")
    assert repo.resolve("abcdef01").name == "twin"
    # a name that is also a prefix of another snapshot's id: the id the user copied from the
    # list must not find (and delete) the snapshot that happens to be named so
    shadow = dataclasses.replace(root, id="feed" + "0" * 12, name=root.id[:6])
    repo.write_root(shadow)
    with pytest.raises(AmbiguousSnapshot, match=f"{shadow.id}.*{root.id}"):
        repo.resolve(root.id[:6])
    assert repo.resolve(root.id).name == "monday"
    assert repo.resolve(shadow.id).name == root.id[:6]
    assert repo.resolve("monday").id == root.id  # a name no id starts with is found as ever


def test_a_root_damaged_after_the_listing_stops_deletes_before_they_delete_anything(
        store_url: str, make_store: MakeStore, tmp_path: Path) -> None:
    """Garbage collection cannot know what an unreadable root needs: it refuses, and so does a
    delete whose caller listed the snapshots before the root went bad (the check is made again
    under the exclusive lock). Deleting the bad root itself is what lets collection run."""
    repo = Repository.init(make_store(store_url))
    a = create(repo, random_image(tmp_path / "a.img", MiB, seed=21), disk="a").root
    b = create(repo, random_image(tmp_path / "b.img", MiB, seed=22), disk="b").root
    roots = repo.snapshots()
    repo.store.put(f"snapshots/{b.id}", b'{"format": "snapfs-snapshot", "vers')
    before = {key: repo.store.get(key) for key, _ in repo.store.list("")}
    subject = f"snapshots/{b.id} in {repo.store.url} is damaged (snapshot root is not valid JSON)"
    with pytest.raises(RootsUnreadable) as caught:
        trio.run(collect_garbage, repo)
    assert caught.value.message.startswith(f"{subject}: not collecting garbage")
    with pytest.raises(RootsUnreadable) as caught:
        trio.run(delete_snapshots, repo, [r for r in roots if r.id == a.id])
    assert caught.value.message.startswith(f"{subject}: not deleting anything")
    with pytest.raises(RootsUnreadable) as caught:
        repo.snapshots()
    assert caught.value.message.startswith(subject)
    assert {key: repo.store.get(key) for key, _ in repo.store.list("")} == before

    listing = repo.list_snapshots()
    assert listing.roots == [a]
    (unreadable,) = listing.unreadable
    assert (unreadable.key, unreadable.snapshot_id) == (f"snapshots/{b.id}", b.id)
    stats = trio.run(lambda: delete_snapshots(repo, [], unreadable=[unreadable]))
    assert stats["deleted"] == [b.id] and stats["bytes_freed"] > 0
    assert repo.snapshots() == [a] and verify(repo).ok


def test_a_root_that_cannot_be_read_is_found_by_its_key(store_url: str, make_store: MakeStore,
                                                       tmp_path: Path) -> None:
    repo = Repository.init(make_store(store_url))
    a = create(repo, random_image(tmp_path / "a.img", MiB, seed=23), disk="a", name="a").root
    odd = a.id[:8] + "zzzz"  # shares a prefix with a's id
    repo.store.put(f"snapshots/{odd}", b"junk")
    listing = repo.list_snapshots()
    assert repo.find(odd, listing).snapshot_id == odd  # type: ignore[union-attr]
    assert repo.find(odd[:10], listing).snapshot_id == odd  # type: ignore[union-attr]
    assert repo.find(a.id, listing) == a and repo.resolve("a", listing) == a
    with pytest.raises(AmbiguousSnapshot, match=f"{a.id}, {odd}|{odd}, {a.id}"):
        repo.find(a.id[:8], listing)  # the healthy one is not taken on a guess
    with pytest.raises(RootsUnreadable, match=f"snapshots/{odd} in .* is damaged"):
        repo.resolve(odd[:10], listing)
    with pytest.raises(SnapshotNotFound):
        repo.find("nothing", listing)


def test_duplicate_name_is_refused_and_stores_nothing(store_url: str, make_store: MakeStore,
                                                      tmp_path: Path) -> None:
    repo = Repository.init(make_store(store_url))
    create(repo, random_image(tmp_path / "a.img", MiB, seed=7), disk="a", name="nightly")
    before = objects(repo.store)
    with pytest.raises(DuplicateName, match="'nightly'"):
        create(repo, random_image(tmp_path / "b.img", MiB, seed=8), disk="b", name="nightly")
    assert objects(repo.store) == before


@pytest.mark.parametrize("given", [True, False])
def test_a_name_stored_by_another_create_meanwhile_is_not_taken_twice(
    given: bool, store_url: str, make_store: MakeStore, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two creates at once (two hosts' cron jobs of /dev/vdb, the same --name) both found the
    name free when they listed the snapshots, and both stored it: two snapshots of one name,
    which exports, mounts and --parent could no longer tell apart. The second to finish now
    refuses a name it was given, and takes another default name."""
    repo = Repository.init(make_store(store_url))
    # both in the same second (the clock of default names only: boto3 signs with the real one)
    monkeypatch.setattr(create_module, "time", SimpleNamespace(
        strftime=lambda fmt: "20260101-000000", monotonic=time.monotonic))
    name = {"name": "nightly"} if given else {}
    other: list[CreateResult] = []
    real_load_index = repo.load_index
    calls = []

    def load_index(*args: Any) -> BlobIndex:
        """Called after this create listed the snapshots: the other create runs to its end."""
        calls.append(args)
        if len(calls) == 1:
            other.append(create(repo, random_image(tmp_path / "b.img", MiB, seed=51), disk="vdb",
                                **name))
        return real_load_index(*args)

    monkeypatch.setattr(repo, "load_index", load_index)
    source = random_image(tmp_path / "a.img", MiB, seed=50)
    if given:
        with pytest.raises(DuplicateName, match="'nightly' was stored while this one was taken"):
            create(repo, source, disk="vdb", **name)
        assert [r.name for r in repo.snapshots()] == ["nightly"]
    else:
        mine = create(repo, source, disk="vdb").root
        assert other[0].root.name == "vdb-20260101-000000"
        assert mine.name == "vdb-20260101-000000.2"
        assert sorted(r.name for r in repo.snapshots()) == sorted([mine.name, other[0].root.name])


@pytest.mark.parametrize("kind", ["missing", "odd-size", "empty", "directory", "fifo"])
def test_bad_sources_are_refused_and_store_nothing(
    store_url: str, make_store: MakeStore, tmp_path: Path, kind: str
) -> None:
    repo = Repository.init(make_store(store_url))
    source = tmp_path / "source"
    if kind == "odd-size":
        source.write_bytes(random_bytes(1000, 9))
    elif kind == "empty":
        source.write_bytes(b"")
    elif kind == "directory":
        source.mkdir()
    elif kind == "fifo":
        os.mkfifo(source)
    before = objects(repo.store)
    # A FIFO with no writer blocks a plain open(). If snapfs is still holding it open after
    # 5 s, this releases it, and the test fails instead of hanging.
    rescued: list[bool] = []
    rescue = threading.Timer(5, lambda: rescued.append(release_fifo_reader(source)))
    if kind == "fifo":
        rescue.start()
    try:
        with pytest.raises(SourceError) as caught:
            create(repo, source)
    finally:
        rescue.cancel()
        if rescue.ident is not None:  # started
            rescue.join()
    assert rescued != [True], "snapshot create blocked opening a FIFO"
    assert str(source) in str(caught.value)
    assert objects(repo.store) == before


def test_export_does_not_replace_an_existing_file_unless_forced(
    store_url: str, make_store: MakeStore, tmp_path: Path
) -> None:
    repo = Repository.init(make_store(store_url))
    source = random_image(tmp_path / "d.img", 2 * MiB + 512, seed=11)
    root = create(repo, source, disk="d").root
    out = tmp_path / "out.img"
    out.write_bytes(b"keep me")
    with pytest.raises(SnapfsError, match="--force"):
        export(repo, root, out)
    assert out.read_bytes() == b"keep me"
    trio.run(export_snapshot, repo, root, str(out), True)
    assert sha256_file(out) == sha256_file(source)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the fault is a local one
def test_a_lock_whose_removal_fails_is_kept_to_let_go_of_later(
    store_url: str, make_store: MakeStore, tmp_path: Path
) -> None:
    """A store that fails while a lock is removed (here: a directory stands where the lock
    object's file was, so the delete fails for real) must not hide the error a ``finally`` is
    carrying, and the holder keeps the lock to remove it once the store works again."""
    from snapfs.repo.lock import RepositoryLock

    store = make_store(store_url)
    Repository.init(store)
    lock = RepositoryLock(store, "shared", "test").acquire()
    path = Path(store_url) / lock.key
    path.unlink()
    path.mkdir()
    (path / "in-the-way").write_bytes(b"x")
    assert lock.release_quietly() is False and lock.held
    shutil.rmtree(path)
    path.write_bytes(b"{}")  # the store works again and the object is back
    assert lock.release_quietly() is True and not lock.held
    assert not path.exists()


class RootReads(LocalStore):
    """A local store that records which snapshot roots were fetched."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.roots_read: list[str] = []

    def get(self, key: str) -> bytes:
        if key.startswith("snapshots/"):
            self.roots_read.append(key.removeprefix("snapshots/"))
        return super().get(key)


def test_listing_again_fetches_only_the_roots_not_read_before(tmp_path: Path) -> None:
    """A mount lists the snapshots again whenever a name it does not know is looked up; with
    hundreds of snapshots, fetching every root each time made such a lookup wait for a GET per
    snapshot. Only new roots are fetched, and those that could not be read (one may have been
    put back); deleted ones drop out."""
    store = RootReads(tmp_path / "repo")
    repo = Repository.init(store)
    ids = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        ids[name] = create(repo, random_image(tmp_path / f"{name}.img", MiB, seed=seed),
                           name=name).root.id
    first = repo.list_snapshots()
    assert [r.name for r in first.roots] == ["a", "b", "c"]
    good_c = store.get(f"snapshots/{ids['c']}")
    store.delete(f"snapshots/{ids['c']}")
    first = repo.list_snapshots()
    ids["d"] = create(repo, random_image(tmp_path / "d.img", MiB, seed=4), name="d").root.id
    store.put(f"snapshots/{ids['c']}", good_c[:-1])  # back, damaged
    store.roots_read.clear()

    again = repo.list_snapshots_again(first)
    assert sorted(store.roots_read) == sorted([ids["c"], ids["d"]])
    assert [r.name for r in again.roots] == ["a", "b", "d"]
    assert [u.snapshot_id for u in again.unreadable] == [ids["c"]]

    store.put(f"snapshots/{ids['c']}", good_c)  # put back from a copy
    store.delete(f"snapshots/{ids['a']}")
    store.roots_read.clear()
    third = repo.list_snapshots_again(again)
    assert store.roots_read == [ids["c"]]
    assert third == repo.list_snapshots()
    assert [r.name for r in third.roots] == ["b", "c", "d"] and third.unreadable == []


class LockWritesMeet(LocalStore):
    """``parties`` lockers write their locks together: each lock write waits until every
    locker has taken its first look (and found nothing), and once written until every lock is:
    the lockers then look for each other again only after all have written (the race a
    store's latency makes likely, made certain)."""

    def __init__(self, root: Path, parties: int) -> None:
        super().__init__(root)
        self.looked = threading.Barrier(parties, timeout=30)
        self.written = threading.Barrier(parties, timeout=30)

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("locks/"):
            self.looked.wait()
        super().put(key, data)
        if key.startswith("locks/"):
            self.written.wait()


def _race(lockers: list[Any]) -> list[BaseException | None]:
    """Each locker's ``acquire`` on a thread of its own, all at once: what each raised."""
    outcome: list[BaseException | None] = [None] * len(lockers)

    def take(i: int) -> None:
        try:
            lockers[i].acquire()
        except BaseException as e:  # (asserted by the caller)
            outcome[i] = e

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(lockers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcome


@pytest.mark.parametrize("kinds", [("exclusive", "exclusive"), ("exclusive", "shared"),
                                   ("shared", "exclusive"), ("exclusive",) * 3])
def test_lockers_that_write_their_locks_at_once_let_exactly_one_proceed(
        tmp_path: Path, kinds: tuple[str, ...]) -> None:
    """Two prunes (or a prune and a snapshot) that take the lock at the same instant see each
    other's lock after writing their own. Both used to back off and fail; now the one whose
    lock sorts first proceeds and the others withdraw theirs."""
    from snapfs.repo.lock import RepositoryLock

    for winner in range(len(kinds)):
        root = tmp_path / f"repo-{winner}"
        Repository.init(LocalStore(root))
        store = LockWritesMeet(root, len(kinds))
        lockers = [RepositoryLock(store, kind, f"locker {i}") for i, kind in enumerate(kinds)]
        for i, locker in enumerate(lockers):  # the winner's key sorts first
            locker.key = f"locks/{(i - winner) % len(kinds)}{locker.key[7:]}"
        outcome = _race(lockers)
        assert [e is None for e in outcome] == [i == winner for i in range(len(kinds))]
        assert all(isinstance(e, RepositoryLocked) and f"locker {winner}" in str(e)
                   for e in outcome if e is not None)
        assert lockers[winner].held
        assert [key for key, _ in store.list("locks/")] == [lockers[winner].key]


def test_a_lock_taken_between_our_two_looks_is_held_and_we_back_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock that sorts after ours may belong to a locker that looked before ours was
    written, and so holds the lock: we wait for it to be withdrawn, it is not, and we fail
    (never both proceed), taking ours away."""
    import snapfs.repo.lock as lock_module

    monkeypatch.setattr(lock_module, "RACE_WAIT", 0.5)
    root = tmp_path / "repo"
    Repository.init(LocalStore(root))
    first = lock_module.RepositoryLock(LocalStore(root), "exclusive", "the holder")
    first.key = "locks/f" + first.key[7:]

    class HolderBetween(LocalStore):
        def put(self, key: str, data: bytes) -> None:  # after our first look, before ours
            first.acquire()
            super().put(key, data)

    ours = lock_module.RepositoryLock(HolderBetween(root), "exclusive", "the late one")
    ours.key = "locks/0" + ours.key[7:]
    started = time.monotonic()
    with pytest.raises(RepositoryLocked, match="the holder"):
        ours.acquire()
    assert time.monotonic() - started >= 0.5
    assert first.held and not ours.held
    assert [key for key, _ in LocalStore(root).list("locks/")] == [first.key]


class LockCalls(LocalStore):
    """A local store that records its calls on lock objects, in order."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[tuple[str, str]] = []

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("locks/"):
            self.calls.append(("put", key))
        super().put(key, data)

    def get(self, key: str) -> bytes:
        if key.startswith("locks/"):
            self.calls.append(("get", key))
        return super().get(key)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        if prefix == "locks/":
            self.calls.append(("list", prefix))
        return super().list(prefix)


def test_a_snapshots_lock_is_written_first_and_looked_for_once(tmp_path: Path) -> None:
    """A snapshot's shared lock, in the usual case (no collection runs): written, then one
    look for an exclusive lock, which finds only ours and does not read it, and beside that
    look what the snapshot reads under the lock (its index). Every snapshot pays for these
    round trips before its upload: there were five (a look, the write, a look and a read of
    our own lock, then the index)."""
    from snapfs.repo.lock import RepositoryLock

    root = tmp_path / "repo"
    Repository.init(LocalStore(root))
    store = LockCalls(root)
    lock = RepositoryLock(store, "shared", "a snapshot")

    async def read_index() -> str:
        store.calls.append(("read", "index"))
        return "the index"

    assert trio.run(lock.acquire_waiting, 5.0, None, read_index) == "the index"
    assert lock.held
    assert sorted(store.calls) == sorted([("put", lock.key), ("list", "locks/"),
                                          ("read", "index")])
    assert store.calls[0] == ("put", lock.key)  # read once the lock is there, never before


def test_a_shared_locker_that_finds_a_collection_writes_no_lock_until_it_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a collection holds the exclusive lock, a snapshot's first try (which writes its
    lock before it looks, and reads its index beside the look) sees it and withdraws; its
    later tries look first and write nothing. The read beside is dropped: once the
    collection ends and the lock is taken, it reads again, and that read is the one used."""
    import snapfs.repo.lock as lock_module

    monkeypatch.setattr(lock_module, "RACE_WAIT", 0.2)
    root = tmp_path / "repo"
    Repository.init(LocalStore(root))
    collection = lock_module.RepositoryLock(LocalStore(root), "exclusive", "a collection")
    collection.key = "locks/f" + collection.key[7:]  # sorts after ours: we wait, then go
    collection.acquire()
    store = LockCalls(root)
    ours = lock_module.RepositoryLock(store, "shared", "a snapshot")
    ours.key = "locks/0" + ours.key[7:]
    reads: list[int] = []

    async def read_index() -> int:
        reads.append(len(reads) + 1)
        return reads[-1]

    async def main() -> int | None:
        async with trio.open_nursery() as nursery:
            async def collect_then_end() -> None:
                await trio.sleep(1.0)
                assert not ours.held
                assert [key for key, _ in LocalStore(root).list("locks/")] == [collection.key]
                await trio.to_thread.run_sync(collection.release)

            nursery.start_soon(collect_then_end)
            return await ours.acquire_waiting(10.0, None, read_index)

    assert trio.run(main) == 2
    assert ours.held and reads == [1, 2]
    puts = [c for c in store.calls if c[0] == "put"]
    assert puts == [("put", ours.key)] * 2  # its first try, and the try after the collection
    assert store.calls.count(("list", "locks/")) >= 4  # looks after writing, and while held
    assert [key for key, _ in LocalStore(root).list("locks/")] == [ours.key]


def test_a_read_beside_a_collection_that_ends_while_we_wait_is_done_again(
        tmp_path: Path) -> None:
    """Our lock written, its confirming look finds a collection's lock sorting after ours:
    we wait for it to be withdrawn, as for a locker that wrote at the same instant. But it
    was held, and its collection deletes a snapshot and ends while we wait: what we read
    beside the look (the snapshot still there) is stale, and is read again once our lock
    is held. (Found by ``test_a_disk_made_while_gc_runs_waits_for_it_and_never_gets_a_deleted_
    base``: a disk was made from a snapshot deleted under it.)"""
    from snapfs.repo.lock import RepositoryLock

    root = tmp_path / "repo"
    Repository.init(LocalStore(root))
    store = LocalStore(root)
    store.put("snapshots/x1", b"a root")
    collection = RepositoryLock(LocalStore(root), "exclusive", "a collection")
    collection.key = "locks/f" + collection.key[7:]  # sorts after ours: we wait for it
    collection.acquire()
    ours = RepositoryLock(store, "shared", "a disk from x1")
    ours.key = "locks/0" + ours.key[7:]
    reads: list[bool] = []
    read_once = trio.Event()

    async def still_stored() -> bool:
        reads.append(await trio.to_thread.run_sync(store.exists, "snapshots/x1"))
        read_once.set()
        return reads[-1]

    async def main() -> bool | None:
        async def collect_then_end() -> None:
            await read_once.wait()  # our lock is written and its look under way
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(store.delete, "snapshots/x1")
            await trio.to_thread.run_sync(collection.release)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_then_end)
            return await ours.acquire_waiting(10.0, None, still_stored)

    assert trio.run(main) is False
    assert reads == [True, False] and ours.held


def test_a_read_under_a_lock_that_fails_leaves_no_lock(tmp_path: Path) -> None:
    from snapfs.repo.lock import RepositoryLock

    root = tmp_path / "repo"
    Repository.init(LocalStore(root))
    lock = RepositoryLock(LocalStore(root), "shared", "a snapshot")

    async def read_index() -> None:
        raise StoreUnavailable("the store went away")

    with pytest.raises(StoreUnavailable, match="went away"):
        trio.run(lock.acquire_waiting, 5.0, None, read_index)
    assert not lock.held
    assert list(LocalStore(root).list("locks/")) == []


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # a lock is a lock on both
def test_a_long_collection_keeps_its_exclusive_lock_fresh(
        make_store: Callable[[str], ObjectStore], store_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another host takes a lock not refreshed for 30 minutes as dead; a collection of a
    large repository can take longer, and then a snapshot elsewhere would reuse blobs it is
    deleting. It refreshes its lock as snapshots do (every 5 minutes; 50 ms here)."""
    import snapfs.repo.gc as gc
    import snapfs.repo.lock as lock
    from snapfs.repo.lock import read_locks

    repo = Repository.init(make_store(store_url))
    seen: list[float] = []

    async def slow_collect(repo: Repository, limiter: trio.CapacityLimiter,
                           progress: Any) -> dict[str, Any]:
        for _ in range(5):
            await trio.sleep(0.3)
            seen.extend(i.time for i in await trio.to_thread.run_sync(read_locks, repo.store))
        return {"packs_deleted": 0}

    monkeypatch.setattr(lock, "REFRESH_EVERY", 0.05)
    monkeypatch.setattr(gc, "_collect", slow_collect)
    trio.run(collect_garbage, repo)
    assert len(seen) == 5 and seen == sorted(set(seen))  # newer each time it looked
    assert read_locks(repo.store) == []
