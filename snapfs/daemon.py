"""A running mount daemon: what it opens, the trio run that serves, and how it closes.

``serve(options, files, ready, opened)`` runs in the process that will hold the mount (the
forked child of ``snapfs.mount``, or the command itself with ``--foreground``), with the
repository ``snapfs.mount`` opened and read (its snapshot list and index). It opens the block
cache and disks, then under one trio run: the signal watcher (SIGTERM, SIGINT: unmount and
exit), the catalog (from that list and index), the hydrator's fetch workers, the sweep (hints,
then background hydration), the control socket, and ``pyfuse3.main()``. It calls ``ready`` once
the mount answers (and its kernel read-ahead is widened).

The session ends when the file system is unmounted (``snapfs umount``, ``fusermount3 -u``), on
a signal, or on a ``shutdown`` request: then ``pyfuse3.close(unmount=True)`` (a lazy unmount if
still mounted), the hydrator's access profiles are saved (bounded time), the cache is flushed
and closed, in that order; ``snapfs.mount`` removes the pid file and socket last.

Writable disks (``snapfs.write``): the daemon serves the disks kept in its cache directory for
its repository (``DiskService``), unless another daemon on this host already does. The control
socket takes the disk and snapshot requests the CLI sends (``disk-create``, ``disk-list``,
``disk-delete``, ``disk-rollback``, ``snapshot``, ``task``, ``tasks``), and ``refresh`` from
the commands that create or delete snapshots (the catalog reads the snapshot list again at
once); a run file ``RUNDIR/KEY.json`` names the repository, so the CLI finds the daemon from
``-r REPO`` alone.

Only ``snapfs.mount`` imports this module, and only where the daemon runs: it pulls in trio,
pyfuse3, lmdb and the store's client library.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from snapfs.cache import BlockCache
from snapfs.control import MAX_MESSAGE, REQUEST_TIMEOUT, RunFiles
from snapfs.errors import MountError, SnapfsError
from snapfs.fuse_ops import SnapshotFS
from snapfs.hydration.scheduler import HydrationConfig, Hydrator
from snapfs.image.catalog import REFRESH_INTERVAL, SnapshotCatalog
from snapfs.image.sweep import Sweeper
from snapfs.repo.lock import SNAPSHOT_LOCK_PATIENCE
from snapfs.repo.parallel import single_error
from snapfs.repo.repository import Repository
from snapfs.write.service import DiskService

if TYPE_CHECKING:
    from snapfs.mount import MountOptions, OpenRepository

log = logging.getLogger(__name__)

#: how long a clean shutdown may spend storing access profiles before it gives up on them
SAVE_TIMEOUT = 20.0
#: the kernel's read-ahead for the mount, in KiB: 1 MiB, the largest read request FUSE sends
#: (256 pages), instead of the 128 KiB default, so a sequential reader of an image (a copy, a
#: loop device under a file restore) costs one request per MiB instead of eight
KERNEL_READ_AHEAD_KB = 1024
#: how long a thread holding the GIL keeps it while another waits (Python's default is 5 ms):
#: the trio thread answers the kernel's requests, and behind a worker thread's hashing or
#: encoding each of them waited up to the whole interval
SWITCH_INTERVAL = 0.0005
#: seconds between checks of the block cache's reserve while nothing may be cached
RESERVE_CHECK_EVERY = 2.0


def hydration_config(options: MountOptions) -> HydrationConfig:
    return HydrationConfig(background=options.background, hydrate_rate=options.hydrate_rate,
                           read_around=options.read_around, prefetch_list=options.prefetch_list)


def given(seconds: float | None, default: float) -> float:
    """A mount option of seconds (``MountOptions.lock_patience`` ...), or its default where
    the command did not give it."""
    return default if seconds is None else seconds


def serve(options: MountOptions, files: RunFiles, ready: Callable[[], None],
          opened: OpenRepository) -> None:
    """Mount what ``opened`` holds, serve until unmounted, close everything (``opened.store``
    included) in this process."""
    repo = opened.repo
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        cache = BlockCache(options.cache_dir, options.cache_size)
        try:
            hydrator = Hydrator(repo, opened.index, cache, hydration_config(options))
            catalog = SnapshotCatalog(repo, hydrator,
                                      given(options.refresh_interval, REFRESH_INTERVAL),
                                      index_cache=opened.index_cache)
            disks = DiskService(options.cache_dir, repo, hydrator, catalog,
                                disk_path=lambda name: f"{options.mountpoint}/disks/{name}.img",
                                upload_lock_patience=given(options.lock_patience,
                                                           SNAPSHOT_LOCK_PATIENCE))
            disks.open()
            try:
                daemon = MountDaemon(options, files, repo, cache, hydrator, catalog, disks)
                try:
                    os.unlink(files.socket)  # a dead predecessor's; we hold the pid file's lock
                except FileNotFoundError:
                    pass
                files.write_info({"repository": options.repository, "repository_id": repo.config.id,
                                  "mountpoint": options.mountpoint, "pid": os.getpid(),
                                  "disks": disks.enabled, "disk_state": str(disks.dir),
                                  "cache_dir": os.path.abspath(options.cache_dir)})
                with single_error():
                    trio.run(daemon.run, ready, opened)
            finally:
                disks.close()
        finally:
            cache.close()
    finally:
        opened.store.close()


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
        self.sweeper = Sweeper(catalog, hydrator, hydrator.config)  # hints, background
        self.disks = disks
        self.ops = SnapshotFS(catalog, disks)
        self.started = time.time()
        self._fuse_live = False
        self._cancel_scope: trio.CancelScope | None = None

    async def run(self, ready: Callable[[], None], opened: OpenRepository) -> None:
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            await nursery.start(self._watch_signals)
            self.catalog.load(opened.listing, opened.index)
            await nursery.start(self.hydrator.run)
            nursery.start_soon(self.sweeper.run)
            nursery.start_soon(self._keep_cache_reserve)
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
                nursery.start_soon(self._announce, ready)
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

    async def _announce(self, ready: Callable[[], None]) -> None:
        """Call ``ready`` once the mount answers, its read-ahead set (see below)."""
        await self._widen_read_ahead()
        ready()

    async def _widen_read_ahead(self) -> None:
        """Set the kernel's read-ahead for this mount to ``KERNEL_READ_AHEAD_KB`` (best effort:
        only root may, and the default only costs speed). Not before the kernel has the reply
        to FUSE's INIT, which lowers it to what that reply allows (128 KiB): the ``stat`` that
        finds the mount's device is answered only after it, by this daemon (on a thread, so
        that the FUSE loop answers it)."""
        def widen() -> None:
            device = os.stat(self.options.mountpoint).st_dev
            path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
            with open(path, "w") as f:
                f.write(str(KERNEL_READ_AHEAD_KB))

        try:
            await trio.to_thread.run_sync(widen, abandon_on_cancel=True)
        except OSError as e:
            log.debug("kernel read-ahead of %s left as it was: %s", self.options.mountpoint, e)

    async def _keep_cache_reserve(self) -> None:
        """The cache's reserve kept free while nothing is cached, too (see ``BlockCache``)."""
        every = given(self.options.reserve_interval, RESERVE_CHECK_EVERY)
        while True:
            await trio.sleep(every)
            await trio.to_thread.run_sync(self.cache.keep_reserve)

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
                    # a name it made go (a deleted snapshot, a deleted disk) is gone from the
                    # kernel too before the command hears back
                    await self.ops.settle()
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
            if op == "snapshots-open":
                return {"ok": True, "open": self.ops.snapshots_open()}
            if op == "refresh":  # a command here made or deleted snapshots: see them now
                await self.catalog.refresh(force=True)
                return {"ok": True}
            if disks is None or not disks.enabled:
                if op in ("tasks", "disk-list"):
                    return {"ok": True, "tasks": [], "disks": []}
                reason = disks.disabled_reason if disks is not None else None
                return {"ok": False, "code": 1,
                        "error": reason or f"unknown request {op!r}"}
            if op == "disk-create":
                disk = await disks.create_disk(str(request["name"]), request.get("from"),
                                               request.get("size"))
                # with the image's path, as ``disk-list`` gives it
                return {"ok": True, "disk": disks.disk_facts(disk)}
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
        except Exception as e:  # a bug: the command says so in one line, the log has the rest
            log.exception("control request %s failed", op)
            where = ("its stderr" if self.options.foreground
                     else f"its log {self.files.log_file(self.options.cache_dir)}")
            return {"ok": False, "code": 1,
                    "error": f"the snapfs daemon failed to do {op}: {type(e).__name__}: {e} "
                             f"({where} has the details)"}

    async def stats(self) -> dict[str, Any]:
        cache = await trio.to_thread.run_sync(self._cache_stats)
        in_use = self.catalog.in_use
        images = {name: {**view.stats(), "in_use": view.root.id in in_use}
                  for name, view in sorted(self.catalog.images().items())}
        return {
            "mountpoint": self.options.mountpoint,
            "repository": self.repo.store.url,
            "simulated": getattr(self.repo.store, "simulation", None),
            "pid": os.getpid(),
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "uptime_seconds": round(time.time() - self.started, 3),
            "log": None if self.options.foreground else str(
                self.files.log_file(self.options.cache_dir)),
            "background": self.options.background,
            "images": images,
            "disks": self.disks.disk_list() if self.disks is not None and self.disks.enabled else [],
            "hydrator": self.hydrator.stats(),
            "cache": cache,
        }

    def _cache_stats(self) -> dict[str, Any]:
        try:
            free: int | None = self.cache.free_space()
        except OSError:  # its directory removed under the daemon: stats answer all the same
            free = None
        return {
            "directory": str(self.cache.dir),
            "capacity": self.cache.capacity,
            "bytes": self.cache.size,
            "blocks": self.cache.entries(),
            "hits": self.cache.hits,
            "misses": self.cache.misses,
            "bad": self.cache.bad,
            "errors": self.cache.errors,  # of its own files and index (each cost a miss)
            "reserve": self.cache.reserve,  # bytes of its file system it leaves free
            "free": free,
            "short_of_space": self.cache.short_of_space,  # caching paused to keep the reserve
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
