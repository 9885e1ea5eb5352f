"""The Hydrator: one priority queue of block fetches for every image a daemon serves.

Rules it keeps (DESIGN.md, "Hydration order"):

- Priority: WAITING (a process is blocked on it) < READAHEAD < HINT < BACKGROUND. A request for
  a block that is already queued raises that fetch's priority instead of queueing a second one;
  a request for a block being fetched waits for that fetch. So a block is fetched at most once,
  whoever asks.
- Background work never holds every fetch slot: ``reserved`` slots are kept for reads that
  someone waits on, and the sweep pauses while waiting reads are frequent.
- Neighbouring queued blocks of one pack are fetched with one ranged GET (a run).
- A store that is slow or down fails a waiting read with ``StoreUnavailable`` after
  ``attempts`` tries with backoff: seconds, never forever. A corrupt blob fails at once with
  ``CorruptBlock``, logged with its ID, and is never cached.
- Every blob is verified (xxh3 and keyed BLAKE3 against its ID) before it is cached or returned.

Trio rules: the queue and the in-flight table are touched only on the trio thread; store, cache
and decoding run in worker threads behind limiters.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from snapfs.cache.blockcache import BlockCache
from snapfs.errors import IntegrityError, SnapfsError, StoreError, StoreUnavailable
from snapfs.repo.repository import BlobIndex, Location, Repository
from snapfs.throttle import RateLimiter

log = logging.getLogger(__name__)


RECENT_BYTES = 32 << 20
RATE_WINDOW = 10.0
BULK_WINDOW = 2.0
BULK_BYTES = 32 << 20


class Priority(enum.IntEnum):
    WAITING = 0
    READAHEAD = 1
    HINT = 2
    BACKGROUND = 3


@dataclass(frozen=True)
class HydrationConfig:
    fetchers: int = 8
    reserved: int = 2  # fetch slots that background work may never take
    background: bool = True
    hydrate_rate: float | None = None  # bytes per second for background work
    prefetch_list: str | None = None
    attempts: int = 3
    retry_delay: float = 0.25  # doubled after each failed attempt
    max_run: int = 1 << 20  # bytes one GET may span for foreground runs
    max_background_run: int = 4 << 20
    max_gap: int = 64 << 10
    quiet_after: float = 0.2  # the sweep resumes this long after the last waiting read
    readahead_budget: int = 64 << 20  # raw bytes of read-ahead queued at once, for all images


@dataclass(eq=False)
class _Fetch:
    block_id: bytes
    loc: Location
    priority: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: SnapfsError | None = None
    taken: bool = False


class LatencyWindow:
    """The last ``size`` latencies, for p50/p99."""

    def __init__(self, size: int = 2048) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def percentile(self, p: float) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class HydrationStats:
    blocks_fetched: int = 0
    bytes_fetched: int = 0  # bytes moved from the store (compressed, with run gaps)
    requests: int = 0  # GETs issued
    failed_requests: int = 0
    cache_hits: int = 0
    waiting_reads: int = 0  # blocks a reader had to wait on the store for
    wait_seconds: float = 0.0  # total time readers spent waiting on the store
    background_blocks: int = 0
    background_bytes: int = 0
    corrupt_blocks: int = 0


@dataclass
class ReadTally:
    """What one image's reads cost: the image layer keeps one per image."""

    cache_hits: int = 0
    blocks_fetched: int = 0  # blocks its readers had to wait on the store for
    wait_seconds: float = 0.0


class Hydrator:
    def __init__(self, repo: Repository, index: BlobIndex, cache: BlockCache,
                 config: HydrationConfig = HydrationConfig()) -> None:
        self.repo = repo
        self.index = index
        self.cache = cache
        self.config = config
        self.counters = HydrationStats()
        self.latency = LatencyWindow()
        self._heap: list[tuple[int, int, _Fetch]] = []
        self._seq = itertools.count()
        self._inflight: dict[bytes, _Fetch] = {}
        self._queued_by_pack: dict[str, set[_Fetch]] = {}
        self._changed = trio.Event()
        self._active_background = 0
        self._readahead_queued = 0
        self._background_queued = 0
        #: blocks fetched lately, with their bytes (bounded by RECENT_BYTES): closes the gap
        #: between a cache lookup on a worker thread and the decision to fetch
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._recent_bytes = 0
        self._recent_waiting: deque[tuple[float, int]] = deque()  # (time, bytes) of waiting misses
        self._background_done: deque[tuple[float, int]] = deque()  # (time, raw bytes) hydrated
        self._last_waiting = -1e9
        self._store_limiter = trio.CapacityLimiter(config.fetchers)
        self._cache_limiter = trio.CapacityLimiter(8)
        self._rate = RateLimiter(config.hydrate_rate)
        #: called with each block ID once it is in the cache (the image layer's progress)
        self.on_cached: list[Callable[[bytes], None]] = []
        #: awaited by ``save`` on a clean shutdown (the image layer stores access profiles)
        self.on_save: list[Callable[[], Awaitable[None]]] = []

    # -- asking for blocks ------------------------------------------------------------

    async def read_blocks(self, block_ids: list[bytes], tally: ReadTally | None = None,
                          priority: Priority = Priority.WAITING) -> list[bytes]:
        """The verified plain bytes of each block, fetching what the cache lacks. A caller
        that is not a reader someone waits on (the sweep loading manifest pages) passes a lower
        ``priority``; a waiting reader who needs the same block raises it."""
        tally = tally or ReadTally()
        cached = await trio.to_thread.run_sync(self.cache.get_many, block_ids,
                                               limiter=self._cache_limiter)
        out: list[bytes | None] = list(cached)
        for i, data in enumerate(out):
            if data is None:
                # a fetch may have finished (and cached it) after our lookup: no await from
                # here to _request, so "recent, in flight, or fetch it" is decided atomically
                out[i] = self._recent.get(block_ids[i])
        missing = [i for i, d in enumerate(out) if d is None]
        self.counters.cache_hits += len(block_ids) - len(missing)
        tally.cache_hits += len(block_ids) - len(missing)
        if missing:
            fetches = {block_ids[i]: self._request(block_ids[i], priority, notify=False)
                       for i in missing}
            self._notify()
            if priority == Priority.WAITING:
                self.counters.waiting_reads += len(fetches)
                self._last_waiting = trio.current_time()
                self._recent_waiting.append(
                    (self._last_waiting, sum(f.loc.raw_length for f in fetches.values())))
            started = trio.current_time()
            for f in fetches.values():
                await f.done.wait()
            waited = trio.current_time() - started
            self.counters.wait_seconds += waited
            tally.wait_seconds += waited
            tally.blocks_fetched += len(fetches)
            for i in missing:
                f = fetches[block_ids[i]]
                if f.error is not None:
                    raise f.error
                out[i] = f.data
        return out  # type: ignore[return-value]

    async def read_blob(self, blob_id: bytes, priority: Priority = Priority.WAITING) -> bytes:
        return (await self.read_blocks([blob_id], priority=priority))[0]

    def prefetch(self, block_ids: Iterable[bytes], priority: Priority) -> int:
        """Queue fetches nobody waits on; return how many were new. Callers pass blocks that
        ``cache.missing`` found missing; ones fetched since are skipped here."""
        n = 0
        for bid in block_ids:
            if bid in self._recent:
                continue
            if bid in self._inflight:
                self._raise(self._inflight[bid], priority)
                continue
            if bid not in self.index:
                continue
            self._request(bid, priority, notify=False)
            n += 1
        if n:
            self._notify()  # once for the batch: each wake-up costs every idle worker a turn
        return n

    def readahead_room(self) -> int:
        return self.config.readahead_budget - self._readahead_queued

    def _request(self, bid: bytes, priority: int, notify: bool = True) -> _Fetch:
        f = self._inflight.get(bid)
        if f is not None:
            self._raise(f, priority)
            return f
        f = _Fetch(bid, self.index.locate(bid), priority)
        self._inflight[bid] = f
        self._queued_by_pack.setdefault(f.loc.pack, set()).add(f)
        self._count_queued(f, +1)
        heapq.heappush(self._heap, (priority, next(self._seq), f))
        if notify:
            self._notify()
        return f

    def _raise(self, f: _Fetch, priority: int) -> None:
        if priority < f.priority and not f.taken:
            self._count_queued(f, -1)
            f.priority = priority
            self._count_queued(f, +1)
            heapq.heappush(self._heap, (priority, next(self._seq), f))
            self._notify()

    def _count_queued(self, f: _Fetch, sign: int) -> None:
        if f.priority == Priority.READAHEAD:
            self._readahead_queued += sign * f.loc.raw_length
        elif f.priority == Priority.BACKGROUND:
            self._background_queued += sign

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- fetching ---------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch workers, until cancelled. (The background sweep is the image layer's.)"""
        async with trio.open_nursery() as nursery:
            for _ in range(self.config.fetchers):
                nursery.start_soon(self._worker)
            task_status.started()

    def background_slots_free(self) -> bool:
        return self._active_background < self.config.fetchers - self.config.reserved

    def quiet(self) -> bool:
        """No read has waited on the store for a little while."""
        return trio.current_time() - self._last_waiting > self.config.quiet_after

    async def background_turn(self, backlog_limit: int) -> None:
        """Return when the sweep may queue more: its backlog is short, and no read has waited
        on the store for ``quiet_after`` seconds (or the workload is streaming: ``bulk``)."""
        while True:
            if self._background_queued >= backlog_limit:
                await self._changed.wait()
                continue
            wait = self.config.quiet_after - (trio.current_time() - self._last_waiting)
            if wait <= 0 or self.bulk():
                return
            await trio.sleep(wait)

    def background_backlog(self) -> int:
        """Background fetches queued and not yet started."""
        return self._background_queued

    def bulk(self) -> bool:
        """The workload itself is streaming the image (more than ``BULK_BYTES`` of waiting
        misses in the last ``BULK_WINDOW`` seconds): then pausing the sweep only slows it, and
        it should run at full speed instead (stargz's lesson)."""
        now = trio.current_time()
        while self._recent_waiting and now - self._recent_waiting[0][0] > BULK_WINDOW:
            self._recent_waiting.popleft()
        return sum(n for _, n in self._recent_waiting) > BULK_BYTES

    async def _take(self) -> _Fetch:
        while True:
            while self._heap:
                priority, _, f = self._heap[0]
                if f.taken or priority != f.priority:
                    heapq.heappop(self._heap)
                    continue
                if priority == Priority.BACKGROUND and not self.background_slots_free():
                    break
                heapq.heappop(self._heap)
                return f
            await self._changed.wait()

    def _claim_run(self, first: _Fetch) -> list[_Fetch]:
        """``first`` plus queued neighbours in its pack that one GET can cover."""
        limit = self.config.max_background_run if first.priority == Priority.BACKGROUND \
            else self.config.max_run
        queued = self._queued_by_pack.get(first.loc.pack, set())
        near = sorted((f for f in queued if not f.taken), key=lambda f: f.loc.offset)
        at = near.index(first)
        lo = hi = at
        gap = self.config.max_gap
        while lo > 0 and near[lo].loc.offset - (near[lo - 1].loc.offset + near[lo - 1].loc.length) <= gap \
                and near[hi].loc.offset + near[hi].loc.length - near[lo - 1].loc.offset <= limit:
            lo -= 1
        while hi + 1 < len(near) and near[hi + 1].loc.offset - (near[hi].loc.offset + near[hi].loc.length) <= gap \
                and near[hi + 1].loc.offset + near[hi + 1].loc.length - near[lo].loc.offset <= limit:
            hi += 1
        run = near[lo : hi + 1]
        for f in run:
            f.taken = True
            queued.discard(f)
            self._count_queued(f, -1)
        if not queued:
            self._queued_by_pack.pop(first.loc.pack, None)
        return run

    async def _worker(self) -> None:
        while True:
            first = await self._take()
            run = self._claim_run(first)
            background = all(f.priority == Priority.BACKGROUND for f in run)
            if background:
                self._active_background += 1
            try:
                await self._fetch_run(run, background)
            finally:
                if background:
                    self._active_background -= 1
                    self._notify()

    async def _fetch_run(self, run: list[_Fetch], background: bool) -> None:
        pack = run[0].loc.pack
        wanted = [(f.block_id, f.loc) for f in run]
        span = wanted[-1][1].offset + wanted[-1][1].length - wanted[0][1].offset
        if background:
            await self._rate.take(span)
        try:
            data = await self._get_with_retries(pack, wanted)
            results = await trio.to_thread.run_sync(self._decode_and_cache, data, run)
        except SnapfsError as e:
            for f in run:
                self._finish(f, error=e)
            return
        self.counters.bytes_fetched += span
        for f, (plain, error) in zip(run, results, strict=True):
            if error is not None:
                self.counters.corrupt_blocks += 1
                log.error("%s", error)
                self._finish(f, error=error)
                continue
            self.counters.blocks_fetched += 1
            if background:
                self.counters.background_blocks += 1
                self.counters.background_bytes += f.loc.length
                self._background_done.append((trio.current_time(), f.loc.raw_length))
            self._finish(f, data=plain)
            for callback in self.on_cached:
                callback(f.block_id)

    async def _get_with_retries(self, pack: str, wanted: list[tuple[bytes, Location]]) -> memoryview:
        delay = self.config.retry_delay
        for attempt in range(1, self.config.attempts + 1):
            started = trio.current_time()
            self.counters.requests += 1
            try:
                data = await trio.to_thread.run_sync(self.repo.fetch_run, pack, wanted,
                                                     limiter=self._store_limiter)
            except IntegrityError:
                self.counters.failed_requests += 1
                raise
            except StoreError as e:
                self.counters.failed_requests += 1
                if attempt == self.config.attempts:
                    log.warning("giving up on pack %s after %d attempts: %s", pack[:12], attempt, e)
                    raise StoreUnavailable(f"store unavailable: {e}") from None
                await trio.sleep(delay)
                delay *= 2
                continue
            self.latency.add(trio.current_time() - started)
            return data
        raise AssertionError("unreachable")

    def _decode_and_cache(self, data: memoryview, run: list[_Fetch]) -> list[tuple[bytes | None, IntegrityError | None]]:
        start = run[0].loc.offset
        out: list[tuple[bytes | None, IntegrityError | None]] = []
        for f in run:
            try:
                plain = self.repo.decode_piece(data, start, f.block_id, f.loc)
            except IntegrityError as e:
                out.append((None, e))
                continue
            self.cache.put(f.block_id, plain)
            out.append((plain, None))
        return out

    def _finish(self, f: _Fetch, data: bytes | None = None, error: SnapfsError | None = None) -> None:
        f.data = data
        f.error = error
        self._inflight.pop(f.block_id, None)
        if data is not None:
            self._recent[f.block_id] = data
            self._recent_bytes += len(data)
            while self._recent_bytes > RECENT_BYTES:
                _, old = self._recent.popitem(last=False)
                self._recent_bytes -= len(old)
        f.done.set()

    def background_rate(self) -> float:
        """Raw bytes per second the background sweep hydrated over the last RATE_WINDOW s."""
        now = trio.current_time()
        while self._background_done and now - self._background_done[0][0] > RATE_WINDOW:
            self._background_done.popleft()
        return sum(n for _, n in self._background_done) / RATE_WINDOW

    async def save(self) -> None:
        """What should outlive this daemon: called once on a clean shutdown."""
        for save in self.on_save:
            try:
                await save()
            except SnapfsError as e:
                log.warning("could not save hydration state: %s", e)

    def stats(self) -> dict[str, Any]:
        p50 = self.latency.percentile(50)
        p99 = self.latency.percentile(99)
        return {
            **asdict(self.counters),
            "fetch_latency_ms_p50": round(p50 * 1000, 2) if p50 is not None else None,
            "fetch_latency_ms_p99": round(p99 * 1000, 2) if p99 is not None else None,
            "queued": len(self._inflight),
            "background_rate_bytes_per_s": round(self.background_rate()),
            "cache_bytes": self.cache.size,
            "cache_capacity": self.cache.capacity,
        }
