"""Taking a snapshot of an image file or block device.

The pipeline (all stages overlap; memory is bounded by the channel sizes, whatever the disk):

    reader --chunks--> encoders (one per core: zero check, keyed hash, zstd) --> assembler
        --full packs--> uploaders (store concurrency, ``--rate``)

Only blocks the repository does not hold yet are compressed and uploaded: a block whose keyed
hash is already in the index (from the parent snapshot, another disk, or earlier in this run) is
referenced, not stored again. Holes are never read; all-zero blocks are never stored.

Commit order, the crash rule of the repository: packs, then the index object naming them, then
the root. A crash at any point before the root is stored leaves only unreferenced packs (and
perhaps an index of them), which ``gc`` collects; a root never names anything missing. The
shared lock held from before loading the index until the root is stored keeps ``gc`` from
deleting blobs this snapshot reuses.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from snapfs.errors import DuplicateName
from snapfs.format.block import ZERO_ID, zero_bytes
from snapfs.format.manifest import DEFAULT_ENTRIES_PER_PAGE, SnapshotRoot, encode_page
from snapfs.format.names import check_disk_label, check_snapshot_name, check_text, name_part
from snapfs.format.pack import KIND_DATA, KIND_PAGE
from snapfs.progress import NO_PROGRESS, Progress
from snapfs.repo.lock import SNAPSHOT_LOCK_PATIENCE, RepositoryLock, refresh_lock
from snapfs.repo.packer import FullPack, PackAssembler, PackUploader
from snapfs.repo.parallel import single_error
from snapfs.repo.repository import BlobIndex, Repository, new_id, now_iso, warn_unreadable
from snapfs.repo.source import Source
from snapfs.throttle import RateLimiter

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
CPU_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class CreateOptions:
    name: str | None = None
    disk: str | None = None
    parent: str | None = None
    tags: tuple[str, ...] = ()
    rate: float | None = None  # bytes per second for uploads
    group: str | None = None


@dataclass
class CreateCounts:
    blocks_data: int = 0
    blocks_zero: int = 0
    blocks_uploaded: int = 0
    blocks_changed: int = 0  # compared with the parent; left out when there is none
    bytes_read: int = 0
    pages_written: int = 0


@dataclass
class CreateResult:
    root: SnapshotRoot
    stats: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {**self.root.summary(), **self.stats}


def default_disk_name(path: str) -> str:
    """The source's file name: a file name's bytes that are not UTF-8 become U+FFFD, since a
    label is stored as text (``check_text``)."""
    name = os.path.basename(os.path.normpath(path))
    return os.fsencode(name).decode(errors="replace") or "disk"


def default_snapshot_name(disk: str, taken: set[str]) -> str:
    """``DISK-YYYYMMDD-HHMMSS``, with ``.N`` added when that is taken (several in a second)."""
    base = f"{name_part(disk)}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}.{n}"
    return name


def block_ranges(extents: Iterator[tuple[int, int]], block_size: int, nblocks: int) -> list[tuple[int, int]]:
    """Merge byte extents into sorted, disjoint [first, last) block ranges."""
    out: list[tuple[int, int]] = []
    for start, end in extents:
        first, last = start // block_size, min(nblocks, -(-end // block_size))
        if out and first <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        elif first < last:
            out.append((first, last))
    return out


class ManifestBuilder:
    """Collects block IDs page by page and reports each page when its last block arrives."""

    def __init__(self, nblocks: int, per_page: int, ranges: list[tuple[int, int]]) -> None:
        self.nblocks = nblocks
        self.per_page = per_page
        npages = -(-nblocks // per_page)
        self.page_ids: list[bytes | None] = [None] * npages
        self._entries: dict[int, list[bytes]] = {}
        self._remaining = [0] * npages
        for first, last in ranges:
            for p in range(first // per_page, (last - 1) // per_page + 1):
                lo, hi = max(first, p * per_page), min(last, (p + 1) * per_page)
                self._remaining[p] += hi - lo
        for p, left in enumerate(self._remaining):
            if left == 0:
                self.page_ids[p] = ZERO_ID  # nothing but holes: an implicit all-zero page

    def page_len(self, page: int) -> int:
        return min(self.per_page, self.nblocks - page * self.per_page)

    def set(self, first: int, ids: list[bytes]) -> list[tuple[int, list[bytes]]]:
        """Record IDs for blocks from ``first``; return the pages this completed."""
        done = []
        i = 0
        while i < len(ids):
            block = first + i
            page = block // self.per_page
            entries = self._entries.get(page)
            if entries is None:
                entries = self._entries[page] = [ZERO_ID] * self.page_len(page)
            start = block - page * self.per_page
            n = min(len(ids) - i, len(entries) - start)
            entries[start : start + n] = ids[i : i + n]
            self._remaining[page] -= n
            if self._remaining[page] == 0:
                done.append((page, self._entries.pop(page)))
            i += n
        return done


def encode_chunk(
    repo: Repository, data: bytes, index: BlobIndex, pending: set[bytes]
) -> tuple[list[bytes], list[tuple[bytes, bytes, int]], int]:
    """Worker-thread body: IDs of every block in ``data`` and the encoded new ones.

    Reads ``index`` and ``pending`` without locks: the index does not change during a
    snapshot, and the trio thread only adds to ``pending``; a race only means a block is
    compressed needlessly (the trio side checks again before storing it). Membership is asked
    of the index itself, so a packed index (the daemon's, from the host's index cache) is never
    unpacked for it. A short block may only come last (the end of a disk).
    """
    bs = repo.block_size
    ids: list[bytes] = []
    new: list[tuple[bytes, bytes, int]] = []
    if data == zero_bytes(len(data)):  # memcmp: stops at the first nonzero byte
        n = -(-len(data) // bs)
        return [ZERO_ID] * n, new, n
    zeros = 0
    zero_block = zero_bytes(bs)
    seen: set[bytes] = set()
    block_id = repo.keyer.block_id
    encode = repo.codec.encode
    for off in range(0, len(data), bs):
        block = data[off : off + bs]
        if block == zero_block or (len(block) < bs and block == zero_bytes(len(block))):
            ids.append(ZERO_ID)
            zeros += 1
            continue
        bid = block_id(block)
        ids.append(bid)
        if bid in index or bid in pending or bid in seen:
            continue
        seen.add(bid)
        new.append((bid, encode(block), len(block)))
    return ids, new, zeros


async def create_snapshot(
    repo: Repository,
    source_path: str,
    options: CreateOptions,
    progress: Progress = NO_PROGRESS,
) -> CreateResult:
    started = time.monotonic()
    # before anything is opened or written (the lock): a bad name is the caller's mistake alone
    if options.name is not None:
        check_snapshot_name(options.name)
    if options.disk is not None:
        check_disk_label(options.disk)
    for tag in options.tags:
        check_text(tag, "a tag")
    source = Source(source_path)
    lock = RepositoryLock(repo.store, "shared", f"snapshot create of {source_path}")
    store_limiter = trio.CapacityLimiter(repo.store.concurrency)
    try:
        # a forget or prune holds the exclusive lock for seconds: a scheduled snapshot waits
        await lock.acquire_waiting(SNAPSHOT_LOCK_PATIENCE, store_limiter)
        try:
            with single_error():
                return await _create_locked(repo, source, lock, options, progress, store_limiter, started)
        finally:
            failing = sys.exc_info()[1] is not None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lock.release_quietly, failing,
                                              limiter=store_limiter)
    finally:
        source.close()


async def _create_locked(
    repo: Repository,
    source: Source,
    lock: RepositoryLock,
    options: CreateOptions,
    progress: Progress,
    store_limiter: trio.CapacityLimiter,
    started: float,
) -> CreateResult:
    listing = await trio.to_thread.run_sync(repo.list_snapshots, limiter=store_limiter)
    # a root that cannot be read: its name and whether it was this disk's newest are not known,
    # which costs at most a name that repeats or a parent that is not the newest
    warn_unreadable(listing.unreadable, repo.store.url, "left out")
    roots = listing.roots
    disk = options.disk or default_disk_name(source.path)
    taken = {r.name for r in roots}
    if options.name is not None:
        name = check_snapshot_name(options.name)
        if name in taken:
            raise DuplicateName(f"a snapshot named {name!r} already exists")
    else:
        name = default_snapshot_name(disk, taken)
    if options.parent:
        parent: SnapshotRoot | None = repo.resolve(options.parent, listing)
    else:
        same_disk = [r for r in roots if r.disk == disk]
        parent = same_disk[-1] if same_disk else None
    index = await trio.to_thread.run_sync(repo.load_index, limiter=store_limiter)

    bs = repo.block_size
    nblocks = -(-source.size // bs)
    ranges = block_ranges(source.data_extents(), bs, nblocks)
    manifest = ManifestBuilder(nblocks, DEFAULT_ENTRIES_PER_PAGE, ranges)
    hole_pages = [p for p, pid in enumerate(manifest.page_ids) if pid == ZERO_ID]
    assembler = PackAssembler(repo.config.pack_size)
    uploader = PackUploader(repo, store_limiter, RateLimiter(options.rate))
    cpu_limiter = trio.CapacityLimiter(CPU_WORKERS)
    counts = CreateCounts()
    parent_pages = parent.pages if parent and parent.entries_per_page == manifest.per_page else None
    # the parent's pages hold as many blocks as its own size gives: a disk that grew or shrank
    # since has one page of another length (and more or fewer pages)
    parent_page_lens = repo.page_lengths(parent) if parent is not None else []
    data_bytes = sum(min(last * bs, source.size) - first * bs for first, last in ranges)
    progress.start("snapshot", data_bytes)

    def chunks() -> Iterator[tuple[int, int]]:
        per_chunk = max(1, CHUNK_BYTES // bs)
        for first, last in ranges:
            for b in range(first, last, per_chunk):
                yield b, min(per_chunk, last - b)

    async def store_blob(send: trio.MemorySendChannel[FullPack], bid: bytes, kind: int,
                         encoded: bytes, raw: int) -> None:
        if bid in index.blobs or bid in assembler.pending:
            return
        if kind == KIND_DATA:
            counts.blocks_uploaded += 1
        full = assembler.add(bid, kind, encoded, raw)
        if full is not None:
            await send.send(full)

    async def finish_page(send: trio.MemorySendChannel[FullPack], page: int, ids: list[bytes]) -> None:
        if all(i == ZERO_ID for i in ids):
            manifest.page_ids[page] = ZERO_ID
        else:
            plain = encode_page(ids)
            pid = repo.keyer.block_id(plain)
            manifest.page_ids[page] = pid
            if pid not in index.blobs and pid not in assembler.pending:
                encoded = await trio.to_thread.run_sync(repo.codec.encode, plain, limiter=cpu_limiter)
                counts.pages_written += 1
                await store_blob(send, pid, KIND_PAGE, encoded, len(plain))
        await count_changed(page, ids)

    async def count_changed(page: int, ids: list[bytes]) -> None:
        if parent_pages is not None and page < len(parent_pages):
            old_pid = bytes.fromhex(parent_pages[page])
            if old_pid != manifest.page_ids[page]:
                old = await trio.to_thread.run_sync(
                    repo.read_page, index, old_pid, parent_page_lens[page], limiter=store_limiter
                )
                common = min(len(old), len(ids))
                counts.blocks_changed += sum(1 for a, b in zip(old[:common], ids[:common],
                                                               strict=True) if a != b)
                counts.blocks_changed += sum(1 for i in ids[common:] if i != ZERO_ID)
        elif parent_pages is not None:
            counts.blocks_changed += sum(1 for i in ids if i != ZERO_ID)

    async def read_chunks(send: trio.MemorySendChannel[tuple[int, bytes]]) -> None:
        async with send:
            for first, count in chunks():
                length = min(count * bs, source.size - first * bs)
                data = await trio.to_thread.run_sync(source.read, first * bs, length)
                counts.bytes_read += length
                await send.send((first, data))

    async def encode(receive: trio.MemoryReceiveChannel[tuple[int, bytes]],
                     send: trio.MemorySendChannel[FullPack]) -> None:
        async with receive, send:
            async for first, data in receive:
                ids, new, zeros = await trio.to_thread.run_sync(
                    encode_chunk, repo, data, index, assembler.pending, limiter=cpu_limiter
                )
                counts.blocks_zero += zeros
                counts.blocks_data += len(ids) - zeros
                for bid, encoded, raw in new:
                    await store_blob(send, bid, KIND_DATA, encoded, raw)
                for page, page_ids in manifest.set(first, ids):
                    await finish_page(send, page, page_ids)
                progress.advance(len(data))

    pack_send, pack_recv = trio.open_memory_channel[FullPack](2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(refresh_lock, lock, store_limiter)
        async with trio.open_nursery() as pipeline:
            streams = min(8, repo.store.concurrency)  # PUT streams: 8 is where S3 flattens
            for _ in range(streams):
                pipeline.start_soon(uploader.run, pack_recv.clone())
            pack_recv.close()
            async with pack_send:
                chunk_send, chunk_recv = trio.open_memory_channel[tuple[int, bytes]](CPU_WORKERS)
                async with trio.open_nursery() as encoders:
                    encoders.start_soon(read_chunks, chunk_send)
                    for _ in range(CPU_WORKERS):
                        encoders.start_soon(encode, chunk_recv.clone(), pack_send.clone())
                    chunk_recv.close()
                # (the packs before are stored or storing: the last ones go in pieces,
                # side by side, and their page pack beside them)
                for full in assembler.flush(pieces=streams - 1):
                    await pack_send.send(full)
        nursery.cancel_scope.cancel()  # only the lock refresher is left
    # a page of nothing but holes is never read, so never finished: its blocks are zeros now,
    # and those that held data in the parent changed all the same (a range punched or cut off)
    for page in hole_pages:
        await count_changed(page, [ZERO_ID] * manifest.page_len(page))

    await trio.to_thread.run_sync(source.check_unchanged)
    if uploader.index_file.packs:
        _name, nbytes = await trio.to_thread.run_sync(
            repo.write_index, uploader.index_file, limiter=store_limiter
        )
        uploader.count(nbytes)

    counts.blocks_zero += nblocks - counts.blocks_data - counts.blocks_zero
    page_ids = manifest.page_ids
    assert all(p is not None for p in page_ids), "every page is complete after the last chunk"
    root = SnapshotRoot(
        id=new_id(),
        name=name,
        disk=disk,
        parent=parent.id if parent else None,
        size=source.size,
        block_size=bs,
        created=now_iso(),
        entries_per_page=manifest.per_page,
        pages=[p.hex() for p in page_ids if p is not None],
        tags=list(options.tags),
        group=options.group,
    )
    root.stats = {
        **asdict(counts),
        "blocks_total": nblocks,
        "bytes_uploaded": uploader.stats.bytes,  # packs and index; the root is not counted
        "objects_written": uploader.stats.objects + 1,
    }
    if parent is None:
        root.stats.pop("blocks_changed")
    # Another create (of the same disk, in the same second, for a default name) may have stored
    # this name since the listing, as long as this one read and uploaded: names must stay
    # unique, since a snapshot is found, exported and mounted by its name. Checked again this
    # late, only creates that store their roots within the same moment can still both take it.
    since = await trio.to_thread.run_sync(repo.roots_since, listing, limiter=store_limiter)
    if any(r.name == name for r in since):
        if options.name is not None:
            raise DuplicateName(f"a snapshot named {name!r} was stored while this one was "
                                "taken; nothing was recorded")
        root.name = default_snapshot_name(disk, taken | {r.name for r in since})
    await trio.to_thread.run_sync(repo.write_root, root, limiter=store_limiter)
    stats = dict(root.stats)
    stats["seconds"] = round(time.monotonic() - started, 3)
    return CreateResult(root, stats)
