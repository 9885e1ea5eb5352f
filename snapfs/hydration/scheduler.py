"""The Hydrator: one priority queue of block fetches for every image a daemon serves.

Rules it keeps (DESIGN.md, "Hydration order"):

- Priority: WAITING (a process is blocked on it) < READAHEAD < HINT < BACKGROUND. A request for
  a block that is already queued raises that fetch's priority instead of queueing a second one;
  a request for a block being fetched waits for that fetch. So a block is fetched at most once,
  whoever asks.
- Background work never holds every fetch slot: ``reserved`` slots are kept for reads that
  someone waits on. While reads wait on the store (and the workload is not itself streaming the
  image, see ``bulk``), or other foreground work runs (``foreground``: a writable disk's reads
  and writes), queued background fetches are not started and the sweep queues no more.
- Neighbouring queued blocks of one pack are fetched with one ranged GET (a run): up to
  ``max_run`` bytes for a run that a waiting read leads (it must not wait for megabytes of
  read-ahead behind it), ``max_background_run`` for read-ahead, hints and background work
  (fewer, larger GETs: each costs about a millisecond of the GIL in botocore).
- Background work is queued as whole runs (``_Run``), cut when it is queued: the sweep hands
  over tens of thousands of blocks, and a fetch object, heap entry and event for each one cost
  the trio thread more than decoding them. A block of a queued run that someone asks for
  sooner leaves its run for a fetch of its own; one asked for while its run is in flight
  waits for that run.
- Read-around: the GET of a run that someone waits on also brings the blobs of its pack within
  ``read_around`` bytes on either side that the cache lacks (at most ``read_around_max`` plain
  bytes of them), decoded and cached after the waiting blocks are handed over. A pack holds a
  snapshot's new blocks in disk order, and a file system's metadata compresses to a few hundred
  bytes a block, so the superblock, group descriptors, bitmaps, inode tables and directories
  that mounting and a path lookup read one after another mostly come with the first GETs: on a
  link where a GET costs 20 ms, that is most of the round trips to a first file. A GET of a few
  KiB and one of ~130 KiB cost the same on object stores (the first byte is the price), so a
  read never waits longer for it. (Not a whole pack nor a large group of blocks, restic #1680:
  a bounded window of stored bytes.) Those blocks are in flight like any fetch, so a reader
  who wants one waits for that GET rather than making another. It goes on while it pays: once
  ``AROUND_TRIAL`` such GETs have been made (a count that halves every ``2 * AROUND_TRIAL``
  GETs, so that it follows the workload), at least one in ``AROUND_PAYS`` of them must have
  brought a block that someone then read; otherwise only every ``AROUND_PROBE``-th waiting GET
  reads around. Random reads (a database) thus soon stop paying for neighbours they never read
  (their GETs were 16× larger and each cached ~30 blocks, +2 ms a read at p50), and a
  directory walk or a mount brings them back.
- A store that is slow, down or hung fails a waiting read with ``StoreUnavailable`` after
  bounded tries, in seconds, never forever; a slow transfer that still moves is not cut short.
  A fetch makes ``attempts`` tries of the store in all, the store's own retries counted
  (``ObjectStore.attempts``), so that they do not multiply: S3 retries inside each call (3
  tries), and a fetch from it is one call; a local directory does not, and a fetch from it is
  ``attempts`` calls, ``retry_delay`` apart and doubling. Background work (the sweep's runs and
  the manifest pages its scan loads) is not in a hurry and makes one call: its blocks stay
  missing and the sweep tries them again later (``sweep_retry``, growing), so a store that is
  down or hung costs the sweep one failed call per run, not a burst of quick ones. A corrupt
  blob fails at once with ``CorruptBlock``, logged with its ID, and is never cached.
- The kernel tries a buffered read that failed once more at once (its page alone): so that it
  does not wait for a store that is down or hung all over again, a waiting read of a block
  whose fetch the store failed less than ``FAILED_MEMORY`` seconds ago fails at once with the
  same error (for half a second only: after that the next read fetches again).
- A store that hangs (accepts a request and never answers): a store with a
  ``stall_timeout`` (S3: a try that moves no byte for 5 s fails, however long a transfer that
  moves takes) fails the call by itself, so a waiting read on a hung S3 store fails after about
  3 x 5 s (15 s) and never holds a fetch slot longer. A store without one (a directory on a
  dead NFS server) costs a try after ``store_timeout`` seconds, a total: the try (waiting for a
  fetch slot, the GET, decoding and caching its run) counts as failed and is retried like any
  store error, and its thread is abandoned. An abandoned thread keeps its fetch slot (its
  ``_store_limiter`` token) until its call returns, on purpose: however long the store hangs,
  at most ``fetchers`` threads hang with it (releasing the slot at the timeout would add a hung
  thread per try, without bound). The price: once they all hang, every fetch fails the same
  way, each within its own timeout, even from a pack that would answer; the slots come back
  when the calls return, and a call that never returns (a hard NFS mount whose server never
  comes back) keeps its slot until the daemon restarts. An abandoned try whose GET returns
  late stops there (it neither hands over nor caches; the try after it does). A read waits at
  most its fetch's tries (each bounded as above) plus the backoff, and longer if every worker
  is busy with a fetch of its own.
- Nothing a fetch runs into ends the daemon: an error other than a ``SnapfsError`` (a bug, an
  error a store did not wrap) is logged with its traceback and fails the fetch's reads. The
  cache's own I/O errors cost no read at all (``BlockCache``): a block it could not store is
  handed over all the same, and not reported cached (the sweep fetches it again later).
- Every blob is verified (xxh3 and keyed BLAKE3 against its ID) before it is cached or returned.

Trio rules: the queue and the in-flight table are touched only on the trio thread; store, cache
and decoding run in worker threads behind limiters. A fetched run costs one worker-thread hop:
the GET, the decoding and verifying of its blobs (zstd and BLAKE3 release the GIL, so the runs
in flight decode on every core) and one ``BlockCache.put_many``. When someone waits on a run,
its blocks are handed over as soon as they are verified, before the cache write (``_recent``
keeps them meanwhile, so nobody fetches them again). A background run's blocks go to the cache
only: decoded as views into the one buffer of the run (no copy per block, which held the GIL),
and kept out of ``_recent``, which the sweep would otherwise churn through.

``buffers`` is the one memory budget of every image's in-memory read-ahead (``budget``); the
figures it keeps are ``stats``' counters.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from snapfs.cache.blockcache import BlockCache
from snapfs.errors import (
    IntegrityError,
    PackMissing,
    SnapfsError,
    StoreError,
    StoreUnavailable,
)
from snapfs.format.block import recorded_checksum
from snapfs.format.pack import KIND_PAGE
from snapfs.hydration.budget import MemoryBudget
from snapfs.hydration.stats import HydrationStats, LatencyWindow, ReadTally
from snapfs.plural import counted
from snapfs.repo.repository import BlobIndex, Location, Repository
from snapfs.throttle import RateLimiter

log = logging.getLogger(__name__)


RECENT_BYTES = 32 << 20
#: seconds between looks, while a background GET waits for its turn under ``--hydrate-rate``,
#: whether a read has come to wait on one of its blocks
THROTTLE_LOOK = 0.02
RATE_WINDOW = 10.0
BULK_WINDOW = 2.0
BULK_BYTES = 32 << 20
AROUND_TRIAL = 8  # read-around GETs made before whether it pays decides
AROUND_PAYS = 4  # read-around goes on while at least 1 in this many of its GETs paid
AROUND_PROBE = 8  # while it does not pay, 1 waiting GET in this many still reads around
AROUND_TRACKED = 4096  # blocks read-around brought that are remembered until someone reads them
#: seconds a block whose fetch the store failed fails again at once (see the module docstring)
FAILED_MEMORY = 0.5
FAILED_TRACKED = 4096  # such blocks remembered at most


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
    #: tries of the store a fetch someone may wait on makes in all, the store's own retries
    #: included (``ObjectStore.attempts``); background fetches make one call
    attempts: int = 3
    retry_delay: float = 0.25  # doubled after each failed attempt
    max_run: int = 1 << 20  # bytes one GET may span for a run someone waits on
    max_background_run: int = 4 << 20  # for other runs (read-ahead, hints, the sweep)
    max_gap: int = 64 << 10
    read_around: int = 64 << 10  # stored bytes on each side of a waiting read's GET it also brings
    read_around_max: int = 4 << 20  # plain bytes of such neighbours one GET may bring
    quiet_after: float = 0.2  # the sweep resumes this long after the last waiting read
    sweep_retry: float = 30.0  # the sweep's first wait before it tries failed blocks again
    readahead_budget: int = 64 << 20  # raw bytes of read-ahead queued at once, for all images
    readahead_memory: int = 64 << 20  # plain bytes held in read-ahead buffers, for all images
    #: seconds one fetch attempt may take in all, on a store that does not bound its own
    #: stalls (``ObjectStore.stall_timeout`` is None: a local directory, maybe on NFS); a
    #: store that does (S3) is trusted to, and a slow transfer from it is never cut short
    store_timeout: float = 30.0


@dataclass(eq=False)
class _Fetch:
    block_id: bytes
    loc: Location
    priority: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: SnapfsError | None = None
    taken: bool = False


@dataclass(eq=False)
class _Run:
    """Background blocks of one pack that one GET covers, queued together."""

    pack: str
    blocks: dict[bytes, Location] = field(default_factory=dict)  # in pack order
    taken: bool = False
    #: fetches of its blocks that someone asked for while it was in flight
    waiters: dict[bytes, _Fetch] = field(default_factory=dict)


class _PackQueue:
    """The queued fetches of one pack, by offset, so that ``claim`` finds a fetch's
    neighbours by bisection (sorting the pack's queue for every claim cost a streaming read
    more than the rest of its bookkeeping)."""

    def __init__(self) -> None:
        self.offsets: list[int] = []  # sorted; one fetch per offset
        self.fetches: dict[int, _Fetch] = {}

    def add(self, f: _Fetch) -> None:
        bisect.insort(self.offsets, f.loc.offset)
        self.fetches[f.loc.offset] = f

    def claim(self, first: _Fetch, limit: int, gap: int) -> list[_Fetch]:
        """Take ``first`` and the neighbours that one GET of at most ``limit`` bytes covers
        without bridging more than ``gap`` bytes between two of them."""
        offsets, fetches = self.offsets, self.fetches
        lo = hi = bisect.bisect_left(offsets, first.loc.offset)
        start, end = first.loc.offset, first.loc.offset + first.loc.length
        while lo > 0:
            prev = fetches[offsets[lo - 1]].loc
            if start - (prev.offset + prev.length) > gap or end - prev.offset > limit:
                break
            lo, start = lo - 1, prev.offset
        while hi + 1 < len(offsets):
            after = fetches[offsets[hi + 1]].loc
            if after.offset - end > gap or after.offset + after.length - start > limit:
                break
            hi, end = hi + 1, after.offset + after.length
        run = [fetches.pop(offset) for offset in offsets[lo : hi + 1]]
        del offsets[lo : hi + 1]
        return run


#: (plain, error) per blob of a run; a plain may be a view into the buffer its whole run was
#: decoded into (background runs: ``BlockCodec.decode_many``), which ``_finish`` copies
Pieces = list[tuple[bytes | memoryview | None, IntegrityError | None]]


async def _all_done(fetches: Iterable[_Fetch]) -> None:
    """Until every one of ``fetches`` has ended. Fetches end a run at a time: waiting only on
    those not ended yet saves a trip through the scheduler per block."""
    for f in fetches:
        if not f.done.is_set():
            await f.done.wait()


def _copy_into(target: memoryview, data: bytes) -> bool:
    """Copy a block's verified bytes into a read-ahead target; False if the lengths differ."""
    if len(data) != len(target):
        return False
    target[:] = data
    return True


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
        self._queued_by_pack: dict[str, _PackQueue] = {}
        self._runs: deque[_Run] = deque()  # background runs not yet taken, in sweep order
        self._in_runs: dict[bytes, _Run] = {}  # block -> its background run, until it ends
        self._changed = trio.Event()
        self._active_background = 0
        self._readahead_queued = 0
        self._background_queued = 0
        self._background_queued_bytes = 0  # stored bytes of queued background fetches
        self._hints_queued = 0  # fetches queued at HINT priority, not taken yet
        self.hints_queued_most = 0  # the most there ever were (what ``hint_turn`` bounds)
        self._hint_room = trio.Event()  # set whenever a queued hint is taken
        #: blocks fetched lately, with their bytes (bounded by RECENT_BYTES): closes the gap
        #: between a cache lookup on a worker thread and the decision to fetch
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._recent_bytes = 0
        #: blocks whose fetch the store failed lately: block -> (trio clock, the error)
        self._failed: OrderedDict[bytes, tuple[float, SnapfsError]] = OrderedDict()
        #: why the store failed the last fetch that gave up on it, until a fetch succeeds: a
        #: reader whose read failed learns from ``stats`` that others will fail too
        #: (``restore-files`` stops then, rather than wait out every file)
        self.store_failing: str | None = None
        self._recent_waiting: deque[tuple[float, int]] = deque()  # (time, bytes) of waiting misses
        self._background_done: deque[tuple[float, int]] = deque()  # (time, raw bytes) hydrated
        self._last_waiting = -1e9
        #: read-around: its blocks not read yet (block -> its GET's number), the GETs that
        #: paid, and decaying counts of its GETs and of those that paid (see the docstring)
        self._around_unread: OrderedDict[bytes, int] = OrderedDict()
        self._around_paid: OrderedDict[int, None] = OrderedDict()
        self._around_seq = itertools.count()
        self._around_gets = 0.0
        self._around_pays = 0.0
        self._around_skipped = 0
        #: trio clocks of the last foreground work the sweep should yield to, besides reads
        #: waiting on the store (the write layer adds its disks' last I/O)
        self.foreground: list[Callable[[], float]] = []
        self._store_limiter = trio.CapacityLimiter(config.fetchers)
        self._cache_limiter = trio.CapacityLimiter(8)
        self._rate = RateLimiter(config.hydrate_rate)
        self._nursery: trio.Nursery | None = None
        #: the bytes every image's read-ahead buffers may hold together
        self.buffers = MemoryBudget(config.readahead_memory)
        #: called with the IDs of blocks once they are in the cache (the image layer's progress)
        self.on_cached: list[Callable[[list[bytes]], None]] = []
        #: awaited by ``save`` on a clean shutdown (the image layer stores access profiles)
        self.on_save: list[Callable[[], Awaitable[None]]] = []
        #: loads the repository's whole index, in a worker thread (the daemon's goes through
        #: the host's index cache); ``refresh_index`` calls it when the index objects changed
        self.index_loader: Callable[[], BlobIndex] = repo.load_index
        self._index_lock = trio.Lock()

    async def refresh_index(self) -> bool:
        """Reload ``index`` if the store's index objects are no longer the ones it was built
        from; True if it was reloaded. Another process stored snapshots, or garbage collection
        rewrote the index after deleting blobs or moving them into new packs: a blob that is
        gone must not be deduplicated against (``snapfs.write.uploader``), and a moved one must
        be read from where it is now (``_fetch_with_retries``). One LIST when nothing changed."""
        async with self._index_lock:
            listed = await trio.to_thread.run_sync(self.repo.list_index_names)
            if listed == set(self.index.index_names):
                return False
            self.index = await trio.to_thread.run_sync(self.index_loader)
            log.info("repository index reloaded (%s)", counted(len(listed), "index object"))
            return True

    # -- asking for blocks ------------------------------------------------------------

    async def read_blocks(self, block_ids: list[bytes], tally: ReadTally | None = None,
                          priority: Priority = Priority.WAITING) -> list[bytes]:
        """The verified plain bytes of each block, fetching what the cache lacks. A caller
        that is not a reader someone waits on (the sweep loading manifest pages) passes a lower
        ``priority``; a waiting reader who needs the same block raises it."""
        tally = tally or ReadTally()
        recent = self._recent
        inflight = self._inflight
        if self._around_unread:
            self._note_read(block_ids)
        out: list[bytes | None] = [recent.get(bid) for bid in block_ids]
        # blocks fetched lately come from memory, blocks being fetched from their fetch: only
        # the rest need the cache (and a worker-thread hop). (What the sweep's scan found
        # uncached is not skipped: another daemon sharing the cache may have fetched it since.)
        lookup = [i for i, d in enumerate(out) if d is None and block_ids[i] not in inflight]
        if lookup:
            cached = await trio.to_thread.run_sync(self.cache.get_many, [block_ids[i] for i in lookup],
                                                   limiter=self._cache_limiter)
            for i, data in zip(lookup, cached, strict=True):
                out[i] = data
            # a fetch may have finished (and cached it) during the lookup, one we meant to
            # join too: no await from here to _request, so "recent, in flight, or fetch it"
            # is decided atomically
            for i, data in enumerate(out):
                if data is None:
                    out[i] = recent.get(block_ids[i])
        missing = [i for i, d in enumerate(out) if d is None]
        self.counters.cache_hits += len(block_ids) - len(missing)
        tally.cache_hits += len(block_ids) - len(missing)
        if missing:
            if self._failed:
                self._fail_again([block_ids[i] for i in missing])
            fetches = {block_ids[i]: self._request(block_ids[i], priority, notify=False)
                       for i in missing}
            self._notify()
            if priority == Priority.WAITING:
                self.counters.waiting_reads += len(fetches)
                self._last_waiting = trio.current_time()
                self._recent_waiting.append(
                    (self._last_waiting, sum(f.loc.raw_length for f in fetches.values())))
            started = trio.current_time()
            await _all_done(fetches.values())
            waited = trio.current_time() - started
            self.counters.wait_seconds += waited
            tally.wait_seconds += waited
            tally.blocks_fetched += len(fetches)
            again: list[int] = []
            for i in missing:
                f = fetches[block_ids[i]]
                if f.error is not None:
                    raise f.error
                if f.data is None:  # a read-around neighbour that was cached already
                    again.append(i)
                out[i] = f.data
            if again:
                got = await self.read_blocks([block_ids[i] for i in again], tally, priority)
                for i, data in zip(again, got, strict=True):
                    out[i] = data
        return out  # type: ignore[return-value]

    async def read_blob(self, blob_id: bytes, priority: Priority = Priority.WAITING) -> bytes:
        return (await self.read_blocks([blob_id], priority=priority))[0]

    async def read_ahead(self, block_ids: list[bytes], targets: list[memoryview],
                         further: list[bytes], landed: Callable[[list[bool]], None],
                         wanted: Callable[[], bool] = lambda: True) -> bool:
        """Read-ahead of a stream, straight into its buffer: each of ``block_ids`` is read
        into its target (a writable buffer as long as the block; an ID may come more than
        once). ``landed`` is called with which targets hold their block's verified bytes
        once the cache has been asked (one worker-thread hop: ``BlockCache.read_into``), then
        again, if the cache lacked any, once their fetches (READAHEAD priority) ended (the
        ones that failed stay False; none are copied in if ``wanted()`` says the buffer is no
        longer used by then). A target is written only while it is False, so a caller
        may hand out the bytes of the ones marked True at once. If the cache lacked any, the
        same hop finds which of ``further`` it lacks too, and those are queued at READAHEAD
        priority while ``readahead_room`` lasts; returns whether it did (a stream through
        cached blocks skips those lookups). Never raises a store or integrity error: a reader
        who needs a failed block asks for it itself."""
        def lookup() -> tuple[list[bool], list[bytes] | None]:
            had = self.cache.read_into(block_ids, targets)
            if not further or all(had):
                return had, None
            return had, self.cache.missing(further)

        if self._around_unread:
            self._note_read(block_ids)
        had, far = await trio.to_thread.run_sync(lookup, limiter=self._cache_limiter)
        fetches: dict[bytes, _Fetch] = {}
        for i, ok in enumerate(had):
            if not ok:
                bid = block_ids[i]
                data = self._recent.get(bid)
                if data is not None:
                    had[i] = _copy_into(targets[i], data)
                elif bid not in fetches:
                    f = self._inflight.get(bid)
                    if f is not None:  # queued further ahead already (no index lookup)
                        self._raise(f, Priority.READAHEAD)
                        fetches[bid] = f
                    elif (loc := self.index.get(bid)) is not None:
                        fetches[bid] = self._request(bid, Priority.READAHEAD, notify=False, loc=loc)
        if far and self.readahead_room() > 0:
            self.prefetch(far, Priority.READAHEAD)  # notifies
        elif fetches:
            self._notify()
        landed(had)
        if not fetches:
            return far is not None
        await _all_done(fetches.values())
        if not wanted():
            return far is not None
        for i, ok in enumerate(had):
            if not ok:
                fetched = fetches.get(block_ids[i])
                if fetched is not None and fetched.data is not None:
                    had[i] = _copy_into(targets[i], fetched.data)
        landed(had)
        return far is not None

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> bool:
        """Run ``fn(*args)`` as a task beside the fetch workers (cancelled with them); False
        if the hydrator is not running. ``fn`` must not raise."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    def prefetch(self, block_ids: Iterable[bytes], priority: Priority) -> int:
        """Queue fetches nobody waits on; return how many were new. Callers pass blocks that
        ``cache.missing`` found missing; ones fetched since are skipped here. Background
        blocks are queued as runs."""
        if priority == Priority.BACKGROUND:
            return self._queue_runs(block_ids)
        n = 0
        for bid in block_ids:
            if bid in self._recent:
                continue
            if bid in self._inflight:
                self._raise(self._inflight[bid], priority)
                continue
            loc = self.index.get(bid)
            if loc is None:
                continue
            self._request(bid, priority, notify=False, loc=loc)
            n += 1
        if n:
            self._notify()  # once for the batch: each wake-up costs every idle worker a turn
        return n

    def _queue_runs(self, block_ids: Iterable[bytes]) -> int:
        """Queue background fetches of ``block_ids`` as runs: by pack, in pack order, cut
        where one GET would exceed ``max_background_run`` or bridge more than ``max_gap``."""
        recent, inflight, in_runs = self._recent, self._inflight, self._in_runs
        by_pack: dict[str, list[tuple[int, bytes, Location]]] = {}
        for bid in block_ids:
            if bid in recent or bid in inflight or bid in in_runs:
                continue
            loc = self.index.get(bid)
            if loc is not None:
                by_pack.setdefault(loc.pack, []).append((loc.offset, bid, loc))
        limit, gap = self.config.max_background_run, self.config.max_gap
        n = nbytes = 0
        for pack, pieces in by_pack.items():
            pieces.sort()
            run = _Run(pack)
            start = end = pieces[0][0]
            for offset, bid, loc in pieces:
                if run.blocks and (offset - end > gap or offset + loc.length - start > limit):
                    self._runs.append(run)
                    run, start = _Run(pack), offset
                run.blocks[bid] = loc
                in_runs[bid] = run
                end = offset + loc.length
                nbytes += loc.length
            self._runs.append(run)
            n += len(pieces)
        if n:
            self._background_queued += n
            self._background_queued_bytes += nbytes
            self._notify()
        return n

    def readahead_room(self) -> int:
        return self.config.readahead_budget - self._readahead_queued

    def _request(self, bid: bytes, priority: int, notify: bool = True,
                 loc: Location | None = None) -> _Fetch:
        f = self._inflight.get(bid)
        if f is not None:
            self._raise(f, priority)
            return f
        run = self._in_runs.get(bid)
        if run is not None:
            if run.taken:  # in flight: wait for it
                f = self._inflight[bid] = run.waiters[bid] = _Fetch(bid, run.blocks[bid], priority,
                                                                     taken=True)
                return f
            loc = run.blocks.pop(bid)  # queued: it leaves its run for a fetch of its own
            del self._in_runs[bid]
            self._background_queued -= 1
            self._background_queued_bytes -= loc.length
        f = _Fetch(bid, loc if loc is not None else self.index.locate(bid), priority)
        self._inflight[bid] = f
        queued = self._queued_by_pack.get(f.loc.pack)
        if queued is None:
            queued = self._queued_by_pack[f.loc.pack] = _PackQueue()
        queued.add(f)
        self._count_queued(f, +1)
        heapq.heappush(self._heap, (priority, next(self._seq), f))
        if notify:
            self._notify()
        return f

    def _raise(self, f: _Fetch, priority: int) -> None:
        if priority < f.priority and f.taken:
            # in flight: no sooner for that, but a wait for ``--hydrate-rate`` ends (``_throttle``)
            f.priority = priority
        elif priority < f.priority:
            self._count_queued(f, -1)
            f.priority = priority
            self._count_queued(f, +1)
            heapq.heappush(self._heap, (priority, next(self._seq), f))
            self._notify()

    def _count_queued(self, f: _Fetch, sign: int) -> None:
        if f.priority == Priority.READAHEAD:
            self._readahead_queued += sign * f.loc.raw_length
        elif f.priority == Priority.HINT:
            self._hints_queued += sign
            if sign > 0:
                self.hints_queued_most = max(self.hints_queued_most, self._hints_queued)
            else:
                self._hint_room.set()
        elif f.priority == Priority.BACKGROUND:
            self._background_queued += sign
            self._background_queued_bytes += sign * f.loc.length

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- fetching ---------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch workers, until cancelled. (The background sweep is the image layer's.)"""
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.config.fetchers):
                    nursery.start_soon(self._worker)
                self._nursery = nursery
                task_status.started()
        finally:
            self._nursery = None

    def background_slots_free(self) -> bool:
        return self._active_background < self.config.fetchers - self.config.reserved

    def _background_may_start(self) -> float:
        """0 if a queued background fetch may start now, else how long to wait at most before
        asking again (reads are waiting on the store: the sweep yields to them)."""
        if not self.background_slots_free():
            return float("inf")
        wait = self.config.quiet_after - (trio.current_time() - self._last_busy())
        if wait <= 0 or self.bulk():
            return 0.0
        return wait

    def _last_busy(self) -> float:
        """When a read last waited on the store, or other foreground work (a disk's reads and
        writes, through ``foreground``) last ran: the sweep yields to both."""
        return max([self._last_waiting, *(last() for last in self.foreground)])

    def quiet(self) -> bool:
        """No read has waited on the store for a little while."""
        return trio.current_time() - self._last_busy() > self.config.quiet_after

    async def background_turn(self, backlog_bytes: int) -> None:
        """Return when the sweep may queue more: fewer than ``backlog_bytes`` (stored bytes)
        of background fetches are queued, and no read has waited on the store for
        ``quiet_after`` seconds (or the workload is streaming: ``bulk``)."""
        while True:
            if self._background_queued_bytes >= backlog_bytes:
                await self._changed.wait()
                continue
            wait = self.config.quiet_after - (trio.current_time() - self._last_busy())
            if wait <= 0 or self.bulk():
                return
            await trio.sleep(wait)

    async def hint_turn(self, most: int) -> None:
        """Return once fewer than ``most`` hinted fetches are queued: the sweep queues a long
        profile a batch at a time (queued at once, the 32768 blocks of a whole-image profile
        raised the daemon's peak memory from 207 to 231 MiB; a profile may name 65536)."""
        while self._hints_queued >= most:
            if self._hint_room.is_set():
                self._hint_room = trio.Event()
            await self._hint_room.wait()

    def background_idle(self) -> bool:
        """No background work is queued or in flight."""
        return not self._in_runs and not self._background_queued

    def bulk(self) -> bool:
        """The workload itself is streaming the image (more than ``BULK_BYTES`` of waiting
        misses in the last ``BULK_WINDOW`` seconds): then pausing the sweep only slows it, and
        it should run at full speed instead (stargz's lesson)."""
        now = trio.current_time()
        while self._recent_waiting and now - self._recent_waiting[0][0] > BULK_WINDOW:
            self._recent_waiting.popleft()
        return sum(n for _, n in self._recent_waiting) > BULK_BYTES

    async def _take(self) -> _Fetch | _Run:
        """The most urgent queued work: a fetch (with the neighbours ``_claim_run`` adds),
        or a background run once background work may start."""
        heap = self._heap
        while True:
            while heap and (heap[0][2].taken or heap[0][0] != heap[0][2].priority):
                heapq.heappop(heap)
            if heap and heap[0][0] < Priority.BACKGROUND:
                return heapq.heappop(heap)[2]
            while self._runs and not self._runs[0].blocks:  # every block left for a fetch
                self._runs.popleft()
            wait = float("inf")
            if heap or self._runs:
                wait = self._background_may_start()
                if not wait:
                    # background fetches (manifest pages the sweep waits on) before runs
                    return heapq.heappop(heap)[2] if heap else self._runs.popleft()
            with trio.move_on_after(wait):
                await self._changed.wait()

    def _claim_run(self, first: _Fetch) -> list[_Fetch]:
        """``first`` plus queued neighbours in its pack that one GET can cover."""
        # a read someone waits on must not wait for megabytes of read-ahead behind it
        limit = self.config.max_run if first.priority == Priority.WAITING \
            else self.config.max_background_run
        queued = self._queued_by_pack[first.loc.pack]
        run = queued.claim(first, limit, self.config.max_gap)
        for f in run:
            f.taken = True
            self._count_queued(f, -1)
        if not queued.offsets:
            del self._queued_by_pack[first.loc.pack]
        return run

    async def _worker(self) -> None:
        while True:
            first = await self._take()
            if isinstance(first, _Run):
                self._active_background += 1
                try:
                    await self._hydrate_run(first)
                finally:
                    self._active_background -= 1
                    self._notify()
                continue
            run = self._claim_run(first)
            background = all(f.priority == Priority.BACKGROUND for f in run)
            if background:
                self._active_background += 1
            try:
                await self._fetch_run(run, background, [] if background else self._read_around(run))
            finally:
                if background:
                    self._active_background -= 1
                    self._notify()

    def _read_around(self, run: list[_Fetch]) -> list[_Fetch]:
        """Fetches, in flight from now, of the neighbours that a waiting run's GET may bring
        (see the module docstring): blobs of its pack within ``read_around`` bytes that no
        fetch or background run has and that were not fetched lately, nearest first while
        their plain bytes fit ``read_around_max``. Whether the cache has them is asked on
        the worker thread, which fetches only the ones it lacks."""
        window = self.config.read_around
        if not window or not any(f.priority == Priority.WAITING for f in run):
            return []
        if self._around_gets >= AROUND_TRIAL and AROUND_PAYS * self._around_pays < self._around_gets:
            self._around_skipped += 1
            if self._around_skipped % AROUND_PROBE:
                return []
        if run[0].loc.kind == KIND_PAGE:  # the snapshot's other block-map pages: ~0.1 MiB each
            window = max(window, self.config.max_run)
        start = run[0].loc.offset
        end = max(f.loc.offset + f.loc.length for f in run)
        inflight, recent, in_runs = self._inflight, self._recent, self._in_runs
        near = [(bid, loc) for bid, loc in self.index.neighbours(run[0].block_id, start - window,
                                                                 end + window)
                if bid not in inflight and bid not in recent and bid not in in_runs]
        near.sort(key=lambda item: item[1].offset - end if item[1].offset >= end
                  else start - item[1].offset)
        extras: list[_Fetch] = []
        room = self.config.read_around_max
        for bid, loc in near:
            room -= loc.raw_length
            if room < 0:
                break
            f = inflight[bid] = _Fetch(bid, loc, Priority.READAHEAD, taken=True)
            extras.append(f)
        if extras:
            self._count_around(extras)
        extras.sort(key=lambda f: f.loc.offset)
        return extras

    def _count_around(self, extras: list[_Fetch]) -> None:
        """One more read-around GET; its blocks are remembered until someone reads them."""
        number = next(self._around_seq)
        self.counters.read_around_gets += 1
        self._around_gets += 1
        if self._around_gets >= 2 * AROUND_TRIAL:
            self._around_gets /= 2
            self._around_pays /= 2
        unread = self._around_unread
        for f in extras:
            unread[f.block_id] = number
        while len(unread) > AROUND_TRACKED:
            unread.popitem(last=False)

    def _note_read(self, block_ids: Iterable[bytes]) -> None:
        """Blocks someone reads: a read-around GET that brought one of them paid."""
        unread, paid = self._around_unread, self._around_paid
        for bid in block_ids:
            number = unread.pop(bid, None)
            if number is not None and number not in paid:
                paid[number] = None
                if len(paid) > AROUND_TRACKED:
                    paid.popitem(last=False)
                self.counters.read_around_paid += 1
                self._around_pays += 1

    async def _fetch_run(self, run: list[_Fetch], background: bool,
                         extras: list[_Fetch]) -> None:
        """Fetch a run of queued fetches, with ``extras`` (its read-around) in the same GET."""
        pack = run[0].loc.pack
        wanted = [(f.block_id, f.loc) for f in run]
        if background:
            span = wanted[-1][1].offset + wanted[-1][1].length - wanted[0][1].offset
            await self._throttle(span, lambda: any(f.priority != Priority.BACKGROUND for f in run))
        early: Callable[[Pieces], None] | None = None
        if any(f.priority == Priority.WAITING for f in run):
            # someone waits: hand the blocks over before they are written to the cache (they
            # stay in ``_recent`` meanwhile, so nobody fetches them again)
            token = trio.lowlevel.current_trio_token()

            def early(results: Pieces) -> None:
                token.run_sync_soon(self._complete, run, results, background)

        try:
            results, around, stored = await self._fetch_with_retries(
                pack, wanted, early, [(f.block_id, f.loc) for f in extras],
                background=background)
        except SnapfsError as e:
            for f in run + extras:
                if not f.done.is_set():  # a late abandoned attempt may have handed it over
                    self._finish(f, error=e)
            return
        self._complete(run, results, background)
        cached = [f.block_id for f, (plain, _) in zip(run, results, strict=True)
                  if plain is not None]
        if extras:
            cached += self._complete_around(extras, around)
        if stored:
            self._cached(cached)

    def _complete_around(self, extras: list[_Fetch], results: Pieces) -> list[bytes]:
        """End the read-around fetches of a run: a neighbour the cache had (no bytes, no
        error) ends empty, and whoever joined it reads the cache. Returns the IDs of those
        fetched."""
        cached: list[bytes] = []
        for f, (plain, error) in zip(extras, results, strict=True):
            if error is not None:
                self._corrupt(error)
                self._finish(f, error=error)
            elif plain is None:
                self._finish(f)
            else:
                self._finish(f, data=plain)
                cached.append(f.block_id)
        self.counters.blocks_fetched += len(cached)
        self.counters.read_around_blocks += len(cached)
        return cached

    def _complete(self, run: list[_Fetch], results: Pieces, background: bool) -> None:
        """Hand each fetch of a run its bytes or error (those not handed theirs already). Whether
        they are cached is known only later: ``_fetch_run`` says so."""
        now = trio.current_time()
        for f, (plain, error) in zip(run, results, strict=True):
            if f.done.is_set():
                continue
            if error is not None:
                self._corrupt(error)
                self._finish(f, error=error)
                continue
            self.counters.blocks_fetched += 1
            if background:
                self.counters.background_blocks += 1
                self.counters.background_bytes += f.loc.length
                self._background_done.append((now, f.loc.raw_length))
            self._finish(f, data=plain)

    async def _throttle(self, nbytes: int, someone_waits: Callable[[], bool]) -> None:
        """A background GET's turn under ``--hydrate-rate``, or sooner once a read comes to wait
        on one of its blocks: a read must not wait on the throttle. (The bytes stay counted:
        the background work after it waits for them.)"""
        start = self._rate.reserve(nbytes)
        while not someone_waits():
            left = start - trio.current_time()
            if left <= 0:
                return
            await trio.sleep(min(THROTTLE_LOOK, left))

    async def _hydrate_run(self, run: _Run) -> None:
        """Fetch a background run: one GET, and one pass over its blocks on this thread."""
        run.taken = True
        wanted = list(run.blocks.items())
        self._background_queued -= len(wanted)
        self._background_queued_bytes -= sum(loc.length for _, loc in wanted)
        span = wanted[-1][1].offset + wanted[-1][1].length - wanted[0][1].offset
        await self._throttle(span, lambda: bool(run.waiters))
        try:
            results, _, kept = await self._fetch_with_retries(run.pack, wanted, None, [],
                                                              copy=False, background=True)
        except SnapfsError as e:
            for bid, _ in wanted:  # its blocks stay missing: a later sweep queues them again
                del self._in_runs[bid]
            for f in run.waiters.values():
                self._finish(f, error=e)
            return
        cached: list[bytes] = []
        raw = stored = 0
        for (bid, loc), (plain, error) in zip(wanted, results, strict=True):
            del self._in_runs[bid]
            waiter = run.waiters.get(bid)
            if error is not None:
                self._corrupt(error)
                if waiter is not None:
                    self._finish(waiter, error=error)
                continue
            if waiter is not None:
                self._finish(waiter, data=plain)
            cached.append(bid)
            raw += loc.raw_length
            stored += loc.length
        self.counters.blocks_fetched += len(cached)
        self.counters.background_blocks += len(cached)
        self.counters.background_bytes += stored
        self._background_done.append((trio.current_time(), raw))
        if kept:  # if not, they stay missing too
            self._cached(cached)

    def _corrupt(self, error: IntegrityError) -> None:
        self.counters.corrupt_blocks += 1
        log.error("%s", error)

    def _cached(self, block_ids: list[bytes]) -> None:
        if block_ids:
            for callback in self.on_cached:
                callback(block_ids)

    async def _fetch_with_retries(self, pack: str, wanted: list[tuple[bytes, Location]],
                                  early: Callable[[Pieces], None] | None,
                                  around: list[tuple[bytes, Location]], copy: bool = True,
                                  relocate: bool = True, background: bool = False,
                                  ) -> tuple[Pieces, Pieces, bool]:
        """``_fetch_decode_cache`` on a worker thread, tried again after a store error or
        after ``store_timeout`` (see the module docstring: how many calls, and when a call
        has a timeout here); if the pack is gone, read where the reloaded index says the blobs
        are now. Returns (plain, error) per blob of ``wanted`` and of ``around``, and whether
        the blobs fetched were cached."""
        delay = self.config.retry_delay
        store = self.repo.store
        timeout = self.config.store_timeout if store.stall_timeout is None else math.inf
        calls = 1 if background else max(1, -(-self.config.attempts // store.attempts))
        for attempt in range(1, calls + 1):
            self.counters.requests += 1
            try:
                with trio.fail_after(timeout):
                    latency, nbytes, results, around_results, stored = \
                        await trio.to_thread.run_sync(
                            self._fetch_decode_cache, pack, wanted, early, around, copy,
                            limiter=self._store_limiter, abandon_on_cancel=True)
            except PackMissing:
                self.counters.failed_requests += 1
                if not relocate:
                    raise
                results, stored = await self._relocated(pack, wanted, early, copy, background)
                return results, [(None, None)] * len(around), stored  # neighbours: a guess anyway
            except IntegrityError:
                self.counters.failed_requests += 1
                raise
            except (StoreError, trio.TooSlowError) as e:
                self.counters.failed_requests += 1
                reason = e if isinstance(e, StoreError) else \
                    f"{self.repo.store.url}: pack {pack[:12]}: no answer in {timeout:g} s"
                if attempt == calls:
                    log.warning("giving up on pack %s after %s: %s", pack[:12],
                                counted(attempt, "call"), reason)
                    self.store_failing = str(reason)
                    raise StoreUnavailable(f"store unavailable: {reason}") from None
                await trio.sleep(delay)
                delay *= 2
                continue
            except SnapfsError:
                self.counters.failed_requests += 1
                raise
            except Exception as e:
                # not ours to retry (a bug, or an error a store did not wrap), and not a
                # reason to end the daemon: the reads of this run fail, the others go on
                self.counters.failed_requests += 1
                log.exception("fetch from pack %s failed", pack[:12])
                raise SnapfsError(f"fetch from pack {pack[:12]} failed: {e!r}") from e
            self.counters.bytes_fetched += nbytes
            self.latency.add(latency)
            self.store_failing = None
            return results, around_results, stored
        raise AssertionError("unreachable")

    async def _relocated(self, pack: str, wanted: list[tuple[bytes, Location]],
                         early: Callable[[Pieces], None] | None, copy: bool,
                         background: bool) -> tuple[Pieces, bool]:
        """The blobs of ``wanted`` read from the packs the reloaded index names, now that
        ``pack`` is gone (garbage collection repacked them), and whether they were cached;
        ``PackMissing`` again if the index has them nowhere else."""
        await self.refresh_index()
        moved: list[tuple[bytes, Location]] = []
        for bid, _ in wanted:
            loc = self.index.get(bid)
            if loc is None or loc.pack == pack:
                raise PackMissing(f"pack {pack[:12]} is missing from {self.repo.store.url}")
            moved.append((bid, loc))
        by_pack: dict[str, list[int]] = {}
        for i, (_, loc) in enumerate(moved):
            by_pack.setdefault(loc.pack, []).append(i)
        results: Pieces = [(None, None)] * len(wanted)
        stored = True
        for new_pack, places in by_pack.items():
            places.sort(key=lambda i: moved[i][1].offset)
            got, _, stored_here = await self._fetch_with_retries(
                new_pack, [moved[i] for i in places], None, [], copy, relocate=False,
                background=background)
            stored = stored and stored_here
            for i, piece in zip(places, got, strict=True):
                results[i] = piece
        if early is not None:
            early(results)
        log.info("%d blobs of pack %s read where garbage collection moved them", len(wanted),
                 pack[:12])
        return results, stored

    def _fetch_decode_cache(self, pack: str, wanted: list[tuple[bytes, Location]],
                            early: Callable[[Pieces], None] | None,
                            around: list[tuple[bytes, Location]], copy: bool = True,
                            ) -> tuple[float, int, Pieces, Pieces, bool]:
        """In a worker thread: one GET of the run (and of the blobs of ``around`` that the
        cache lacks), each blob of the run decoded and verified (then handed to ``early``, if
        given), then those of ``around``, the good ones cached together. Returns the GET's
        latency and size, (plain, error) per blob of the run and of ``around`` (``(None,
        None)`` for one the cache had), and whether the cache stored the good ones.
        ``copy=False`` (a background run, whose blocks go to the cache and are let go): the
        run's plains are views into one buffer, no copy each."""
        lacking = set(self.cache.missing([bid for bid, _ in around])) if around else set()
        extra = [(bid, loc) for bid, loc in around if bid in lacking]
        every = sorted(wanted + extra, key=lambda w: w[1].offset) if extra else wanted
        start = every[0][1].offset
        started = time.monotonic()
        data = self.repo.fetch_run(pack, every)
        latency = time.monotonic() - started
        trio.from_thread.check_cancelled()  # abandoned (store_timeout) while the GET hung: stop
        results, checksums = self._decode(data, start, wanted, copy)
        if early is not None:
            early(results)
        good = [(bid, plain) for (bid, _), (plain, _) in zip(wanted, results, strict=True)
                if plain is not None]
        around_results: Pieces = [(None, None)] * len(around)
        if extra:
            decoded, extra_checksums = self._decode(data, start, extra)
            by_id = dict(zip([bid for bid, _ in extra], decoded, strict=True))
            around_results = [by_id.get(bid, (None, None)) for bid, _ in around]
            good += [(bid, plain) for (bid, _), (plain, _) in zip(extra, decoded, strict=True)
                     if plain is not None]
            checksums += extra_checksums
        stored = self.cache.put_many(good, checksums)
        return latency, len(data), results, around_results, stored

    def _decode(self, data: memoryview, start: int, wanted: list[tuple[bytes, Location]],
                copy: bool = True) -> tuple[Pieces, list[bytes]]:
        """(plain, error) per blob of ``wanted`` in a fetched run that begins at pack offset
        ``start``, and the xxh3-128 of each good one's plain bytes (its header's, which
        decoding checked: the cache need not hash them again)."""
        out: Pieces = []
        checksums: list[bytes] = []
        for (_, loc), plain in zip(wanted, self.repo.decode_pieces(data, start, wanted, copy),
                                   strict=True):
            if isinstance(plain, IntegrityError):
                out.append((None, plain))
            else:
                out.append((plain, None))
                checksums.append(recorded_checksum(data[loc.offset - start :]))
        return out, checksums

    def _finish(self, f: _Fetch, data: bytes | memoryview | None = None,
                error: SnapfsError | None = None) -> None:
        if isinstance(data, memoryview):
            data = bytes(data)  # a view holds its whole run's buffer: keep only the block
        f.data = data
        f.error = error
        self._inflight.pop(f.block_id, None)
        if data is not None:
            self._remember(f.block_id, data)
        elif isinstance(error, StoreUnavailable):
            failed = self._failed
            failed.pop(f.block_id, None)
            failed[f.block_id] = (trio.current_time(), error)
            if len(failed) > FAILED_TRACKED:
                failed.popitem(last=False)
        f.done.set()

    def _fail_again(self, block_ids: list[bytes]) -> None:
        """Raise the error of a fetch of one of ``block_ids`` that the store failed less than
        ``FAILED_MEMORY`` seconds ago (none in flight again), and forget older failures."""
        failed = self._failed
        forget = trio.current_time() - FAILED_MEMORY
        while failed and next(iter(failed.values()))[0] < forget:
            failed.popitem(last=False)
        for bid in block_ids:
            last = failed.get(bid)
            if last is not None and bid not in self._inflight:
                self.counters.failed_again += 1
                raise last[1]

    def _remember(self, block_id: bytes, data: bytes) -> None:
        """Keep a fetched block's bytes in ``_recent`` (bounded by RECENT_BYTES)."""
        recent = self._recent
        if block_id not in recent:
            recent[block_id] = data
            self._recent_bytes += len(data)
            while self._recent_bytes > RECENT_BYTES:
                _, old = recent.popitem(last=False)
                self._recent_bytes -= len(old)

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
            "queued": len(self._inflight) + len(self._in_runs),
            "readahead_buffered_bytes": self.buffers.used,
            "background_rate_bytes_per_s": round(self.background_rate()),
            "cache_bytes": self.cache.size,
            "cache_capacity": self.cache.capacity,
            "store_failing": self.store_failing,
        }
