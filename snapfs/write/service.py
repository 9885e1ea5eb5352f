"""DiskService: the writable disks one daemon serves, and their snapshots.

It owns the disks' durable state (``state``), their overlays, the queue of snapshot uploads and
the pending snapshots that are readable while they upload. The mount daemon creates one per
repository and state directory (``STATE/disks/REPO-ID``, locked with ``flock`` so that only one
daemon on a host serves a repository's disks from one state directory; another one serves
snapshots only), and calls it from its control socket; the FUSE adapter asks it for disks and
pending snapshots.

Snapshots of disks (``snapshot``): every named disk's open generation is closed under all their
write locks at once (a consistency group when there are several), in one lmdb transaction that
also records the task, so the snapshot is one instant for all of them. Uploads then run one task
at a time, in order (a disk's next snapshot is incremental to the one before). A task ends
``accomplished`` (roots stored; the copy-on-write files dropped; the changed sets kept, for
``rollback``) or ``failed`` after retries (its changed blocks merge back into the open
generation, so the next snapshot uploads them; later tasks of the same disks fail with it, as
their parent is gone). A task whose pending snapshot a disk was created from never fails: it
keeps retrying (ever less often, at most 30 s apart), since that disk reads from it; nor does a
consistency group once its roots began to be stored (giving it up would leave the group
half-stored: each member alone, crash-consistent with nothing); one that can
never be stored (its kept blocks may be lost) waits, not retrying, until no disk reads from it,
then fails: it waits off the queue (parked), so that other disks' tasks go on meanwhile (later
tasks of its own disks wait with it, and fail with it). The closing is durable (with the closed
generations' marks, after their bytes) before it is acknowledged, so after kill -9 or a power
cut the next daemon finds the task still ``progressing`` and uploads it again from the durable
local copy, or finds its root stored already and takes it as it is. A part's end is recorded
durably before its copy-on-write file goes; what a cut leaves of a deleted disk or an ended
upload (journal and state entries, files) the next start deletes (``_drop_leftovers``).

Staging (``_stage_ahead``): while no upload runs, the changed blocks of open generations that
were not rewritten for a while are read, hashed and compressed ahead of their snapshot (paced
like an upload while disks are in use, and up to ``STAGE_BUDGET`` bytes held in memory), so a
snapshot's upload mostly finds its blocks ready: the snapshot of a disk changed minutes ago
costs its manifest pages and one pack, not the reading and compressing of every change.

Every method runs on the trio thread; blocking work goes to worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import trio

from snapfs.dirsync import make_dirs
from snapfs.errors import (
    DuplicateName,
    KeptBlocksLost,
    NotFoundError,
    ObjectNotFound,
    SnapfsError,
    SnapshotNotFound,
    UsageError,
)
from snapfs.format.manifest import SnapshotRoot
from snapfs.format.names import check_disk_name, group_snapshot_names
from snapfs.host import boot_id
from snapfs.hydration.scheduler import Hydrator, Priority
from snapfs.image.catalog import SnapshotCatalog
from snapfs.image.view import ImageView
from snapfs.niced import NicedWorkers, run_on
from snapfs.plural import counted
from snapfs.repo.create import default_snapshot_name, encode_chunk
from snapfs.repo.lock import SNAPSHOT_LOCK_PATIENCE, RepositoryLock
from snapfs.repo.parallel import single_error
from snapfs.repo.repository import BlobIndex, Repository, new_id, now_iso
from snapfs.write.bitmap import Bitmap
from snapfs.write.disk import ClosedGeneration, Disk, Image, PendingSnapshot, Staged, read_lower
from snapfs.write.overlay import Overlay, leftover_files
from snapfs.write.pacing import ForegroundPacer
from snapfs.write.state import DiskRecord, DiskState, SnapshotPart, SnapshotTask
from snapfs.write.uploader import UploadProgress, shared_lock, upload_generation

T = TypeVar("T")
log = logging.getLogger(__name__)

#: the largest disk: the last 512-byte boundary a file offset (off_t) can reach
MAX_DISK_SIZE = (1 << 63) - 512
UPLOAD_ATTEMPTS = 3
RETRY_DELAY = 2.0
DEPENDED_RETRY_DELAY = 30.0
KEEP_FAILED = 20
HOLD_RETRY = 30.0  # seconds before a hold that could not be stored is tried again
LOCK_PATIENCE = 30.0  # seconds a disk create or rollback waits for a gc's exclusive lock
LOCK_RETRY = 3.0  # seconds between tries to remove a lock whose removal failed
RELEASE_GRACE = 2.0  # seconds a closed handle may take to be released by the kernel
#: staging: a block is staged once a pass finds it not rewritten since the previous pass
STAGE_INTERVAL = 0.5
STAGE_BATCH = 64  # blocks read and encoded per step (1 MiB at 16 KiB)
STAGE_PASS = 4096  # blocks at most per disk and pass
STAGE_BUDGET = 64 << 20  # compressed bytes held staged, over every disk and closed generation


async def stage_blocks(repo: Repository, index: BlobIndex, disk: Disk, blocks: list[int],
                       cpu: NicedWorkers | None = None) -> None:
    """Read, hash and compress ``blocks`` of ``disk``'s open generation ahead of its snapshot."""
    contents = await disk.read_for_staging(blocks)
    disk.stage(blocks, await encode_staged(repo, index, contents, cpu))


async def encode_staged(repo: Repository, index: BlobIndex, contents: list[bytes],
                        cpu: NicedWorkers | None = None) -> list[Staged]:
    """``contents`` hashed, and compressed where the repository does not hold them (in a
    thread: one of ``cpu``'s, which give way to the disks' I/O, if given)."""
    ids, new, _zeros = await run_on(cpu, encode_chunk, repo, b"".join(contents), index, set())
    blobs = {bid: (blob, raw) for bid, blob, raw in new}
    return [Staged(bid, *blobs.get(bid, (None, len(data))))
            for bid, data in zip(ids, contents, strict=True)]


class DiskBusy(SnapfsError):
    """A disk that is open, attached or uploading cannot be changed that way now."""


class DiskService:
    def __init__(self, state_dir: str | os.PathLike[str], repo: Repository, hydrator: Hydrator,
                 catalog: SnapshotCatalog, disk_path: Callable[[str], str] | None = None,
                 upload_lock_patience: float = SNAPSHOT_LOCK_PATIENCE) -> None:
        self.repo = repo
        self.hydrator = hydrator
        self.catalog = catalog
        self.dir = Path(state_dir) / "disks" / repo.config.id
        #: where the kernel sees a disk's image (to find loop devices attached to it)
        self.disk_path = disk_path or (lambda name: name)
        #: seconds each upload attempt waits for a garbage collection's exclusive lock
        self.upload_lock_patience = upload_lock_patience
        self.disks: dict[str, Disk] = {}
        self.pending: dict[str, PendingSnapshot] = {}  # snapshot id -> view, while uploading
        self.tasks: dict[str, SnapshotTask] = {}
        self.progress: dict[str, UploadProgress] = {}  # snapshot id -> its upload's progress
        self.stored: dict[str, SnapshotRoot] = {}  # roots this daemon uploaded
        self.enabled = False
        self.disabled_reason: str | None = None
        self._lock_fd: int | None = None
        self._state: DiskState | None = None
        self._loaded_changed: dict[str, dict[int, list[int]]] = {}  # between open and start
        self._queue_send, self._queue_recv = trio.open_memory_channel[str](1000)
        self._current: SnapshotTask | None = None  # the task the queue is uploading
        #: tasks that can never be stored, kept off the queue while disks read from them
        #: (``_park``); later tasks of their disks wait with them, other disks' tasks go on
        self._parked: dict[str, SnapshotTask] = {}
        self._run_nursery: trio.Nursery | None = None
        self._finished: dict[str, trio.Event] = {}  # task id -> set when it ends
        self._uploading = 0  # uploads running now: the sweep yields to them too
        #: snapshots closed by this daemon whose upload has not begun: no root of theirs can
        #: be stored, so their first attempt need not ask the store (``_store_part``)
        self._never_tried: set[str] = set()
        #: background disk work (uploads, staging) gives way to the disks' reads and writes
        self.pacer = ForegroundPacer(self._last_io)
        #: the threads that hash and compress for uploads and staging, at the lowest priority
        self.cpu = NicedWorkers()
        hydrator.foreground.append(self._last_foreground)  # the sweep yields to disk I/O
        #: called when disks or pending snapshots come or go, with the name of a disk whose
        #: contents were rewritten (a rollback) if any: the FUSE adapter invalidates its caches
        self.changed: list[Callable[[str | None], None]] = []
        self._holds_stale = trio.Event()  # set when what the disks need may have changed
        #: set (and replaced) when disks were created, rolled back or deleted: any number of
        #: tasks may wait on it
        self._disks_changed = trio.Event()
        self._hold_lock = trio.Lock()
        #: repository locks whose removal failed (the store was down): let go of later, or
        #: every garbage collection would wait for them to go stale (30 minutes)
        self._unreleased: list[RepositoryLock] = []
        self._hold_stored: dict[str, str] | None = None  # the hold as stored, once known
        #: (snapshot id, why) of changes about to make a disk need a snapshot (``_needing_stored``)
        self._about_to_need: list[tuple[str, str]] = []
        self._holder_id: str | None = None

    def _make_room(self, nbytes: int) -> None:
        """Before a disk's write adds up to ``nbytes`` to its files: the block cache, on the
        same file system, evicts to leave them free (a disk's blocks have no other copy)."""
        self.hydrator.cache.ensure_free(nbytes)

    # -- start and stop ----------------------------------------------------------------------

    def open(self) -> None:
        """Take the state directory's lock and load every disk (blocking: before trio runs or
        in a thread). Without the lock, disks are not served here (``enabled`` is False)."""
        make_dirs(self.dir)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.disabled_reason = f"another snapfs daemon serves the disks of {self.dir}"
            log.warning("%s; this one serves snapshots only", self.disabled_reason)
            return
        self._lock_fd = fd
        self._state = DiskState(self.dir)
        trusted = self._state.start(boot_id())
        if not trusted:
            log.warning("the last daemon did not stop cleanly before a reboot: changed-block "
                        "records may miss writes; the next snapshot of each disk compares "
                        "checksums instead")
        self.enabled = True
        records = self._state.disks()
        for record in records:
            self._load_disk(record)
            failed_before = self.disks[record.name].overlay.failed_before
            if failed_before is not None:
                log.warning("disk %s: a flush failed before this start (%s); its changed-block "
                            "record is not trusted, and its snapshots still uploading fail if "
                            "they need contents kept aside that it may have lost",
                            record.name, failed_before)
            if (not trusted or failed_before is not None) and record.trusted:
                record.trusted = False
                self._state.put_disk(record)
            # a dead daemon's journal (kill -9; after a reboot it is gone): its disks' bytes
            # are flushed, then their marks made durable
            self._state.sync(record, self.disks[record.name].overlay.sync_all)
        for task in self._state.tasks():
            self.tasks[task.id] = task
        self._drop_leftovers()

    def _drop_leftovers(self) -> None:
        """Delete what a kill -9 or a power cut left of disks that are gone and of uploads that
        ended (in ``disk delete`` or ``create``, or at an upload's end, between the durable
        commit and the rest): their journal and state entries and their files (removals are
        not synced: see ``overlay``). Files beside a state that was never started are kept
        (a state directory that lost its environment: they are not known to be leftovers)."""
        state = self._state
        assert state is not None
        disk_ids = {d.record.id for d in self.disks.values()}
        uploading = {(p.disk_id, p.gen) for t in self.tasks.values() if t.state == "progressing"
                     for p in t.parts if not p.done}
        try:
            dropped = state.drop_leftovers(disk_ids, uploading)
            if dropped:
                log.info("dropped %d state entries of deleted disks or ended uploads", dropped)
            files = leftover_files(self.dir, disk_ids, uploading)
            if files and state.fresh:
                log.warning("%s: files of no known disk beside a new disk state (%s); kept",
                            self.dir, ", ".join(p.name for p in files))
                return
            for path in files:
                log.info("deleting %s, left by a deleted disk or an ended upload", path.name)
                path.unlink(missing_ok=True)
        except (OSError, lmdb.Error) as e:  # only space is lost: the disks are served all the same
            log.warning("could not delete what deleted disks or ended uploads left: %s", e)

    def _load_disk(self, record: DiskRecord) -> None:
        assert self._state is not None
        overlay = Overlay(self.dir, record.id, record.size, self._make_room)
        present = Bitmap(record.nblocks, self._state.present(record))
        changed = self._state.changed(record)
        disk = Disk(record, self._state, overlay, None, present,
                    Bitmap(record.nblocks, changed.get(record.gen, ())))
        self._loaded_changed[record.name] = changed
        self.disks[record.name] = disk

    async def start(self) -> None:
        """After the catalog's first refresh: resolve bases, rebuild pending snapshots of
        uploads a dead daemon left, and queue them."""
        if not self.enabled:
            return
        assert self._state is not None
        for task, part, disk in self._unfinished_parts():
            blocks = self._loaded_changed.get(disk.name, {}).get(part.gen, [])
            closed = ClosedGeneration(part.gen, Bitmap(disk.nblocks, blocks), task.id,
                                      part.snapshot_id)
            closed.cowed = await trio.to_thread.run_sync(self._state.cow, disk.record, part.gen)
            disk.closed.append(closed)
        self._loaded_changed.clear()
        # pending views, in task order, so each one's lower image exists before it is needed
        for _task, part, disk in self._unfinished_parts():
            closed = next(c for c in disk.closed if c.gen == part.gen)
            self._add_pending(disk, closed, part)
        for task in sorted(self.tasks.values(), key=lambda t: t.created):
            if task.state != "progressing":
                continue
            log.info("resuming the upload of snapshot task %s (%s)", task.id,
                     ", ".join(p.name for p in task.parts))
            self._queue_send.send_nowait(task.id)
        for disk in self.disks.values():
            try:
                disk.base = await self._image(disk.record.base)
            except SnapshotNotFound as e:
                log.error("disk %s: %s", disk.name, e.message)
                disk.base = MissingImage(e.message)

    def _unfinished_parts(self) -> list[tuple[SnapshotTask, SnapshotPart, Disk]]:
        """(task, part, disk) of every part still to upload, oldest task first."""
        out = []
        for task in sorted(self.tasks.values(), key=lambda t: t.created):
            if task.state == "progressing":
                out += [(task, part, self.disks[part.disk]) for part in task.parts
                        if not part.done and part.disk in self.disks]
        return out

    def close(self) -> None:
        """Flush every disk and record a clean stop, only if every disk was flushed: a
        clean stop lets the next start after a reboot trust the changed sets and delete the
        journal unread, so a disk whose marks are still only in the journal must leave the
        state unclean (its next snapshot then compares checksums, and misses nothing)."""
        for lock in self._unreleased:  # a last try; else they go stale (see ``repo.lock``)
            lock.release_quietly()
        flushed = True
        for disk in self.disks.values():
            try:
                if self._state is not None:
                    self._state.sync(disk.record, disk.overlay.sync)
                disk.overlay.close()
            except (OSError, lmdb.Error, SnapfsError) as e:
                flushed = False
                log.error("disk %s: could not flush it at the stop (%s); its writes since "
                          "the last fsync may not survive a power cut", disk.name, e)
        if self._state is not None:
            try:
                if flushed:
                    self._state.stop()
                else:
                    log.error("the disks' state is left marked as not stopped cleanly: after "
                              "a reboot, the next snapshot of each disk compares checksums")
            except (OSError, lmdb.Error) as e:
                log.error("could not record a clean stop of the disks' state (%s): after a "
                          "reboot, the next snapshot of each disk compares checksums", e)
            finally:
                self._state.close()
                self._state = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.cpu.close()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The upload queue: one task at a time, in the order they were closed."""
        async with trio.open_nursery() as nursery:
            self._run_nursery = nursery
            nursery.start_soon(self._stage_ahead)
            nursery.start_soon(self._publish_holds)
            nursery.start_soon(self._let_go_of_locks)
            task_status.started()
            async for task_id in self._queue_recv:
                task = self.tasks.get(task_id)
                if task is not None and any(task in self._doomed_with(parked)
                                            for parked in self._parked.values()):
                    continue  # it needs a parked task's snapshot: it fails with it
                if task is not None and task.state == "progressing":
                    self._current = task
                    try:
                        await self._upload_task(task)
                    finally:
                        self._current = None
            nursery.cancel_scope.cancel()

    async def _stage_ahead(self) -> None:
        """Stage quiet changed blocks of the open generations, one batch at a time, while no
        upload runs and the budget allows (see the module's docstring)."""
        while True:
            await trio.sleep(STAGE_INTERVAL)
            for disk in list(self.disks.values()):
                if not disk.record.trusted:  # its next snapshot compares every written block
                    continue
                if not self._may_stage():
                    break  # before the scan for candidates, a walk of the changed set
                blocks = disk.stage_candidates(STAGE_PASS)
                for at in range(0, len(blocks), STAGE_BATCH):
                    if not self._may_stage() or self.disks.get(disk.name) is not disk:
                        break
                    started = trio.current_time()
                    await self._stage_batch(disk, blocks[at : at + STAGE_BATCH])
                    await self.pacer.pace(trio.current_time() - started)

    async def _stage_batch(self, disk: Disk, blocks: list[int]) -> None:
        try:
            await stage_blocks(self.repo, self.hydrator.index, disk, blocks, self.cpu)
        except (OSError, ValueError) as e:  # the disk was deleted meanwhile
            log.debug("staging blocks of disk %s: %s", disk.name, e)

    def _may_stage(self) -> bool:
        """No upload runs, and the staged bytes of every disk and closed generation are
        within the budget."""
        staged = sum(d.staged_bytes + sum(c.staged_bytes for c in d.closed)
                     for d in self.disks.values())
        return not self._uploading and staged < STAGE_BUDGET

    # -- looking things up -------------------------------------------------------------------

    def _require(self) -> DiskState:
        if self._state is None:
            raise SnapfsError(self.disabled_reason or "this daemon does not serve disks")
        return self._state

    def disk(self, name: str) -> Disk:
        self._require()
        disk = self.disks.get(name)
        if disk is None:
            raise NotFoundError(f"no disk named {name!r}")
        return disk

    async def _image(self, snapshot_id: str | None) -> Image | None:
        """The image of a stored or pending snapshot, by ID (None for None), as the base of a
        disk: the background sweep hydrates it from now on (so the disk becomes local)."""
        if snapshot_id is None:
            return None
        self.catalog.use(snapshot_id)
        pending = self.pending.get(snapshot_id)
        if pending is not None:
            return pending
        return await self._find_stored(snapshot_id, "a disk made from it cannot read its blocks")

    def _stored_view(self, snapshot_id: str) -> ImageView | None:
        """The view of a stored snapshot: the catalog's (whose pages every reader shares), or
        one over a root this daemon stored that the catalog has not listed yet."""
        view = self.catalog.by_snapshot_id(snapshot_id)
        root = self.stored.get(snapshot_id)
        if view is None and root is not None:
            view = ImageView(self.repo, root, self.hydrator, f"{root.name}.img")
        return view

    async def _parents_gone(self, disks: list[Disk]) -> set[str]:
        """The stored parents of ``disks`` (what their next snapshots would be incremental to)
        that a fresh listing of the repository no longer has: deleted behind the disk's back
        (``snapshot delete --force`` while no daemon ran, or after a daemon was killed before
        it stored the hold naming a new parent). A snapshot incremental to one would reference
        pages garbage collection deleted, so it was refused for ever; it is made against the
        disk's base instead (which reads every block the disk did not write), comparing the
        checksums of the blocks it did. Nothing is taken for gone while the repository cannot
        be listed: that raises, and the snapshot is refused now rather than made in vain."""
        parents = {d.record.parent for d in disks if not d.closed and d.record.parent is not None}
        parents -= self.pending.keys()
        if not any(self._stored_view(p) is None for p in parents):
            return set()
        await self.catalog.refresh(force=True)
        gone = {p for p in parents if self._stored_view(p) is None}
        for disk in disks:
            base = disk.record.base
            if disk.record.parent in gone and base is not None and base not in self.pending \
                    and self._stored_view(base) is None:
                which = (f"its base snapshot {base} is" if base == disk.record.parent else
                         f"its parent snapshot {disk.record.parent} and its base {base} are")
                raise SnapshotNotFound(
                    f"disk {disk.name}: {which} no longer in the repository: the blocks it did "
                    f"not write cannot be read, so no snapshot of it can be made")
        return gone

    async def _find_stored(self, snapshot_id: str, needed_for: str) -> ImageView:
        """``_stored_view``, listing the repository again if it is not known yet."""
        view = self._stored_view(snapshot_id)
        if view is None:
            await self.catalog.refresh(force=True)
            view = self._stored_view(snapshot_id)
        if view is None:
            raise SnapshotNotFound(f"snapshot {snapshot_id} is not in the repository (deleted?); "
                                   f"{needed_for}")
        return view

    async def resolve(self, ref: str) -> tuple[str, int, str]:
        """(snapshot ID, size, name) of a stored or pending snapshot named or ID-prefixed
        ``ref``."""
        for view in self.pending.values():
            if ref in (view.snapshot_id, view.snapshot_name):
                return view.snapshot_id, view.size, view.snapshot_name
        try:  # the snapshots known already (refreshed every few seconds), else a fresh listing
            root = self.repo.resolve(ref, self.catalog.listing())
        except SnapshotNotFound:
            await self.catalog.refresh(force=True)
            root = self.repo.resolve(ref, self.catalog.listing())
        return root.id, root.size, root.name

    def _taken_names(self) -> set[str]:
        names = {v.root.name for v in self.catalog.images().values()}
        names |= {v.snapshot_name for v in self.pending.values()}
        return names

    # -- disks ---------------------------------------------------------------------------------

    async def create_disk(self, name: str, source: str | None, size: int | None) -> Disk:
        state = self._require()
        check_disk_name(name)
        if name in self.disks:
            raise DuplicateName(f"a disk named {name!r} already exists")
        bs = self.repo.block_size
        if source is None:
            if size is None:
                raise UsageError("give --from SNAP, --size SIZE, or both")
            snapshot_id, base_size, source_name = None, 0, None
        else:
            snapshot_id, base_size, source_name = await self.resolve(source)
            if size is None:
                size = base_size
            elif size < base_size:
                raise UsageError(f"a disk cannot be smaller than its snapshot: {source_name} is "
                                 f"{base_size} bytes, --size asks for {size}")
        if size <= 0 or size % 512:
            raise UsageError(f"disk size must be a positive multiple of 512 bytes, not {size}")
        if size > MAX_DISK_SIZE:  # past what a file offset can say: no overlay could be made
            raise UsageError(f"disk size must be at most 8 EiB ({MAX_DISK_SIZE} bytes), not {size}")
        record = DiskRecord(name=name, id=new_id(), size=size, block_size=bs,
                            base=snapshot_id, parent=snapshot_id, source=source_name,
                            created=now_iso(), gen=1,
                            lineage=[[snapshot_id, 0]] if snapshot_id else [])
        base = await self._image(snapshot_id)

        def create() -> Overlay:
            overlay = Overlay(self.dir, record.id, size, self._make_room)
            state.put_disk(record)
            return overlay

        async def make() -> Disk:
            if name in self.disks:  # made meanwhile, while we waited for the lock
                raise DuplicateName(f"a disk named {name!r} already exists")
            overlay = await trio.to_thread.run_sync(create)
            disk = Disk(record, state, overlay, base, Bitmap(record.nblocks),
                        Bitmap(record.nblocks))
            self.disks[name] = disk
            return disk

        disk = await self._needing_stored(snapshot_id, f"disk create {name}", make)
        try:
            await self._pad_short_base_block(disk)
        except BaseException:
            # not made after all (the store failed): no one can have opened it, since the file
            # system learns of a disk only once it is made
            with trio.CancelScope(shield=True):
                await self._remove(disk)
            self._notify()
            raise
        log.info("disk %s created (%d bytes, from %s)", name, size, source_name or "nothing")
        self._notify()
        return disk

    async def _pad_short_base_block(self, disk: Disk) -> None:
        """A disk bigger than a base whose size is not a whole number of blocks: the base's
        short last block is a whole block of the disk (zeros after the base's end). It is
        written to the overlay as such (and so counts as changed), because a snapshot's
        manifest may hold a short block only at its very end: by ``create_disk`` and
        ``rollback``, and again by ``snapshot`` in case the store failed them (or the daemon
        died) before it was made."""
        base, bs = disk.base, disk.block_size
        if base is None or base.size >= disk.size or not base.size % bs:
            return
        n = base.size // bs
        if n not in disk.present:
            length = min(bs, disk.size - n * bs)
            await disk.write(n * bs, await read_lower(base, n * bs, length))

    async def _check_idle(self, disk: Disk, doing: str) -> None:
        # The kernel releases a file (and a detached loop device its backing file) a moment
        # after close() returns: give handles that are going away that moment.
        with trio.move_on_after(RELEASE_GRACE):
            await disk.idle.wait()
        self._check_still_idle(disk, doing)

    def _check_still_idle(self, disk: Disk, doing: str) -> None:
        """``_check_idle`` without the grace: also for after an ``await`` that may have let
        someone open or attach the disk, snapshot it, or delete it."""
        if self.disks.get(disk.name) is not disk:
            raise NotFoundError(f"cannot {doing} disk {disk.name}: it was deleted meanwhile")
        loops = attached_loops(self.disk_path(disk.name))
        if loops:
            raise DiskBusy(f"cannot {doing} disk {disk.name}: it is attached to "
                           f"{', '.join(loops)} (detach it with losetup -d)")
        if disk.opens:
            raise DiskBusy(f"cannot {doing} disk {disk.name}: it is open "
                           f"({counted(disk.opens, 'handle')})")
        if disk.closing:
            raise DiskBusy(f"cannot {doing} disk {disk.name}: a snapshot of it is being taken")
        if disk.closed:
            raise DiskBusy(f"cannot {doing} disk {disk.name}: its snapshot "
                           f"{disk.closed[0].snapshot_name} is still uploading")

    async def delete_disk(self, name: str) -> None:
        disk = self.disk(name)
        await self._check_idle(disk, "delete")
        await self._remove(disk)
        log.info("disk %s deleted", name)
        self._notify()

    async def _remove(self, disk: Disk) -> None:
        """Forget ``disk`` (which no one has open) and delete its state and files."""
        state = self._require()
        name = disk.name

        def remove() -> None:
            disk.overlay.close()
            disk.overlay.remove()

        del self.disks[name]  # opened by no one while its state is deleted
        try:
            await trio.to_thread.run_sync(state.delete_disk, disk.record)
        except BaseException:
            self.disks[name] = disk  # the state has it still: so does the daemon
            raise
        try:
            await trio.to_thread.run_sync(remove)
        except OSError as e:  # deleted all the same: its files are left for the next start
            log.warning("disk %s deleted, but its files were not (%s); the next start "
                        "deletes them", name, e)

    async def rollback(self, name: str, ref: str) -> dict[str, Any]:
        """Make disk ``name`` equal snapshot ``ref``: resetting only the blocks that changed
        since when ``ref`` is one of the disk's own snapshots or its source, else every block
        it wrote. A rollback never shrinks a disk: past the end of a smaller snapshot (the
        source of a disk created bigger) it reads zeros, as it did when it was created."""
        state = self._require()
        started = time.monotonic()
        timings: dict[str, float] = {}

        def lap(what: str) -> None:
            timings[what] = round(time.monotonic() - started - sum(timings.values()), 4)

        disk = self.disk(name)
        await self._check_idle(disk, "roll back")
        lap("idle_check")
        snapshot_id, size, snap_name = await self.resolve(ref)
        lap("resolve")
        if snapshot_id in self.pending:
            raise DiskBusy(f"snapshot {snap_name} is still uploading; roll back once it is stored")
        base = await self._image(snapshot_id)

        async def reset_to_snapshot() -> tuple[bool, list[int]]:
            async with disk.write_lock:
                # checked again: the wait for the repository's lock (seconds, while a gc holds
                # it) left time to open, attach, snapshot or delete the disk
                self._check_still_idle(disk, "roll back")
                record = disk.record
                at = next((i for i, (sid, _g) in enumerate(record.lineage) if sid == snapshot_id),
                          None)
                # the changed sets tell what differs from one of the disk's own snapshots only
                # while they are trusted: after an unclean reboot they may miss writes (see
                # ``boot_id``), and then every block the disk holds is reset instead
                if at is not None and size <= record.size and record.trusted:
                    since_gen = record.lineage[at][1]
                    changed = await trio.to_thread.run_sync(state.changed, record)
                    drop = [g for g in changed if g > since_gen]
                    reset = sorted({n for g in drop for n in changed[g]})
                    new = dataclasses.replace(record, base=snapshot_id, parent=snapshot_id,
                                              gen=record.gen + 1, lineage=record.lineage[: at + 1],
                                              trusted=True)
                    clear_all = False
                else:
                    drop = list(range(0, record.gen + 1))
                    reset = []
                    new = dataclasses.replace(record, base=snapshot_id, parent=snapshot_id,
                                              size=max(size, record.size), gen=record.gen + 1,
                                              lineage=[[snapshot_id, record.gen]],
                                              trusted=True)
                    clear_all = True

                def apply() -> None:
                    # Reset blocks keep their space in the overlay (a later write reuses it; the
                    # disk's deletion frees it): punching a hole per block costs a syscall each,
                    # and rollback must cost what changed, with as little per block as possible.
                    state.rollback(new, reset, drop, clear_all, disk.overlay.sync)
                    if clear_all:
                        disk.overlay.clear()
                        disk.overlay.grow(new.size)

                lap("plan")
                await trio.to_thread.run_sync(apply)
                lap("apply")
                disk.record = new
                disk.base = base
                if clear_all:
                    disk.present = Bitmap(new.nblocks)
                else:
                    for n in reset:
                        disk.present.discard(n)
                disk.changed = Bitmap(new.nblocks)
                disk.unstage_all()
            return clear_all, reset

        clear_all, reset = await self._needing_stored(snapshot_id, f"disk rollback {name}",
                                                      reset_to_snapshot)
        await self._pad_short_base_block(disk)
        self._notify(rewritten=name)
        lap("notify")
        log.info("disk %s rolled back to %s (%s)", name, snap_name,
                 "all written blocks reset" if clear_all else f"{counted(len(reset), 'block')} reset")
        return {"disk": name, "snapshot": snapshot_id, "snapshot_name": snap_name,
                "blocks_reset": len(reset) if not clear_all else None, "whole_overlay": clear_all,
                "seconds": round(time.monotonic() - started, 4), "timings": timings}

    def disk_list(self) -> list[dict[str, Any]]:
        self._require()
        return [self.disk_facts(disk) for _, disk in sorted(self.disks.items())]

    def disk_facts(self, disk: Disk) -> dict[str, Any]:
        """What ``disk list`` says of ``disk``: its stats, with the image's path (for
        ``losetup`` and scripts) and its base's name as it is now (``_source_now``)."""
        return {**disk.stats(), **self._source_now(disk), "path": self.disk_path(disk.name)}

    def _source_now(self, disk: Disk) -> dict[str, Any]:
        """``source`` (the name of the disk's base) as the snapshots are named now: a base
        deleted behind the disk's back (``snapshot delete --force`` while no daemon ran) left
        its old name, which another snapshot may have taken since. Then None, and
        ``base_deleted``. While the repository cannot be listed, the name it had."""
        base = disk.record.base
        if base is None:
            return {"base_deleted": False}
        pending = self.pending.get(base)
        if pending is not None:
            return {"source": pending.snapshot_name, "base_deleted": False}
        view = self.catalog.by_snapshot_id(base)
        if view is not None:
            return {"source": view.root.name, "base_deleted": False}
        if self.catalog.failure is not None:
            return {"base_deleted": False}
        return {"source": None, "base_deleted": True}

    # -- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, names: list[str], name: str | None = None, tags: list[str] | None = None,
                       consistency: str = "crash", deadline: float | None = None) -> SnapshotTask:
        """Close the open generation of every disk in ``names`` at one instant and queue the
        upload. ``deadline``: seconds within which the closing must happen for the requested
        ``consistency`` to hold (a frozen file system is waiting); later, it is ``crash``."""
        state = self._require()
        if not names:
            raise UsageError("no disk named")
        disks = [self.disk(n) for n in dict.fromkeys(names)]
        taken = self._taken_names()
        given = group_snapshot_names(name, [d.name for d in disks]) if name is not None else None
        parts = []
        for i, disk in enumerate(disks):
            if given is None:
                snap_name = default_snapshot_name(disk.name, taken)
            else:
                snap_name = given[i]
                if snap_name in taken:
                    raise DuplicateName(f"a snapshot named {snap_name!r} already exists")
            taken.add(snap_name)
            parts.append(SnapshotPart(disk=disk.name, disk_id=disk.record.id, gen=0,
                                      snapshot_id=new_id(), name=snap_name, parent=None,
                                      size=disk.size))
        task = SnapshotTask(id=new_id(), state="progressing", created=now_iso(), parts=parts,
                            group=new_id() if len(disks) > 1 else None, tags=list(tags or []),
                            consistency=consistency)
        # a delete or rollback meanwhile is refused (``_check_still_idle``): the flush below
        # gives them time, and the closing must not find its disk gone
        with _being_closed(disks):
            for disk in disks:  # if a pad was not made (the store failed in a rollback)
                await self._pad_short_base_block(disk)
            gone = await self._parents_gone(disks)
            # most of what the closing flushes, before it holds the disks' write locks
            await trio.to_thread.run_sync(_flush, disks)
            started = trio.current_time()
            async with _write_locks(disks):
                task.created = now_iso()  # the snapshots' point in time, their roots' ``created``
                if deadline is not None and trio.current_time() - started > deadline:
                    task.consistency = "crash"
                for disk, part in zip(disks, parts, strict=True):
                    # its size too as of this instant: a rollback that held the disk while
                    # this closing waited for it may have grown it
                    part.size = disk.size
                    part.parent = disk.closed[-1].snapshot_id if disk.closed else disk.record.parent
                    why = None
                    if part.parent in gone:
                        why = (f"its parent snapshot {part.parent} is no longer in the "
                               f"repository; its snapshot is made against its base "
                               f"{disk.record.base or '(none: an empty disk)'}")
                        part.parent = disk.record.base
                    elif not disk.record.trusted:
                        why = "its changed-block record is not trusted after an unclean reboot"
                    if why is not None:  # compare every written block, as of this instant
                        await trio.to_thread.run_sync(state.mark, disk.record, disk.record.gen, [],
                                                      list(disk.present))
                        disk.changed.update(disk.present)
                        part.compared = True
                        log.warning("disk %s: %s; the snapshot compares the checksums of its %d "
                                    "written blocks instead", disk.name, why, len(disk.present))
                records = []
                for disk, part in zip(disks, parts, strict=True):
                    part.gen = disk.record.gen
                    part.blocks = len(disk.changed)
                    records.append(dataclasses.replace(disk.record, gen=disk.record.gen + 1))
                # durable, with the closed generations' marks (after their bytes): a power cut
                # after the closing resumes this upload, never loses it
                await trio.to_thread.run_sync(state.put_task, task, records,
                                              functools.partial(_flush, disks))
                for disk, part, record in zip(disks, parts, records, strict=True):
                    disk.record = record
                    self._never_tried.add(part.snapshot_id)
                    closed = disk.close_generation(task.id, part.snapshot_id)
                    self._add_pending(disk, closed, part)
        self.tasks[task.id] = task
        self._queue_send.send_nowait(task.id)
        log.info("snapshot task %s closed %s", task.id,
                 ", ".join(f"{p.disk} ({p.blocks} changed blocks) as {p.name}" for p in parts))
        self._notify()
        return task

    def _add_pending(self, disk: Disk, closed: ClosedGeneration, part: SnapshotPart) -> None:
        earlier = [c for c in disk.closed if c.gen < closed.gen]
        lower: Image | None
        if earlier:
            lower = earlier[-1].view
        elif part.parent is not None:
            lower = self._stored_view(part.parent) or self.pending.get(part.parent)
        else:
            lower = None
        view = PendingSnapshot(disk, closed, lower, f"{part.name}.img", part.snapshot_id, part.size)
        closed.view = view
        self.pending[part.snapshot_id] = view
        self.progress[part.snapshot_id] = UploadProgress(blocks_total=part.blocks)

    def pending_images(self) -> dict[str, PendingSnapshot]:
        return {v.name: v for v in self.pending.values()}

    async def _upload_task(self, task: SnapshotTask) -> None:
        state = self._require()
        # what an earlier daemon found (both are persisted with the task): this one's attempts
        # find it again, or not
        task.retried_for, task.read_by, task.group_retried = [], [], False
        attempt = 0
        while True:
            attempt += 1
            try:
                with single_error():  # a failing upload must be retried, never end the daemon
                    await self._upload_parts(task)
                break
            except SnapfsError as e:
                if isinstance(e, KeptBlocksLost):
                    # contents a failed flush may have lost do not come back by trying again
                    if task.roots_begun:
                        log.error("snapshot task %s cannot complete its consistency group: the "
                                  "snapshots of it stored already stay, listed as incomplete",
                                  task.id)
                    if self._readers(task):
                        self._park(task, e.message)
                    else:
                        await self._fail(task, e.message)
                    return
                readers = self._readers(task)
                depended = bool(readers) or task.roots_begun
                if attempt < UPLOAD_ATTEMPTS or depended:
                    delay = min(RETRY_DELAY * attempt, DEPENDED_RETRY_DELAY)
                    task.retried_for = readers if attempt >= UPLOAD_ATTEMPTS else []
                    task.group_retried = task.roots_begun and attempt >= UPLOAD_ATTEMPTS
                    why = ""
                    if readers:
                        why = " (a disk reads from it, so it is never given up)"
                    elif task.roots_begun:
                        why = (" (part of its consistency group may be stored, so it is never"
                               " given up)")
                    log.warning("snapshot task %s: upload failed (%s); retrying in %.0f s%s",
                                task.id, e.message, delay, why)
                    task.reason = e.message
                    await trio.sleep(delay)
                    continue
                await self._fail(task, e.message)
                return
        task.state = "accomplished"
        task.reason = None
        task.finished = now_iso()
        await trio.to_thread.run_sync(state.delete_task, task.id)
        self._ended(task)
        log.info("snapshot task %s accomplished", task.id)
        try:  # the stored snapshots take the pending views' names
            await self.catalog.refresh(force=True)
        except SnapfsError as e:
            log.warning("listing the new snapshots failed (they appear later): %s", e.message)
        for part in task.parts:
            self.pending.pop(part.snapshot_id, None)
        self._notify()

    def _last_io(self) -> float:
        return max((d.last_io for d in self.disks.values()), default=-1e9)

    def _last_foreground(self) -> float:
        """What the background sweep yields to: disk I/O, and snapshot uploads (which a user
        usually waits for, and which pace themselves against disk I/O already)."""
        return trio.current_time() if self._uploading else self._last_io()

    async def wait_task(self, task_id: str, patience: float) -> dict[str, Any]:
        """The task's summary once it has ended, or after ``patience`` seconds."""
        task = self.tasks.get(task_id)
        if task is not None and task.state == "progressing":
            event = self._finished.setdefault(task_id, trio.Event())
            with trio.move_on_after(patience):
                await event.wait()
        return self.task_summary(task_id)

    def _ended(self, task: SnapshotTask) -> None:
        self._finished.pop(task.id, trio.Event()).set()

    async def _keep_pages(self, pages: list[tuple[bytes, bytes]]) -> None:
        """The manifest pages a snapshot just stored (ID, plain bytes), into the cache in the
        background: the disk's next snapshot rewrites some of them, and finds them there (no
        GET, and no wait for the upload's end)."""
        async def put() -> None:
            await trio.to_thread.run_sync(self.hydrator.cache.put_many, pages)

        if self._run_nursery is not None:
            self._run_nursery.start_soon(put)

    async def _fresh_index(self) -> BlobIndex:
        """The index as the store has it now (see ``upload_generation``)."""
        await self.hydrator.refresh_index()
        return self.hydrator.index

    def _readers(self, task: SnapshotTask) -> list[str]:
        """The disks that read from a snapshot that giving ``task`` up would lose: its own, or
        one of a later task that would fail with it (``_doomed_with``)."""
        ids = {p.snapshot_id for t in self._doomed_with(task) for p in t.parts}
        return sorted(d.name for d in self.disks.values() if d.record.base in ids)

    def _park(self, task: SnapshotTask, reason: str) -> None:
        """Take ``task``, which can never be stored, off the queue: it waits for the disks that
        read from it to go (``_while_read_from``), then fails, beside the queue, which goes on
        with the tasks of other disks (those of its own disks fail with it)."""
        assert self._run_nursery is not None
        self._parked[task.id] = task

        async def wait_then_fail() -> None:
            try:
                await self._while_read_from(task, reason)
                await self._fail(task, reason)
            finally:
                self._parked.pop(task.id, None)

        self._run_nursery.start_soon(wait_then_fail)

    async def _while_read_from(self, task: SnapshotTask, reason: str) -> None:
        """Keep ``task``, which can never be stored, while disks read from its snapshot: giving
        it up would take their base away. It waits, not retrying, until they are deleted or
        rolled back, and says so in ``snapshot list``."""
        readers = self._readers(task)
        if not readers:
            return
        task.reason = reason
        task.read_by = readers
        log.error("snapshot task %s cannot be stored: %s; it fails once no disk reads from "
                  "it (delete or roll back %s)", task.id, reason, ", ".join(readers))
        while readers:
            await self._disks_changed.wait()
            readers = task.read_by = self._readers(task)

    def _doomed_with(self, task: SnapshotTask) -> list[SnapshotTask]:
        """``task`` and the later progressing tasks of the same disks: their parents are its
        snapshots (or later ones), so they cannot be made without it."""
        doomed = [task]
        disks = {p.disk for p in task.parts if not p.done}
        for other in sorted(self.tasks.values(), key=lambda t: t.created):
            if other is not task and other.state == "progressing" and other.created >= task.created \
                    and disks & {p.disk for p in other.parts}:
                doomed.append(other)
        return doomed

    async def _upload_parts(self, task: SnapshotTask) -> None:
        """Store the parts of ``task`` not stored yet. A consistency group's parts are stored
        together: under one shared lock, every part's blocks and pages first, then their roots
        one after another, so that a part that fails leaves no other part of the group stored.
        A failure or a cut between two roots leaves the rest to the next attempt, which finds
        the first ones stored; from the first root on (``roots_begun``) the task is never given
        up, so the group is not left half-stored. A part counts as done once every root is
        stored."""
        await self._release_leftover_locks()  # an attempt after the store came back: tidy first
        parts = [p for p in task.parts if not p.done]
        if len(task.parts) == 1:
            for part in parts:
                root, _ = await self._store_part(task, part)
                await self._finish_part(task, part, root)
            return
        stored: list[tuple[SnapshotRoot, bool]] = []
        async with shared_lock(self.repo, f"snapshot of disks {', '.join(p.disk for p in parts)}",
                               self.upload_lock_patience, self._unreleased,
                               then=self.hydrator.refresh_index) as (limiter, _):
            # (deduplicated against the index as it is now: read beside the lock's last look)
            for part in parts:
                stored.append(await self._store_part(task, part, limiter))
            if not task.roots_begun:  # durably, before a root may be stored
                task.roots_begun = True
                await trio.to_thread.run_sync(self._require().put_task, task)
            for root, unstored in stored:
                if unstored:
                    root.group_size = len(task.parts)
                    await trio.to_thread.run_sync(self.repo.write_root, root, limiter=limiter)
        for part, (root, _) in zip(parts, stored, strict=True):
            await self._finish_part(task, part, root)

    async def _store_part(self, task: SnapshotTask, part: SnapshotPart,
                          under_lock: trio.CapacityLimiter | None = None,
                          ) -> tuple[SnapshotRoot, bool]:
        """Upload ``part``'s changed blocks and pages, and its root unless ``under_lock`` (the
        group's shared lock is held: see ``upload_generation``); its root, and whether it is
        still to be stored."""
        disk = self.disks[part.disk]
        closed = next(c for c in disk.closed if c.gen == part.gen)
        parent_view = None if part.parent is None else await self._find_stored(
            part.parent, "the snapshot after it cannot be made")
        parent = parent_view.root if parent_view is not None else None

        async def parent_pages_of(ps: list[int]) -> list[list[bytes]]:
            assert parent_view is not None
            await parent_view.load_pages(ps, Priority.READAHEAD)  # together, then from memory
            return [await parent_view.page(p, Priority.READAHEAD) for p in ps]

        progress = self.progress.setdefault(part.snapshot_id, UploadProgress())
        progress.blocks_done = progress.blocks_uploaded = 0
        root: SnapshotRoot | None = None
        if part.snapshot_id in self._never_tried:
            self._never_tried.discard(part.snapshot_id)  # an attempt may store it from now on
        else:
            root = await trio.to_thread.run_sync(self._root_stored, part.snapshot_id)
        if root is not None:
            # stored by an attempt whose end this state did not record: a daemon that died
            # (or lost power) after the root's PUT, or a PUT that failed after it was done
            log.info("snapshot %s of disk %s was stored already", root.name, disk.name)
            await self.hydrator.refresh_index()
            return root, False
        self._uploading += 1
        try:
            # it rests only for disk I/O that comes while it runs, not for the writes that
            # went before the snapshot (see ``pacing``)
            began = trio.current_time()
            root, packs, index_name = await upload_generation(
                self.repo, self.hydrator.index, disk, closed, part, parent, parent_pages_of,
                group=task.group, tags=task.tags, progress=progress, created=task.created,
                pace=functools.partial(self.pacer.pace, since=began),
                busy=functools.partial(self.pacer.busy, since=began),
                fresh_index=self._fresh_index, unreleased=self._unreleased,
                lock_patience=self.upload_lock_patience, under_lock=under_lock,
                keep_pages=self._keep_pages, cpu=self.cpu)
        finally:
            self._uploading -= 1
        for pack, entries in packs.items():
            self.hydrator.index.add_pack(pack, entries)
        if index_name is not None:  # so that ``refresh_index`` finds the index current
            self.hydrator.index.index_names.append(index_name)
        return root, under_lock is not None

    async def _finish_part(self, task: SnapshotTask, part: SnapshotPart,
                           root: SnapshotRoot) -> None:
        """``part`` is stored as ``root``: its image reads from the store, its disk's record
        follows it, and its generation's copies kept aside go."""
        state = self._require()
        disk = self.disks[part.disk]
        closed = next(c for c in disk.closed if c.gen == part.gen)
        self.stored[root.id] = root
        view = closed.view
        if view is not None:
            view.stored = ImageView(self.repo, root, self.hydrator, view.name)
        part.done = True
        async with disk.write_lock:  # closings and rollbacks change the record too
            record = dataclasses.replace(disk.record, parent=root.id, trusted=True,
                                         lineage=[*disk.record.lineage, [root.id, part.gen]])
            await trio.to_thread.run_sync(state.put_task, task, [record])
            disk.record = record
            disk.finish_generation(closed)

            def drop() -> None:
                state.drop_cow(record, closed.gen)
                disk.drop_cow(closed.gen)

            await trio.to_thread.run_sync(drop)
        log.info("snapshot %s of disk %s stored: %s", root.name, disk.name, root.stats)

    def _root_stored(self, snapshot_id: str) -> SnapshotRoot | None:
        """The root of ``snapshot_id`` if the repository holds it (blocking)."""
        try:
            return SnapshotRoot.decode(self.repo.store.get(f"snapshots/{snapshot_id}"))
        except ObjectNotFound:
            return None

    async def _fail(self, task: SnapshotTask, reason: str) -> None:
        """Give ``task`` up: its changed blocks count as changed again, and later tasks of the
        same disks (whose parents it was) fail with it."""
        state = self._require()
        for t in self._doomed_with(task):
            t.state = "failed"
            t.reason = reason if t is task else f"its parent snapshot failed: {reason}"
            t.finished = now_iso()
            ends = []
            for part in t.parts:
                disk = self.disks.get(part.disk)
                if part.done or disk is None:
                    continue
                closed = next((c for c in disk.closed if c.gen == part.gen), None)
                if closed is not None:
                    ends.append((part, disk, closed))
            async with _write_locks([disk for _, disk, _ in ends]):
                # the task's failure and its generations' blocks, counted as changed again,
                # in one commit (see ``DiskState.fail_task``)
                await trio.to_thread.run_sync(
                    state.fail_task, t,
                    [(disk.record, part.gen, disk.record.gen) for part, disk, _ in ends])
                for _, disk, closed in ends:
                    disk.changed.update(closed.blocks)
                    disk.finish_generation(closed)

                def drop(ends: list[tuple[SnapshotPart, Disk, ClosedGeneration]] = ends) -> None:
                    for part, disk, _ in ends:
                        disk.drop_cow(part.gen)

                await trio.to_thread.run_sync(drop)
            for part, _, _ in ends:
                self.pending.pop(part.snapshot_id, None)
            self._ended(t)
            log.error("snapshot task %s failed: %s", t.id, t.reason)
        failed = [t for t in self.tasks.values() if t.state == "failed"]
        for old in sorted(failed, key=lambda t: t.created)[:-KEEP_FAILED]:
            del self.tasks[old.id]
            await trio.to_thread.run_sync(state.delete_task, old.id)
        self._notify()

    def task_summary(self, task_id: str) -> dict[str, Any]:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFoundError(f"no snapshot task {task_id}")
        return self._summary(task)

    def _summary(self, task: SnapshotTask) -> dict[str, Any]:
        parts = []
        for part in task.parts:
            doc = dataclasses.asdict(part)
            progress = self.progress.get(part.snapshot_id)
            if progress is not None:
                doc["progress"] = dataclasses.asdict(progress)
            root = self.stored.get(part.snapshot_id)
            if root is not None:
                doc["snapshot"] = root.summary()
            parts.append(doc)
        doc = dataclasses.asdict(task)
        doc["parts"] = parts
        doc["block_size"] = self.repo.block_size  # what a part's blocks are in bytes
        doc["stuck"] = self._stuck(task)
        return doc

    def _stuck(self, task: SnapshotTask) -> str | None:
        """Why ``task``'s upload has no end in sight, if so: it, or a task it waits behind (a
        parked one of its disks, or the one the queue is retrying), is kept for the disks that
        read from it (waiting for them to go, or retried at most 30 s apart), or is a group
        whose roots began to be stored, retried so. A waiting ``snapshot create`` stops waiting
        then, and says this."""
        if task.state != "progressing":
            return None
        head = next((p for p in self._parked.values()
                     if p.read_by and (p is task or task in self._doomed_with(p))), None)
        if head is None:
            head = self._current
            if head is None or not (head.retried_for or head.group_retried):
                return None
        disks = head.read_by or head.retried_for
        reads = f"disk {disks[0]} reads" if len(disks) == 1 else f"disks {', '.join(disks)} read"
        retried = (f"failed to upload {UPLOAD_ATTEMPTS} times ({head.reason}) and is retried, "
                   f"at most {DEPENDED_RETRY_DELAY:.0f} s apart,")
        if head.read_by:
            why = (f"cannot be stored ({head.reason}) and fails once no disk reads from it "
                   f"(delete or roll back {', '.join(disks)})")
        elif disks:
            why = f"{retried} for as long as {reads} from it"
        else:
            why = (f"{retried} until its whole consistency group is stored (part of it may be "
                   "already)")
        if head is task:
            return f"it {why}"
        return f"it waits behind snapshot {', '.join(p.name for p in head.parts)}, which {why}"

    def task_list(self) -> list[dict[str, Any]]:
        return [self._summary(t) for t in sorted(self.tasks.values(), key=lambda t: t.created)]

    def needed_snapshots(self) -> dict[str, str]:
        """The snapshots these disks need, by id, with what needs them."""
        needed: dict[str, str] = {}
        for name, disk in sorted(self.disks.items()):
            if disk.record.base:
                needed.setdefault(disk.record.base, f"base of disk {name}")
            if disk.record.parent:
                needed.setdefault(disk.record.parent, f"parent of disk {name}")
        for snapshot_id, why in self._about_to_need:
            needed.setdefault(snapshot_id, why)
        return needed

    async def _publish_holds(self) -> None:
        """Keep ``holds/HOLDER`` in the repository equal to ``needed_snapshots`` (deleted when
        nothing is needed), so that ``snapshot delete`` and ``forget`` keep those snapshots
        even while this daemon is not running. Written at start and after every change; a
        failed write is tried again (the local daemon is asked directly meanwhile)."""
        if not self.enabled:
            return
        holder = await self._holder()
        try:
            await trio.to_thread.run_sync(self._lift_stale_holds, holder)
        except SnapfsError as e:
            log.warning("could not look for stale holds of this host: %s", e.message)
        while True:
            self._holds_stale = trio.Event()
            try:
                await self._write_hold()
            except SnapfsError as e:
                log.warning("could not store this host's hold on its disks' snapshots "
                            "(trying again in %.0f s): %s", HOLD_RETRY, e.message)
                with trio.move_on_after(HOLD_RETRY):
                    await self._holds_stale.wait()
                continue
            await self._holds_stale.wait()

    async def _let_go_of_locks(self) -> None:
        """Remove the repository locks whose removal failed, once the store answers again."""
        while True:
            await trio.sleep(LOCK_RETRY)
            await self._release_leftover_locks()

    async def _release_leftover_locks(self) -> None:
        for lock in list(self._unreleased):
            try:
                await trio.to_thread.run_sync(lock.release)
            except SnapfsError:
                continue  # said once already, by ``release_quietly``
            self._unreleased.remove(lock)
            log.info("let go of the lock %s at last", lock.key)

    async def _holder(self) -> str:
        if self._holder_id is None:
            self._holder_id = await trio.to_thread.run_sync(self._require().holder_id)
        return self._holder_id

    async def _write_hold(self) -> None:
        """Store the hold as ``needed_snapshots`` is now, unless it is stored so already. One
        writer at a time, each with the needs of its own moment: a slower, older write must
        not land after a newer one."""
        from snapfs.format.hold import Hold
        from snapfs.host import hostname, machine_id

        holder = await self._holder()
        async with self._hold_lock:
            needed = self.needed_snapshots()
            if needed == self._hold_stored:
                return
            if needed:
                hold = Hold(hostname(), str(self.dir), now_iso(), needed, machine_id())
                await trio.to_thread.run_sync(self.repo.write_hold, holder, hold)
            elif self._hold_stored is not None or await trio.to_thread.run_sync(
                    self.repo.store.exists, f"holds/{holder}"):
                await trio.to_thread.run_sync(self.repo.delete_hold, holder)
            self._hold_stored = needed

    async def _needing_stored(self, snapshot_id: str | None, doing: str,
                              change: Callable[[], Awaitable[T]]) -> T:
        """Make ``change`` (which makes a disk need the stored snapshot ``snapshot_id``) with
        the hold naming it stored first, under the repository's shared lock, after checking
        that the snapshot is still stored. ``forget`` and ``delete`` delete roots only under the
        exclusive lock and read the holds again once they have it, so either they see this
        hold, or they deleted the snapshot before we looked and ``change`` is not made. The
        hold comes before the change: a daemon killed between the two otherwise left a disk
        needing a snapshot that no hold named, which a delete or forget took while no daemon
        answered for the disk (every block the disk had not written was lost)."""
        if snapshot_id is None or snapshot_id in self.pending:  # nothing stored to lose
            return await change()
        lock = RepositoryLock(self.repo.store, "shared", f"{doing} (snapfs daemon)")

        async def still_stored() -> bool:  # (once our lock is written: beside its last look)
            return await trio.to_thread.run_sync(self.repo.store.exists,
                                                 f"snapshots/{snapshot_id}")

        stored = await lock.acquire_waiting(LOCK_PATIENCE, then=still_stored)
        try:
            if not stored:
                raise SnapshotNotFound(f"snapshot {snapshot_id} was deleted meanwhile")
            need = (snapshot_id, f"snapshot that {doing} needs")
            self._about_to_need.append(need)
            try:
                await self._write_hold()
                result = await change()
            finally:
                self._about_to_need.remove(need)
                self._holds_stale.set()  # not needed after all if the change failed
            await self._write_hold()
            return result
        finally:
            with trio.CancelScope(shield=True):
                if not await trio.to_thread.run_sync(lock.release_quietly):
                    self._unreleased.append(lock)

    def _lift_stale_holds(self, holder: str) -> None:
        """Delete the holds this host left for disk states that no longer exist here (a cache
        directory removed or moved): nothing can use their disks any more."""
        from snapfs.host import hostname, machine_id

        for other, hold in self.repo.holds().items():
            if other != holder and hold.host == hostname() and hold.machine == machine_id() \
                    and not os.path.exists(os.path.join(hold.state, "state.lmdb")):
                log.info("lifting the hold %s of %s, a disk state that is gone", other,
                         hold.state)
                self.repo.delete_hold(other)

    def _notify(self, rewritten: str | None = None) -> None:
        self._holds_stale.set()
        self._disks_changed.set()
        self._disks_changed = trio.Event()
        for callback in self.changed:
            try:
                callback(rewritten)
            except Exception:  # the change is made; a stale kernel cache must not undo the reply
                log.exception("telling the file system about a change of disks failed")


@contextlib.asynccontextmanager
async def _write_locks(disks: list[Disk]) -> AsyncIterator[None]:
    """Hold the write locks of ``disks``, taken in one order (by name) so that two holders of
    several never deadlock."""
    async with contextlib.AsyncExitStack() as stack:
        for disk in sorted(disks, key=lambda d: d.name):
            await stack.enter_async_context(disk.write_lock)
        yield


@contextlib.contextmanager
def _being_closed(disks: list[Disk]) -> Iterator[None]:
    """Count ``disks`` as being closed for a snapshot while the block runs (``Disk.closing``)."""
    for disk in disks:
        disk.closing += 1
    try:
        yield
    finally:
        for disk in disks:
            disk.closing -= 1


def _flush(disks: list[Disk]) -> None:
    """Make the bytes of every write to ``disks`` so far durable (a worker thread's call)."""
    for disk in disks:
        disk.overlay.sync()


class MissingImage:
    """The base of a disk whose snapshot is gone: its untouched blocks cannot be read."""

    size = 1 << 62

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def read(self, offset: int, length: int) -> bytes:
        raise SnapshotNotFound(self.reason)


def attached_loops(path: str) -> list[str]:
    """Loop devices whose backing file is ``path`` (an absolute path without symlinks: the
    daemon must never resolve paths under its own mount point, since a FUSE request it sends
    to itself from the trio thread could never be answered)."""
    out = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip()
        except OSError:
            continue
        if name.removesuffix(" (deleted)") == path:
            out.append("/dev/" + backing.parent.parent.name)
    return out
