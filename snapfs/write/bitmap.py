"""A fixed-size set of block numbers as a bit array: one bit per block, so a 1 TiB disk of
16 KiB blocks costs 8 MiB however many of its blocks are set."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_NONZERO = re.compile(rb"[^\x00]")


class Bitmap:
    __slots__ = ("_bits", "count", "size")

    def __init__(self, size: int, members: Iterable[int] = ()) -> None:
        self.size = size
        self._bits = bytearray((size + 7) // 8)
        self.count = 0
        for n in members:
            self.add(n)

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int) or not 0 <= n < self.size:
            return False
        return bool(self._bits[n >> 3] & (1 << (n & 7)))

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        """Members in increasing order; runs of zero bytes are skipped in C."""
        for match in _NONZERO.finditer(self._bits):
            i = match.start()
            byte = self._bits[i]
            for b in range(8):
                if byte & (1 << b):
                    yield i * 8 + b

    def add(self, n: int) -> bool:
        """Set bit ``n``; True if it was not set."""
        mask = 1 << (n & 7)
        if self._bits[n >> 3] & mask:
            return False
        self._bits[n >> 3] |= mask
        self.count += 1
        return True

    def discard(self, n: int) -> bool:
        mask = 1 << (n & 7)
        if not self._bits[n >> 3] & mask:
            return False
        self._bits[n >> 3] &= ~mask & 0xFF
        self.count -= 1
        return True

    def update(self, members: Iterable[int]) -> None:
        for n in members:
            self.add(n)

    def resized(self, size: int) -> Bitmap:
        """A copy holding the members below ``size``."""
        out = Bitmap(size)
        out.update(n for n in self if n < size)
        return out

    def copy(self) -> Bitmap:
        out = Bitmap(self.size)
        out._bits[:] = self._bits
        out.count = self.count
        return out
