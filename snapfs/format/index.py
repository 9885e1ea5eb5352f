"""Index objects: where every blob of a set of packs lives.

An index object lists packs and, per pack, its entries. The repository's index is the union of
all index objects (a blob listed twice is in two packs; either copy serves). Layout::

    magic "SNIX" | version u8 | zstd( supersedes count u32 | 16-byte ids ...
                                      | pack count u32 | per pack: name (32) | entry count u32
                                      | entries (id 32 | kind u8 | offset u32 | length u32 | raw u32) )

``supersedes`` names index objects whose content this one contains, so a reader that sees both
(a repack interrupted between writing the new index and deleting the old) may ignore the old.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import zstandard

from snapfs.errors import CorruptBlock, FormatError
from snapfs.format.pack import ENTRY, PackEntry

INDEX_MAGIC = b"SNIX"
INDEX_VERSION = 1
U32 = struct.Struct("<I")
MAX_INDEX_BYTES = 1 << 32  # one index object describes at most this much (entries are 45 bytes)


@dataclass
class IndexFile:
    packs: dict[str, list[PackEntry]] = field(default_factory=dict)
    supersedes: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        body = bytearray()
        body += U32.pack(len(self.supersedes))
        for name in self.supersedes:
            body += bytes.fromhex(name)
        body += U32.pack(len(self.packs))
        for pack, entries in self.packs.items():
            body += bytes.fromhex(pack)
            body += U32.pack(len(entries))
            for e in entries:
                body += ENTRY.pack(e.blob_id, e.kind, e.offset, e.length, e.raw_length)
        return INDEX_MAGIC + bytes([INDEX_VERSION]) + zstandard.compress(bytes(body), 3)

    @classmethod
    def decode(cls, data: bytes) -> IndexFile:
        if len(data) < 5 or data[:4] != INDEX_MAGIC:
            raise CorruptBlock("index object has a bad magic")
        if data[4] != INDEX_VERSION:
            raise FormatError(f"unknown index format version {data[4]}")
        try:
            claimed = zstandard.frame_content_size(data[5:])
            if claimed < 0 or claimed > MAX_INDEX_BYTES:
                raise CorruptBlock(f"index object claims an implausible size ({claimed})")
            body = zstandard.decompress(data[5:], max_output_size=claimed)
        except zstandard.ZstdError as e:
            raise CorruptBlock(f"index object does not decompress: {e}") from None
        try:
            pos = 0
            (n,) = U32.unpack_from(body, pos)
            pos += 4
            sup = [body[pos + 16 * i : pos + 16 * (i + 1)].hex() for i in range(n)]
            pos += 16 * n
            (npacks,) = U32.unpack_from(body, pos)
            pos += 4
            packs: dict[str, list[PackEntry]] = {}
            for _ in range(npacks):
                name = body[pos : pos + 32].hex()
                (count,) = U32.unpack_from(body, pos + 32)
                pos += 36
                end = pos + count * ENTRY.size
                if end > len(body):
                    raise struct.error("truncated")
                entries = list(map(PackEntry._make, ENTRY.iter_unpack(body[pos:end])))
                pos = end
                packs[name] = entries
        except struct.error:
            raise CorruptBlock("index object is truncated") from None
        return cls(packs=packs, supersedes=sup)
