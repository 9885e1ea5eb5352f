"""ImageView: one snapshot as a read-only image, read lazily through the Hydrator.

A read maps its byte range to blocks (O(1) per block: block n is entry n % per_page of page
n // per_page), answers all-zero blocks without any I/O, and asks the hydrator for the rest in
one call, so the blocks of one kernel read are fetched together (and coalesced into one GET when
they are neighbours in a pack).

Read-ahead, per stream: a view follows up to ``STREAMS`` sequential streams (a read that starts
where one ended continues it; any other read starts a new one, replacing the least recently
used). Once a stream is clearly sequential and large (two reads in a row continued it, and it
has read ``READAHEAD_AFTER`` bytes: a small file read through a loop-mounted filesystem comes
as a few sequential reads, which must not cost megabytes of read-ahead):

- a buffer in memory is filled ahead of it, ``FILL_BYTES`` of consecutive blocks at a time and
  ``FILLS`` fills ahead at most, each fill one task with one worker-thread hop that reads the
  blocks the cache has straight into the buffer (``Hydrator.read_ahead``,
  ``BlockCache.read_into``: one preadv per run of blocks lying end to end in a segment, each
  block checked in place); blocks the cache lacks are fetched at READAHEAD priority and copied
  in. A read whose bytes are all in the buffer is answered from memory, on the trio thread,
  with no hop at all, and ``read_buffer`` (the FUSE adapter's) hands out a read-only view of
  the buffer instead of a copy; a read whose blocks a fill is still looking up waits for that
  lookup rather than making its own. Every byte in a buffer was verified on its way in (the
  cache checks xxh3 on read, fetches check xxh3 and the keyed ID) and is never written again
  while a view of it may be alive, so a read never returns unverified bytes. Buffers drop
  what the stream has passed (a spare one is reused only once nobody views it), and all of
  them together are capped by the hydrator's one memory budget (``Hydrator.buffers``, the
  least recently served stream gives way: mountpoint-s3 #987);
- further ahead, blocks the cache lacks are queued at READAHEAD priority (they go to the cache,
  not to memory), in a window that doubles (from ``READAHEAD_MIN`` to ``READAHEAD_MAX`` blocks)
  while the stream stays sequential; the hydrator caps how much of that may be queued for all
  images together.

A read that the buffer cannot answer (the first reads, random reads, a fill still under way)
asks the hydrator for its blocks as a waiting read, which also raises the priority of any
read-ahead fetch of them.

The view also records the order in which blocks were first read (the access profile that the
next mount uses as hints) and how much of the image is hydrated.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio

from snapfs.errors import SnapfsError
from snapfs.format.block import ZERO_ID, zero_bytes
from snapfs.format.manifest import SnapshotRoot, decode_page
from snapfs.hydration.budget import MemoryBudget
from snapfs.hydration.scheduler import Hydrator, Priority
from snapfs.hydration.stats import ReadTally
from snapfs.repo.repository import Repository

log = logging.getLogger(__name__)

READAHEAD_AFTER = 1 << 20  # bytes a sequential stream reads before its read-ahead starts
READAHEAD_MIN = 8
READAHEAD_MAX = 512
FILL_BYTES = 8 << 20  # a stream's buffer is filled this much at a time
FILLS = 2  # fills under way at once per stream (a fill is mostly waiting on its thread hop)
STREAMS = 8
PAGE_CACHE = 256
PROFILE_MAX = 65536


@dataclass(eq=False)
class _Fill:
    """Blocks ``start`` .. ``until - 1`` of a stream's buffer: their image bytes end to end in
    ``data`` (holes are its zeros), of which blocks before ``reached`` are verified. Bytes
    before ``reached`` are never written again, so they may be handed out as they are."""

    start: int
    until: int
    data: bytearray
    reached: int
    fresh: bool  # ``data`` is all zeros (else the holes must be zeroed)
    looked_up: trio.Event = field(default_factory=trio.Event)  # its cached blocks are in
    done: bool = False  # its task ended: nothing writes into ``data`` any more
    dropped: bool = False  # no longer in its stream's buffer: nobody reads it


@dataclass(eq=False)
class _Stream:
    """One sequential reader of an image, and its read-ahead buffer."""

    budget: MemoryBudget
    next_offset: int  # where its next read should start
    next_block: int  # the block after its last read
    run: int = 0  # reads in a row that continued it
    began: int = 0  # the offset it started at
    window: int = 0  # blocks queued ahead of it for the cache (doubles while sequential)
    ahead_until: int = 0  # blocks before this are queued (or cached) for it
    fill_until: int = 0  # blocks before this are buffered, being filled, or left to reads
    #: its buffer: fills in block order (done or under way), none wholly before its last read
    fills: list[_Fill] = field(default_factory=list)

    def shed(self) -> None:
        """The budget took our bytes back (or the stream is dropped): empty the buffer. (Fills
        under way finish into buffers nobody reads.)"""
        for fill in self.fills:
            fill.dropped = True
        self.fills.clear()
        self.fill_until = self.next_block

    def drop_before(self, n: int) -> None:
        """Forget the fills the stream has passed (that end at block ``n`` or before)."""
        fills = self.fills
        while fills and fills[0].until <= n:
            fill = fills.pop(0)
            fill.dropped = True
            self.budget.give_back(self, len(fill.data))
            if fill.done:
                self.budget.recycle(fill.data)


class ImageView:
    def __init__(self, repo: Repository, root: SnapshotRoot, hydrator: Hydrator, name: str) -> None:
        self.repo = repo
        self.root = root
        self.hydrator = hydrator
        self.name = name
        self.snapshot_id = root.id
        self.size = root.size
        self.block_size = root.block_size
        self.nblocks = root.blocks_total
        self.per_page = root.entries_per_page
        created = datetime.fromisoformat(root.created.replace("Z", "+00:00"))
        self.mtime_ns = int(created.timestamp() * 1e9)
        self._page_lens = repo.page_lengths(root)
        self._pages: OrderedDict[int, list[bytes]] = OrderedDict()
        self._streams: list[_Stream] = []  # most recently used last
        self._fill_blocks = max(1, FILL_BYTES // self.block_size)
        # access profile and progress
        self._touched = bytearray(self.nblocks // 8 + 1)
        self.profile: list[int] = []
        self.tally = ReadTally()
        self.reads = 0
        self.bytes_read = 0
        self.data_blocks: int | None = None  # unique non-zero blocks, once the sweep scanned
        #: of those, the ones not cached yet, with their raw size (no index lookup per block
        #: fetched: ``blocks_cached`` runs for the blocks the hydrator caches)
        self.pending: dict[bytes, int] = {}
        self.pending_bytes = 0  # their raw size

    # -- the block map ------------------------------------------------------------------

    def _page_name(self, p: int) -> str:
        return f"manifest page {p} of {self.name}"

    async def page(self, p: int, priority: Priority = Priority.WAITING) -> list[bytes]:
        """Block IDs of page ``p``. Two callers loading one page share its fetch through the
        hydrator (which also raises a background load's priority for a waiting reader)."""
        ids = self._pages.get(p)
        if ids is not None:
            self._pages.move_to_end(p)
            return ids
        page_id = bytes.fromhex(self.root.pages[p])
        if page_id == ZERO_ID:
            ids = [ZERO_ID] * self._page_lens[p]
        else:
            plain = await self.hydrator.read_blob(page_id, priority)
            ids = await trio.to_thread.run_sync(decode_page, plain, self._page_lens[p],
                                                self._page_name(p))
        self._pages[p] = ids
        if len(self._pages) > PAGE_CACHE:
            self._pages.popitem(last=False)
        return ids

    async def load_pages(self, pages: Iterable[int], priority: Priority) -> None:
        """``pages`` in memory (at most ``PAGE_CACHE``), asked for in one call: a snapshot
        stores its pages together, so their fetch is a GET a run (where a page at a time
        costs a round trip each), and cached ones are looked up together."""
        wanted = [p for p in pages
                  if p not in self._pages and bytes.fromhex(self.root.pages[p]) != ZERO_ID]
        if not wanted:
            return
        plains = await self.hydrator.read_blocks([bytes.fromhex(self.root.pages[p]) for p in wanted],
                                                 priority=priority)  # fmt: skip
        decoded = await trio.to_thread.run_sync(
            lambda: [decode_page(x, self._page_lens[p], self._page_name(p))
                     for p, x in zip(wanted, plains, strict=True)])
        for p, ids in zip(wanted, decoded, strict=True):
            self._pages[p] = ids
            if len(self._pages) > PAGE_CACHE:
                self._pages.popitem(last=False)

    async def block_ids(self, first: int, stop: int) -> list[bytes]:
        """IDs of blocks ``first`` .. ``stop - 1``."""
        out: list[bytes] = []
        n = first
        while n < stop:
            p, i = divmod(n, self.per_page)
            ids = await self.page(p)
            take = min(stop - n, len(ids) - i)
            out.extend(ids[i : i + take])
            n += take
        return out

    # -- reading --------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        data = await self.read_buffer(offset, length)
        return data if isinstance(data, bytes) else data.tobytes()

    async def read_buffer(self, offset: int, length: int) -> bytes | memoryview:
        """``read``, without a copy: a read that the read-ahead buffer answers is a read-only
        view of the buffer's (verified) bytes, which are never written again. For a caller
        that only passes the bytes on (the FUSE adapter hands them to the kernel)."""
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        bs = self.block_size
        first, stop = offset // bs, (end - 1) // bs + 1
        stream = self._stream_for(offset, end, first, stop)
        data = self._from_buffer(stream, offset, end, first, stop) if stream.fills else None
        if data is None:
            fill = next((f for f in stream.fills if f.start <= first and stop <= f.until), None)
            if fill is not None and not fill.looked_up.is_set():
                # a fill is looking these blocks up in the cache: waiting for it costs less
                # than a second lookup (blocks it must fetch, a waiting read joins below,
                # which raises their priority)
                await fill.looked_up.wait()
                data = self._from_buffer(stream, offset, end, first, stop)
        if data is None:
            ids = await self.block_ids(first, stop)
            wanted = list(dict.fromkeys(b for b in ids if b != ZERO_ID))
            got = await self.hydrator.read_blocks(wanted, self.tally) if wanted else []
            blocks = dict(zip(wanted, got, strict=True))
            parts = [blocks[bid] if bid != ZERO_ID else zero_bytes(min(bs, self.size - n * bs))
                     for n, bid in zip(range(first, stop), ids, strict=True)]
            whole = parts[0] if len(parts) == 1 else b"".join(parts)
            skip = offset - first * bs
            data = whole if skip == 0 and len(whole) == end - offset \
                else memoryview(whole)[skip : skip + (end - offset)]
        stream.drop_before(first)
        self._note_read(first, stop, end - offset)
        if stream.run >= 2 and end - stream.began >= READAHEAD_AFTER:
            self._read_ahead(stream, stop)
        return data

    def _stream_for(self, offset: int, end: int, first: int, stop: int) -> _Stream:
        """The stream this read continues (or a new one); updated before any await, so that
        reads are matched in the order they arrive."""
        streams = self._streams
        for i in range(len(streams) - 1, -1, -1):
            s = streams[i]
            if s.next_offset == offset:
                s.run += 1
                break
            fills = s.fills
            if fills and fills[0].start <= first and stop <= fills[-1].until:
                break  # a read overtaken by the next one: still inside this stream's buffer
        else:
            if len(streams) >= STREAMS:
                old = streams.pop(0)
                self.hydrator.buffers.release(old)
                old.shed()
            s = _Stream(self.hydrator.buffers, next_offset=offset, next_block=first,
                        fill_until=first, began=offset)
            streams.append(s)
            i = len(streams) - 1
        if i != len(streams) - 1:
            streams.append(streams.pop(i))
        s.next_offset = max(s.next_offset, end)
        s.next_block = max(s.next_block, stop)
        return s

    def _from_buffer(self, s: _Stream, offset: int, end: int, first: int, stop: int,
                     ) -> bytes | memoryview | None:
        """Bytes ``offset`` .. ``end`` from ``s``'s buffer, if it has all of them verified: a
        view of one fill's bytes (a copy only if the read spans two fills)."""
        fills = s.fills
        k = 0
        while k < len(fills) and fills[k].until <= first:
            k += 1
        if k == len(fills) or fills[k].start > first:
            return None
        bs = self.block_size
        parts: list[memoryview] = []
        n = fills[k].start
        for f in fills[k:]:
            if f.start != n or f.reached < min(stop, f.until):
                return None
            base = f.start * bs
            parts.append(memoryview(f.data)[max(offset, base) - base : min(end, base + len(f.data)) - base])
            n = f.until
            if stop <= n:
                break
        else:
            return None
        counted = stop - first
        self.hydrator.counters.cache_hits += counted
        self.tally.cache_hits += counted
        return parts[0].toreadonly() if len(parts) == 1 else b"".join(parts)

    def _read_ahead(self, s: _Stream, stop: int) -> None:
        """Start the fills that keep ``s``'s buffer ``FILLS`` fills ahead of it."""
        s.window = min(READAHEAD_MAX, max(READAHEAD_MIN, s.window * 2))
        s.fill_until = max(s.fill_until, stop)
        size = self._fill_blocks
        bs = self.block_size
        while s.fill_until - stop < FILLS * size and s.fill_until < self.nblocks:
            start = s.fill_until
            until = min(self.nblocks, start + size)
            far_start = max(until, s.ahead_until)
            far_until = min(self.nblocks, stop + max(s.window, FILLS * size))
            if far_until - far_start < size and far_until < self.nblocks:
                far_until = far_start  # queue for the cache a fill's worth at least at a time
            nbytes = min(self.size, until * bs) - start * bs
            if not s.budget.take(s, nbytes):
                return
            data, fresh = s.budget.buffer(nbytes)
            fill = _Fill(start, until, data, reached=start, fresh=fresh)
            if not self.hydrator.spawn(self._fill, s, fill, far_start, far_until):
                s.budget.give_back(s, nbytes)
                return
            s.ahead_until = max(s.ahead_until, far_until)
            s.fills.append(fill)
            s.fill_until = until

    async def _fill(self, s: _Stream, fill: _Fill, far_start: int, far_until: int) -> None:
        """Read blocks ``fill.start`` .. ``fill.until - 1`` into ``fill.data`` and queue the
        blocks the cache lacks from ``far_start`` to ``far_until`` (a task of the hydrator:
        never raises). The blocks the cache had land at once, the rest when fetched; readers
        may use the buffer up to the first block not landed yet."""
        start, until = fill.start, fill.until
        bs = self.block_size

        try:
            ids = await self.block_ids(start, until)
            far = await self.block_ids(far_start, far_until) if far_until > far_start else []
            landed = [bid == ZERO_ID for bid in ids]  # holes: the buffer's zeros
            at = [k for k, bid in enumerate(ids) if bid != ZERO_ID]
            buf = memoryview(fill.data)
            if not fill.fresh:  # a spare buffer: its holes hold an earlier fill's bytes
                for k, hole in enumerate(landed):
                    if hole:
                        buf[k * bs : (k + 1) * bs] = zero_bytes(min(bs, len(buf) - k * bs))
            # (the image's last block may be short: the slice ends with the buffer)
            targets = [buf[k * bs : (k + 1) * bs] for k in at]

            def arrived(had: list[bool]) -> None:
                for k, ok in zip(at, had, strict=True):
                    landed[k] = ok
                r = fill.reached - start
                while r < len(landed) and landed[r]:
                    r += 1
                fill.reached = start + r
                fill.looked_up.set()  # readers waiting on it look in the buffer, or fetch themselves

            further = list(dict.fromkeys(b for b in far if b != ZERO_ID))
            if not at:
                arrived([])
            if not await self.hydrator.read_ahead([ids[k] for k in at], targets, further, arrived,
                                                  lambda: not fill.dropped) \
                    and further and s.ahead_until == far_until:
                s.ahead_until = far_start  # not queued: the next fill asks again
        except SnapfsError as e:
            log.debug("read-ahead of %s at block %d stopped: %s", self.name, start, e)
        except Exception:  # read-ahead is optional: a bug here must not take the daemon down
            log.exception("read-ahead of %s at block %d failed", self.name, start)
        finally:
            fill.looked_up.set()
            fill.done = True

    def _note_read(self, first: int, stop: int, nbytes: int) -> None:
        self.reads += 1
        self.bytes_read += nbytes
        if len(self.profile) >= PROFILE_MAX:
            return
        touched = self._touched
        for n in range(first, stop):
            if not touched[n >> 3] & (1 << (n & 7)):
                touched[n >> 3] |= 1 << (n & 7)
                self.profile.append(n)

    # -- progress -------------------------------------------------------------------------

    def blocks_cached(self, block_ids: list[bytes]) -> None:
        pop = self.pending.pop
        for block_id in block_ids:
            raw = pop(block_id, None)
            if raw is not None:
                self.pending_bytes -= raw

    def set_pending(self, pending: Iterable[bytes]) -> None:
        """The sweep's scan found these blocks uncached (it keeps adding as it goes)."""
        self.pending = {}
        self.pending_bytes = 0
        self.add_pending(pending)

    def add_pending(self, block_ids: Iterable[bytes]) -> None:
        locate = self.hydrator.index.locate
        pending = self.pending
        for b in block_ids:
            if b not in pending:
                raw = pending[b] = locate(b).raw_length
                self.pending_bytes += raw

    def stats(self) -> dict[str, Any]:
        hydrated = remaining = eta = None
        if self.data_blocks is not None:
            hydrated = 1.0 if not self.data_blocks else 1 - len(self.pending) / self.data_blocks
            remaining = self.pending_bytes  # kept up to date: stats must be O(1) on the trio thread
            rate = self.hydrator.background_rate()
            eta = round(remaining / rate, 1) if remaining and rate > 0 else (0.0 if not remaining else None)
            if remaining and not self.hydrator.config.background:
                eta = None  # no sweep runs: what hints did not bring waits for its first read
        return {
            "snapshot": self.root.id,
            "size": self.size,
            "block_size": self.block_size,
            "reads": self.reads,
            "bytes_read": self.bytes_read,
            "data_blocks": self.data_blocks,
            "blocks_missing": len(self.pending) if self.data_blocks is not None else None,
            "hydrated_fraction": round(hydrated, 4) if hydrated is not None else None,
            "bytes_missing": remaining,
            "eta_seconds": eta,  # at the recent background rate; None if unknown or no sweep
            "cache_hits": self.tally.cache_hits,
            "blocks_fetched": self.tally.blocks_fetched,
            "wait_seconds": round(self.tally.wait_seconds, 3),
        }
