"""Storing a closed generation of a disk as a snapshot.

Only the generation's changed blocks are read (from its copy-on-write file or the overlay, as
they were at the closing), hashed, and compressed and uploaded if the repository does not hold
them yet; the rest of the disk is never read. Blocks staged before the closing (hashed and
compressed ahead, ``Disk.stage``) are taken as they are and not read again. The manifest is the
parent's: its untouched pages are referenced as they are, and only pages holding a changed entry
(or whose length changed because the disk grew) are rewritten.

Commit order, as for every snapshot: packs, then the index object naming them, then the root;
the shared repository lock is held throughout so ``gc`` cannot delete a blob the new manifest
reuses. A crash before the root is stored leaves unreferenced packs for ``gc``, never a half
snapshot; the daemon then uploads the generation again from its durable local copy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from snapfs.format.block import ZERO_ID
from snapfs.format.manifest import DEFAULT_ENTRIES_PER_PAGE, SnapshotRoot, encode_page
from snapfs.format.pack import KIND_DATA, KIND_PAGE
from snapfs.niced import NicedWorkers, run_on
from snapfs.repo.create import encode_chunk
from snapfs.repo.lock import SNAPSHOT_LOCK_PATIENCE, RepositoryLock, refresh_lock
from snapfs.repo.packer import FullPack, PackAssembler, PackUploader
from snapfs.repo.parallel import single_error
from snapfs.repo.repository import BlobIndex, Repository, now_iso
from snapfs.throttle import RateLimiter
from snapfs.write.disk import ClosedGeneration, Disk
from snapfs.write.state import SnapshotPart

log = logging.getLogger(__name__)

BATCH_BLOCKS = 256  # blocks read, hashed and compressed per step (4 MiB at 16 KiB)
PUT_STREAMS = 4
#: the parent's pages loaded in one call when a snapshot rewrites them (a GET each if not
#: cached: one after another they cost a round trip each, as many as the pages the changes
#: touch); at most ``view.PAGE_CACHE``, which keeps them meanwhile
PAGE_WINDOW = 32
#: the pages of a new manifest handed to ``keep_pages`` at most (128 KiB each): the next
#: snapshot of the disk rewrites some of them, and finds them in the cache, not the store
KEPT_PAGES = 64
CPU_WORKERS = max(1, min(4, os.cpu_count() or 1))

#: the parent's pages ``ps`` (their block IDs), loaded together
PageLoader = Callable[[list[int]], Awaitable[list[list[bytes]]]]
T = TypeVar("T")
#: awaited after each batch with the seconds it took: lets foreground I/O go first
Pacer = Callable[[float], Awaitable[None]]


@dataclass
class UploadProgress:
    blocks_total: int = 0
    blocks_done: int = 0
    blocks_uploaded: int = 0  # new in the repository
    bytes_uploaded: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds of each step


async def upload_generation(
    repo: Repository,
    index: BlobIndex,
    disk: Disk,
    closed: ClosedGeneration,
    part: SnapshotPart,
    parent: SnapshotRoot | None,
    parent_pages_of: PageLoader,
    *,
    group: str | None,
    tags: list[str],
    progress: UploadProgress,
    created: str | None = None,
    rate: float | None = None,
    pace: Pacer | None = None,
    busy: Callable[[], bool] = lambda: False,
    fresh_index: Callable[[], Awaitable[BlobIndex]] | None = None,
    unreleased: list[RepositoryLock] | None = None,
    lock_patience: float = SNAPSHOT_LOCK_PATIENCE,
    under_lock: trio.CapacityLimiter | None = None,
    keep_pages: Callable[[list[tuple[bytes, bytes]]], Awaitable[None]] | None = None,
    cpu: NicedWorkers | None = None,
) -> tuple[SnapshotRoot, dict[str, list], str | None]:
    """Store ``closed`` as snapshot ``part.snapshot_id``; return its root, the packs it added
    and the name of the index object naming them (for the caller's index). ``created``: the
    instant ``closed`` was closed, the snapshot's point in time (default: now; an upload may
    end hours later, after an outage). ``parent_pages_of(ps)`` gives the IDs of the
    parent's pages ``ps``, loaded together. (A disk whose changed sets are not trusted after
    an unclean reboot had every block it ever wrote marked in ``closed`` at its closing,
    ``part.compared``: the manifest then differs from the parent only where a checksum does.)
    ``keep_pages`` is given (ID, plain bytes) of the pages the snapshot rewrote (up to
    ``KEPT_PAGES``) once they are stored, for the cache. ``cpu``: the threads that hash and
    compress the blocks not staged (trio's, if not given).

    Blobs are deduplicated against the index as it is once the shared lock is held
    (``fresh_index``, if given, is read under it, beside its last look: see
    ``RepositoryLock.acquire_waiting``): garbage collection runs only under the
    exclusive lock, so no blob this snapshot reuses can be deleted or moved until its root is
    stored. An index read before the lock may name blobs that are gone since. The lock is
    waited for up to ``lock_patience`` seconds (a garbage collection's exclusive lock).

    ``under_lock``: the caller holds the shared lock already (``shared_lock``, with its store
    limiter, this), for the parts of a consistency group: then the root is returned, not
    stored. The caller stores every part's root once every part's blocks and pages are stored,
    before it lets go of the lock (until a root names them, only the lock keeps garbage
    collection from taking them)."""
    started = time.monotonic()
    made: list[tuple[bytes, bytes]] = []
    if under_lock is not None:
        root, packs, index_name = await _upload(
            repo, index, disk, closed, part, parent, parent_pages_of, group, tags,
            created or now_iso(), progress, rate, under_lock, pace, busy, made, cpu,
            store_root=False)
    else:
        async with shared_lock(repo, f"snapshot of disk {disk.name}", lock_patience,
                               unreleased, then=fresh_index) as (store_limiter, fresh):
            # (the index is read beside the lock's confirming look: the two are one step)
            progress.timings["lock"] = round(time.monotonic() - started, 4)
            if fresh is not None:
                index = fresh
            root, packs, index_name = await _upload(
                repo, index, disk, closed, part, parent, parent_pages_of, group, tags,
                created or now_iso(), progress, rate, store_limiter, pace, busy, made, cpu)
    root.stats["seconds"] = round(time.monotonic() - started, 3)
    root.stats["timings"] = progress.timings
    if keep_pages is not None and made:
        await keep_pages(made)
    return root, packs, index_name


@asynccontextmanager
async def shared_lock(repo: Repository, purpose: str, patience: float = SNAPSHOT_LOCK_PATIENCE,
                      unreleased: list[RepositoryLock] | None = None,
                      then: Callable[[], Awaitable[T]] | None = None,
                      ) -> AsyncIterator[tuple[trio.CapacityLimiter, T | None]]:
    """The block runs under a shared repository lock (waited for up to ``patience`` seconds:
    a forget or prune holds the exclusive lock for seconds), kept fresh meanwhile; it gets the
    limiter of the store's requests, and what ``then`` read under the lock (see
    ``RepositoryLock.acquire_waiting``: the index, for an upload), or None. A lock whose
    removal fails goes to ``unreleased`` (the caller lets go of it later). An error of the
    block comes out as itself, not in trio's group (the caller retries a ``SnapfsError``)."""
    lock = RepositoryLock(repo.store, "shared", purpose)
    store_limiter = trio.CapacityLimiter(repo.store.concurrency)
    read = await lock.acquire_waiting(patience, store_limiter, then)
    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refresh_lock, lock, store_limiter)
                yield store_limiter, read
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            released = await trio.to_thread.run_sync(lock.release_quietly, limiter=store_limiter)
            if not released and unreleased is not None:
                unreleased.append(lock)


async def _encode_on_cores(repo: Repository, blocks: list[bytes], index: BlobIndex,
                           pending: set[bytes], cores: int, cpu: NicedWorkers | None
                           ) -> tuple[list[bytes], list[tuple[bytes, bytes, int]]]:
    """``encode_chunk`` of consecutive ``blocks`` (whole blocks but maybe the last) split over
    ``cores`` threads (zstd and BLAKE3 release the GIL), ``cpu``'s if given: every block's ID,
    and the new blobs encoded. A block new to two parts is encoded twice and stored once
    (``add`` checks)."""
    step = -(-len(blocks) // cores)
    parts = [b"".join(blocks[i : i + step]) for i in range(0, len(blocks), step)]
    results: list[tuple[list[bytes], list[tuple[bytes, bytes, int]], int]] = [
        ([], [], 0) for _ in parts]

    async def encode(i: int) -> None:
        results[i] = await run_on(cpu, encode_chunk, repo, parts[i], index, pending)

    async with trio.open_nursery() as nursery:
        for i in range(len(parts)):
            nursery.start_soon(encode, i)
    return ([bid for ids, _new, _z in results for bid in ids],
            [blob for _ids, new, _z in results for blob in new])


async def _upload(
    repo: Repository, index: BlobIndex, disk: Disk, closed: ClosedGeneration,
    part: SnapshotPart, parent: SnapshotRoot | None, parent_pages_of: PageLoader,
    group: str | None, tags: list[str], created: str, progress: UploadProgress,
    rate: float | None, store_limiter: trio.CapacityLimiter, pace: Pacer | None,
    busy: Callable[[], bool], made: list[tuple[bytes, bytes]], cpu: NicedWorkers | None,
    store_root: bool = True,
) -> tuple[SnapshotRoot, dict[str, list], str | None]:
    bs = disk.block_size
    nblocks = -(-part.size // bs)
    per_page = DEFAULT_ENTRIES_PER_PAGE
    changed = [n for n in closed.blocks if n < nblocks]
    progress.blocks_total = len(changed)
    staged = closed.staged
    assembler = PackAssembler(repo.config.pack_size)
    uploader = PackUploader(repo, store_limiter, RateLimiter(rate), pace=pace)
    ids: dict[int, bytes] = {}

    async def add(send: trio.MemorySendChannel[FullPack], bid: bytes, kind: int,
                  encoded: bytes, raw: int) -> None:
        if bid in index or bid in assembler.pending:
            return
        if kind == KIND_DATA:
            progress.blocks_uploaded += 1
        full = assembler.add(bid, kind, encoded, raw)
        if full is not None:
            await send.send(full)

    step = trio.current_time()
    pack_send, pack_recv = trio.open_memory_channel[FullPack](1)
    async with trio.open_nursery() as putters:
        for _ in range(min(PUT_STREAMS, repo.store.concurrency)):
            putters.start_soon(uploader.run, pack_recv.clone())
        pack_recv.close()
        async with pack_send:
            for n in changed:  # the staged blobs first: the check below asks for them
                ahead = staged.get(n)
                if ahead is not None and ahead.blob is not None:
                    await add(pack_send, ahead.bid, KIND_DATA, ahead.blob, ahead.raw)
            to_read: list[int] = []
            for n in changed:
                entry = staged.get(n)
                if entry is None or (entry.blob is None and entry.bid != ZERO_ID
                                     and entry.bid not in index
                                     and entry.bid not in assembler.pending):
                    to_read.append(n)  # not staged, or its blob left the repository since
                else:
                    ids[n] = entry.bid
            used = len(changed) - len(to_read)
            progress.blocks_done += used
            disk.counters.snapshot_blocks_read += used
            disk.counters.blocks_staged += used
            batches_send, batches_recv = trio.open_memory_channel[tuple[list[int], list[bytes]]](1)

            async def read_batches() -> None:  # one batch ahead of the encoders
                async with batches_send:
                    await disk.prefetch_closed(closed, to_read[:BATCH_BLOCKS])
                    for at in range(0, len(to_read), BATCH_BLOCKS):
                        batch = to_read[at : at + BATCH_BLOCKS]
                        await disk.prefetch_closed(
                            closed, to_read[at + BATCH_BLOCKS : at + 2 * BATCH_BLOCKS])
                        read_started = trio.current_time()
                        contents = await disk.read_closed(closed, batch)
                        if pace is not None:  # the reads rest too (they hold the write lock)
                            await pace(trio.current_time() - read_started)
                        await batches_send.send((batch, contents))

            async with trio.open_nursery() as reader:
                reader.start_soon(read_batches)
                async for batch, contents in batches_recv:
                    batch_started = trio.current_time()
                    # all cores when the disks are quiet, one while they are in use
                    batch_ids, new = await _encode_on_cores(repo, contents, index,
                                                            assembler.pending,
                                                            1 if busy() else CPU_WORKERS, cpu)
                    ids.update(zip(batch, batch_ids, strict=True))
                    for bid, blob, raw in new:
                        await add(pack_send, bid, KIND_DATA, blob, raw)
                    progress.blocks_done += len(batch)
                    if pace is not None:
                        await pace(trio.current_time() - batch_started)
            progress.timings["blocks"] = round(trio.current_time() - step, 4)
            step = trio.current_time()
            # the last data pack goes now, while the pages are made (which may wait for the
            # parent's pages from the store), in pieces side by side; one stream is left for
            # the page pack
            for full in assembler.flush((KIND_DATA,), pieces=PUT_STREAMS - 1):
                await pack_send.send(full)
            pages, blocks_changed, pages_written = await _pages(
                repo, ids, nblocks, per_page, parent, parent_pages_of, index, assembler,
                pack_send, made)
            progress.timings["pages"] = round(trio.current_time() - step, 4)
            step = trio.current_time()
            for full in assembler.flush():
                await pack_send.send(full)
    progress.timings["packs"] = round(trio.current_time() - step, 4)
    step = trio.current_time()
    packs = dict(uploader.index_file.packs)
    index_name = None
    if packs:
        index_name, nbytes = await trio.to_thread.run_sync(repo.write_index, uploader.index_file,
                                                           limiter=store_limiter)
        uploader.count(nbytes)
    root = SnapshotRoot(
        id=part.snapshot_id,
        name=part.name,
        disk=disk.name,
        parent=parent.id if parent else None,
        size=part.size,
        block_size=bs,
        created=created,
        entries_per_page=per_page,
        pages=[p.hex() for p in pages],
        tags=list(tags),
        group=group,
    )
    root.stats = {
        "blocks_total": nblocks,
        "blocks_read": len(changed),  # by the upload, or ahead of it by staging
        "blocks_staged": used,
        "blocks_changed": blocks_changed,
        "blocks_uploaded": progress.blocks_uploaded,
        "pages_written": pages_written,
        "bytes_uploaded": uploader.stats.bytes,
        "objects_written": uploader.stats.objects + 1,
        "source": "checksum comparison" if part.compared else "changed-block tracking",
    }
    progress.timings["index"] = round(trio.current_time() - step, 4)
    if store_root:
        step = trio.current_time()
        await trio.to_thread.run_sync(repo.write_root, root, limiter=store_limiter)
        progress.timings["root"] = round(trio.current_time() - step, 4)
    progress.bytes_uploaded = uploader.stats.bytes
    return root, packs, index_name


async def _pages(
    repo: Repository, ids: dict[int, bytes], nblocks: int, per_page: int,
    parent: SnapshotRoot | None, parent_pages_of: PageLoader, index: BlobIndex,
    assembler: PackAssembler, send: trio.MemorySendChannel[FullPack],
    made: list[tuple[bytes, bytes]] | None = None,
) -> tuple[list[bytes], int, int]:
    """The new manifest's page IDs: the parent's where nothing changed, new pages elsewhere.
    Returns (page IDs, entries that differ from the parent, pages written). The pages made
    (ID, plain bytes) go to ``made``, up to ``KEPT_PAGES``."""
    npages = -(-nblocks // per_page)
    parent_nblocks = parent.blocks_total if parent else 0
    parent_pages = [bytes.fromhex(p) for p in parent.pages] if parent else []
    if parent is not None and parent.entries_per_page != per_page:
        raise AssertionError("a parent manifest with another page size")  # not made by snapfs

    def page_len(p: int, total: int) -> int:
        return max(0, min(per_page, total - p * per_page))

    touched: dict[int, dict[int, bytes]] = {}
    for n, bid in ids.items():
        touched.setdefault(n // per_page, {})[n % per_page] = bid

    def rewritten(p: int) -> bool:
        return bool(touched.get(p)) or page_len(p, nblocks) != page_len(p, parent_nblocks)

    # the parent's pages to rewrite, PAGE_WINDOW at a time loaded together (``loaded``)
    to_load = [p for p in range(min(npages, len(parent_pages)))
               if parent_pages[p] != ZERO_ID and rewritten(p)]
    loaded: dict[int, list[bytes]] = {}

    out: list[bytes] = []
    blocks_changed = 0
    written = 0
    # the new pages, encoded (compressed and checksummed) a window at a time in one worker
    # call: a call each cost more in handing over than in encoding
    to_store: dict[bytes, bytes] = {}

    async def store_pages() -> None:
        nonlocal written
        plains = list(to_store.values())
        encoded = await trio.to_thread.run_sync(
            lambda: [repo.codec.encode(plain) for plain in plains])
        for (pid, plain), blob in zip(to_store.items(), encoded, strict=True):
            full = assembler.add(pid, KIND_PAGE, blob, len(plain))
            if full is not None:
                await send.send(full)
        written += len(to_store)
        to_store.clear()

    for p in range(npages):
        length = page_len(p, nblocks)
        old_length = page_len(p, parent_nblocks)
        changes = touched.get(p)
        if not rewritten(p):
            out.append(parent_pages[p] if p < len(parent_pages) else ZERO_ID)
            continue
        if to_load and to_load[0] == p:  # the next window, loaded together
            window = to_load[:PAGE_WINDOW]
            loaded.update(zip(window, await parent_pages_of(window), strict=True))
            del to_load[:PAGE_WINDOW]
        if p in loaded:
            old = loaded.pop(p)
        else:
            old = [ZERO_ID] * old_length
        entries = old[:length] + [ZERO_ID] * (length - len(old))
        for i, bid in (changes or {}).items():
            if entries[i] != bid:
                blocks_changed += 1
                entries[i] = bid
        if all(e == ZERO_ID for e in entries):
            out.append(ZERO_ID)
            continue
        plain = encode_page(entries)
        pid = repo.keyer.block_id(plain)
        out.append(pid)
        if made is not None and len(made) < KEPT_PAGES:
            made.append((pid, plain))
        if pid not in index and pid not in assembler.pending:
            to_store[pid] = plain  # (a page made twice is stored once)
            if len(to_store) >= PAGE_WINDOW:
                await store_pages()
    if to_store:
        await store_pages()
    return out, blocks_changed, written
