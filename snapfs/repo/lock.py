"""Repository locks: shared for snapshot creation, exclusive for deleting blobs.

Why: a snapshot being created may reuse blobs that are already stored (dedup) before its root
exists; if a deletion collected those blobs meanwhile, the new snapshot would point at nothing.
So ``create`` holds a shared lock from before it loads the index until its root is stored, and
garbage collection holds an exclusive one. Removing a snapshot root alone is always safe.

A lock is an object ``locks/ID`` with its holder's host, pid, kind, the time it was taken
(``since``, which the "locked" error names) and the time it was last written. A lock is stale,
and ignored (and removed by the next exclusive locker), when its holder is a dead process on
this host (its pid gone, or taken by a process that started after the lock was written), or,
from another host, when it was not refreshed for ``STALE_AFTER`` seconds (holders refresh every
``REFRESH_EVERY``; every holder, exclusive ones too: a collection of a large repository may take
longer). A lock of a live process on this host is never stale, however old: it is in use. A lock
object that cannot be read is ignored by every locker and removed by ``unlock``.

Taking a lock: look for conflicting locks, write ours, look again. A shared locker's first try
skips the first look: only an exclusive lock conflicts with it, and one is held only while a
garbage collection runs, so the look would nearly always find nothing and cost a listing (tens
of milliseconds on S3) before every snapshot. Its tries after a conflict look first, not to
write a lock beside one that is known to be held. What a shared locker reads under its lock
(``acquire_waiting``'s ``then``: an upload's index) may be read beside the look after writing,
and is kept only if that look found no exclusive lock at all: one it waits for and sees go
(below) may have been held by a collection that did its work meanwhile. Two lockers that write
at about the same time both see each other after writing. Then the one whose key sorts after the
other's withdraws its lock and fails, and the one that sorts first waits up to ``RACE_WAIT`` for
it to do so: one of them proceeds (where both used to fail). Never both: whichever looked last
after writing saw the other's lock, and proceeds only if that lock was withdrawn. A lock that
sorts after ours and stays was taken before we wrote ours (its locker looked before we wrote);
we then fail after the wait, as the others do at once.

A host that died holding an exclusive lock would hold up every snapshot for ``STALE_AFTER``;
``snapfs unlock --all`` (``remove_locks``) lets its owner remove it sooner: every lock but those
of live processes on the host it runs on, which it can see are in use.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio

from snapfs.errors import ObjectNotFound, RepositoryLocked, SnapfsError
from snapfs.host import hostname, pid_alive, pid_started_after
from snapfs.repo.parallel import single_error
from snapfs.repo.repository import new_id
from snapfs.store.base import ObjectStore

log = logging.getLogger(__name__)

T = TypeVar("T")

STALE_AFTER = 30 * 60
#: seconds a snapshot (``snapshot create``, a disk's upload attempt) waits for a garbage
#: collection's exclusive lock before it fails: a forget or prune holds it for seconds
SNAPSHOT_LOCK_PATIENCE = 10.0
REFRESH_EVERY = 5 * 60
#: seconds a locker that wrote its lock beside a conflicting one sorting after it waits for that
#: one to be withdrawn (its locker takes a store listing and a delete to do so)
RACE_WAIT = 2.0


@dataclass
class LockInfo:
    key: str
    host: str
    pid: int
    kind: str
    purpose: str
    time: float  # when it was last written (refreshed)
    since: float  # when it was taken

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{self.purpose} (pid {self.pid} on {self.host}, since {when})"

    @property
    def stale(self) -> bool:
        """Ignored by every locker: its holder died on this host, or (elsewhere) stopped
        refreshing it."""
        if self.host == hostname():
            return not self.live_here
        return time.time() - self.time > STALE_AFTER

    @property
    def live_here(self) -> bool:
        """Held by a running process on this host: surely in use (a process that started
        after the lock was written has only inherited its pid)."""
        return self.host == hostname() and pid_alive(self.pid) \
            and not pid_started_after(self.pid, self.time)

    def as_dict(self) -> dict[str, object]:
        return {"id": self.key.removeprefix("locks/"), "kind": self.kind,
                "purpose": self.purpose, "host": self.host, "pid": self.pid,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.time)),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.since)),
                "stale": self.stale}


def read_locks(store: ObjectStore, unreadable: list[str] | None = None,
               but: str | None = None) -> list[LockInfo]:
    """Every lock in the repository but the one at key ``but`` (a locker's own, not read).
    An unreadable lock object is skipped, and its key added to ``unreadable`` if given (else
    logged: lockers ignore it, ``unlock`` removes it)."""
    found = []
    for key, _ in store.list("locks/"):
        if key == but:
            continue
        try:
            doc = json.loads(store.get(key))
            # (a lock written by a snapfs that did not record ``since``: its last write)
            found.append(LockInfo(key, str(doc["host"]), int(doc["pid"]), str(doc["kind"]),
                                  str(doc.get("purpose", "?")), float(doc["time"]),
                                  float(doc.get("since", doc["time"]))))
        except ObjectNotFound:
            continue
        except (ValueError, KeyError, TypeError):
            if unreadable is not None:
                unreadable.append(key)
            else:
                log.warning("ignoring unreadable lock object %s (`snapfs unlock` removes it)",
                            key)
    return found


def remove_locks(store: ObjectStore, everything: bool = False
                 ) -> tuple[list[LockInfo], list[LockInfo], list[str]]:
    """Remove the stale locks and the lock objects that cannot be read (every locker ignores
    them), or with ``everything`` every lock but those of live processes on this host (for a
    host that died holding one: only its owner knows it will not come back). The locks
    removed, the locks kept, and the keys of the unreadable objects removed."""
    removed: list[LockInfo] = []
    kept: list[LockInfo] = []
    unreadable: list[str] = []
    for info in read_locks(store, unreadable):
        if info.stale or (everything and not info.live_here):
            store.delete(info.key)
            removed.append(info)
        else:
            kept.append(info)
    for key in unreadable:
        store.delete(key)
    return removed, kept, unreadable


async def refresh_lock(lock: RepositoryLock, limiter: trio.CapacityLimiter) -> None:
    """Keep ``lock`` fresh while it is held (run it beside the work the lock covers, and
    cancel it after): other hosts take a lock not refreshed for ``STALE_AFTER`` as dead."""
    while True:
        await trio.sleep(REFRESH_EVERY)
        await trio.to_thread.run_sync(lock.refresh, limiter=limiter)


@asynccontextmanager
async def exclusively(store: ObjectStore, purpose: str, limiter: trio.CapacityLimiter,
                      ) -> AsyncIterator[None]:
    """The block runs under the repository's exclusive lock, taken at once or not at all
    (``RepositoryLocked``), kept fresh meanwhile and let go of after, even on an error (a
    removal that fails leaves a lock that goes stale). An error of the block comes out as
    itself, not in trio's group."""
    lock = RepositoryLock(store, "exclusive", purpose)
    await trio.to_thread.run_sync(lock.acquire, limiter=limiter)
    try:
        with single_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refresh_lock, lock, limiter)
                yield
                nursery.cancel_scope.cancel()
    finally:
        failing = sys.exc_info()[1] is not None
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lock.release_quietly, failing, limiter=limiter)


class RepositoryLock:
    def __init__(self, store: ObjectStore, kind: str, purpose: str) -> None:
        assert kind in ("shared", "exclusive")
        self.store = store
        self.kind = kind
        self.purpose = purpose
        self.key = f"locks/{new_id(8)}"
        self.host = hostname()
        self.started = time.time()  # when it was last tried for: when it was taken, once held
        self.held = False
        self._written = False  # (our lock object: maybe there from a write that failed)

    def _body(self) -> bytes:
        # a refresh keeps ``since``: the "locked" error says when the holder began, which for
        # a long collection is long before its last refresh
        now = time.time()
        if not self.held:
            self.started = now
        doc = {"host": self.host, "pid": os.getpid(), "kind": self.kind,
               "purpose": self.purpose, "time": now, "since": self.started}
        return json.dumps(doc).encode()

    def _others(self) -> list[LockInfo]:
        found = []
        for info in read_locks(self.store, but=self.key):
            if info.stale:
                if self.kind == "exclusive":
                    log.info("removing stale lock %s", info.describe())
                    self.store.delete(info.key)
                continue
            found.append(info)
        return found

    def _conflicts(self) -> list[LockInfo]:
        others = self._others()
        if self.kind == "exclusive":
            return others
        return [o for o in others if o.kind == "exclusive"]

    def acquire(self) -> RepositoryLock:
        """Take the lock (looking for conflicts first), or raise ``RepositoryLocked``."""
        blocking = self._conflicts()
        if blocking:
            raise self._locked(blocking)
        self._write()
        self._confirm()
        return self

    def _write(self) -> None:
        self._written = True  # (maybe: a PUT that failed may have been done)
        self.store.put(self.key, self._body())

    def _confirm(self) -> bool:
        """Look for conflicts once our lock is written: none, and it is held; else it is
        withdrawn and ``RepositoryLocked`` raised. Whether the first look found none: a
        conflicting lock that went away while we waited (``_after_a_race``) may have been a
        collection's that was held, not withdrawn, and did its work meanwhile."""
        seen = self._conflicts()
        blocking = self._after_a_race(seen)
        if blocking:
            self.store.delete(self.key)
            self._written = False
            raise self._locked(blocking)
        self.held = True
        return not seen

    def _locked(self, blocking: list[LockInfo]) -> RepositoryLocked:
        what = "; ".join(b.describe() for b in blocking)
        hint = "" if all(b.live_here for b in blocking) else \
            " (if that process is gone for good, `snapfs unlock --all` removes its lock)"
        return RepositoryLocked(f"{self.store.url} is locked by {what}; try again when it "
                                f"ends{hint}")

    def _after_a_race(self, blocking: list[LockInfo]) -> list[LockInfo]:
        """The conflicting locks left once lockers that wrote theirs beside ours have
        withdrawn them: all of ``blocking`` sort after our key, so their lockers back off if
        they saw ours (waited for up to ``RACE_WAIT``); any that sorts first, we back off."""
        deadline = time.monotonic() + RACE_WAIT
        while blocking and all(b.key > self.key for b in blocking) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            blocking = self._conflicts()
        return blocking

    async def acquire_waiting(self, patience: float,
                              limiter: trio.CapacityLimiter | None = None,
                              then: Callable[[], Awaitable[T]] | None = None) -> T | None:
        """``acquire`` (in a worker thread), tried again for up to ``patience`` seconds while
        another holds a conflicting lock: a garbage collection ends in seconds (a stale lock
        never does, so the wait is bounded). The waits are trio's, so cancellable.

        ``then`` is awaited once the lock is written, and its result returned: what it reads
        from the repository is as of a moment when the lock was in place, so no collection
        deletes it meanwhile. A shared lock's first try awaits it beside the look that
        confirms the lock, a round trip less before an upload; if that look finds any
        exclusive lock (even one that goes away while we wait for it: it may have been held,
        by a collection that did its work meanwhile), the result is dropped and ``then``
        awaited again once the lock is held. On an error (or a cancellation) no lock of ours
        is left."""
        deadline = trio.current_time() + patience
        delay = 0.1
        try:
            if self.kind == "shared":
                held, result = await self._write_and_read(limiter, then)
                if held:
                    return result
            while True:
                try:
                    await trio.to_thread.run_sync(self.acquire, limiter=limiter)
                    break
                except RepositoryLocked:
                    if trio.current_time() + delay > deadline:
                        raise
                await trio.sleep(delay)
                delay = min(2 * delay, 2.0)
            return await then() if then is not None else None
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._withdraw_quietly, limiter=limiter)
            raise

    async def _write_and_read(self, limiter: trio.CapacityLimiter | None,
                              then: Callable[[], Awaitable[T]] | None) -> tuple[bool, T | None]:
        """A shared lock's first try: written at once, then ``then`` awaited beside the look
        that confirms it (again after it, if that look found a conflict that went away).
        (False, None) if the look found a conflict that stayed (ours is withdrawn)."""
        await trio.to_thread.run_sync(self._write, limiter=limiter)
        result: list[T] = []

        async def read_beside() -> None:
            if then is not None:
                result.append(await then())

        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_beside)
                    clean = await trio.to_thread.run_sync(self._confirm, limiter=limiter)
        except RepositoryLocked:
            return False, None
        if then is not None and not clean:
            return True, await then()  # read beside a collection that ended meanwhile: again
        return True, result[0] if result else None

    def _withdraw_quietly(self) -> None:
        """Remove our lock object if it may be there (an error is on its way out: a failed
        removal is logged, and the lock goes stale)."""
        if self._written:
            try:
                self.store.delete(self.key)
            except SnapfsError as e:
                log.info("could not remove the lock %s (%s)", self.key, e.message)
        self._written = self.held = False

    def refresh(self) -> None:
        if self.held:
            self.store.put(self.key, self._body())

    def release(self) -> None:
        if self.held:
            self.store.delete(self.key)
            self.held = self._written = False

    def release_quietly(self, failing: bool = False) -> bool:
        """``release`` for a ``finally``: a store that fails now must not hide the error that
        is on its way out (nor turn a success into a failure). False if the lock object is
        still there: a dead process's lock is ignored at once on its host, and everywhere once
        ``STALE_AFTER`` has passed; a long-lived process should try again (``held`` stays).
        ``failing``: an error is on its way out (most likely the store's own, which this one
        repeats): the lock left behind is logged, not warned of, so the error stays one line."""
        try:
            self.release()
        except SnapfsError as e:
            log.log(logging.INFO if failing else logging.WARNING,
                    "could not remove the lock %s (%s); it will be let go later", self.key,
                    e.message)
            return False
        return True

    def __enter__(self) -> RepositoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
