"""A store wrapper that adds latency and caps bandwidth, so a local repository behaves like a
remote one (``mount --simulate-latency 20ms --simulate-bandwidth 100MB/s``).

Every call waits ``latency`` seconds (first byte), and the bytes it moves share one link of
``bandwidth`` bytes per second with every other call (a reservation on a shared timeline, so
parallel calls do not each get the full bandwidth). Calls run on worker threads, so sleeping here
blocks nothing but the caller.

It keeps the inner store's ``attempts`` and ``stall_timeout``: those bound a call on a store that
hangs, and the delay added here is a transfer that progresses, never a stall. Over an S3 store
nothing then cuts a slowed call short; over a local directory the hydrator's ``store_timeout``
(a total per try) covers the delay too, so a link booked for longer than that by the calls
queued on it (under 1 MB/s, the sweep's runs alone) fails reads as a hung store would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from snapfs.store.base import ObjectStore


class SimulatedStore(ObjectStore):
    def __init__(self, inner: ObjectStore, latency: float = 0.0, bandwidth: float | None = None) -> None:
        self.inner = inner
        self.latency = latency
        self.bandwidth = bandwidth
        self.concurrency = inner.concurrency
        # the inner store's tries and timeouts are the ones that bound a call: the simulated
        # delay is a transfer that progresses, never a stall, and is added to each call once
        # (not retried)
        self.attempts = inner.attempts
        self.stall_timeout = inner.stall_timeout
        self.url = inner.url  # the same repository: browse looks for a daemon serving it
        self.simulation = f"{latency * 1000:.0f} ms a request"
        self.simulation += f", {bandwidth / 1e6:.0f} MB/s" if bandwidth else ""
        self._lock = threading.Lock()
        self._link_free = 0.0

    def _delay(self, nbytes: int) -> None:
        start = time.monotonic()
        done = start + self.latency
        if self.bandwidth:
            with self._lock:
                begin = max(done, self._link_free)
                self._link_free = begin + nbytes / self.bandwidth
                done = self._link_free
        if done > start:
            time.sleep(done - start)

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self._delay(len(data))
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        data = self.inner.get_range(key, offset, length)
        self._delay(len(data))
        return data

    def put(self, key: str, data: bytes) -> None:
        self._delay(len(data))
        self.inner.put(key, data)

    def delete(self, key: str) -> None:
        self._delay(0)
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        self._delay(0)
        return self.inner.list(prefix)

    def exists(self, key: str) -> bool:
        self._delay(0)
        return self.inner.exists(key)

    def ensure_container(self) -> None:
        self.inner.ensure_container()

    def remove_partial_writes(self, prefixes: tuple[str, ...], older_than: float | None = None,
                              ) -> tuple[int, int]:
        return self.inner.remove_partial_writes(prefixes, older_than)

    def container_exists(self) -> bool:
        return self.inner.container_exists()

    def close(self) -> None:
        self.inner.close()
