"""What hydration counts: the daemon's fetch figures (``HydrationStats``, with fetch latencies
in a ``LatencyWindow``) and each image's share of them (``ReadTally``), for ``snapfs stats``.
Plain counters, touched on the trio thread only."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class LatencyWindow:
    """The last ``size`` latencies, for p50/p99."""

    def __init__(self, size: int = 2048) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def percentile(self, p: float) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class HydrationStats:
    blocks_fetched: int = 0
    bytes_fetched: int = 0  # bytes moved from the store (compressed, with run gaps)
    requests: int = 0  # GETs issued
    failed_requests: int = 0
    cache_hits: int = 0
    waiting_reads: int = 0  # blocks a reader had to wait on the store for
    wait_seconds: float = 0.0  # total time readers spent waiting on the store
    background_blocks: int = 0
    background_bytes: int = 0
    read_around_blocks: int = 0  # blocks fetched beside a waiting read's (its GET's neighbours)
    read_around_gets: int = 0  # GETs that brought such blocks
    read_around_paid: int = 0  # of those, the ones with a block that was read afterwards
    corrupt_blocks: int = 0
    failed_again: int = 0  # reads failed at once: their block's fetch had failed just before


@dataclass
class ReadTally:
    """What one image's reads cost: the image layer keeps one per image."""

    cache_hits: int = 0
    blocks_fetched: int = 0  # blocks its readers had to wait on the store for
    wait_seconds: float = 0.0
