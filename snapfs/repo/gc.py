"""Deleting snapshots and collecting the blobs no snapshot needs any more.

Deleting a root is always safe. Collecting garbage is not, while a snapshot is being created
(it may reuse a blob that looks unreferenced), so ``collect_garbage`` runs under the exclusive
repository lock, which waits for no one: it fails at once, naming the holder, if a create is
running (see ``lock``).

Order, so that a crash at any point loses nothing that a root references:
1. repack: copy the live blobs of mostly-dead packs into new packs (verified on the way);
2. write one new index of every live pack, superseding all older index objects;
3. delete the older index objects;
4. delete packs that are no longer indexed: empty ones, repacked ones, orphans of crashed runs.
Before all that it deletes what writers killed in the middle of a ``put`` left (a local
directory's temporary files): no writer of packs, index or roots runs under the lock. Writers
of locks, holds, access profiles, policies and the config take no lock, so their temporary
files go only once nothing has written to them for ``lock.STALE_AFTER``, the time after which
a lock that is not refreshed is taken for a dead holder's.

Nothing is collected while a snapshot root cannot be read (damaged, or of an unknown format):
which blobs that snapshot needs cannot be known, and guessing could delete them. Collection
refuses (``RootsUnreadable``, naming the root and how to go on), and so does deleting snapshots,
before it deletes any root, unless the unreadable roots are among those it deletes.

Progress (``snapfs.progress``), phase by phase, counted in what each phase goes through:
"deleting snapshots" (roots), "reading index" (index objects), "reading snapshots" (roots),
"reading manifests" (manifest pages), "repacking" (packs read and copied), "deleting index"
(superseded index objects), "deleting packs".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from snapfs.errors import IntegrityError, Interrupted, SnapfsError
from snapfs.format.block import ZERO_ID
from snapfs.format.index import IndexFile
from snapfs.format.manifest import SnapshotRoot
from snapfs.format.pack import PackEntry
from snapfs.plural import counted
from snapfs.progress import NO_PROGRESS, Progress
from snapfs.repo.lock import STALE_AFTER, exclusively
from snapfs.repo.packer import FullPack, PackAssembler, PackUploader
from snapfs.repo.parallel import map_in_threads, single_error
from snapfs.repo.repository import (
    BlobIndex,
    Repository,
    UnreadableRoot,
    pack_key,
    refuse_unreadable,
)
from snapfs.throttle import RateLimiter

log = logging.getLogger(__name__)

#: a pack whose live bytes are below this share of its blob bytes is rewritten
REPACK_BELOW = 0.5
#: where objects are written by commands that do not take the repository lock
UNLOCKED_PREFIXES = ("locks/", "holds/", "profiles/", "policies/", "config")


async def copy_blobs(repo: Repository, jobs: list[tuple[str, list[PackEntry]]],
                     limiter: trio.CapacityLimiter, progress: Progress,
                     at_once: int) -> PackUploader:
    """Copy the blobs ``jobs`` name (a pack and the entries of it to keep, each) into new
    packs, each read afresh and checked against its ID on the way, ``at_once`` packs read at a
    time (what is held in memory); the uploader's ``index_file`` names the new packs. One
    ``progress`` step per pack read. For ``prune``'s repack and ``repair packs``."""
    uploader = PackUploader(repo, limiter, RateLimiter(None))
    assembler = PackAssembler(repo.config.pack_size)

    def fetch(job: tuple[str, list[PackEntry]]) -> list[tuple[PackEntry, bytes]]:
        pack, entries = job
        data = memoryview(repo.store.get(pack_key(pack)))
        out = []
        for e in entries:
            piece = bytes(data[e.offset : e.offset + e.length])
            repo.decode_verified(e.blob_id, piece, f"blob {e.blob_id.hex()[:16]} in pack {pack[:12]}")
            out.append((e, piece))
        return out

    send, receive = trio.open_memory_channel[FullPack](1)
    with single_error():
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(uploader.run, receive.clone())
            receive.close()
            async with send:
                fetched: list[list[tuple[PackEntry, bytes]]] = []

                def fetched_one(_job: tuple[str, list[PackEntry]],
                                blobs: list[tuple[PackEntry, bytes]]) -> None:
                    fetched.append(blobs)
                    progress.advance(1)

                for first in range(0, len(jobs), at_once):
                    await map_in_threads(fetch, jobs[first : first + at_once], limiter,
                                         fetched_one)
                    for blobs in fetched:
                        for e, piece in blobs:
                            full = assembler.add(e.blob_id, e.kind, piece, e.raw_length)
                            if full is not None:
                                await send.send(full)
                    fetched.clear()
                for full in assembler.flush():
                    await send.send(full)
    return uploader


async def replace_index(repo: Repository, new: IndexFile, doomed: list[str],
                        limiter: trio.CapacityLimiter, progress: Progress) -> None:
    """Store ``new`` (it supersedes the index objects it names), then delete those objects,
    then the ``doomed`` packs: the order in which a crash loses nothing (module docstring)."""
    await trio.to_thread.run_sync(repo.write_index, new, limiter=limiter)
    progress.start("deleting index", len(new.supersedes), "object")
    await map_in_threads(lambda name: repo.store.delete(f"index/{name}"), new.supersedes,
                         limiter, lambda _n, _r: progress.advance(1))
    progress.start("deleting packs", len(doomed), "pack")
    await map_in_threads(lambda p: repo.store.delete(pack_key(p)), doomed, limiter,
                         lambda _p, _r: progress.advance(1))


async def delete_snapshots(
    repo: Repository, roots: list[SnapshotRoot],
    recheck: Callable[[list[SnapshotRoot]], list[SnapshotRoot]] | None = None,
    purpose: str = "snapshot delete", unreadable: list[UnreadableRoot] | None = None,
    progress: Progress = NO_PROGRESS,
) -> dict[str, Any]:
    """Delete ``roots`` and the ``unreadable`` roots, and collect what only they used.
    ``recheck`` (in a worker thread, once the exclusive lock is held) gives the roots that may
    still go, or raises: what needs a snapshot (a disk made from it, a hold) may have appeared
    since the caller decided, and a disk is made under the shared lock, so what the recheck sees
    stays true until the end. Refuses, deleting nothing, while a root that is not among those
    to delete cannot be read."""
    unreadable = unreadable or []
    limiter = trio.CapacityLimiter(repo.store.concurrency)
    async with exclusively(repo.store, purpose, limiter):
        listing = await trio.to_thread.run_sync(repo.list_snapshots, limiter=limiter)
        doomed_keys = {u.key for u in unreadable}
        others = [u for u in listing.unreadable if u.key not in doomed_keys]
        if others:
            raise refuse_unreadable(others, repo.store.url, "not deleting anything: garbage "
                                    "collection cannot know which blocks that snapshot needs",
                                    "try again")
        if recheck is not None:
            roots = await trio.to_thread.run_sync(recheck, roots, limiter=limiter)
        doomed = [r.id for r in roots] + [u.snapshot_id for u in unreadable]
        progress.start("deleting snapshots", len(doomed), "snapshot")
        for snapshot_id in doomed:
            await trio.to_thread.run_sync(repo.delete_root, snapshot_id, limiter=limiter)
            progress.advance(1)
        names = [r.name for r in roots] + [u.snapshot_id for u in unreadable]
        try:
            with single_error():
                stats = await _collect(repo, limiter, progress)
        except SnapfsError as e:
            # the roots are gone whatever comes next: said alone, the error read as if nothing
            # had been deleted, and the same command again found no such snapshot
            raise type(e)(f"deleted {counted(len(names), 'snapshot')} ({', '.join(names)}) but "
                          f"collected no garbage: {e.message}; what only they used stays "
                          "stored until snapfs prune succeeds", e.exit_code) from e
        except KeyboardInterrupt:  # the same, for ^C (plain "interrupted" read as nothing done)
            raise Interrupted(f"interrupted after deleting {counted(len(names), 'snapshot')} "
                              f"({', '.join(names)}): what only they used stays stored until "
                              "snapfs prune succeeds") from None
    return {"deleted": doomed, **stats}


async def collect_garbage(repo: Repository, progress: Progress = NO_PROGRESS) -> dict[str, Any]:
    limiter = trio.CapacityLimiter(repo.store.concurrency)
    async with exclusively(repo.store, "prune", limiter):
        return await _collect(repo, limiter, progress)


def live_blobs(repo: Repository, index: BlobIndex, roots: list[SnapshotRoot],
               progress: Progress = NO_PROGRESS) -> set[bytes]:
    """Every blob ``roots`` use: their manifest pages and the blocks these name."""
    live: set[bytes] = set()
    seen_pages: set[bytes] = set()
    progress.start("reading manifests", sum(len(r.pages) for r in roots), "page")
    for root in roots:
        for page_hex, count in zip(root.pages, repo.page_lengths(root), strict=True):
            progress.advance(1)
            pid = bytes.fromhex(page_hex)
            if pid == ZERO_ID or pid in seen_pages:
                continue
            seen_pages.add(pid)
            live.add(pid)
            # An unreadable page makes this raise: collecting while a manifest is broken
            # could delete blobs it needs, so we stop instead.
            live.update(repo.read_page(index, pid, count))
    live.discard(ZERO_ID)
    return live


async def _collect(repo: Repository, limiter: trio.CapacityLimiter,
                   progress: Progress = NO_PROGRESS) -> dict[str, Any]:
    started = time.monotonic()
    index = await trio.to_thread.run_sync(repo.load_index, None, progress, limiter=limiter)
    listing = await trio.to_thread.run_sync(repo.list_snapshots, progress, limiter=limiter)
    if listing.unreadable:
        raise refuse_unreadable(listing.unreadable, repo.store.url, "not collecting garbage, "
                                "since which blocks that snapshot needs cannot be known",
                                "run prune")
    roots = listing.roots
    live = await trio.to_thread.run_sync(live_blobs, repo, index, roots, progress)
    # the exclusive lock keeps every writer of these out: what is half written there is a
    # dead writer's (a local directory's temporary files, which no listing shows)
    partial, partial_bytes = await trio.to_thread.run_sync(
        repo.store.remove_partial_writes, ("packs/", "index/", "snapshots/"), limiter=limiter)
    # these are written without that lock (locks, a daemon's holds and profiles, policy set,
    # init): a temporary file there is taken for a dead writer's once it has not been written
    # to for as long as a lock that is not refreshed is (a put takes milliseconds)
    unlocked, unlocked_bytes = await trio.to_thread.run_sync(
        repo.store.remove_partial_writes, UNLOCKED_PREFIXES, STALE_AFTER, limiter=limiter)
    partial += unlocked
    partial_bytes += unlocked_bytes
    stored = dict(await trio.to_thread.run_sync(lambda: list(repo.store.list("packs/"))))
    stored_packs = {key.rpartition("/")[2]: size for key, size in stored.items()}

    keep: dict[str, list[PackEntry]] = {}
    repack: list[tuple[str, list[PackEntry]]] = []
    claimed: set[bytes] = set()  # a blob kept once is dead in any other pack that has it
    for pack, entries in index.packs.items():
        if pack not in stored_packs:
            log.info("index names pack %s, which is not in the store", pack[:12])
            continue
        total = sum(e.length for e in entries)
        live_entries = [e for e in entries if e.blob_id in live and e.blob_id not in claimed]
        live_bytes = sum(e.length for e in live_entries)
        if not live_entries:
            continue
        claimed.update(e.blob_id for e in live_entries)
        if live_bytes < REPACK_BELOW * total:
            repack.append((pack, live_entries))
        else:
            keep[pack] = entries
    if live - claimed:
        missing = len(live - claimed)
        raise IntegrityError(
            f"snapshots use {counted(missing, 'blob')} that no stored pack holds; not collecting "
            "garbage (run verify)"
        )

    progress.start("repacking", len(repack), "pack")
    # as many packs at a time as are read at once: what is held in memory is their live
    # blobs, not those of every pack to repack (which may be most of the data)
    uploader = await copy_blobs(repo, repack, limiter, progress, int(limiter.total_tokens))
    new_index = IndexFile(packs={**keep, **uploader.index_file.packs}, supersedes=index.index_names)
    doomed = [p for p in stored_packs if p not in new_index.packs]
    await replace_index(repo, new_index, doomed, limiter, progress)
    return {
        "packs_deleted": len(doomed) - len(repack),
        "packs_repacked": len(repack),
        "packs_written": uploader.stats.packs,
        "bytes_freed": sum(stored_packs[p] for p in doomed) - uploader.stats.bytes + partial_bytes,
        "partial_objects_deleted": partial,
        "bytes_repacked": sum(e.length for _pack, entries in repack for e in entries),
        "seconds": round(time.monotonic() - started, 3),
    }
