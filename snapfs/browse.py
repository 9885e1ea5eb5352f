"""Browsing the files inside a snapshot: ``browse`` mounts them read-only, ``unbrowse`` undoes it.

A snapshot is a disk image; its files are one more mount away. ``browse(options)`` does, in
order, and undoes what it did (in reverse) if a later step fails:

1. Checks: DIR exists, is an empty directory, is not a mount point and is not browsed already;
   SNAP resolves in the repository (``Repository.resolve``).
2. A mount daemon serving the repository: a running one is reused, found by asking every live
   daemon of this user (``RUNDIR/*.pid``, see ``control``) for its ``stats``, whose
   ``repository`` is the store's URL. Browse's own daemon is preferred if several serve it.
   Otherwise browse starts its own (``snapfs.mount.mount``, daemonized, no background
   hydration: it exists to serve what is browsed) at a private mount point,
   ``CACHE/browse-mnt/RKEY`` (RKEY: 16 hex digits of the SHA-1 of the store URL), detaching
   first the dead mount a killed daemon of its own left there. A daemon at such a mount point
   is *browse's own*: the last ``unbrowse`` that used it stops it. Any other daemon is the
   user's and is never stopped.
3. The image, ``MNT/snapshots/NAME.img`` (the one whose ``stats`` entry names the snapshot's
   id), is probed with ``blkid -p``. Only ext2/ext3/ext4 are opened; anything else is one line
   naming what was found ("found: swap", "found: nothing recognisable"). An image with a
   partition table (MBR or GPT, as most VM disks have) is opened at one partition: the one
   ``partition`` names, else its only partition holding a filesystem browse opens (with
   several, the message lists them and asks for ``--partition``). ``partx`` reads the table,
   ``blkid -p -O OFFSET -S SIZE`` probes each partition; only the sectors those two read are
   fetched.
4. As root: ``losetup -f``, then ``losetup -r DEVICE IMAGE`` (with ``--offset`` and
   ``--sizelimit`` for a partition) and ``mount -t ext4 -o ro,noload,nosuid,nodev`` of the loop
   device on DIR (``noload``: a journal is never replayed on a snapshot; ``nosuid``, ``nodev``:
   a snapshot's set-id programs and device nodes grant nothing). Otherwise, or with
   ``use_fuse2fs``: ``fuse2fs -o ro,norecovery,fakeroot[,offset=OFFSET] IMAGE DIR``
   (``norecovery``: no journal replay either). The kernel path is preferred because fuse2fs
   1.47 misbehaves after a read error.
5. What is done is written to ``RUNDIR/browse-KEY.json`` (KEY: ``control.mount_key(DIR)``),
   before it is done (see below): the loop device and its image, the daemon's mount point,
   whether the daemon is browse's own.
   ``unbrowse DIR`` reads only that file: it unmounts DIR (``umount``, or ``fusermount3 -u``
   for fuse2fs), detaches the loop device if it is still bound to the recorded image (a number
   the kernel gave to someone else since is left alone), removes the state file, and stops
   browse's own daemon if no other browse state names it (a loop device or fuse2fs lets go of
   the image asynchronously, so a busy daemon is retried for a few seconds).

RUNDIR is per user and, for root, under /run: a reboot, which ends every mount and loop device,
also forgets every state. All of browse and unbrowse's bookkeeping (finding or starting the
daemon, counting its users, stopping it) runs under ``RUNDIR/browse.lock``, a POSIX record lock:
unlike a flock, it is not inherited by the daemon ``mount`` forks. The state is written before
anything is attached, and again with the loop device's name before the image is bound to it
(a free device is found, written down, then bound), so that ``unbrowse DIR`` also undoes a
browse killed half way (kill -9).

``restore_from_snapshot`` is ``restore-files``: browse at a temporary directory under
``CACHE/browse-mnt`` (``restore-PID-…``), ``restore.restore_files`` from there, unbrowse however
that ends. An error that stops the copy comes out as ``RestoreStopped``, with the report of what
was done so far. A restore killed outright (kill -9) leaves its browse behind: the next one
undoes it, its pid being gone (or reused by a process that started later).

This module blocks (subprocesses, the control socket); it is for the CLI.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from snapfs.cli.output import human_size
from snapfs.control import (
    RunFiles,
    find_daemon,
    fusermount,
    mount_entry,
    mount_key,
    request,
    runtime_dir,
    runtime_files,
    unmount,
)
from snapfs.errors import (
    FormatError,
    MountBusy,
    MountError,
    NotMounted,
    SnapfsError,
    SnapshotNotFound,
    UsageError,
)
from snapfs.format.manifest import SnapshotRoot
from snapfs.host import pid_alive, pid_started_after
from snapfs.mount import (
    MountOptions,
    check_cache_dir,
    check_mountpoint,
    check_outside_repository,
    mount,
)
from snapfs.progress import NO_PROGRESS, Progress
from snapfs.repo.repository import Repository, warn_unreadable
from snapfs.restore import RestoreOptions, RestoreReport, restore_files
from snapfs.store import open_store

log = logging.getLogger(__name__)

STATE_FORMAT = "snapfs-browse"
STATE_VERSION = 1
#: filesystems the kernel (and fuse2fs) open read-only for us
OPENABLE = ("ext2", "ext3", "ext4")
KERNEL_MOUNT_OPTIONS = "ro,noload,nosuid,nodev"
#: ``norecovery``, fuse2fs's ``noload``: without it fuse2fs refuses a journal that needs
#: recovery, which is every snapshot of a filesystem that was mounted when it was taken
FUSE2FS_MOUNT_OPTIONS = "ro,norecovery,fakeroot"
PRIVATE_DIR = "browse-mnt"
#: how long a new snapshot may take to appear in a running daemon's catalog (it refreshes at
#: most every 2 s)
IMAGE_WAIT = 6.0
#: how long a daemon may stay busy after its image was let go of (loop device, fuse2fs exiting)
RELEASE_WAIT = 10.0
STATS_TIMEOUT = 5.0
#: loop devices tried when others take the free one found before it is bound
LOOP_TRIES = 5
#: the temporary directory of a restore: ``restore-PID-RANDOM``
_RESTORE_DIR = re.compile(r"restore-(\d+)-\w+")


@dataclass(frozen=True)
class BrowseOptions:
    repository: str  # a directory path or s3://bucket/prefix
    snapshot: str  # id, name or id prefix
    directory: str
    cache_dir: str  # of a daemon browse starts; its private mount point is under it too
    cache_size: int
    endpoint_url: str | None = None
    use_fuse2fs: bool = False  # default: a loop device as root, fuse2fs otherwise
    debug: bool = False
    partition: int | None = None  # of a partitioned image (None: its only openable one)


@dataclass(frozen=True)
class BrowseState:
    """What one browse did: everything ``unbrowse`` needs to undo it exactly."""

    directory: str
    repository: str  # the store's URL
    snapshot_id: str
    snapshot_name: str
    image: str  # the image file on the daemon's mount
    filesystem: str
    method: str  # "loop" or "fuse2fs"
    loop_device: str | None
    daemon_mountpoint: str
    daemon_pid: int | None
    #: browse's own daemon (at a private mount point): the last unbrowse using it stops it
    daemon_private: bool
    #: this browse started the daemon (for messages only; ownership is ``daemon_private``)
    daemon_started: bool
    #: the partition of a partitioned image that holds the filesystem (None: the whole image;
    #: a state written before partitions were opened has none)
    partition: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def encode(self) -> bytes:
        return json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION,
                           **self.as_dict()}).encode()

    @classmethod
    def decode(cls, data: bytes, where: Path) -> BrowseState:
        try:
            doc = json.loads(data)
            if doc.get("format") != STATE_FORMAT:
                raise ValueError("not a browse state")
        except (ValueError, AttributeError):
            raise FormatError(f"{where} is not a snapfs browse state") from None
        if doc.get("version") != STATE_VERSION:
            raise FormatError(f"{where}: browse state version {doc.get('version')!r} is not "
                              f"one this snapfs knows ({STATE_VERSION})")
        del doc["format"], doc["version"]
        try:
            return cls(**doc)
        except TypeError:
            raise FormatError(f"{where} is not a snapfs browse state") from None


# -- where things are ----------------------------------------------------------------------------


def repository_location(repository: str) -> str:
    """The location as a daemon sees it (``mount`` makes directory paths absolute)."""
    return repository if "://" in repository else os.path.abspath(repository)


def private_root(cache_dir: str) -> Path:
    """``CACHE/browse-mnt``: browse's daemon mount points and restore's temporary mounts."""
    check_cache_dir(cache_dir)  # one line, as for mount, for a cache that cannot be used
    path = Path(os.path.abspath(cache_dir)) / PRIVATE_DIR
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise SnapfsError(f"cannot make {path}: {e.strerror}") from None
    return path


def private_mountpoint(cache_dir: str, store_url: str) -> Path:
    return (Path(os.path.abspath(cache_dir)) / PRIVATE_DIR
            / hashlib.sha1(store_url.encode()).hexdigest()[:16])


def is_private_mountpoint(path: str, store_url: str) -> bool:
    p = Path(path)
    return p.parent.name == PRIVATE_DIR and p.name == hashlib.sha1(
        store_url.encode()).hexdigest()[:16]


def state_file(directory: str) -> Path:
    return Path(runtime_dir()) / f"browse-{mount_key(directory)}.json"


def read_state(directory: str) -> BrowseState | None:
    path = state_file(directory)
    try:
        return BrowseState.decode(path.read_bytes(), path)
    except FileNotFoundError:
        return None


def all_states() -> list[BrowseState]:
    states = []
    for path in sorted(Path(runtime_dir()).glob("browse-*.json")):
        try:
            states.append(BrowseState.decode(path.read_bytes(), path))
        except FileNotFoundError:
            continue
        except FormatError as e:
            log.warning("ignored: %s", e.message)
    return states


def _write_state(state: BrowseState) -> None:
    path = state_file(state.directory)
    partial = path.with_suffix(f".tmp-{os.getpid()}")
    partial.write_bytes(state.encode())
    partial.replace(path)


@contextmanager
def _bookkeeping_lock() -> Iterator[None]:
    """The lock around finding, starting, counting and stopping daemons (see the docstring)."""
    fd = os.open(os.path.join(runtime_dir(), "browse.lock"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- browse --------------------------------------------------------------------------------------


def browse(options: BrowseOptions) -> BrowseState:
    """Mount the filesystem inside a snapshot read-only at ``options.directory``."""
    directory = os.path.realpath(options.directory)
    with _bookkeeping_lock(), ExitStack() as undo:  # the lock: two browses of DIR, one wins
        existing = read_state(directory)
        if existing is not None:
            raise MountError(f"{directory} is browsed already (snapshot "
                             f"{existing.snapshot_name}); undo it with: snapfs unbrowse "
                             f"{directory}")
        check_mountpoint(directory)
        location = repository_location(options.repository)
        check_outside_repository(directory, location)
        store = open_store(location, options.endpoint_url)
        try:
            repo = Repository.open(store)
            listing = repo.list_snapshots()
            root = repo.resolve(options.snapshot, listing)
            warn_unreadable(listing.unreadable, store.url, "left out")
            store_url = store.url
        finally:
            store.close()  # before mount() forks: no store client crosses a fork
        daemon_mp, started = _daemon_for(options, location, store_url)
        private = is_private_mountpoint(daemon_mp, store_url)
        if started:
            undo.callback(_quietly, _stop_daemon, daemon_mp)
        files = RunFiles.for_mountpoint(daemon_mp)
        image, pid = _image_of(files, root)
        place = locate_filesystem(image, root, options.partition)
        use_fuse2fs = options.use_fuse2fs or os.geteuid() != 0
        state = BrowseState(
            directory=directory, repository=store_url, snapshot_id=root.id,
            snapshot_name=root.name, image=str(image), filesystem=place.filesystem,
            method="fuse2fs" if use_fuse2fs else "loop",
            loop_device=None, daemon_mountpoint=daemon_mp, daemon_pid=pid,
            daemon_private=private, daemon_started=started,
            partition=place.partition.number if place.partition else None,
        )
        # written before anything is attached, and again with the loop device before it is
        # bound: a browse killed on the way (kill -9) leaves a state that unbrowse undoes
        _write_state(state)
        undo.callback(state_file(directory).unlink, missing_ok=True)

        def record(loop_device: str) -> None:
            nonlocal state
            state = dataclasses.replace(state, loop_device=loop_device)
            _write_state(state)

        _attach(image, directory, place, use_fuse2fs, undo, record)
        undo.pop_all()
    return state


def _attach(image: Path, directory: str, place: Place, use_fuse2fs: bool,
            undo: ExitStack, record: Callable[[str], None]) -> None:
    """Mount the filesystem at ``place`` in the image read-only at ``directory``. Each step done
    pushes its undoing onto ``undo``; the loop device is given to ``record`` before the image
    is bound to it (a free one is found, then bound: ``losetup -f --show`` would bind it before
    its name could be written down)."""
    where = image.name if place.partition is None else (
        f"partition {place.partition.number} of {image.name}")
    if use_fuse2fs:
        options = FUSE2FS_MOUNT_OPTIONS + (f",offset={place.offset}" if place.offset else "")
        _run(["fuse2fs", "-o", options, str(image), directory], f"fuse2fs cannot mount {where}")
        undo.callback(_quietly, fusermount, directory)
        return
    extent = [] if place.partition is None else [
        "--offset", str(place.partition.offset), "--sizelimit", str(place.partition.size)]
    for attempt in range(LOOP_TRIES):
        loop_device = _run(["losetup", "-f"], "cannot find a free loop device").strip()
        record(loop_device)
        try:
            _run(["losetup", "-r", *extent, loop_device, str(image)], "cannot attach a loop device")
            break
        except MountBusy:  # another process took that device meanwhile: find another
            if attempt == LOOP_TRIES - 1:
                raise
    undo.callback(_quietly, _detach, loop_device, str(image))
    _run(["mount", "-t", "ext4", "-o", KERNEL_MOUNT_OPTIONS, loop_device, directory],
         f"cannot mount the {place.filesystem} filesystem of {where}")
    undo.callback(_quietly, _run, ["umount", directory], f"cannot unmount {directory}")


def _daemon_for(options: BrowseOptions, location: str, store_url: str) -> tuple[str, bool]:
    """The mount point of a daemon serving the repository, and whether we started it."""
    private = private_mountpoint(options.cache_dir, store_url)
    serving = find_daemons(store_url)
    if serving:
        return min(serving, key=lambda mp: (mp != str(private), mp)), False
    private_root(options.cache_dir)
    private.mkdir(mode=0o700, exist_ok=True)
    _detach_if_dead(private)
    mount(MountOptions(
        repository=location, endpoint_url=options.endpoint_url, mountpoint=str(private),
        cache_dir=options.cache_dir, cache_size=options.cache_size, debug=options.debug,
        background=False,
    ), log.info)
    return str(private), True


def _detach_if_dead(mountpoint: Path) -> None:
    """Detach browse's own mount point if its daemon died (kill -9, the OOM killer), as
    ``snapfs umount`` would: it is browse's to clean up, not a path to send the user to. A live
    daemon there (one that did not answer ``stats``) is left alone, and ``mount`` refuses the
    mount point. A browse still using the dead daemon's image reads EIO as before, and its
    ``unbrowse`` undoes it (its state names this mount point: it keeps the next daemon)."""
    files = RunFiles.for_mountpoint(str(mountpoint))
    entry = mount_entry(files.mountpoint)
    if entry is None or not entry.is_snapfs:
        return
    daemon = find_daemon(files)
    if daemon is not None:
        daemon.close()
        return
    log.info("%s", unmount(files.mountpoint))


def find_daemons(store_url: str) -> list[str]:
    """The mount points of the live, mounted daemons of this user that serve ``store_url``."""
    found = []
    for pid_file in runtime_files(".pid"):
        files = RunFiles.of_pid_file(pid_file, f"(the daemon of {pid_file})")
        daemon = find_daemon(files)
        if daemon is None:
            continue
        daemon.close()
        try:
            stats = request(files, {"op": "stats"}, STATS_TIMEOUT)["stats"]
        except SnapfsError as e:  # starting, stopping or hung: not one to build on
            log.debug("skipped %s: %s", pid_file, e.message)
            continue
        mountpoint = stats.get("mountpoint")
        if stats.get("repository") != store_url or not isinstance(mountpoint, str):
            continue
        entry = mount_entry(mountpoint)
        if entry is not None and entry.is_snapfs and mount_key(mountpoint) == files.key:
            found.append(mountpoint)
    return found


def _image_of(files: RunFiles, root: SnapshotRoot) -> tuple[Path, int | None]:
    """The daemon's image file of ``root`` (and the daemon's pid).

    The file is ``NAME.img``, or ``NAME-ID.img`` should two snapshots share a name; the daemon's
    stats say which one is this snapshot. A snapshot newer than the daemon's catalog appears
    within a refresh interval; looking its name up asks for that refresh."""
    snapshots = Path(files.mountpoint) / "snapshots"
    deadline = time.monotonic() + IMAGE_WAIT
    while True:
        stats = request(files, {"op": "stats"}, STATS_TIMEOUT)["stats"]
        for name, image in stats.get("images", {}).items():
            if isinstance(image, dict) and image.get("snapshot") == root.id:
                return snapshots / name, stats.get("pid")
        if time.monotonic() > deadline:
            raise SnapshotNotFound(f"the snapfs daemon at {files.mountpoint} does not serve "
                                   f"snapshot {root.name} ({root.id})")
        (snapshots / f"{root.name}.img").exists()  # a lookup miss refreshes the catalog
        time.sleep(0.1)


@dataclass(frozen=True)
class Partition:
    """One entry of an image's partition table (``partx``), and what ``blkid`` finds in it."""

    number: int
    offset: int  # bytes from the start of the image
    size: int  # bytes
    filesystem: str | None
    label: str | None

    def describe(self) -> str:
        found = self.filesystem or "nothing recognisable"
        if self.label:
            found += f" {self.label!r}"
        return f"{self.number} ({found}, {human_size(self.size)})"


@dataclass(frozen=True)
class Place:
    """Where browse finds the filesystem it opens: the whole image, or one partition."""

    filesystem: str
    partition: Partition | None = None

    @property
    def offset(self) -> int:
        return self.partition.offset if self.partition else 0


def _probe(image: str, offset: int | None = None, size: int | None = None) -> dict[str, str]:
    """``blkid``'s low-level probe of ``image`` (or of ``size`` bytes at ``offset``)."""
    cmd = ["blkid", "-p", "-o", "export"]
    if offset is not None:
        cmd += ["-O", str(offset)]
    if size is not None:
        cmd += ["-S", str(size)]
    try:
        result = subprocess.run([*cmd, image], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SnapfsError("blkid is not installed (apt-get install util-linux)") from None
    if result.returncode not in (0, 2):  # 2: nothing found
        raise SnapfsError(f"cannot probe {image}: {_first_line(result)}")
    return dict(line.partition("=")[::2] for line in result.stdout.splitlines())


def list_partitions(image: str) -> list[Partition]:
    """The partitions of ``image``'s table (MBR or GPT; ``partx`` reads it, in 512-byte
    sectors for an image file), each probed for a filesystem."""
    try:
        result = subprocess.run(["partx", "--raw", "--noheadings", "--output", "NR,START,SECTORS",
                                 image], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SnapfsError("partx is not installed (apt-get install util-linux)") from None
    if result.returncode != 0:
        raise SnapfsError(f"cannot read the partition table of {image}: {_first_line(result)}")
    out = []
    for line in result.stdout.splitlines():
        number, start, sectors = (int(x) for x in line.split())
        offset, size = start * 512, sectors * 512
        fields = _probe(image, offset, size)
        out.append(Partition(number, offset, size, fields.get("TYPE") or None,
                             fields.get("LABEL") or None))
    return out


def locate_filesystem(image: Path, root: SnapshotRoot, partition: int | None = None) -> Place:
    """The filesystem browse opens in ``root``'s image: on the whole image, or on partition
    ``partition`` of its table, or on its one partition that holds a filesystem snapfs opens
    (several: the user must choose, and the message lists them)."""
    fields = _probe(str(image))
    table = fields.get("PTTYPE")
    whole = fields.get("TYPE")
    if partition is None and (whole or not table):
        if whole not in OPENABLE:
            raise _unopenable(f"snapshot {root.name}", whole)
        return Place(whole)
    if not table:
        raise UsageError(f"snapshot {root.name} has no partition table (found: "
                          f"{whole or 'nothing recognisable'}): leave out --partition")
    parts = list_partitions(str(image))
    listed = "; ".join(p.describe() for p in parts) or "none"
    if partition is not None:
        chosen = next((p for p in parts if p.number == partition), None)
        if chosen is None:
            raise UsageError(f"snapshot {root.name} has no partition {partition} (its {table} "
                              f"partition table has: {listed})")
        if chosen.filesystem not in OPENABLE:
            raise _unopenable(f"partition {partition} of snapshot {root.name}", chosen.filesystem)
        return Place(chosen.filesystem, chosen)
    openable = [p for p in parts if p.filesystem in OPENABLE]
    if len(openable) == 1:
        return Place(openable[0].filesystem or "", openable[0])
    if not openable:
        raise _unopenable(f"snapshot {root.name}",
                          f"a {table} partition table, partitions: {listed}")
    raise UsageError(f"snapshot {root.name} holds {len(openable)} filesystems on its {table} "
                      f"partition table: choose one with --partition N (partitions: {listed})")


def _unopenable(what: str, found: str | None) -> SnapfsError:
    return SnapfsError(f"{what} holds no filesystem snapfs can open (found: "
                       f"{found or 'nothing recognisable'}; it opens {', '.join(OPENABLE)})")


# -- unbrowse ------------------------------------------------------------------------------------


def unbrowse(directory: str, timeout: float = 60.0) -> str:
    """Undo the browse at ``directory``; a one-line account of what was done."""
    directory = os.path.realpath(directory)
    with _bookkeeping_lock():
        state = read_state(directory)
        if state is None:
            raise NotMounted(f"{directory} is not browsed (no snapfs browse state for it)")
        entry = mount_entry(directory)
        if entry is not None:
            if state.method == "fuse2fs":
                fusermount(directory)
            else:
                _run(["umount", directory], f"cannot unmount {directory}")
        if state.loop_device is not None:
            _detach(state.loop_device, state.image)
        state_file(directory).unlink()
        done = f"unbrowsed {directory}"
        if not state.daemon_private:
            return done
        if any(s.daemon_mountpoint == state.daemon_mountpoint for s in all_states()):
            return done + f"; the snapfs daemon at {state.daemon_mountpoint} serves other browses"
        try:
            stopped = _stop_daemon(state.daemon_mountpoint, timeout)
        except SnapfsError as e:
            raise MountError(f"{done}, but its snapfs daemon could not be stopped: "
                             f"{e.message}") from None
        return f"{done}; stopped its snapfs daemon ({stopped})"


def _stop_daemon(mountpoint: str, timeout: float = 60.0) -> str:
    """Stop browse's own daemon (retried while the image is still being let go of); what
    ``control.unmount`` said."""
    deadline = time.monotonic() + RELEASE_WAIT
    while True:
        try:
            said = unmount(mountpoint, timeout)
            break
        except NotMounted:
            said = f"{mountpoint} was not mounted any more"
            break
        except MountBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        os.rmdir(mountpoint)
    except OSError:
        pass  # not ours to insist on: someone put something there
    return said


@contextmanager
def browsing(options: BrowseOptions) -> Iterator[BrowseState]:
    """``browse``, and ``unbrowse`` when the block ends, however it ends."""
    state = browse(options)
    try:
        yield state
    finally:
        unbrowse(state.directory)


class RestoreStopped(SnapfsError):
    """``restore_files`` ended with an error that stops the whole run (a full or read-only
    target), its message and exit code; what was browsed and done until then comes with it."""

    def __init__(self, error: SnapfsError, state: BrowseState, report: RestoreReport) -> None:
        super().__init__(error.message, error.exit_code)
        self.state = state
        self.report = report


def restore_from_snapshot(options: BrowseOptions, target: str, restore: RestoreOptions,
                          progress: Progress = NO_PROGRESS) -> tuple[BrowseState, RestoreReport]:
    """``restore_files`` from the snapshot, browsed at a temporary directory under
    ``CACHE/browse-mnt`` (``options.directory`` is not used) and unbrowsed however it ends.
    An error of the restore itself comes as ``RestoreStopped``."""
    # (files under packs/ are taken for packs: prune counts them as deleted, repair index
    # as unreadable)
    check_outside_repository(os.path.realpath(target), repository_location(options.repository),
                             "restore target")
    root = private_root(options.cache_dir)
    _undo_killed_restores(root)
    temp = tempfile.mkdtemp(prefix=f"restore-{os.getpid()}-", dir=root)
    try:
        with browsing(dataclasses.replace(options, directory=temp)) as state:
            report = RestoreReport()
            try:
                restore_files(temp, target, restore, progress, report,
                              source_failing=lambda: store_failing(state.daemon_mountpoint))
            except SnapfsError as e:
                raise RestoreStopped(e, state, report) from e
        return state, report
    finally:
        try:
            os.rmdir(temp)
        except OSError as e:  # still mounted: unbrowse failed, and said why
            log.debug("%s left behind: %s", temp, e.strerror)


def store_failing(daemon_mountpoint: str) -> str | None:
    """Why the store of the daemon at ``daemon_mountpoint`` fails every fetch for now (its
    last fetch that gave up on the store, none succeeding since), or None: also when the
    daemon cannot be asked (a read's failure then counts for that file alone)."""
    try:
        stats = request(RunFiles.for_mountpoint(daemon_mountpoint), {"op": "stats"},
                        STATS_TIMEOUT)["stats"]
    except SnapfsError as e:
        log.debug("could not ask the daemon at %s: %s", daemon_mountpoint, e.message)
        return None
    failing = stats.get("hydrator", {}).get("store_failing")
    return failing if isinstance(failing, str) else None


def _undo_killed_restores(root: Path) -> None:
    """Unbrowse the temporary browses of restores that were killed outright (kill -9, the OOM
    killer: no chance to undo their own), and remove their directories. Their directory names
    the restore's pid (``restore-PID-…``): a browse whose process lives, and started before
    the browse did, is a restore still running, and is left alone."""
    for state in all_states():
        where = Path(state.directory)
        m = _RESTORE_DIR.fullmatch(where.name)
        if where.parent != root or m is None:
            continue
        pid = int(m.group(1))
        try:
            browsed_at = state_file(state.directory).stat().st_mtime
        except FileNotFoundError:
            continue  # undone meanwhile
        if pid_alive(pid) and not pid_started_after(pid, browsed_at):
            continue
        try:
            log.info("a killed restore's browse: %s", unbrowse(state.directory))
        except SnapfsError as e:
            log.warning("could not undo the browse of a killed restore at %s: %s",
                        state.directory, e.message)
            continue
        try:
            os.rmdir(where)
        except OSError:
            pass


# -- helpers -------------------------------------------------------------------------------------


def _quietly(undo: Callable[..., object], *args: Any) -> None:
    """One undo step of a failed browse: a failure here is logged, so that the error the user
    sees is the one that made browse fail."""
    try:
        undo(*args)
    except SnapfsError as e:
        log.warning("could not undo a step of the failed browse: %s", e.message)


def _detach(loop_device: str, image: str) -> None:
    """``losetup -d`` the device if it is still bound to ``image`` (else the kernel has given
    its number to someone else since, or it is detached already). Once the daemon's mount is
    gone from the mount table (its daemon died, and a later browse or ``snapfs umount`` took
    the dead mount point away lazily), the kernel names the image by its path inside that mount
    (``/snapshots/NAME.img``): that is still ours (it was left attached for ever)."""
    backing = Path("/sys/block") / os.path.basename(loop_device) / "loop" / "backing_file"
    try:
        bound_to = backing.read_text().strip()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENXIO):
            return
        raise
    inside_mount = "/" + "/".join(Path(image).parts[-2:])
    if bound_to.removesuffix(" (deleted)") not in (image, inside_mount):
        log.info("%s now serves %s: left alone", loop_device, bound_to)
        return
    _run(["losetup", "-d", loop_device], f"cannot detach {loop_device}")


def _run(cmd: list[str], failure: str) -> str:
    """Run a system tool; its stdout, or a ``MountError`` with ``failure`` and the tool's
    first line of complaint."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise MountError(f"{failure}: {cmd[0]} is not installed") from None
    if result.returncode != 0:
        reason = _first_line(result)
        if "busy" in reason:
            raise MountBusy(f"{failure}: it is busy (a process still uses it, see fuser -m)")
        raise MountError(f"{failure}: {reason}")
    return result.stdout


def _first_line(result: subprocess.CompletedProcess[str]) -> str:
    """The tool's complaint: the first line of its stderr, else the last of its stdout (where
    fuse2fs says why, after "Mounting read-only."), else its exit status."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    if lines:
        return lines[0]
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"
