"""Snapshot manifests: a small root plus content-addressed pages of block references.

A page holds the block IDs of ``entries_per_page`` consecutive blocks (``ZERO_ID`` for an
all-zero block). Pages are stored as blobs in packs, addressed by their keyed content hash, so
snapshots share every page they did not change: an incremental snapshot writes only the pages
whose entries changed, and a sparse disk's runs of identical pages cost one page.

The root is JSON with a magic and a version. It is the only mutable-looking thing in a
repository and it is written exactly once, after every page and block it names is stored
(and indexed), so a crash leaves either a whole snapshot or none.
"""

from __future__ import annotations

import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from snapfs.errors import CorruptBlock, FormatError
from snapfs.format.block import ID_SIZE, ZERO_ID
from snapfs.format.versioned import decode_versioned, encode_versioned
from snapfs.plural import counted

PAGE_MAGIC = b"SNMP"
PAGE_VERSION = 1
PAGE_HEADER = struct.Struct("<4sBI")
ROOT_FORMAT = "snapfs-snapshot"
ROOT_VERSION = 1

DEFAULT_ENTRIES_PER_PAGE = 4096
#: a page ID as a root lists it
_PAGE_ID = re.compile(f"[0-9a-fA-F]{{{2 * ID_SIZE}}}")


def encode_page(ids: list[bytes]) -> bytes:
    return PAGE_HEADER.pack(PAGE_MAGIC, PAGE_VERSION, len(ids)) + b"".join(ids)


def decode_page(plain: bytes, expected: int | None = None, what: str = "manifest page",
                ) -> list[bytes]:
    """The block IDs of a manifest page; ``CorruptBlock`` unless there are ``expected`` of
    them (if given: what the snapshot's size says that page holds)."""
    if len(plain) < PAGE_HEADER.size:
        raise CorruptBlock("manifest page is truncated")
    magic, version, count = PAGE_HEADER.unpack_from(plain)
    if magic != PAGE_MAGIC:
        raise CorruptBlock("manifest page has a bad magic")
    if version != PAGE_VERSION:
        raise FormatError(f"unknown manifest page version {version}")
    body = plain[PAGE_HEADER.size :]
    if len(body) != count * ID_SIZE:
        raise CorruptBlock("manifest page length does not match its count")
    if expected is not None and count != expected:
        raise CorruptBlock(f"{what} names {counted(count, 'block')}, not {expected}")
    return [body[i * ID_SIZE : (i + 1) * ID_SIZE] for i in range(count)]


def empty_page(count: int) -> list[bytes]:
    return [ZERO_ID] * count


@dataclass
class SnapshotRoot:
    """Everything about one snapshot; ``pages`` are hex page IDs in disk order."""

    id: str
    name: str
    disk: str
    parent: str | None
    size: int
    block_size: int
    created: str
    entries_per_page: int
    pages: list[str]
    state: str = "accomplished"
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    #: how many disks ``group`` has: a listing that finds fewer of its snapshots stored knows
    #: the group is incomplete (none on roots written before it was recorded)
    group_size: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks_total(self) -> int:
        return -(-self.size // self.block_size)

    def encode(self) -> bytes:
        return encode_versioned(ROOT_FORMAT, ROOT_VERSION, asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> SnapshotRoot:
        doc = decode_versioned(data, ROOT_FORMAT, ROOT_VERSION, "snapshot root",
                               "snapshot format")
        known = set(cls.__dataclass_fields__)
        try:
            root = cls(**{k: v for k, v in doc.items() if k in known})
        except TypeError:  # a field missing
            raise CorruptBlock("snapshot root lacks fields") from None
        text = (root.id, root.name, root.disk, root.created, root.state)
        numbers = (root.size, root.block_size, root.entries_per_page)
        if not all(isinstance(t, str) for t in text) \
                or not all(type(n) is int and n >= 0 for n in numbers) \
                or not root.block_size or not root.entries_per_page \
                or not isinstance(root.pages, list) or not all(isinstance(p, str) for p in root.pages) \
                or not isinstance(root.tags, list) or not all(isinstance(t, str) for t in root.tags) \
                or not isinstance(root.stats, dict) \
                or not isinstance(root.parent, str | None) or not isinstance(root.group, str | None) \
                or not (root.group_size is None or type(root.group_size) is int and root.group_size > 0):
            raise CorruptBlock(f"snapshot root {str(root.id)[:16]} has fields of the wrong type")
        # What garbage collection and verify take for granted (one page ID of the right size
        # per page of blocks), checked here so that a bad root is named, not a traceback.
        if len(root.pages) != -(-root.blocks_total // root.entries_per_page) \
                or not all(_PAGE_ID.fullmatch(p) for p in root.pages):
            raise CorruptBlock(f"snapshot root {root.id[:16]} has a malformed page list")
        return root

    def summary(self) -> dict[str, Any]:
        """The public description printed by ``snapshot list/show --json``."""
        d = asdict(self)
        d.pop("pages")
        d.pop("entries_per_page")
        stats = d.pop("stats")
        d["blocks_total"] = self.blocks_total
        d.update(stats)
        return d
