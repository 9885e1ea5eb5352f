"""One memory budget for every image's in-memory read-ahead buffers (mountpoint-s3 #987:
per-stream windows without a global cap ran hosts out of memory). The image layer keeps the
buffers and charges them here; the Hydrator only fills them. Trio thread only."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

SPARE_BUFFERS = 4  # freed read-ahead buffers kept for reuse (outside the budget's limit)


class BufferHolder(Protocol):
    def shed(self) -> None:
        """Drop everything held (the budget has already taken it back)."""


class MemoryBudget:
    """One cap on the bytes that every read-ahead buffer holds. A holder that needs room takes
    it from the least recently served other holders, which are told to ``shed``. Trio thread
    only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._held: OrderedDict[BufferHolder, int] = OrderedDict()
        self._spares: list[bytearray] = []

    def take(self, holder: BufferHolder, nbytes: int) -> bool:
        """Charge ``nbytes`` to ``holder``; False if even shedding others cannot make room."""
        while self.used + nbytes > self.limit:
            victim = next((h for h in self._held if h is not holder), None)
            if victim is None:
                return False
            self.used -= self._held.pop(victim)
            victim.shed()
        self.used += nbytes
        self._held[holder] = self._held.get(holder, 0) + nbytes
        self._held.move_to_end(holder)
        return True

    def give_back(self, holder: BufferHolder, nbytes: int) -> None:
        held = self._held.get(holder)
        if held is None:
            return
        nbytes = min(nbytes, held)
        self.used -= nbytes
        if held == nbytes:
            del self._held[holder]
        else:
            self._held[holder] = held - nbytes

    def release(self, holder: BufferHolder) -> None:
        """Take back everything ``holder`` holds."""
        self.used -= self._held.pop(holder, 0)

    def held(self, holder: BufferHolder) -> int:
        return self._held.get(holder, 0)

    def buffer(self, nbytes: int) -> tuple[bytearray, bool]:
        """A buffer of ``nbytes`` for a holder to fill (charge it with ``take`` first), and
        whether it is fresh (all zeros) or a spare one (any bytes). A spare is handed out only
        once no view refers to it any more, so bytes that someone may still read are never
        written over."""
        for i, buf in enumerate(self._spares):
            if len(buf) == nbytes and _unviewed(buf):
                del self._spares[i]
                return buf, False
        return bytearray(nbytes), True

    def recycle(self, buf: bytearray) -> None:
        """Keep a buffer that its holder no longer uses, for ``buffer`` (up to
        ``SPARE_BUFFERS``): a fresh 8 MiB buffer costs more than the reads that fill it
        (allocating, zeroing and faulting its pages in). The last reader may still hold a
        view of it: ``buffer`` checks."""
        if len(self._spares) < SPARE_BUFFERS:
            self._spares.append(buf)


def _unviewed(buf: bytearray) -> bool:
    """No memoryview of ``buf`` is alive: a bytearray refuses to change its size while one
    is (and this costs no copy once it has grown by a byte)."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True
