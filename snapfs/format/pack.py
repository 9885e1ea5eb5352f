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

    def finish(self) -> tuple[str, bytes, list[PackEntry]]:
        trailer = b"".join(ENTRY.pack(*e) for e in self.entries)
        footer = FOOTER.pack(PACK_MAGIC, PACK_VERSION, len(self.entries))
        data = b"".join([*self._parts, trailer, footer])
        return pack_name(data), data, self.entries


def pack_name(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def read_trailer(data: bytes) -> list[PackEntry]:
    """Parse the entries of a whole pack (used by verify and repack)."""
    if len(data) < FOOTER.size:
        raise CorruptBlock("pack too short for a footer")
    magic, version, count = FOOTER.unpack_from(data, len(data) - FOOTER.size)
    if magic != PACK_MAGIC:
        raise CorruptBlock("pack footer has a bad magic")
    if version != PACK_VERSION:
        raise FormatError(f"unknown pack format version {version}")
    start = len(data) - FOOTER.size - count * ENTRY.size
    if start < 0:
        raise CorruptBlock("pack trailer is longer than the pack")
    entries = list(map(PackEntry._make, ENTRY.iter_unpack(memoryview(data)[start : len(data) - FOOTER.size])))
    if any(e.offset + e.length > start for e in entries):
        raise CorruptBlock("pack entry points past the blobs")
    return entries
