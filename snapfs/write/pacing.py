"""How a served disk's background work (a snapshot's upload, staging) gives way to the disks'
own reads and writes: while they are in use, it takes at most ``UPLOAD_SHARE_WHEN_BUSY`` of the
time (the "at most ~10% of disk I/O" that cloud snapshots promise).

"In use" is read from the last read or write someone waited on: within ``BUSY_WINDOW`` of now,
and not before the work began. A disk written up to the instant a snapshot was taken (a script
that writes, syncs and snapshots) is not in use once the writes have stopped: only I/O that
comes while the work runs makes it rest. Without that, the upload of a snapshot taken right
after the writes rested for the whole window on I/O that had ended.

No I/O of its own; the trio clock only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

#: while disks are read or written, background work takes at most this share of the time,
#: so foreground I/O keeps the CPU and disk
UPLOAD_SHARE_WHEN_BUSY = 0.1
BUSY_WINDOW = 0.25  # seconds since the last disk read or write that count as busy
REST_SLICE = 0.05  # resting work looks this often whether the disks fell quiet


class ForegroundPacer:
    """``last_io()``: the trio time of the disks' last read or write someone waited on."""

    def __init__(self, last_io: Callable[[], float]) -> None:
        self.last_io = last_io
        self._rest_until = 0.0  # the rest owed by all the work, jointly

    def busy(self, since: float = -math.inf) -> bool:
        """Whether the disks are in use: read or written within ``BUSY_WINDOW``, and not
        before ``since`` (when the work that asks began)."""
        last = self.last_io()
        return last >= since and trio.current_time() - last < BUSY_WINDOW

    async def pace(self, batch_seconds: float, since: float = -math.inf) -> None:
        """After a step of background work that took ``batch_seconds`` (an upload's batch or
        PUT, a staging batch): while the disks are in use, rest so that all of it together
        keeps its share of the time. The rest is owed jointly: an upload runs several PUTs at
        once, and each resting only for its own work gave the upload as a whole four times
        its share. The rest ends early when the disks fall quiet."""
        if not self.busy(since):
            return
        now = trio.current_time()
        owed = batch_seconds * (1 - UPLOAD_SHARE_WHEN_BUSY) / UPLOAD_SHARE_WHEN_BUSY
        self._rest_until = max(self._rest_until, now) + owed
        until = self._rest_until
        while True:  # polled: "quiet" is the absence of I/O for a while, not an event
            left = until - trio.current_time()
            if left <= 0 or not self.busy(since):
                return
            await trio.sleep(min(REST_SLICE, left))
