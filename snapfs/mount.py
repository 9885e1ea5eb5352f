"""The mount daemon's life: check, fork, mount, serve, and leave nothing behind.

``mount(options, announce)`` is all the CLI calls. In order:

1. Checks that need no repository, each a one-line ``SnapfsError``: the mount point exists, is
   a directory, is empty and is not a mount point already (a dead FUSE mount included); no
   daemon serves it (its pid file is locked, see ``control``); the cache directory is writable.
   (Several daemons may share one cache directory: ``BlockCache`` is multi-process safe.)
2. Unless ``foreground``: fork. The parent waits on a pipe for one line from the child,
   ``ready`` or ``error CODE MESSAGE``, then returns or raises that error; the child starts a
   new session (``setsid``), moves to ``/`` (so it keeps no directory busy), and sends its
   stdin to /dev/null and its stdout, stderr and log records to ``<cache>/daemon-KEY.log``.
   Every store client is created in the child, after the fork: boto3 and lmdb must not cross a
   fork.
3. The child opens the store, repository, index and block cache, refreshes the catalog, then
   under one trio run: the signal watcher (SIGTERM, SIGINT: unmount and exit), the hydrator's
   fetch workers, the sweep (hints, then background hydration), the control socket, and
   ``pyfuse3.main()``. It reports ``ready`` once the kernel
   has the mount.
4. The session ends when the file system is unmounted (``snapfs umount``, ``fusermount3 -u``),
   on a signal, or on a ``shutdown`` request: then ``pyfuse3.close(unmount=True)`` (a lazy
   unmount if still mounted), the hydrator's access profiles are saved (bounded time), the
   cache is flushed and closed, and the pid file and socket are removed, in that order, before
   the process exits and releases its locks. ``snapfs umount`` waits for exactly that.

FUSE options: ``fsname=snapfs,subtype=snapfs`` (the mount table shows ``fuse.snapfs``, which
is how ``umount`` knows a mount is ours) and ``default_permissions`` (the kernel checks the
modes: snapshots 0444, disks 0600; the adapter refuses writes to snapshots even for root).
``allow_other`` only when asked: a snapshot holds a whole disk's secrets, and without it only
the mounting user (root included) sees the files; with it, every user can.

Writable disks (``snapfs.write``): the daemon serves the disks kept in its cache directory for
its repository (``DiskService``), unless another daemon on this host already does. The control
socket takes the disk and snapshot requests the CLI sends (``disk-create``, ``disk-list``,
``disk-delete``, ``disk-rollback``, ``snapshot``, ``task``, ``tasks``); a run file
``RUNDIR/KEY.json`` names the repository, so the CLI finds the daemon from ``-r REPO`` alone.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import pyfuse3
import trio

from snapfs.cache import BlockCache
from snapfs.control import MAX_MESSAGE, REQUEST_TIMEOUT, PidFile, RunFiles, mount_entry
from snapfs.errors import MountError, NotFoundError, SnapfsError, UsageError
from snapfs.fuse_ops import SnapshotFS
from snapfs.hydration.scheduler import HydrationConfig, Hydrator
from snapfs.image.catalog import SnapshotCatalog
from snapfs.image.sweep import Sweeper
from snapfs.repo.indexcache import IndexCache
from snapfs.repo.parallel import single_error
from snapfs.repo.repository import BlobIndex, Repository
from snapfs.store import ObjectStore, open_store
from snapfs.store.simulated import SimulatedStore
from snapfs.write.service import DiskService

log = logging.getLogger(__name__)

#: how long a clean shutdown may spend storing access profiles before it gives up on them
SAVE_TIMEOUT = 20.0
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
    hydration: HydrationConfig = field(default_factory=HydrationConfig)
    #: a simulated slower link to the store (latency per request in seconds, bytes/s), for
    #: measuring what a remote store would feel like from a local one
    simulate_latency: float | None = None
    simulate_bandwidth: float | None = None

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
    files = RunFiles.for_mountpoint(options.mountpoint)
    check_mountpoint(files.mountpoint)
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
        child = os.fork()
        if child == 0:
            os.close(read_end)
            _daemon_child(options, files, pid_file, log_file, write_end)
        handed_over = True
        os.close(write_end)
        report = _read_all(read_end)
    finally:
        if not handed_over:
            files.remove()  # still under our lock, so nobody else's files
        pid_file.close()  # a forked child holds the same locks on
    if report.startswith("ready"):
        announce(f"mounted {options.repository} at {files.mountpoint} "
                 f"(pid {child}, log {log_file})")
        return
    os.waitpid(child, 0)
    kind, _, rest = report.partition(" ")
    code, _, message = rest.partition(" ")
    if kind == "error" and code.isdigit() and message.strip():
        raise SnapfsError(message.strip(), int(code))
    raise MountError(f"the mount daemon exited before mounting; see {log_file}")


def _absolute(options: MountOptions) -> MountOptions:
    """Paths made absolute: the daemon changes its directory to /."""
    repository = options.repository
    if "://" not in repository:
        repository = os.path.abspath(repository)
    return dataclasses.replace(options, repository=repository,
                               mountpoint=os.path.realpath(options.mountpoint),
                               cache_dir=os.path.abspath(options.cache_dir))


def _check_simulation(options: MountOptions) -> None:
    for name, value in (("--simulate-latency", options.simulate_latency),
                        ("--simulate-bandwidth", options.simulate_bandwidth)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be positive")


def _open_store(options: MountOptions) -> ObjectStore:
    """The store the daemon reads from, behind a simulated slow link if asked."""
    store = open_store(options.repository, options.endpoint_url)
    if options.simulate_latency is not None or options.simulate_bandwidth is not None:
        store = SimulatedStore(store, options.simulate_latency or 0.0, options.simulate_bandwidth)
    return store


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


def check_cache_dir(directory: str) -> None:
    """Create the cache directory if needed and make sure we can write in it (before forking,
    so the user sees the error)."""
    probe = Path(directory) / f".probe-{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SnapfsError(f"cache directory {directory} is not writable: {e.strerror}") from None


# -- the child -----------------------------------------------------------------------------------


def _read_all(fd: int) -> str:
    chunks = []
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class _Report:
    """The child's one line to the waiting parent; only the first call says anything."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line.encode() + b"\n")
        except OSError:
            pass  # the parent is gone (killed): nobody to tell
        os.close(self._fd)
        self._fd = None

    def ready(self) -> None:
        self._send("ready")

    def error(self, e: SnapfsError) -> None:
        self._send(f"error {e.exit_code} {e.message}")


def _daemon_child(options: MountOptions, files: RunFiles, pid_file: PidFile,
                  log_file: Path, report_fd: int) -> NoReturn:
    """The forked daemon: detach, serve until unmounted, clean up, exit. Never returns."""
    report = _Report(report_fd)
    code = 1
    try:
        os.setsid()
        os.chdir("/")
        _redirect_stdio(log_file)
        _log_to_stderr(options.debug)
        pid_file.write_pid(os.getpid())
        _serve(options, files, report.ready)
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


def _redirect_stdio(log_file: Path) -> None:
    try:
        if log_file.stat().st_size > LOG_ROTATE_SIZE:
            log_file.replace(log_file.with_suffix(".log.1"))
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


# -- serving -------------------------------------------------------------------------------------


def _serve(options: MountOptions, files: RunFiles, ready: Callable[[], None]) -> None:
    """Open everything, mount, serve until unmounted, close everything (in this process)."""
    store = _open_store(options)
    try:
        repo = Repository.open(store)
        cache = BlockCache(options.cache_dir, options.cache_size)
        try:
            # the catalog's first refresh loads the index (with the snapshot list it matches)
            hydrator = Hydrator(repo, BlobIndex(), cache, options.hydration)
            catalog = SnapshotCatalog(repo, hydrator,
                                      index_cache=IndexCache(options.cache_dir))
            disks = DiskService(options.cache_dir, repo, hydrator, catalog,
                                disk_path=lambda name: f"{options.mountpoint}/disks/{name}.img")
            disks.open()
            try:
                daemon = MountDaemon(options, files, repo, cache, hydrator, catalog, disks)
                try:
                    files.socket.unlink()  # a dead predecessor's; we hold the pid file's lock
                except FileNotFoundError:
                    pass
                files.write_info({"repository": options.repository, "repository_id": repo.config.id,
                                  "mountpoint": options.mountpoint, "pid": os.getpid(),
                                  "disks": disks.enabled})
                with single_error():
                    trio.run(daemon.run, ready)
            finally:
                disks.close()
        finally:
            cache.close()
    finally:
        store.close()


class MountDaemon:
    """One mount's trio side: FUSE session, hydrator, control socket, signals."""

    def __init__(self, options: MountOptions, files: RunFiles, repo: Repository,
                 cache: BlockCache, hydrator: Hydrator, catalog: SnapshotCatalog,
                 disks: DiskService | None = None) -> None:
        self.options = options
        self.files = files
        self.repo = repo
        self.cache = cache
        self.hydrator = hydrator
        self.catalog = catalog
        self.sweeper = Sweeper(catalog, hydrator, options.hydration)  # hints, background
        self.disks = disks
        self.ops = SnapshotFS(catalog, disks)
        self.started = time.time()
        self._fuse_live = False
        self._cancel_scope: trio.CancelScope | None = None

    async def run(self, ready: Callable[[], None]) -> None:
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            await nursery.start(self._watch_signals)
            await self.catalog.refresh()
            await nursery.start(self.hydrator.run)
            nursery.start_soon(self.sweeper.run)
            if self.disks is not None and self.disks.enabled:
                await self.disks.start()
                self.ops._sync_disks()
                await nursery.start(self.disks.run)
            await nursery.start(self._serve_control)
            try:
                pyfuse3.init(self.ops, self.options.mountpoint, self.options.fuse_options())
            except RuntimeError as e:
                raise MountError(f"cannot mount at {self.options.mountpoint}: {e}") from None
            self._fuse_live = True
            try:
                log.info("mounted %s at %s", self.repo.store.url, self.options.mountpoint)
                ready()
                await pyfuse3.main()
            finally:
                self._fuse_live = False
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", self.options.mountpoint)
            nursery.cancel_scope.cancel()
        with trio.move_on_after(SAVE_TIMEOUT) as scope:
            try:
                await self.hydrator.save()
            except SnapfsError as e:
                log.warning("access profiles not saved: %s", e.message)
        if scope.cancelled_caught:
            log.warning("access profiles not saved: the store took over %.0f s", SAVE_TIMEOUT)

    def shutdown(self) -> None:
        """Leave the FUSE loop (``run`` then unmounts and cleans up); callable on the trio
        thread only."""
        if self._fuse_live:
            pyfuse3.terminate()
        elif self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _watch_signals(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # trio delivers the signals here, on the trio thread, so terminate() needs no token.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                self.shutdown()

    # -- control socket ------------------------------------------------------------------------

    async def _serve_control(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.files.socket))
        await trio.Path(self.files.socket).chmod(0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._answer, [listener])

    async def _answer(self, stream: trio.SocketStream) -> None:
        """One request line, one reply line. Never raises: a bad client must not end the mount."""
        shutdown = False
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    line = await _receive_line(stream)
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                op = request.get("op")
                if op == "shutdown":
                    reply: dict[str, Any] = {"ok": True}
                    shutdown = True
                else:
                    reply = await self._reply(op, request)
            except (trio.TooSlowError, trio.BrokenResourceError, ValueError) as e:
                log.warning("control request dropped: %s", e or type(e).__name__)
                return
            except Exception:
                log.exception("control request failed")
                return
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    await stream.send_all(json.dumps(reply, default=str).encode() + b"\n")
            except (trio.TooSlowError, trio.BrokenResourceError, ValueError) as e:
                log.warning("control request dropped: %s", e or type(e).__name__)
            except Exception:
                log.exception("control request failed")
        if shutdown:
            log.info("shutdown requested")
            self.shutdown()

    async def _reply(self, op: object, request: dict[str, Any]) -> dict[str, Any]:
        """The answer to one request other than ``shutdown``: ``{"ok": true, ...}``, or
        ``{"ok": false, "error": MESSAGE, "code": EXIT_CODE}`` for a ``SnapfsError``."""
        disks = self.disks
        try:
            if op == "stats":
                return {"ok": True, "stats": await self.stats()}
            if disks is None or not disks.enabled:
                if op in ("tasks", "disk-list"):
                    return {"ok": True, "tasks": [], "disks": []}
                reason = disks.disabled_reason if disks is not None else None
                return {"ok": False, "code": 1,
                        "error": reason or f"unknown request {op!r}"}
            if op == "disk-create":
                disk = await disks.create_disk(str(request["name"]), request.get("from"),
                                               request.get("size"))
                return {"ok": True, "disk": disk.stats()}
            if op == "disk-list":
                return {"ok": True, "disks": disks.disk_list()}
            if op == "disk-delete":
                await disks.delete_disk(str(request["name"]))
                return {"ok": True}
            if op == "disk-rollback":
                return {"ok": True, "rollback": await disks.rollback(str(request["name"]),
                                                                     str(request["snapshot"]))}
            if op == "snapshot":
                task = await disks.snapshot(
                    [str(n) for n in request["disks"]], request.get("name"),
                    [str(t) for t in request.get("tags", [])],
                    consistency=str(request.get("consistency", "crash")),
                    deadline=request.get("deadline"))
                return {"ok": True, "task": disks.task_summary(task.id)}
            if op == "task":
                wait = min(float(request.get("wait", 0)), REQUEST_TIMEOUT / 2)
                return {"ok": True, "task": await disks.wait_task(str(request["id"]), wait)}
            if op == "tasks":
                return {"ok": True, "tasks": disks.task_list()}
            return {"ok": False, "code": 2, "error": f"unknown request {op!r}"}
        except SnapfsError as e:
            return {"ok": False, "code": e.exit_code, "error": e.message}
        except (KeyError, TypeError) as e:
            return {"ok": False, "code": 2, "error": f"malformed {op} request: {e}"}

    async def stats(self) -> dict[str, Any]:
        cache = await trio.to_thread.run_sync(self._cache_stats)
        images = {name: view.stats() for name, view in sorted(self.catalog.images().items())}
        return {
            "mountpoint": self.options.mountpoint,
            "repository": self.repo.store.url,
            "pid": os.getpid(),
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "uptime_seconds": round(time.time() - self.started, 3),
            "log": None if self.options.foreground else str(
                self.files.log_file(self.options.cache_dir)),
            "images": images,
            "disks": self.disks.disk_list() if self.disks is not None and self.disks.enabled else [],
            "hydrator": self.hydrator.stats(),
            "cache": cache,
        }

    def _cache_stats(self) -> dict[str, Any]:
        return {
            "directory": str(self.cache.dir),
            "capacity": self.cache.capacity,
            "bytes": self.cache.size,
            "blocks": self.cache.entries(),
            "hits": self.cache.hits,
            "misses": self.cache.misses,
            "bad": self.cache.bad,
        }


async def _receive_line(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ValueError("request too long")
    return bytes(data.partition(b"\n")[0])
