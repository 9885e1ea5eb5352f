"""SnapshotCatalog: the images one mount serves, kept in step with the repository.

``refresh`` re-lists the snapshots (at most every ``interval`` seconds unless forced); new
snapshots get a view, deleted ones are dropped, and the repository index is reloaded if its
index objects changed (new snapshots' packs, or garbage collection's rewrite: through the
host's ``IndexCache`` when the daemon passes one, so only new index objects are fetched). The first list and index may come from ``load`` instead (the daemon
reads them while it starts). Views are stable objects: a refresh never replaces the view of a
snapshot that is still there, so open files keep their read-ahead state and statistics.

A refresh lists the roots' keys and fetches only the roots it has not read (a root is written
once): with hundreds of snapshots, fetching them all made every lookup of an unknown name wait
for a GET per snapshot. A root that cannot be read (damaged) is not served and never fails a
refresh: the other snapshots are served as ever, the daemon logs it once (again only if it is
repaired and damaged anew), and each refresh reads it again, in case it was put back. A root
damaged after it was read is not read again, so the mount serves its snapshot as it was read
(its blocks are intact); the commands that list snapshots report it, and garbage collection
refuses to run until it is deleted or repaired. Deleting the root drops it, as for any snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from snapfs.errors import SnapfsError
from snapfs.hydration.scheduler import Hydrator
from snapfs.image.view import PROFILE_MAX, ImageView
from snapfs.repo.indexcache import IndexCache
from snapfs.repo.repository import (
    BlobIndex,
    Repository,
    SnapshotListing,
    UnreadableRoot,
    warn_unreadable,
)

log = logging.getLogger(__name__)

#: seconds at least between two refreshes that are not forced (a lookup of an unknown name, a
#: listing): a process looking up many names that do not exist must not list the store each time
REFRESH_INTERVAL = 2.0


class SnapshotCatalog:
    def __init__(self, repo: Repository, hydrator: Hydrator, interval: float = REFRESH_INTERVAL,
                 index_cache: IndexCache | None = None) -> None:
        self.repo = repo
        self.index_cache = index_cache
        self.hydrator = hydrator
        self.interval = interval
        self._views: dict[str, ImageView] = {}  # file name -> view
        self._by_id: dict[str, ImageView] = {}
        self._unreadable: list[UnreadableRoot] = []  # as the last listing found them (logged)
        self._read = SnapshotListing()  # the roots read so far (the next refresh reads the rest)
        self._last_refresh = -1e9
        self._refreshing: trio.Event | None = None
        self._reads_begun = 0  # refreshes that began to read the repository
        self._read_finished = 0  # the number (in that count) of the last one that ended
        #: the error of the last refresh, if it failed
        self.failure: SnapfsError | None = None
        if index_cache is not None:
            self.hydrator.index_loader = lambda: repo.load_index(index_cache)
        self.hydrator.on_cached.append(self._blocks_cached)
        self.hydrator.on_save.append(self.save_profiles)
        #: the snapshots in use on this mount (opened, or a served disk's base): the ones the
        #: background sweep hydrates (by ID; kept for the mount's life, a deleted one too)
        self.in_use: set[str] = set()
        #: wakes the sweep when images appear or come into use
        self.changed = trio.Event()
        #: called after a refresh that added or dropped images (the FUSE adapter's names)
        self.on_change: list[Callable[[], None]] = []

    def images(self) -> dict[str, ImageView]:
        return self._views

    def use(self, snapshot_id: str) -> None:
        """The snapshot is in use here (opened, or the base of a served disk): the background
        sweep hydrates it from now on. Call on the trio thread."""
        if snapshot_id not in self.in_use:
            self.in_use.add(snapshot_id)
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def by_snapshot_id(self, snapshot_id: str) -> ImageView | None:
        return self._by_id.get(snapshot_id)

    def listing(self) -> SnapshotListing:
        """The snapshots served, and the roots the last listing could not read."""
        return SnapshotListing([v.root for v in self._views.values()], list(self._unreadable))

    async def refresh(self, force: bool = False, strict: bool = False) -> None:
        """Read the repository's snapshots (and new index objects) again, unless that was done
        less than ``interval`` ago (``force``: even then, by a read that begins after this call:
        one already under way may have listed the snapshots before the caller's change).
        ``strict``: a call that does not read them itself raises the error of the last refresh,
        if it failed (a lookup of a name not known must not be told that it does not exist
        while the repository cannot be read, whichever lookup the refresh ran for)."""
        if force:
            wanted = self._reads_begun + 1
            while self._read_finished < wanted:
                if self._refreshing is None:
                    await self._read_again()  # (raises its own failure)
                    return
                await self._refreshing.wait()  # one refresh at a time; others wait for it
            if self.failure is not None:  # the read it waited for failed
                raise self.failure
            return
        if self._refreshing is not None:
            await self._refreshing.wait()
        elif trio.current_time() - self._last_refresh >= self.interval:
            await self._read_again()
            return
        if strict and self.failure is not None:
            raise self.failure

    async def _read_again(self) -> None:
        self._refreshing = trio.Event()
        self._reads_begun += 1
        number = self._reads_begun
        try:
            listing = await trio.to_thread.run_sync(self.repo.list_snapshots_again, self._read)
            # new snapshots bring new index objects; garbage collection replaces them
            await self.hydrator.refresh_index()
            self._update(listing)
            self.failure = None
        except SnapfsError as e:
            self.failure = e
            raise
        finally:
            # a failed refresh waits its turn too: with the store down, every lookup of an
            # unknown name must not pay the store's retries again
            self._last_refresh = trio.current_time()
            self._read_finished = number
            self._refreshing.set()
            self._refreshing = None

    def load(self, listing: SnapshotListing, index: BlobIndex) -> None:
        """The first refresh, from what the daemon read while it started (``listing``, then
        ``index``, loaded after it: see ``Repository.snapshots_and_index``). Call on the trio
        thread: the next refresh that is not forced waits ``interval`` from now."""
        self.hydrator.index = index
        self._update(listing)
        self._last_refresh = trio.current_time()

    def _update(self, listing: SnapshotListing) -> None:
        """Views for the listed roots: the ones already there kept, new ones made, others
        dropped; roots that cannot be read logged when first found so."""
        known = set(self._unreadable)
        warn_unreadable([u for u in listing.unreadable if u not in known], self.repo.store.url,
                        "not served")
        self._unreadable = listing.unreadable
        self._read = listing
        views: dict[str, ImageView] = {}
        by_id: dict[str, ImageView] = {}
        for root in listing.roots:
            view = self._by_id.get(root.id)
            if view is None:
                name = f"{root.name}.img"
                if name in views:  # names are unique unless two creates raced
                    name = f"{root.name}-{root.id}.img"
                view = ImageView(self.repo, root, self.hydrator, name)
            views[view.name] = view
            by_id[root.id] = view
        appeared = by_id.keys() - self._by_id.keys()
        gone = self._by_id.keys() - by_id.keys()
        self._views, self._by_id = views, by_id
        if appeared:
            self._wake()
        if appeared or gone:
            for callback in self.on_change:
                callback()

    async def save_profiles(self) -> None:
        """Store each read image's access profile beside its snapshot: this mount's first reads
        first, then what earlier profiles had that this mount did not read. Runs at shutdown
        under the daemon's time limit: a store call that hangs is abandoned when it is reached
        (a profile is only a hint, and its PUT is atomic: late or never, it harms nothing), so
        the daemon exits in bounded time whatever the store does."""
        for view in list(self._views.values()):
            if not view.profile:
                continue
            old = await trio.to_thread.run_sync(self.repo.read_profile, view.root.id,
                                                abandon_on_cancel=True)
            mine = set(view.profile)
            merged = view.profile + [n for n in old if n not in mine]
            await trio.to_thread.run_sync(self.repo.write_profile, view.root.id,
                                          merged[:PROFILE_MAX], abandon_on_cancel=True)

    def _blocks_cached(self, block_ids: list[bytes]) -> None:
        for view in self._views.values():
            if view.pending:
                view.blocks_cached(block_ids)
