"""ImageView: one snapshot as a read-only image, read lazily through the Hydrator.

A read maps its byte range to blocks (O(1) per block: block n is entry n % per_page of page
n // per_page), answers all-zero blocks without any I/O, and asks the hydrator for the rest in
one call, so the blocks of one kernel read are fetched together (and coalesced into one GET when
they are neighbours in a pack).

Read-ahead: after two reads in a row that each start where the previous one ended, the blocks
after the stream are queued at READAHEAD priority, in a window that doubles (from
``READAHEAD_MIN`` to ``READAHEAD_MAX`` blocks) while the stream stays sequential and resets when
it breaks. Read-ahead bytes live in the cache, not in memory, and the hydrator caps how much of
it may be queued for all images together.

The view also records the order in which blocks were first read (the access profile that the
next mount uses as hints) and how much of the image is hydrated.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from datetime import datetime
from typing import Any

import trio

from snapfs.errors import CorruptBlock
from snapfs.format.block import ZERO_ID
from snapfs.format.manifest import SnapshotRoot, decode_page
from snapfs.hydration.scheduler import Hydrator, Priority, ReadTally
from snapfs.repo.repository import Repository

log = logging.getLogger(__name__)

READAHEAD_MIN = 8
READAHEAD_MAX = 512
PAGE_CACHE = 256
PROFILE_MAX = 65536


@functools.cache
def _zeros(n: int) -> bytes:
    return bytes(n)


class ImageView:
    def __init__(self, repo: Repository, root: SnapshotRoot, hydrator: Hydrator, name: str) -> None:
        self.repo = repo
        self.root = root
        self.hydrator = hydrator
        self.name = name
        self.size = root.size
        self.block_size = root.block_size
        self.nblocks = root.blocks_total
        self.per_page = root.entries_per_page
        created = datetime.fromisoformat(root.created.replace("Z", "+00:00"))
        self.mtime_ns = int(created.timestamp() * 1e9)
        self._page_lens = repo.page_lengths(root)
        self._pages: OrderedDict[int, list[bytes]] = OrderedDict()
        # read-ahead state
        self._next_block = -1
        self._sequential = 0
        self._window = 0
        self._ahead_until = 0
        # access profile and progress
        self._touched = bytearray(self.nblocks // 8 + 1)
        self.profile: list[int] = []
        self.tally = ReadTally()
        self.reads = 0
        self.bytes_read = 0
        self.data_blocks: int | None = None  # unique non-zero blocks, once the sweep scanned
        self.pending: set[bytes] = set()  # of those, the ones not cached yet
        self.pending_bytes = 0  # their raw size

    # -- the block map ------------------------------------------------------------------

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
            ids = await trio.to_thread.run_sync(decode_page, plain)
            if len(ids) != self._page_lens[p]:
                raise CorruptBlock(f"manifest page {p} of {self.name} has {len(ids)} entries")
        self._pages[p] = ids
        if len(self._pages) > PAGE_CACHE:
            self._pages.popitem(last=False)
        return ids

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
        if offset >= self.size or length <= 0:
            return b""
        end = min(self.size, offset + length)
        bs = self.block_size
        first, stop = offset // bs, (end - 1) // bs + 1
        ids = await self.block_ids(first, stop)
        wanted = list(dict.fromkeys(b for b in ids if b != ZERO_ID))
        blocks = dict(zip(wanted, await self.hydrator.read_blocks(wanted, self.tally), strict=True)) \
            if wanted else {}
        parts = []
        for n, bid in zip(range(first, stop), ids, strict=True):
            parts.append(blocks[bid] if bid != ZERO_ID else _zeros(min(bs, self.size - n * bs)))
        data = b"".join(parts)
        skip = offset - first * bs
        self._note_read(first, stop, end - offset)
        await self._readahead(first, stop)
        return data[skip : skip + (end - offset)]

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

    async def _readahead(self, first: int, stop: int) -> None:
        if first == self._next_block:
            self._sequential += 1
        else:
            self._sequential = 0
            self._window = 0
            self._ahead_until = 0
        self._next_block = stop
        if self._sequential < 2 or stop >= self.nblocks:
            return
        self._window = min(READAHEAD_MAX, max(READAHEAD_MIN, self._window * 2))
        start = max(stop, self._ahead_until)
        until = min(self.nblocks, stop + self._window)
        if start >= until or self.hydrator.readahead_room() <= 0:
            return
        self._ahead_until = until
        ids = [b for b in await self.block_ids(start, until) if b != ZERO_ID]
        missing = await trio.to_thread.run_sync(self.hydrator.cache.missing, list(dict.fromkeys(ids)))
        self.hydrator.prefetch(missing, Priority.READAHEAD)

    # -- progress -------------------------------------------------------------------------

    def block_cached(self, block_id: bytes) -> None:
        if block_id in self.pending:
            self.pending.discard(block_id)
            self.pending_bytes -= self.hydrator.index.locate(block_id).raw_length

    def set_pending(self, pending: set[bytes]) -> None:
        """The sweep's scan found these blocks uncached (it keeps adding as it goes)."""
        self.pending = pending
        self.pending_bytes = sum(self.hydrator.index.locate(b).raw_length for b in pending)

    def add_pending(self, block_ids: list[bytes]) -> None:
        fresh = [b for b in block_ids if b not in self.pending]
        self.pending.update(fresh)
        self.pending_bytes += sum(self.hydrator.index.locate(b).raw_length for b in fresh)

    def stats(self) -> dict[str, Any]:
        hydrated = remaining = eta = None
        if self.data_blocks is not None:
            hydrated = 1.0 if not self.data_blocks else 1 - len(self.pending) / self.data_blocks
            remaining = self.pending_bytes  # kept up to date: stats must be O(1) on the trio thread
            rate = self.hydrator.background_rate()
            eta = round(remaining / rate, 1) if remaining and rate > 0 else (0.0 if not remaining else None)
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
            "eta_seconds": eta,  # at the recent background rate; None while it is unknown
            "cache_hits": self.tally.cache_hits,
            "blocks_fetched": self.tally.blocks_fetched,
            "wait_seconds": round(self.tally.wait_seconds, 3),
        }
