"""Packs: many encoded blobs appended into one object of several MiB.

Layout of a pack object::

    blob | blob | ... | trailer entries | footer

Each trailer entry is ``id (32) | kind u8 | offset u32 | length u32 | raw length u32`` and the
footer is ``magic "SNPK" | version u8 | entry count u32``. The trailer makes a pack
self-describing (an index can be rebuilt from packs alone); readers normally find a blob
through the repository index and fetch only its byte range.

A pack's name is the BLAKE3 hash of its whole contents, so a pack can be checked end to end.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import blake3

from snapfs.errors import CorruptBlock, FormatError

PACK_MAGIC = b"SNPK"
PACK_VERSION = 1
ENTRY = struct.Struct("<32sBIII")
FOOTER = struct.Struct("<4sBI")

KIND_DATA = 0
KIND_PAGE = 1


class PackEntry(NamedTuple):
    """One blob in a pack; field order is the trailer's (so ``_make`` takes unpacked entries)."""

    blob_id: bytes
    kind: int
    offset: int
    length: int
    raw_length: int


class PackBuilder:
    """Accumulates encoded blobs; ``finish`` returns the pack's name, bytes and entries.

    ``add`` only keeps a reference (cheap on the thread that assembles packs, usually trio's);
    the one copy into the pack's bytes, and the hash that names it, happen in ``finish``, which
    the uploader calls in a worker thread."""

    def __init__(self) -> None:
        self._parts: list[bytes | memoryview] = []
        self._size = 0
        self.entries: list[PackEntry] = []

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, blob_id: bytes, kind: int, encoded: bytes | memoryview, raw_length: int) -> None:
        self.entries.append(PackEntry(blob_id, kind, self._size, len(encoded), raw_length))
        self._parts.append(encoded)
        self._size += len(encoded)

    def split(self, pieces: int) -> list[PackBuilder]:
        """This pack's blobs, in order, as up to ``pieces`` packs of about equal size (fewer
        if a blob is bigger than a share)."""
        share = -(-self._size // max(1, pieces))
        out = [PackBuilder()]
        for entry, part in zip(self.entries, self._parts, strict=True):
            if out[-1].size >= share:
                out.append(PackBuilder())
            out[-1].add(entry.blob_id, entry.kind, part, entry.raw_length)
        return out

    def finish(self) -> tuple[str, bytes, list[PackEntry]]:
        trailer = b"".join(ENTRY.pack(*e) for e in self.entries)
        footer = FOOTER.pack(PACK_MAGIC, PACK_VERSION, len(self.entries))
        data = b"".join([*self._parts, trailer, footer])
        return pack_name(data), data, self.entries


def pack_name(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def read_trailer(data: bytes) -> list[PackEntry]:
    """Parse the entries of a whole pack."""
    return read_tail(data, len(data))


def trailer_size(tail: bytes, pack_size: int) -> int:
    """How many bytes at the end of a pack of ``pack_size`` bytes its trailer and footer take,
    from ``tail``, at least the pack's last ``FOOTER.size`` bytes."""
    if pack_size < FOOTER.size or len(tail) < FOOTER.size:
        raise CorruptBlock("pack too short for a footer")
    magic, version, count = FOOTER.unpack_from(tail, len(tail) - FOOTER.size)
    if magic != PACK_MAGIC:
        raise CorruptBlock("pack footer has a bad magic")
    if version != PACK_VERSION:
        raise FormatError(f"unknown pack format version {version}")
    size = FOOTER.size + count * ENTRY.size
    if size > pack_size:
        raise CorruptBlock("pack trailer is longer than the pack")
    return int(size)


def read_tail(tail: bytes, pack_size: int) -> list[PackEntry]:
    """Parse the entries of a pack of ``pack_size`` bytes from ``tail``, its last bytes (at
    least ``trailer_size`` of them): an index is rebuilt from these alone."""
    size = trailer_size(tail, pack_size)
    if len(tail) < size:
        raise ValueError(f"the pack's last {size} bytes are needed, not {len(tail)}")
    start = pack_size - size  # where the trailer starts in the pack
    body = memoryview(tail)[len(tail) - size : len(tail) - FOOTER.size]
    entries = list(map(PackEntry._make, ENTRY.iter_unpack(body)))
    if any(e.offset + e.length > start for e in entries):
        raise CorruptBlock("pack entry points past the blobs")
    return entries
