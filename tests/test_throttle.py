"""RateLimiter: the long-run rate never exceeds the budget, shared by concurrent callers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio
import trio.testing

from snapfs.throttle import RateLimiter

T = TypeVar("T")


def run_with_mock_clock(fn: Callable[[], Awaitable[T]]) -> T:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(fn, clock=clock)


def test_unlimited_never_sleeps() -> None:
    async def main() -> float:
        limiter = RateLimiter(None)
        for _ in range(100):
            await limiter.take(1 << 30)
        return trio.current_time()

    assert run_with_mock_clock(main) == 0


def test_sequential_takes_follow_the_rate() -> None:
    async def main() -> float:
        limiter = RateLimiter(10e6)  # 10 MB/s
        start = trio.current_time()
        for _ in range(5):
            await limiter.take(10_000_000)
        return trio.current_time() - start

    # the first 10 MB goes at once, each later one waits for the previous second to pass
    assert run_with_mock_clock(main) == pytest.approx(4.0)


def test_concurrent_callers_share_one_budget() -> None:
    async def main() -> list[float]:
        limiter = RateLimiter(1e6)
        done: list[float] = []

        async def sender() -> None:
            for _ in range(3):
                await limiter.take(500_000)
            done.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(sender)
        return done

    finished = run_with_mock_clock(main)
    # 12 takes of 0.5 MB at 1 MB/s: the last one starts at 5.5 s
    assert max(finished) == pytest.approx(5.5)


def test_rejects_non_positive_rate() -> None:
    with pytest.raises(ValueError):
        RateLimiter(0)
