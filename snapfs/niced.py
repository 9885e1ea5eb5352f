"""CPU work that gives way: a served disk's upload and staging hash and compress on threads of
the lowest CPU priority, so that the disk's own reads and writes go first.

Cloud snapshots promise that taking one costs foreground I/O at most about 10%. The upload
already rests while the disks are in use (``pacing.UPLOAD_SHARE_WHEN_BUSY``), but its batches
still hash and compress on every core while they run, beside the daemon's FUSE thread, the
loop device's worker and the writer itself. On threads at nice 19 the kernel hands the CPU to
those first whenever it is short, and the upload takes what is left; on a quiet machine nothing
changes, since nobody else wants the CPU then.

The threads are this pool's own, not trio's: trio's worker threads serve every job of the
daemon (a FUSE write's ``pwrite`` among them), and a thread that lowered its priority cannot
raise it again without privilege. Nice 19 and not ``SCHED_IDLE``: a thread holds the GIL
between its C calls, and one that the kernel would starve while it holds it would stall the
FUSE thread behind it; at nice 19 it still gets a short turn soon.

A job is not cancellable once started (as ``trio.to_thread.run_sync``'s default): it holds
buffers the caller owns, and it is short (one batch).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")

NICENESS = 19  # the lowest priority a thread can have, short of SCHED_IDLE
WORKERS = max(1, min(4, os.cpu_count() or 1))


def _give_way() -> None:
    """Thread initializer: this thread (Linux keeps a nice value per thread) at the lowest
    priority. Raising one's nice value needs no privilege; if it fails anyway (a seccomp
    filter), the work still runs, at normal priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
    except OSError as e:
        log.debug("could not lower a worker thread's CPU priority: %s", e)


class NicedWorkers:
    """Up to ``workers`` threads at nice 19, started on first use (so after the daemon has
    forked) and ended by ``close``."""

    def __init__(self, workers: int = WORKERS) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on one of the threads: its result, or its exception raised here."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="snapfs-niced",
                                            initializer=_give_way)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future: Future[T] = self._pool.submit(fn, *args)
        future.add_done_callback(lambda _f: token.run_sync_soon(done.set))
        with trio.CancelScope(shield=True):
            await done.wait()
        return future.result()

    def close(self) -> None:
        """End the threads (after the jobs given to them)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


async def run_on(cpu: NicedWorkers | None, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on one of ``cpu``'s threads, or on trio's if there is no pool (a caller
    outside the daemon, a test)."""
    if cpu is not None:
        return await cpu.run(fn, *args)
    return await trio.to_thread.run_sync(fn, *args)
