"""A byte-rate limiter for trio tasks (upload ``--rate``, later ``--hydrate-rate``).

Each ``take(n)`` reserves the next ``n / rate`` seconds of the budget and sleeps until its turn,
so concurrent callers share one rate and the long-run average never exceeds it.
"""

from __future__ import annotations

import trio


class RateLimiter:
    def __init__(self, bytes_per_second: float | None) -> None:
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("rate must be positive")
        self.rate = bytes_per_second
        self._next = 0.0

    async def take(self, nbytes: int) -> None:
        start = self.reserve(nbytes)
        if start > trio.current_time():
            await trio.sleep_until(start)

    def reserve(self, nbytes: int) -> float:
        """Reserve the next ``nbytes / rate`` seconds of the budget: the trio time at which
        the caller's turn comes (now, or already passed, without a rate)."""
        now = trio.current_time()
        if self.rate is None:
            return now
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        return start
