"""Access profiles: the order in which a mount first read a snapshot's blocks.

Stored beside the snapshot (``profiles/SNAPSHOT-ID``) so the next mount on any host fetches those
blocks first, as hints. Layout: ``magic "SNPF" | version u8 | zstd(u32 block numbers)``.
"""

from __future__ import annotations

import array
import sys

import zstandard

from snapfs.errors import CorruptBlock, FormatError

PROFILE_MAGIC = b"SNPF"
PROFILE_VERSION = 1


def encode_profile(blocks: list[int]) -> bytes:
    arr = array.array("I", blocks)
    if sys.byteorder != "little":
        arr.byteswap()
    return PROFILE_MAGIC + bytes([PROFILE_VERSION]) + zstandard.compress(arr.tobytes(), 3)


def decode_profile(data: bytes) -> list[int]:
    if len(data) < 5:
        raise CorruptBlock("access profile is truncated")
    if data[:4] != PROFILE_MAGIC:
        raise CorruptBlock("access profile has a bad magic")
    if data[4] != PROFILE_VERSION:
        raise FormatError(f"unknown access profile version {data[4]}")
    try:
        raw = zstandard.decompress(data[5:])
    except zstandard.ZstdError as e:
        raise CorruptBlock(f"access profile does not decompress: {e}") from None
    if len(raw) % 4:
        raise CorruptBlock("access profile is truncated")
    arr = array.array("I")
    arr.frombytes(raw)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tolist()
