"""Running blocking jobs on worker threads from trio, a bounded number at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import trio

from snapfs.errors import SnapfsError

T = TypeVar("T")
R = TypeVar("R")


async def map_in_threads(
    fn: Callable[[T], R],
    items: Iterable[T],
    limiter: trio.CapacityLimiter,
    on_done: Callable[[T, R], None] | None = None,
) -> None:
    """Call ``fn(item)`` on a worker thread for every item, at most ``limiter`` at once.

    ``on_done`` runs on the trio thread as each call returns. The first exception cancels the
    rest and propagates (wrapped in an ExceptionGroup, as trio does)."""
    send, receive = trio.open_memory_channel[T](0)

    async def feed() -> None:
        async with send:
            for item in items:
                await send.send(item)

    async def work(rx: trio.MemoryReceiveChannel[T]) -> None:
        async with rx:
            async for item in rx:
                result = await trio.to_thread.run_sync(fn, item, limiter=limiter)
                if on_done is not None:
                    on_done(item, result)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        for _ in range(int(limiter.total_tokens)):
            nursery.start_soon(work, receive.clone())
        receive.close()


@contextmanager
def single_error() -> Iterator[None]:
    """Turn a trio ExceptionGroup back into the one error a caller can act on.

    When several tasks fail, the first ``SnapfsError`` (else the first KeyboardInterrupt) is
    raised alone; a group with anything else in it is re-raised unchanged, since that is a bug
    whose whole story matters."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        for kind in (KeyboardInterrupt, SnapfsError):
            for exc in leaves:
                if isinstance(exc, kind):
                    raise exc from None
        raise


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc
