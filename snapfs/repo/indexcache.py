"""IndexCache: the repository's index, decoded once and kept on this host.

A mount needs the repository index (blob ID -> where it is) before it can serve a read. Fetching
and decoding every index object at every mount costs a GET per object and about 0.1-0.2 s of CPU
per 50k blobs; this cache keeps the decoded union as one compact file per repository, so a mount
whose repository has the same index objects loads it in milliseconds, and a mount that finds new
index objects fetches and merges only those.

One file per repository: ``CACHE/index/URLHASH-REPOID`` (URLHASH: 16 hex digits of the SHA-1 of
the store's URL; REPOID: the repository's id from its config). Layout, little-endian::

    magic "SNIC" | version u8 | 3 zero bytes | xxh3-128 of everything after it (16)
    repo id (16) | names u32 | superseded u32 | packs u32 | entries u32 | slots u32 | blobs u32
    names:       16 bytes each, the index objects whose packs the file holds (sorted)
    superseded:  16 bytes each, the index objects those supersede
    packs:       32 bytes each
    entries:     blob id (32) | kind u8 | offset u32 | length u32 | raw length u32 | pack no. u32
                 grouped by pack, in each index object's order
    slots:       u32 each, a power of two of them: 0 empty, else 1 + the entry number of the
                 first entry of a blob id; open addressing with linear probing, starting at the
                 first 8 bytes of the id (keyed BLAKE3: uniform, and nobody without the
                 repository's secret can choose ids that collide)

Lookups decode one entry on demand: no Python object per blob (about 50 bytes a blob in memory
instead of several hundred), nothing to build at load but two buffer copies.

Trust: the file is a cache. It is used only when its checksum, its sizes and its repository id
match, and only if every index object it was built from is still in the store and none of them
is superseded by a newer one; anything else and it is rebuilt from the store (and rewritten).
A wrong location could in any case only make a read fail: every blob fetched is checked against
its keyed ID. Files are written to a temporary name and renamed, not fsynced: after a crash the
checksum catches a torn file. Several processes may share the directory; the last writer wins.

Must not: hold an index object's content that the store no longer lists, or raise for a cache
problem (a bad or unwritable cache costs time, never a mount).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
import threading
from array import array
from collections.abc import Iterable
from pathlib import Path

import xxhash

from snapfs.errors import CorruptBlock, FormatError
from snapfs.format.pack import PackEntry
from snapfs.plural import counted
from snapfs.repo.repository import BlobIndex, Location, Repository

log = logging.getLogger(__name__)

CACHE_MAGIC = b"SNIC"
CACHE_VERSION = 1
HEAD = struct.Struct("<4sB3x16s")  # magic, version, digest of the rest
COUNTS = struct.Struct("<16sIIIIII")  # repo id, names, superseded, packs, entries, slots, blobs
RECORD = struct.Struct("<32sBIIII")  # blob id, kind, offset, length, raw length, pack number
_ID_START = struct.Struct(f"<Q{RECORD.size - 8}x")  # a record's first 8 id bytes: its hash
NAME_BYTES = 16
PACK_BYTES = 32
MIN_SLOTS = 64

_SLOT_TYPE = next(t for t in "IL" if array(t).itemsize == 4)


def _slot_count(entries: int) -> int:
    """A power of two at least twice ``entries``: probes stay short, and a slot is always free."""
    n = MIN_SLOTS
    while n < 2 * entries:
        n *= 2
    return n


class PackedIndex:
    """An immutable blob ID -> Location table over two flat buffers (see the module docstring),
    with the names of the index objects it was built from."""

    def __init__(self, repo_id: str, names: frozenset[str], superseded: frozenset[str],
                 packs: list[str], entries: bytes, slots: array[int], count: int) -> None:
        self.repo_id = repo_id
        self.names = names
        self.superseded = superseded
        self.pack_names = packs
        self.entries = entries
        self.slots = slots
        self.mask = len(slots) - 1
        self.count = count  # distinct blob ids

    # -- lookups (PackedLocations) -----------------------------------------------------------

    def get(self, blob_id: bytes) -> Location | None:
        j = self._entry(blob_id)
        if j is None:
            return None
        _, kind, offset, length, raw, pack = RECORD.unpack_from(self.entries, j * RECORD.size)
        return Location(self.pack_names[pack], offset, length, raw, kind)

    def _entry(self, blob_id: bytes) -> int | None:
        """The number of the first entry of ``blob_id``."""
        slots, entries, mask = self.slots, self.entries, self.mask
        h = int.from_bytes(blob_id[:8], "little") & mask
        while j := slots[h]:
            if entries[(j - 1) * RECORD.size : (j - 1) * RECORD.size + 32] == blob_id:
                return j - 1
            h = (h + 1) & mask
        return None

    def neighbours(self, blob_id: bytes, start: int, end: int) -> list[tuple[bytes, Location]]:
        """``BlobIndex.neighbours``: a pack's entries lie together in pack order, so they are
        the entries next to ``blob_id``'s, walked outwards while they are in the range."""
        j = self._entry(blob_id)
        if j is None:
            return []
        entries, size = self.entries, RECORD.size
        _, kind0, _, _, _, pack0 = RECORD.unpack_from(entries, j * size)
        name = self.pack_names[pack0]
        found: list[tuple[bytes, Location]] = []
        for step in (-1, 1):
            k = j if step < 0 else j + 1
            while 0 <= k < len(entries) // size:
                bid, kind, offset, length, raw, pack = RECORD.unpack_from(entries, k * size)
                if pack != pack0 or offset < start or offset + length > end:
                    break
                if kind == kind0:
                    found.append((bid, Location(name, offset, length, raw, kind)))
                k += step
        found.sort(key=lambda item: item[1].offset)
        return found

    def __len__(self) -> int:
        return self.count

    def unpack(self) -> dict[str, list[PackEntry]]:
        packs: dict[str, list[PackEntry]] = {}
        names = self.pack_names
        current = -1
        group: list[PackEntry] = []
        for bid, kind, offset, length, raw, pack in RECORD.iter_unpack(self.entries):
            if pack != current:
                current = pack
                group = packs[names[pack]] = []  # a pack listed again: the later list stands
            group.append(PackEntry(bid, kind, offset, length, raw))
        return packs

    def index(self) -> BlobIndex:
        return BlobIndex(self)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def build(cls, repo_id: str, names: Iterable[str], superseded: Iterable[str],
              packs: Iterable[tuple[str, list[PackEntry]]]) -> PackedIndex:
        empty = cls(repo_id, frozenset(), frozenset(), [], b"", array(_SLOT_TYPE, bytes(4 * MIN_SLOTS)), 0)
        return empty.merged(names, superseded, packs)

    def merged(self, names: Iterable[str], superseded: Iterable[str],
               packs: Iterable[tuple[str, list[PackEntry]]]) -> PackedIndex:
        """A new table: this one plus ``packs`` (of the index objects ``names``). Blob ids it
        has already keep their location (either copy serves)."""
        pack_names = list(self.pack_names)
        added = bytearray()
        record = RECORD.pack
        for pack, pack_entries in packs:
            number = len(pack_names)
            pack_names.append(pack)
            added += b"".join([record(bid, kind, offset, length, raw, number)
                               for bid, kind, offset, length, raw in pack_entries])
        entries = self.entries + bytes(added)
        total = len(entries) // RECORD.size
        old = len(self.entries) // RECORD.size
        nslots = _slot_count(total)
        if nslots == len(self.slots):  # room enough: insert only the new entries
            slots = array(_SLOT_TYPE, self.slots)
            count = self.count + _insert(slots, entries, old, total)
        else:
            slots = array(_SLOT_TYPE, bytes(4 * nslots))
            count = _insert(slots, entries, 0, total)
        return PackedIndex(self.repo_id, self.names | frozenset(names),
                           self.superseded | frozenset(superseded), pack_names, entries, slots, count)

    # -- the file ------------------------------------------------------------------------------

    def encode(self) -> bytes:
        slots = array(_SLOT_TYPE, self.slots)
        if sys.byteorder != "little":
            slots.byteswap()
        names = sorted(self.names)
        superseded = sorted(self.superseded)
        body = b"".join([
            COUNTS.pack(bytes.fromhex(self.repo_id), len(names), len(superseded),
                        len(self.pack_names), len(self.entries) // RECORD.size, len(slots),
                        self.count),
            *(bytes.fromhex(n) for n in names),
            *(bytes.fromhex(n) for n in superseded),
            *(bytes.fromhex(p) for p in self.pack_names),
            self.entries,
            slots.tobytes(),
        ])
        return HEAD.pack(CACHE_MAGIC, CACHE_VERSION, xxhash.xxh3_128_digest(body)) + body

    @classmethod
    def decode(cls, data: bytes) -> PackedIndex:
        """Raises CorruptBlock or FormatError for anything but a whole, intact file."""
        if len(data) < HEAD.size + COUNTS.size:
            raise CorruptBlock("index cache file is truncated")
        magic, version, digest = HEAD.unpack_from(data)
        if magic != CACHE_MAGIC:
            raise CorruptBlock("index cache file has a bad magic")
        if version != CACHE_VERSION:
            raise FormatError(f"unknown index cache version {version}")
        body = memoryview(data)[HEAD.size :]
        if xxhash.xxh3_128_digest(body) != digest:
            raise CorruptBlock("index cache file does not match its checksum")
        repo_id, nnames, nsup, npacks, nentries, nslots, count = COUNTS.unpack_from(body)
        sizes = [NAME_BYTES * nnames, NAME_BYTES * nsup, PACK_BYTES * npacks,
                 RECORD.size * nentries, 4 * nslots]
        if COUNTS.size + sum(sizes) != len(body):
            raise CorruptBlock("index cache file's sizes do not add up")
        if nslots < MIN_SLOTS or nslots & (nslots - 1) or nslots <= nentries or count > nentries:
            raise CorruptBlock("index cache file has a bad slot table")
        pos = COUNTS.size
        parts = []
        for size in sizes:
            parts.append(body[pos : pos + size])
            pos += size
        names, sup, packs, entries, raw_slots = parts
        slots = array(_SLOT_TYPE)
        slots.frombytes(raw_slots)
        if sys.byteorder != "little":
            slots.byteswap()
        return cls(
            repo_id.hex(),
            frozenset(names[i : i + NAME_BYTES].hex() for i in range(0, len(names), NAME_BYTES)),
            frozenset(sup[i : i + NAME_BYTES].hex() for i in range(0, len(sup), NAME_BYTES)),
            [packs[i : i + PACK_BYTES].hex() for i in range(0, len(packs), PACK_BYTES)],
            bytes(entries), slots, count,
        )


def _insert(slots: array[int], entries: bytes, start: int, stop: int) -> int:
    """Put entries ``start``..``stop`` into ``slots`` unless their id is there already; returns
    how many went in. (Runs once per blob when a mount finds new index objects: the first 8
    bytes of every id are unpacked in one C loop, and an id is compared only on a collision,
    which at most half-full slots make rare.)"""
    mask = len(slots) - 1
    size = RECORD.size
    added = 0
    for i, (first,) in enumerate(_ID_START.iter_unpack(entries[start * size : stop * size]), start):
        h = first & mask
        if not slots[h]:
            slots[h] = i + 1
            added += 1
            continue
        at = i * size
        bid = entries[at : at + 32]
        while j := slots[h]:
            other = (j - 1) * size
            if entries[other : other + 32] == bid:
                break
            h = (h + 1) & mask
        else:
            slots[h] = i + 1
            added += 1
    return added


class IndexCache:
    """The index cache under a daemon's cache directory (``CACHE/index/``); pass it to
    ``Repository.load_index``. The last table loaded is also kept in memory, so a reload (new
    snapshots appeared) reads nothing but the new index objects. Safe to call from any thread."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(cache_dir) / "index"
        self._lock = threading.Lock()
        self._held: dict[Path, PackedIndex] = {}

    def path_for(self, repo: Repository) -> Path:
        url_hash = hashlib.sha1(repo.store.url.encode()).hexdigest()[:16]
        return self.directory / f"{url_hash}-{repo.config.id}"

    def load(self, repo: Repository) -> BlobIndex:
        path = self.path_for(repo)
        listed = repo.list_index_names()
        with self._lock:
            packed = self._held.get(path)
        if packed is None:
            packed = self._read(path, repo.config.id)
        if packed is not None and not packed.names <= listed:
            log.info("index cache %s: index objects were removed from the store; rebuilding",
                     path.name)
            packed = None
        wanted = listed - packed.names - packed.superseded if packed is not None else listed
        files = repo.fetch_index_files(sorted(wanted))
        superseded = {s for f in files.values() for s in f.supersedes}
        if packed is not None and superseded & packed.names:
            log.info("index cache %s: a new index object supersedes cached ones; rebuilding",
                     path.name)
            packed = None
            files.update(repo.fetch_index_files(sorted(listed - files.keys())))
            superseded = {s for f in files.values() for s in f.supersedes}
        if packed is not None:
            superseded |= packed.superseded
        new = sorted(name for name in files if name not in superseded)
        if packed is None or new:
            packs = [(pack, entries) for name in new for pack, entries in files[name].packs.items()]
            if packed is None:
                packed = PackedIndex.build(repo.config.id, new, superseded, packs)
            else:
                packed = packed.merged(new, superseded, packs)
            self._write(path, packed)
        log.info("index: %s, %d from the host's cache, %d fetched; %s",
                 counted(len(packed.names), "object"), len(packed.names) - len(new), len(files),
                 counted(len(packed), "blob"))
        with self._lock:
            self._held[path] = packed
        index = packed.index()
        index.index_names = sorted(packed.names) + sorted(packed.superseded & listed)
        return index

    def _read(self, path: Path, repo_id: str) -> PackedIndex | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("index cache %s unreadable (%s); loading the index from the store",
                        path, e.strerror)
            return None
        try:
            packed = PackedIndex.decode(data)
        except (CorruptBlock, FormatError) as e:
            log.warning("index cache %s ignored: %s; rebuilding it", path, e.message)
            return None
        if packed.repo_id != repo_id:
            log.warning("index cache %s belongs to another repository; rebuilding it", path)
            return None
        return packed

    def _write(self, path: Path, packed: PackedIndex) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident():x}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(packed.encode())
            tmp.replace(path)
        except OSError as e:
            log.warning("index cache %s not written: %s", path, e.strerror)
            try:
                tmp.unlink()
            except OSError:
                pass

