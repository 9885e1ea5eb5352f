"""Hints and the background sweep: what the hydrator fetches when no one is waiting.

Which images: those in use on this mount (opened since it started, or the base of a disk it
serves: ``SnapshotCatalog.in_use``) get everything below; the newest snapshot of each lineage
(one no served snapshot follows) gets its hints too, before anyone opens it, and so does an
image the ``--prefetch-list`` names. Other images are fetched only as they are read. The sweep
used to hydrate every snapshot of the repository: with hundreds of them, a mount made to
restore one file downloaded the whole repository (paying the store's egress), churned a cache
smaller than that through the images in use, and held block maps and a map of missing blocks
per image (1.9 GB of memory for 300 snapshots of a 1 GiB disk).

For every such image, once: first the hints (the access profile earlier mounts stored for this
snapshot, at most ``HINTS_UNOPENED`` of its blocks until the image is opened, and the user's
``--prefetch-list``) at HINT priority, the newest snapshots' first, ``HINT_BATCH`` blocks
queued at a time;
then, for an image in use, a scan of the block map that
finds which blocks are not cached yet (this is what ``stats`` reports as hydration progress;
it loads the map ``SCAN_PAGES`` pages a request, at BACKGROUND priority: the scan costs the
daemon's CPU, which reads need more; a read that needs a page the scan has not loaded yet
fetches it, and the pages around it, at once);
then, if background hydration is on, those blocks in disk order at BACKGROUND priority (the
hydrator queues them as runs). The sweep keeps about ``BACKLOG_RUNS`` full background runs
(``max_background_run`` bytes each) per background fetch slot queued, so that the hydrator's
runs reach their full length and every slot has a GET in flight; it pauses while reads are waiting on the store (unless the workload is
itself streaming the image, when full speed is better for everyone), the hydrator starts no
queued background fetch meanwhile, and ``--hydrate-rate`` throttles it in the hydrator.

A fetch that failed (the store was down, a blob is damaged) leaves its blocks missing, and a
scan that failed leaves its image unscanned: once the hydrator has no background work left, the
sweep tries them again, ``sweep_retry`` seconds later at first and twice as long after each
try (at most ``RETRY_MAX``), so that an image becomes whole once the store is back.

The newest snapshot of a lineage (one no served snapshot follows) that no mount has read yet
has no profile of its own; it takes the profile of its nearest ancestor that has one (at most
``PROFILE_ANCESTORS`` back). Its blocks are numbered alike and most of them hold what they held
then, so what the last mount of the disk read first (a filesystem's mount, the files a restore
looked at) is fetched before anyone asks, which is the first mount of the snapshot a user
reaches for after a loss: the newest one. Older snapshots without a profile get no borrowed
hints: every one of them would fetch the ancestor's set again, wherever it differs.

The prefetch list's format: ``snapfs.prefetch``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

from snapfs.errors import SnapfsError
from snapfs.format.block import ZERO_ID
from snapfs.hydration.scheduler import HydrationConfig, Hydrator, Priority
from snapfs.image.catalog import SnapshotCatalog
from snapfs.image.view import ImageView
from snapfs.prefetch import parse_prefetch_list

log = logging.getLogger(__name__)

BACKLOG_RUNS = 2
PRESCAN_REFRESH = 30.0
SCAN_PAGES = 8  # block-map pages the scan asks for at once (about 1 MiB, one GET)
RETRY_MAX = 3600.0  # the longest wait before blocks whose fetch failed are tried again
#: how far back the newest snapshot of a lineage looks for an ancestor's access profile
PROFILE_ANCESTORS = 8
#: profile blocks hinted at most for an image nobody has opened (the newest of a lineage,
#: before its first use; 64 MiB at 16 KiB): a profile of a whole image, left by a mount that
#: read it all, fetched it all for each such image. The rest comes once it is opened.
HINTS_UNOPENED = 4096
#: hinted blocks queued at a time: the next batch goes once fewer than this are left queued
#: (``Hydrator.hint_turn``), enough to keep every fetch slot on full runs
HINT_BATCH = 2048


class Sweeper:
    def __init__(self, catalog: SnapshotCatalog, hydrator: Hydrator, config: HydrationConfig) -> None:
        self.catalog = catalog
        self.hydrator = hydrator
        self.config = config
        self.prefetch = parse_prefetch_list(config.prefetch_list) if config.prefetch_list else {}
        self._hinted: dict[str, bool] = {}  # image -> hinted in full (else up to HINTS_UNOPENED)
        self._scanned: set[str] = set()
        #: image -> (trio clock of its next try, the wait after that) for missing blocks
        self._retry: dict[str, tuple[float, float]] = {}

    def _in_use(self) -> list[ImageView]:
        in_use = self.catalog.in_use
        return [v for v in self.catalog.images().values() if v.root.id in in_use]

    def _to_hint(self) -> list[ImageView]:
        """The images in use, the newest of each lineage, and those the prefetch list names."""
        images = self.catalog.images().values()
        followed = {v.root.parent for v in images}
        return self._in_use() + [v for v in images
                                 if v.root.id not in followed or v.name in self.prefetch]

    async def run(self) -> None:
        while True:
            changed = self.catalog.changed
            # the newest first: the snapshot a user mounts to restore from is most often the
            # last one, and each image's hints wait on a GET of its profile
            to_hint = {v.root.id: v for v in self._to_hint()}
            newest_first = sorted(to_hint.values(), key=lambda v: v.root.created, reverse=True)
            for view in newest_first:
                whole = view.root.id in self.catalog.in_use
                hinted = self._hinted.get(view.root.id)
                if hinted is None or whole and not hinted:
                    self._hinted[view.root.id] = whole
                    await self._guard(self._hint(view, None if whole else HINTS_UNOPENED), view)
            for view in self._in_use():
                if view.root.id not in self._scanned and self._due(view):
                    if await self._guard(self._scan_and_hydrate(view), view):
                        self._scanned.add(view.root.id)
            unfinished = [v for v in self._in_use() if self._unfinished(v)]
            for view in unfinished:
                if view.root.id in self._scanned and self.hydrator.background_idle() \
                        and self._due(view):
                    await self._guard(self._hydrate(view, list(view.pending)), view)
            wait = PRESCAN_REFRESH
            for view in unfinished:  # the next try, or a look whether the hydrator is idle
                at, _ = self._retry.get(view.root.id, (0.0, 0.0))
                wait = min(wait, max(at - trio.current_time(), self.config.sweep_retry))
            with trio.move_on_after(wait):
                await changed.wait()
            await self._guard(self.catalog.refresh(), None)

    def _unfinished(self, view: ImageView) -> bool:
        """``view`` is not scanned yet, or the sweep should fetch blocks it still misses."""
        if view.root.id not in self._scanned:
            return True
        return bool(view.pending) and self.config.background

    def _due(self, view: ImageView) -> bool:
        """Whether ``view``'s scan or missing blocks may be tried (again) now; if so, the
        next try waits twice as long as the last."""
        now = trio.current_time()
        at, delay = self._retry.get(view.root.id, (now, self.config.sweep_retry))
        if now < at:
            return False
        self._retry[view.root.id] = (now + delay, min(2 * delay, RETRY_MAX))
        return True

    async def _guard(self, work: object, view: ImageView | None) -> bool:
        """Background work must not take the daemon down: log its failures and go on (an
        unexpected one with its traceback: a bug, or an error nothing below wrapped). Returns
        whether it succeeded; what failed is tried again later (``_due``)."""
        name = view.name if view else "catalog"
        try:
            await work  # type: ignore[misc]
        except SnapfsError as e:
            log.warning("background work for %s stopped: %s", name, e)
            return False
        except Exception:
            log.exception("background work for %s failed", name)
            return False
        return True

    async def _hint(self, view: ImageView, most: int | None) -> None:
        """Queue the blocks of ``view``'s profile (the first ``most`` of them) and of the
        prefetch list's ranges in it (all of them: the user asked), ``HINT_BATCH`` at a time:
        this returns once the last batch is queued."""
        blocks = (await self._profile(view))[:most]
        for offset, length in self.prefetch.get(view.name, []):
            end = view.size if length is None else min(view.size, offset + length)
            blocks.extend(range(offset // view.block_size, -(-end // view.block_size)))
        if blocks:
            ids = await self._ids_of(view, blocks)
            missing = await trio.to_thread.run_sync(self.hydrator.cache.missing, ids)
            log.info("%s: %d hinted blocks to fetch (%d already cached)", view.name,
                     len(missing), len(ids) - len(missing))
            for i in range(0, len(missing), HINT_BATCH):  # a batch at a time: see hint_turn
                await self.hydrator.hint_turn(HINT_BATCH)
                self.hydrator.prefetch(missing[i : i + HINT_BATCH], Priority.HINT)

    async def _profile(self, view: ImageView) -> list[int]:
        """``view``'s access profile; for the newest snapshot of a lineage that has none, its
        nearest served ancestor's (see the module docstring)."""
        read_profile = self.hydrator.repo.read_profile
        blocks: list[int] = await trio.to_thread.run_sync(read_profile, view.root.id)
        if blocks:
            return blocks
        images = self.catalog.images().values()
        if any(v.root.parent == view.root.id for v in images):
            return []  # a later snapshot follows it
        ancestor = view
        for _ in range(PROFILE_ANCESTORS):
            parent = ancestor.root.parent
            found = self.catalog.by_snapshot_id(parent) if parent is not None else None
            if found is None:
                return []  # the first snapshot of its lineage, or its parent was deleted
            ancestor = found
            blocks = await trio.to_thread.run_sync(read_profile, ancestor.root.id)
            if blocks:
                log.info("%s: no access profile yet; hints from that of %s", view.name,
                         ancestor.name)
                return blocks
        return []

    async def _ids_of(self, view: ImageView, blocks: Iterable[int]) -> list[bytes]:
        out: dict[bytes, None] = {}
        for n in blocks:
            if 0 <= n < view.nblocks:
                bid = (await view.block_ids(n, n + 1))[0]
                if bid != ZERO_ID:
                    out[bid] = None
        return list(out)

    async def _scan_and_hydrate(self, view: ImageView) -> None:
        seen: set[bytes] = set()
        order: list[bytes] = []
        view.set_pending(set())
        pages = len(view.root.pages)
        for p in range(pages):
            if p % SCAN_PAGES == 0:
                await view.load_pages(range(p, min(pages, p + SCAN_PAGES)), Priority.BACKGROUND)
            ids = await view.page(p, Priority.BACKGROUND)
            fresh = [b for b in dict.fromkeys(ids) if b != ZERO_ID and b not in seen]
            seen.update(fresh)
            # pending before the cache is asked, and what it holds taken off after: a block
            # that a reader's fetch caches while the lookup runs on its thread is taken off
            # either way (by the lookup, or by the hydrator's notice), never left counted
            # missing with nothing to fetch
            view.add_pending(fresh)
            missing = await trio.to_thread.run_sync(self.hydrator.cache.missing, fresh)
            lacking = set(missing)
            view.blocks_cached([b for b in fresh if b not in lacking])
            order.extend(missing)
        view.data_blocks = len(seen)
        if self.config.background:
            await self._hydrate(view, order)

    async def _hydrate(self, view: ImageView, order: list[bytes]) -> None:
        """Queue the blocks of ``order`` still missing at BACKGROUND priority, in turns."""
        slots = max(1, self.config.fetchers - self.config.reserved)
        backlog_bytes = BACKLOG_RUNS * slots * self.config.max_background_run
        pending = view.pending
        i = 0
        while i < len(order):
            await self.hydrator.background_turn(backlog_bytes)
            # a backlog's worth at a time (in raw bytes, more than enough in stored ones), so
            # that the hydrator cuts runs of full length from it
            batch: list[bytes] = []
            nbytes = 0
            while i < len(order) and nbytes < backlog_bytes:
                raw = pending.get(order[i])
                if raw is not None:
                    batch.append(order[i])
                    nbytes += raw
                i += 1
            self.hydrator.prefetch(batch, Priority.BACKGROUND)
