"""A writable disk: its base snapshot's blocks, with the blocks written to it on top.

A block is read from the overlay if it was ever written (``present``), else from the image below
(the snapshot the disk was created from, read lazily through the shared hydrator and cache, so
ten disks of one snapshot fetch each block once), else it is zeros (past the end of a smaller
base, or a disk created empty).

Writes (``Disk.write``), in order, under the disk's write lock:

1. A block the write covers only partly gets its other bytes from where it reads now (the base
   part is fetched before the lock is taken, so a slow store does not hold other writes up).
2. Copy-on-write: if the block's contents at the closing of a generation that is still being
   uploaded would be overwritten, they are saved to that generation's copy-on-write file first.
3. ``pwrite`` to the overlay, then one lmdb commit marking the blocks present and changed in
   the open generation (before the write is acknowledged: dm-era's rule).

An fsync (``Disk.sync``) makes the overlay and the copy-on-write files durable, then the marks
(until then they are in the state's journal, which a power cut may tear: a mark durable before
its block's bytes would make the block read as a hole).

Closing a generation (``Disk.close_generation``) happens under the write lock, so every write
acknowledged before it belongs to the closed generation and every later one to the next: that
instant is the snapshot's point in time. The uploader reads a closed generation's blocks with
``read_closed`` (also under the lock, so that a copy-on-write cannot interleave with it).

Staging (``stage_candidates``, ``read_for_staging``, ``stage``): while a disk is quiet, the daemon
reads, hashes and compresses blocks of the open generation ahead of its snapshot, so that the
snapshot's upload finds most of its blocks ready and reads only the rest. A staged block is
forgotten by every write to it (under the write lock, before the write is acknowledged), and a
staging read that a write may have raced with is thrown away (``_staging``): what a closing
takes over as staged is always the block's contents at that instant.

A ``PendingSnapshot`` is a closed generation seen as an image: its blocks from the copy-on-write
file or the overlay, the rest from the image below it. It is what ``snapshots/NAME.img`` shows
(and what a new disk can be made from) while the upload runs; once the snapshot is stored it
reads through the stored snapshot instead.

No pyfuse3 here: the FUSE adapter calls these methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from snapfs.errors import KeptBlocksLost, SnapfsError
from snapfs.format.block import zero_bytes
from snapfs.write.bitmap import Bitmap
from snapfs.write.overlay import Overlay
from snapfs.write.state import DiskRecord, DiskState

log = logging.getLogger(__name__)

LOCKED_READ = 16  # blocks an upload reads per hold of a disk's write lock
MARK_ROOM = 1 << 20  # bytes a write's lmdb commit may add (a few pages, with room to spare)


def stop_block(offset: int, length: int, block_size: int) -> int:
    """One past the last block that ``length`` bytes at ``offset`` touch."""
    return (offset + length - 1) // block_size + 1


class Image(Protocol):
    """What a disk or pending snapshot reads its untouched blocks from."""

    size: int

    async def read(self, offset: int, length: int) -> bytes: ...


async def read_layered(offset: int, length: int, size: int, block_size: int,
                       is_local: Callable[[int], bool],
                       read_local: Callable[[int, int], Awaitable[bytes]],
                       lower: Image | None) -> bytes:
    """Bytes ``offset .. offset + length`` of an image whose ``is_local`` blocks come from
    ``read_local(offset, length)`` and the others from ``lower`` (zeros past its end)."""
    end = min(size, offset + length)
    if offset >= end:
        return b""
    bs = block_size
    first, stop = offset // bs, (end - 1) // bs + 1
    parts: list[bytes] = []
    n = first
    while n < stop:
        local = is_local(n)
        m = n + 1
        while m < stop and is_local(m) == local:
            m += 1
        lo, hi = max(offset, n * bs), min(end, m * bs)
        if local:
            parts.append(await read_local(lo, hi - lo))
        else:
            parts.append(await read_lower(lower, lo, hi - lo))
        n = m
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_lower(lower: Image | None, offset: int, length: int) -> bytes:
    if lower is None or offset >= lower.size:
        return zero_bytes(length)
    take = min(length, lower.size - offset)
    data = await lower.read(offset, take)
    return data if take == length else data + zero_bytes(length - take)


@dataclass(frozen=True, slots=True)
class Staged:
    """A block hashed, and compressed when new to the repository, before its snapshot."""

    bid: bytes
    blob: bytes | None  # None: a hole, or a block the repository held when it was staged
    raw: int  # plain length


@dataclass(eq=False)
class ClosedGeneration:
    """A generation closed for a snapshot and not stored yet."""

    gen: int
    blocks: Bitmap  # written during it
    task_id: str
    snapshot_id: str
    cowed: dict[int, int] = field(default_factory=dict)  # block -> offset in its cow file
    view: PendingSnapshot | None = None
    staged: dict[int, Staged] = field(default_factory=dict)  # taken over at the closing
    staged_bytes: int = 0

    @property
    def snapshot_name(self) -> str:
        """Its snapshot's name for people (its id until the pending view exists)."""
        return self.view.snapshot_name if self.view is not None else self.snapshot_id


@dataclass
class DiskCounters:
    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    blocks_copied_on_write: int = 0
    #: blocks read for the snapshots taken (the changed ones, never the rest of the disk): by
    #: the upload, or ahead of it by staging
    snapshot_blocks_read: int = 0
    staging_reads: int = 0  # blocks read ahead of a snapshot, counting those rewritten since
    blocks_staged: int = 0  # staged blocks that went into a snapshot
    fsyncs: int = 0


class Disk:
    def __init__(self, record: DiskRecord, state: DiskState, overlay: Overlay,
                 base: Image | None, present: Bitmap, changed: Bitmap) -> None:
        self.record = record
        self.state = state
        self.overlay = overlay
        self.base = base
        self.present = present
        self.changed = changed  # of the open generation
        self.closed: list[ClosedGeneration] = []
        self.write_lock = trio.Lock()
        self.opens = 0  # open file handles (the FUSE adapter counts them)
        self.closing = 0  # snapshot requests flushing and closing it now
        self.idle = trio.Event()  # set while no handle is open
        self.idle.set()
        self.counters = DiskCounters()
        self.mtime_ns = time.time_ns()
        self.last_io = -1e9  # trio clock of the last read or write someone waited on
        # staging (blocks of the open generation encoded ahead of its snapshot)
        self.staged: dict[int, Staged] = {}
        self.staged_bytes = 0
        self._staging: set[int] = set()  # being read and encoded now; a write drops them
        self._recent: set[int] = set()  # written since the last ``stage_candidates``

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def block_size(self) -> int:
        return self.record.block_size

    @property
    def nblocks(self) -> int:
        return self.record.nblocks

    def _extent(self, n: int) -> int:
        """Bytes of block ``n`` (the last block of a disk may be short)."""
        return min(self.block_size, self.size - n * self.block_size)

    def handle_opened(self) -> None:
        self.opens += 1
        if self.idle.is_set():
            self.idle = trio.Event()

    def handle_released(self) -> None:
        self.opens -= 1
        if not self.opens:
            self.idle.set()

    # -- reading ---------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        data = await read_layered(offset, length, self.size, self.block_size,
                                  self.present.__contains__, self._read_overlay, self.base)
        self.counters.reads += 1
        self.counters.bytes_read += len(data)
        self.last_io = trio.current_time()
        return data

    async def _read_overlay(self, offset: int, length: int) -> bytes:
        return await trio.to_thread.run_sync(self.overlay.pread, offset, length)

    # -- writing ---------------------------------------------------------------------------------

    async def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (inside the disk: the caller checks the bounds)."""
        if not data:
            return 0
        bs = self.block_size
        end = offset + len(data)
        first, stop = offset // bs, (end - 1) // bs + 1
        partial = [n for n in dict.fromkeys((first, stop - 1))
                   if offset > n * bs or end < n * bs + self._extent(n)]
        # the lower image's bytes of partly written blocks, fetched before taking the lock
        fills = {n: await read_lower(self.base, n * bs, self._extent(n))
                 for n in partial if n not in self.present}
        async with self.write_lock:
            fresh = [n for n in range(first, stop) if n not in self.changed]
            cow = self._cow_targets(fresh)
            new_present = [n for n in range(first, stop) if n not in self.present]
            gen = self.record.gen
            try:
                saved = await trio.to_thread.run_sync(
                    self._write_sync, offset, data, partial, fills, cow, new_present, fresh, gen)
            finally:  # after the pwrite, even a failed one: a staging read may have raced it
                for n in range(first, stop):
                    self._unstage(n)
                self._recent.update(range(first, stop))
            for n in new_present:
                self.present.add(n)
            for n in fresh:
                self.changed.add(n)
            for (closed, n), at in zip(cow, saved, strict=True):
                closed.cowed[n] = at
        self.counters.writes += 1
        self.counters.bytes_written += len(data)
        self.counters.blocks_copied_on_write += len(cow)
        self.mtime_ns = time.time_ns()
        self.last_io = trio.current_time()
        return len(data)

    def _cow_targets(self, fresh: list[int]) -> list[tuple[ClosedGeneration, int]]:
        """Blocks written for the first time in the open generation whose current contents a
        closed generation still needs: they are its contents at its closing, because nothing
        wrote them since (this is the first write after it)."""
        if not self.closed:
            return []
        out = []
        for n in fresh:
            for closed in reversed(self.closed):
                if n in closed.blocks:
                    if n not in closed.cowed:
                        out.append((closed, n))
                    break
        return out

    def _write_sync(self, offset: int, data: bytes, partial: list[int], fills: dict[int, bytes],
                    cow: list[tuple[ClosedGeneration, int]], new_present: list[int],
                    fresh: list[int], gen: int) -> list[int]:
        bs = self.block_size
        overlay = self.overlay
        # what this write may add on the state's file system: the data (whole blocks), the
        # copies on write, and lmdb's pages for the marks
        first, stop = offset // bs, stop_block(offset, len(data), bs)
        overlay.make_room((stop - first + len(cow)) * bs + MARK_ROOM)
        saved = []
        by_gen: dict[int, list[tuple[int, int]]] = {}
        for closed, n in cow:
            at = overlay.cow(closed.gen).append(overlay.pread(n * bs, self._extent(n)))
            saved.append(at)
            by_gen.setdefault(closed.gen, []).append((n, at))
        for g, entries in by_gen.items():
            self.state.put_cow(self.record, g, entries)
        # the changed marks before the bytes: a daemon killed between the two would otherwise
        # leave bytes the disk reads (its block was present already) that its changed set
        # misses, and every later snapshot would differ from the disk there. A changed mark
        # without its bytes costs only the upload of a block that did not change. (Its
        # present mark waits for the bytes: without them it would read as zeros, not as the
        # base. Durability is ``state``'s: a fold flushes the bytes before committing marks.)
        if fresh:
            self.state.mark(self.record, gen, [], fresh)
        if partial:
            buf = bytearray(min(stop * bs, self.size) - first * bs)
            for n in partial:
                # present now (another write got in first) or not: then the lower image's bytes
                current = overlay.pread(n * bs, self._extent(n)) if n in self.present else fills[n]
                at = (n - first) * bs
                buf[at : at + len(current)] = current
            at = offset - first * bs
            buf[at : at + len(data)] = data
            overlay.pwrite(first * bs, buf)
        else:
            overlay.pwrite(offset, data)
        if new_present:
            self.state.mark(self.record, gen, new_present, [])
        return saved

    async def sync(self) -> None:
        """Make every acknowledged write, and its marks, durable (the bytes first: see
        ``state``)."""
        await trio.to_thread.run_sync(self.state.sync, self.record, self.overlay.sync)
        self.counters.fsyncs += 1

    # -- staging ---------------------------------------------------------------------------------

    def _unstage(self, n: int) -> None:
        self._staging.discard(n)
        staged = self.staged.pop(n, None)
        if staged is not None:
            self.staged_bytes -= len(staged.blob or b"")

    def unstage_all(self) -> None:
        """Forget every staged block (the open generation was rewritten, e.g. by a rollback)."""
        self.staged = {}
        self.staged_bytes = 0
        self._staging.clear()

    def stage_candidates(self, limit: int) -> list[int]:
        """Up to ``limit`` blocks of the open generation to stage, in disk order: changed, not
        staged yet, and not written since the previous call (a block still being rewritten
        would be staged in vain)."""
        recent, self._recent = self._recent, set()
        out: list[int] = []
        if len(self.staged) >= len(self.changed):
            return out
        for n in self.changed:
            if n not in self.staged and n not in recent:
                out.append(n)
                if len(out) == limit:
                    break
        return out

    async def read_for_staging(self, blocks: list[int]) -> list[bytes]:
        """The open generation's contents of ``blocks`` (all changed, so in the overlay), read
        without the write lock: a write to one of them meanwhile drops it from ``_staging``,
        and ``stage`` then ignores what was read of it."""
        self._staging.update(blocks)
        bs = self.block_size
        data = await trio.to_thread.run_sync(
            lambda: [self.overlay.pread(n * bs, self._extent(n)) for n in blocks])
        self.counters.staging_reads += len(blocks)
        return data

    def stage(self, blocks: list[int], staged: list[Staged]) -> None:
        """Keep what ``read_for_staging`` read and the caller encoded, for the blocks no write
        touched since (and no closing took)."""
        for n, entry in zip(blocks, staged, strict=True):
            if n in self._staging:
                self._staging.discard(n)
                self.staged[n] = entry
                self.staged_bytes += len(entry.blob or b"")

    # -- generations -----------------------------------------------------------------------------

    def close_generation(self, task_id: str, snapshot_id: str) -> ClosedGeneration:
        """Close the open generation (the caller holds ``write_lock`` and has stored the task
        and the record with ``gen`` already advanced). Its staged blocks go with it."""
        closed = ClosedGeneration(self.record.gen - 1, self.changed, task_id, snapshot_id,
                                  staged=self.staged, staged_bytes=self.staged_bytes)
        self.closed.append(closed)
        self.changed = Bitmap(self.nblocks)
        self.unstage_all()
        return closed

    async def read_closed(self, closed: ClosedGeneration, blocks: list[int]) -> list[bytes]:
        """The contents ``blocks`` of ``closed`` had at its closing (for its upload). The write
        lock is taken per ``LOCKED_READ`` blocks, so writes wait for one short read at most."""
        out: list[bytes] = []
        for at in range(0, len(blocks), LOCKED_READ):
            part = blocks[at : at + LOCKED_READ]
            async with self.write_lock:
                out += await trio.to_thread.run_sync(self._read_closed_sync, closed, part)
        self.counters.snapshot_blocks_read += len(blocks)
        return out

    async def prefetch_closed(self, closed: ClosedGeneration, blocks: list[int]) -> None:
        """Start the kernel reading ``blocks`` of ``closed`` from the overlay (an upload calls
        this a batch ahead, so its reads find them in memory instead of one seek each)."""
        bs = self.block_size
        runs: list[tuple[int, int]] = []
        for n in blocks:
            if n in closed.cowed:
                continue
            if runs and runs[-1][0] + runs[-1][1] == n * bs:
                runs[-1] = (runs[-1][0], runs[-1][1] + bs)
            else:
                runs.append((n * bs, bs))
        await trio.to_thread.run_sync(self.overlay.will_need, runs)

    def _read_closed_sync(self, closed: ClosedGeneration, blocks: list[int]) -> list[bytes]:
        bs = self.block_size
        out = []
        cow = None
        for n in blocks:
            at = closed.cowed.get(n)
            if at is None:
                out.append(self.overlay.pread(n * bs, self._extent(n)))
                continue
            lost_from = self.overlay.lost_from(closed.gen)
            if lost_from is not None and at >= lost_from:
                raise KeptBlocksLost(
                    f"disk {self.name}: a flush failed before the contents of block {n} at the "
                    f"closing of snapshot {closed.snapshot_name} were durable, and they may be "
                    f"lost ({self.flush_failure()})")
            cow = cow or self.overlay.cow(closed.gen)
            out.append(cow.pread(at, self._extent(n)))
        return out

    def flush_failure(self) -> str | None:
        """What made a flush of this disk fail, in this run or before the last restart."""
        if self.overlay.failed is not None:
            return self.overlay.failed.message
        return self.overlay.failed_before

    async def read_closed_range(self, closed: ClosedGeneration, offset: int,
                                length: int) -> bytes | None:
        """Bytes of ``closed``'s blocks in a range (all of them changed in ``closed``), or None
        once ``closed`` is finished (stored: read the stored snapshot instead)."""
        bs = self.block_size
        first, stop = offset // bs, (offset + length - 1) // bs + 1
        async with self.write_lock:
            if closed not in self.closed:
                return None
            blocks = await trio.to_thread.run_sync(self._read_closed_sync, closed,
                                                   list(range(first, stop)))
        data = b"".join(blocks)
        skip = offset - first * bs
        return data[skip : skip + length]

    def finish_generation(self, closed: ClosedGeneration) -> None:
        """Forget ``closed`` (stored, or given up); the caller drops its cow file
        (``drop_cow``)."""
        self.closed.remove(closed)

    def drop_cow(self, gen: int) -> None:
        """After ``finish_generation``: generation ``gen``'s copy-on-write file deleted, and a
        flush that failed before the last restart forgotten once no generation still uploading
        may have lost contents to it. Blocking: call from a worker thread."""
        self.overlay.drop_cow(gen)
        self.overlay.forget_failure({c.gen for c in self.closed})

    def stats(self) -> dict[str, object]:
        return {
            "name": self.name,
            "id": self.record.id,
            "created": self.record.created,
            "size": self.size,
            "block_size": self.block_size,
            "source": self.record.source,
            "base": self.record.base,  # the snapshot its untouched blocks are read from
            "parent": self.record.parent,
            "generation": self.record.gen,
            "blocks_written": len(self.present),
            "blocks_changed": len(self.changed),  # since the last snapshot closed
            "blocks_staged_now": len(self.staged),  # of those, ready for the next snapshot
            "uploading": [c.snapshot_id for c in self.closed],
            "uploading_names": [c.snapshot_name for c in self.closed],  # the same, for people
            "open": self.opens,
            "trusted": self.record.trusted,
            # a flush failed: fsyncs and snapshots of this disk fail until the daemon restarts
            "failed": None if self.overlay.failed is None else self.overlay.failed.message,
            # one failed before the restart: snapshots then still uploading may have lost the
            # contents they kept aside (until none of them is left)
            "failed_before_restart": self.overlay.failed_before,
            **self.counters.__dict__,
        }


class PendingSnapshot:
    """A snapshot closed but not stored yet, readable from this host's local copy."""

    def __init__(self, disk: Disk, closed: ClosedGeneration, lower: Image | None, name: str,
                 snapshot_id: str, size: int) -> None:
        self.disk = disk
        self.closed = closed
        self.lower = lower
        self.name = name  # the file name, NAME.img
        self.snapshot_id = snapshot_id
        self.size = size
        self.block_size = disk.block_size
        self.mtime_ns = time.time_ns()
        self.stored: Image | None = None  # once uploaded: read through the stored snapshot

    @property
    def snapshot_name(self) -> str:
        """The snapshot's name (``name`` is its file's, NAME.img)."""
        return self.name.removesuffix(".img")

    async def read(self, offset: int, length: int) -> bytes:
        if self.stored is not None:
            return await self.stored.read(offset, length)
        return await read_layered(offset, length, self.size, self.block_size,
                                  self.closed.blocks.__contains__, self._read_local, self.lower)

    async def _read_local(self, offset: int, length: int) -> bytes:
        data = await self.disk.read_closed_range(self.closed, offset, length)
        if data is None:  # stored (and its cow file dropped) meanwhile, or given up
            if self.stored is None:
                raise SnapfsError(f"snapshot {self.name} failed to upload; it is gone")
            return await self.stored.read(offset, length)
        return data
