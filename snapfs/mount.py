"""The mount daemon's life: check, fork, report, and leave nothing behind.

``mount(options, announce)`` is all the CLI calls. In order:

1. Checks that need no repository, each a one-line ``SnapfsError``: the mount point exists, is
   a directory, is empty and is not a mount point already (a dead FUSE mount included); no
   daemon serves it (its pid file is locked, see ``control``); the cache directory is writable.
   (Several daemons may share one cache directory: ``BlockCache`` is multi-process safe.)
2. Unless ``foreground``: fork. The parent waits on a pipe for the child's report, a line
   ``warning MESSAGE`` for each snapshot root that cannot be read (the parent logs them once
   mounted, as every command that lists snapshots does; the daemon logs them too), then
   ``ready`` or ``error CODE MESSAGE``, and returns or raises that error; the child starts a
   new session (``setsid``), moves to ``/`` (so it keeps no directory busy), and sends its
   stdin to /dev/null and its stdout, stderr and log records to ``<cache>/daemon-KEY.log``.
3. The child opens the store and repository and reads the snapshot list and index
   (``open_repository``; a repository that cannot be opened is the command's error, not the
   log's) while a thread imports the daemon (``snapfs.daemon``, see ``_Preload``), which then
   opens the block cache, mounts, and reports ``ready`` once the kernel has the mount.
4. The session ends when the file system is unmounted (``snapfs umount``, ``fusermount3 -u``),
   on a signal, or on a ``shutdown`` request (see ``snapfs.daemon``); the pid file and socket
   are removed last, before the process exits and releases its locks. ``snapfs umount`` waits
   for exactly that.

This module must stay light: the command that forks imports it, and whatever the parent has
imported it also tears down when it exits, after the daemon is ready, on the path a user waits
for (with trio, pyfuse3 and lmdb loaded, a fifth of a second). So the daemon's libraries (those,
the codecs, boto3) are imported by the child only, after the fork; ``MountOptions`` holds plain
values for the same reason. Every store client is created in the child too: boto3 and lmdb
must not cross a fork.

FUSE options: ``fsname=snapfs,subtype=snapfs`` (the mount table shows ``fuse.snapfs``, which
is how ``umount`` knows a mount is ours) and ``default_permissions`` (the kernel checks the
modes: snapshots 0444, disks 0600; the adapter refuses writes to snapshots even for root).
``allow_other`` only when asked: a snapshot holds a whole disk's secrets, and without it only
the mounting user (root included) sees the files; with it, every user can.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import os
import select
import signal
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from snapfs.control import PidFile, RunFiles, mount_entry
from snapfs.errors import MountError, NotFoundError, SnapfsError, UsageError
from snapfs.interrupt import STOP_SIGNALS
from snapfs.prefetch import parse_prefetch_list

if TYPE_CHECKING:
    from snapfs.repo.indexcache import IndexCache
    from snapfs.repo.repository import BlobIndex, Repository, SnapshotListing
    from snapfs.store import ObjectStore

log = logging.getLogger(__name__)

#: a daemon log bigger than this at start is moved to ``.log.1``
LOG_ROTATE_SIZE = 16 << 20


@dataclass(frozen=True)
class MountOptions:
    repository: str  # a directory path or s3://bucket/prefix
    mountpoint: str
    cache_dir: str
    cache_size: int  # bytes
    endpoint_url: str | None = None
    foreground: bool = False
    allow_other: bool = False
    debug: bool = False
    #: hydration besides the reads: the background sweep, its cap (bytes/s), a list of what to
    #: fetch first. Plain values, not a ``HydrationConfig``: the command builds the options
    #: before it forks, without importing the daemon (which makes its config from these).
    background: bool = True
    hydrate_rate: float | None = None
    read_around: int = 64 << 10  # see ``HydrationConfig.read_around``
    prefetch_list: str | None = None
    #: a simulated slower link to the store (latency per request in seconds, bytes/s), for
    #: measuring what a remote store would feel like from a local one
    simulate_latency: float | None = None
    simulate_bandwidth: float | None = None
    #: seconds each attempt of a disk snapshot's upload waits for a garbage collection's
    #: exclusive lock; None: ``snapfs.repo.lock.SNAPSHOT_LOCK_PATIENCE`` (a plain value here)
    lock_patience: float | None = None
    #: seconds at least between two readings of the snapshot list for lookups and listings;
    #: None: ``snapfs.image.catalog.REFRESH_INTERVAL``
    refresh_interval: float | None = None
    #: seconds between checks of the block cache's reserve, also while nothing is cached;
    #: None: ``snapfs.daemon.RESERVE_CHECK_EVERY``
    reserve_interval: float | None = None

    def fuse_options(self) -> set[str]:
        options = {"fsname=snapfs", "subtype=snapfs", "default_permissions"}
        if self.allow_other:
            options.add("allow_other")
        return options


def mount(options: MountOptions, announce: Callable[[str], None]) -> None:
    """Mount the repository's snapshots at ``options.mountpoint``.

    Returns once the daemon has mounted (``announce`` gets a line saying where and which pid),
    or, with ``foreground``, once the mount has ended. Raises the daemon's error if it could not
    mount."""
    options = _absolute(options)
    _check_simulation(options)
    if options.prefetch_list is not None:
        # here, not only in the daemon: a FIFO or a bad line is refused before it starts
        parse_prefetch_list(options.prefetch_list)
    files = RunFiles.for_mountpoint(options.mountpoint)
    check_mountpoint(files.mountpoint)
    check_outside_repository(files.mountpoint, options.repository)
    pid_file = PidFile.try_claim(files.pid_file)
    if pid_file is None:
        holder = PidFile.holder(files.pid_file)
        raise MountError(f"{files.mountpoint} is already being mounted by snapfs (pid {holder})")
    handed_over = False  # to the forked child, which then owns the run files
    try:
        check_cache_dir(options.cache_dir)
        log_file = files.log_file(options.cache_dir)
        if options.foreground:
            pid_file.write_pid(os.getpid())
            _serve(options, files, lambda: announce(
                f"serving {options.repository} at {files.mountpoint} (pid {os.getpid()}); "
                f"stop with Ctrl-C or: snapfs umount {files.mountpoint}"))
            return
        sys.stdout.flush()
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        # What the two processes share stays shared: no collection in either (the parent's at
        # exit included) walks, and so copies, the pages of the objects they had at the fork.
        gc.freeze()
        noted = _NotedSignals()  # from before the fork on: see _wait_for_report
        try:
            child = os.fork()
        except BaseException:
            noted.restore()
            raise
        if child == 0:
            noted.restore()
            os.close(read_end)
            _daemon_child(options, files, pid_file, log_file, write_end)
        handed_over = True
        os.close(write_end)
        try:
            report = _wait_for_report(read_end, noted)
        except BaseException:
            _stop_starting_daemon(child, files)
            raise
    finally:
        if not handed_over:
            files.remove()  # still under our lock, so nobody else's files
        pid_file.close()  # a forked child holds the same locks on
    lines = report.splitlines()
    warnings = [line.removeprefix("warning ") for line in lines if line.startswith("warning ")]
    outcome = next((line for line in reversed(lines) if not line.startswith("warning ")), "")
    if outcome.startswith("ready"):
        for warning in warnings:
            log.warning("%s", warning)
        announce(f"mounted {options.repository} at {files.mountpoint} "
                 f"(pid {child}, log {log_file})")
        return
    os.waitpid(child, 0)
    kind, _, rest = outcome.partition(" ")
    code, _, message = rest.partition(" ")
    if kind == "error" and code.isdigit() and message.strip():
        raise SnapfsError(message.strip(), int(code))
    raise MountError(f"the mount daemon exited before mounting; see {log_file}")


def _stop_starting_daemon(child: int, files: RunFiles) -> None:
    """The command was stopped (^C, SIGTERM, SIGHUP) before its daemon said it had mounted:
    stop the daemon too, and wait for it. It used to go on and mount later, with nobody told.
    Still starting, it dies at once (SIGTERM's default, and its setsid kept the terminal's ^C
    from it); a daemon that has just mounted unmounts and exits as on ``umount``. The run
    files a daemon killed before it could remove them are removed here: the command still
    holds their lock, so no other mount can have claimed them."""
    try:
        os.kill(child, signal.SIGTERM)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(child, 0)
            break
        except ChildProcessError:
            break
        except KeyboardInterrupt:  # (impatient: ^C again) the daemon is on its way out anyway
            return
    files.remove()


def _absolute(options: MountOptions) -> MountOptions:
    """Paths made absolute: the daemon changes its directory to /."""
    repository = options.repository
    if "://" not in repository:
        repository = os.path.abspath(repository)
    return dataclasses.replace(options, repository=repository,
                               mountpoint=os.path.realpath(options.mountpoint),
                               cache_dir=os.path.abspath(options.cache_dir))


#: the longest ``--simulate-latency``, in seconds: more than an S3 request may wait for its first
#: byte (5 s) is no link's. An hour held ``mount`` up for good (the daemon mounts once it has
#: read the index), and more than ``time.sleep`` takes failed the daemon (OverflowError)
MAX_SIMULATED_LATENCY = 10.0


def _check_simulation(options: MountOptions) -> None:
    for name, value in (("--simulate-latency", options.simulate_latency),
                        ("--simulate-bandwidth", options.simulate_bandwidth)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be positive")
    latency = options.simulate_latency
    if latency is not None and not latency <= MAX_SIMULATED_LATENCY:
        raise UsageError(f"--simulate-latency must be at most {MAX_SIMULATED_LATENCY:g} s "
                         f"(got {latency:g} s)")


def check_mountpoint(path: str) -> None:
    """Refuse a mount point that is missing, not a directory, mounted already, or not empty."""
    try:
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise MountError(f"mount point {path} is not a directory")
        names = os.listdir(path)  # on a dead FUSE mount, stat may still be answered from cache
    except FileNotFoundError:
        raise NotFoundError(f"mount point {path} does not exist") from None
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise MountError(f"{path} is a dead mount (its daemon died); "
                             f"clean it up with: snapfs umount {path}") from None
        raise MountError(f"mount point {path}: {e.strerror}") from None
    entry = mount_entry(path)
    if entry is not None or os.path.ismount(path):
        what = "snapfs" if entry is not None and entry.is_snapfs else (
            entry.fstype if entry is not None else "something")
        raise MountError(f"{path} is already a mount point ({what} is mounted there)")
    if names:
        raise MountError(f"mount point {path} is not empty")


def check_outside_repository(path: str, repository: str, what: str = "mount point") -> None:
    """Refuse a mount point (or a restore's target: ``what``) at real path ``path`` inside a
    local repository: the repository's listings (garbage collection's of its packs, ``repair
    index``'s) would walk into the mount (or collect the restored files), and the daemon would
    read its own images as the repository's objects."""
    if "://" in repository:
        return
    top = os.path.realpath(repository)
    if path == top or path.startswith(top.rstrip(os.sep) + os.sep):
        raise UsageError(f"{what} {path} is inside the repository {repository}")


def check_cache_dir(directory: str) -> None:
    """Create the cache directory if needed and make sure we can write in it (before forking,
    so the user sees the error)."""
    probe = Path(directory) / f".probe-{os.getpid()}"
    if os.path.lexists(directory) and not os.path.isdir(directory):  # not "File exists"
        raise SnapfsError(f"cache directory {directory} is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SnapfsError(f"cache directory {directory} is not writable: {e.strerror}") from None


# -- the child -----------------------------------------------------------------------------------


class _NotedSignals:
    """^C, SIGTERM and SIGHUP only noted (in ``received``, waking a ``select`` on
    ``wake_read``), from before ``mount`` forks its daemon until it has read the daemon's
    report; one ignored when this began stays ignored. ``restore`` puts back what was there
    (the child calls it at once)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous = {signum: signal.getsignal(signum)
                         for signum in (signal.SIGINT, *STOP_SIGNALS)}
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.old_wakeup = signal.set_wakeup_fd(self.wake_write, warn_on_full_buffer=False)
        for signum, handler in self.previous.items():
            if handler != signal.SIG_IGN:
                signal.signal(signum, lambda signum, _frame: self.received.append(signum))

    def restore(self) -> None:
        signal.set_wakeup_fd(self.old_wakeup)
        for signum, handler in self.previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        for each in (self.wake_read, self.wake_write):
            os.close(each)


def _wait_for_report(fd: int, noted: _NotedSignals) -> str:
    """All the daemon sends on ``fd`` until it closes it; ``KeyboardInterrupt`` once the
    command is stopped (^C, SIGTERM, SIGHUP), then or since before the fork. The signals only
    note that they came and wake the wait (``_NotedSignals``): a handler that raised had its
    exception swallowed when it ran inside a finalizer ("Exception ignored in …"), and the
    command went on to report a mount it had been told to stop. (Seen twice in CI: once
    while this wait's handlers raised, and once when the signal came after the fork, before
    this wait had put its own handlers in place: the daemon had written its pid first.)"""
    try:
        chunks: list[bytes] = []
        while not noted.received:
            ready, _, _ = select.select([fd, noted.wake_read], [], [])
            if noted.wake_read in ready:
                os.read(noted.wake_read, 512)
            if fd in ready and not noted.received:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return b"".join(chunks).decode(errors="replace")
                chunks.append(chunk)
        raise KeyboardInterrupt
    finally:
        noted.restore()
        os.close(fd)


class _Report:
    """The child's report to the waiting parent: warnings, then one last line (``ready`` or
    ``error``); only the first last line is sent."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def _send(self, line: str, last: bool = True) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, " ".join(line.split("\n")).encode() + b"\n")
        except OSError:
            pass  # the parent is gone (killed): nobody to tell
        if last:
            os.close(self._fd)
            self._fd = None

    def warning(self, message: str) -> None:
        self._send(f"warning {message}", last=False)

    def ready(self) -> None:
        self._send("ready")

    def error(self, e: SnapfsError) -> None:
        self._send(f"error {e.exit_code} {e.message}")


def _daemon_child(options: MountOptions, files: RunFiles, pid_file: PidFile,
                  log_file: str, report_fd: int) -> NoReturn:
    """The forked daemon: detach, serve until unmounted, clean up, exit. Never returns."""
    report = _Report(report_fd)
    code = 1
    try:
        os.setsid()
        os.chdir("/")
        _redirect_stdio(log_file)
        _log_to_stderr(options.debug)
        pid_file.write_pid(os.getpid())
        _serve(options, files, report.ready, report.warning)
        code = 0
    except SnapfsError as e:
        log.error("%s", e.message)
        report.error(e)
        code = e.exit_code
    except BaseException as e:  # noqa: B036 - the last word of a process: log whatever it was
        log.exception("the mount daemon failed")
        report.error(SnapfsError(f"the mount daemon failed ({type(e).__name__}); see {log_file}"))
    finally:
        try:
            files.remove()
            log.info("exiting with status %d", code)
            logging.shutdown()
        finally:
            os._exit(code)


def _serve(options: MountOptions, files: RunFiles, ready: Callable[[], None],
           warn: Callable[[str], None] | None = None) -> None:
    """Serve in this process until unmounted: the repository first (so that a bad one fails
    before anything else), with the daemon's libraries loading meanwhile (``_Preload``), then
    the mount. ``warn`` gets the line that names each snapshot root that cannot be read (in
    the foreground the daemon's log, which is stderr, says it)."""
    preload = _Preload()
    try:
        opened = open_repository(options, preload)
    finally:
        if preload.ident is not None:
            preload.join()
    if warn is not None:
        from snapfs.repo.repository import unreadable_warning

        for root in opened.listing.unreadable:
            warn(unreadable_warning(root, opened.repo.store.url, "not served"))
    from snapfs.daemon import serve

    serve(options, files, ready, opened)


class _Preload(threading.Thread):
    """Imports the daemon's modules while the main thread reads the repository's snapshot list
    and index: that is round trips to the store one after another (four on a first mount),
    this is about 0.15 s of CPU, and one waits while the other works. Two threads importing at
    once can, rarely, meet in a cycle of module locks, and importlib then fails one of the two
    imports: if it was this one, the main thread imports the daemon again after ``join``; if it
    was the main thread's, ``open_repository`` reads again after ``join``."""

    def __init__(self) -> None:
        super().__init__(name="snapfs-preload", daemon=True)

    def run(self) -> None:
        try:
            import snapfs.daemon  # noqa: F401
        except BaseException:  # noqa: B036 - imported again, and reported, by the main thread
            pass


def _import_deadlock(e: BaseException) -> bool:
    return type(e).__name__ == "_DeadlockError"  # importlib's, a RuntimeError


def _redirect_stdio(log_file: str) -> None:
    try:
        if os.stat(log_file).st_size > LOG_ROTATE_SIZE:
            os.replace(log_file, log_file + ".1")
    except FileNotFoundError:
        pass
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)


def _log_to_stderr(debug: bool) -> None:
    """Log records of the daemon go to its log file (now its stderr), with times and pid."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s snapfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)


# -- the repository, read before the daemon's libraries load ---------------------------------------


@dataclass(frozen=True)
class OpenRepository:
    """What a daemon reads of its repository before it mounts. Whoever holds it closes
    ``store``."""

    store: ObjectStore
    repo: Repository
    listing: SnapshotListing  # every snapshot (and the roots that cannot be read)
    index: BlobIndex  # loaded after the roots were listed, so it covers them
    index_cache: IndexCache  # the host's, which later reloads of the index go through


def open_repository(options: MountOptions, meanwhile: threading.Thread | None = None,
                    ) -> OpenRepository:
    """Open the store (behind a simulated slow link if asked) and the repository, and read its
    snapshot list and index (through the host's index cache). Blocking. Imports the store's
    and repository's modules (boto3 for S3), not the daemon's. ``meanwhile`` is started once
    the repository is open (its first request made the store's client, on this thread), to
    run while the rest is read."""
    from snapfs.repo.indexcache import IndexCache
    from snapfs.repo.repository import Repository
    from snapfs.store import open_store
    from snapfs.store.simulated import SimulatedStore

    store = open_store(options.repository, options.endpoint_url)
    if options.simulate_latency is not None or options.simulate_bandwidth is not None:
        store = SimulatedStore(store, options.simulate_latency or 0.0, options.simulate_bandwidth)
    try:
        repo = Repository.open(store)
        index_cache = IndexCache(options.cache_dir)
        if meanwhile is not None:
            meanwhile.start()
        try:
            listing, index = repo.snapshots_and_index(index_cache)
        except RuntimeError as e:
            if meanwhile is None or not _import_deadlock(e):
                raise
            meanwhile.join()  # see _Preload
            listing, index = repo.snapshots_and_index(index_cache)
    except BaseException:
        store.close()
        raise
    return OpenRepository(store, repo, listing, index, index_cache)
