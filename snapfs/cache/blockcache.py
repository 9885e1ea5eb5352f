"""BlockCache: block ID -> plain bytes, in append-only segment files indexed by lmdb.

Layout of the cache directory::

    index.lmdb/          lmdb: "blocks"  id -> segment u32 | offset u64 | length u32 | xxh3-128
                               "segments" segment u32 -> nothing (which segments exist, oldest first)
                               "members" segment u32 | id -> nothing (what to drop with a segment)
    seg-00000001.dat     plain block bytes, appended

The crash rule: a cached block is returned only if its bytes match the xxh3-128 recorded beside
its location, so a crash that leaves an entry pointing at bytes that never reached the disk (or a
torn segment) costs a refetch, never a wrong read. That is why neither the segment writes nor lmdb
are synced per block (lmdb runs with ``sync=False``; ``flush`` syncs both, and is called
periodically and at close). An lmdb file that cannot be opened is moved aside and the cache
starts empty.

Eviction is by segment, oldest first (a FIFO of segments, as log-structured caches do): when the
segments' total size passes the capacity, the oldest segment's entries are deleted and the file
unlinked. A pread already under way in that segment finishes first (its file is closed after).

Thread-safe: every method may be called from any worker thread; never call one on the trio
thread (they block). An lmdb transaction never outlives the method that opened it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import IO

import lmdb
import xxhash

from snapfs.errors import SnapfsError

log = logging.getLogger(__name__)

ENTRY = struct.Struct("<IQI16s")
SEG = struct.Struct(">I")  # big-endian so lmdb's byte order is numeric order
DEFAULT_SEGMENT_SIZE = 64 << 20
MAP_SIZE = 1 << 36  # address space only; lmdb grows the file as needed


class BlockCache:
    def __init__(
        self, directory: str | os.PathLike[str], capacity: int,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> None:
        self.dir = Path(directory)
        self.capacity = capacity
        self.segment_size = min(segment_size, max(capacity // 4, 1 << 20))
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SnapfsError(f"cache directory {self.dir} is not writable: {e.strerror}") from None
        self._env = self._open_env()
        self._blocks = self._env.open_db(b"blocks")
        self._segments = self._env.open_db(b"segments")
        self._members = self._env.open_db(b"members")
        self._lock = threading.Lock()  # guards the append position and the file table
        self._files: dict[int, IO[bytes]] = {}
        self._readers: dict[int, int] = {}  # segment -> preads under way
        self._doomed: dict[int, IO[bytes]] = {}  # evicted, closed when its last pread ends
        self._sizes: dict[int, int] = {}
        with self._env.begin() as txn:
            for key, _ in txn.cursor(db=self._segments):
                seg = SEG.unpack(key)[0]
                path = self._seg_path(seg)
                self._sizes[seg] = path.stat().st_size if path.exists() else 0
        self._current = max(self._sizes, default=0)
        self._append_pos = self._sizes.get(self._current, 0)
        if not self._sizes or self._append_pos >= self.segment_size:
            self._start_segment()
        self.hits = 0
        self.misses = 0
        self.bad = 0
        self._last_flush = time.monotonic()

    def _open_env(self) -> lmdb.Environment:
        path = self.dir / "index.lmdb"
        try:
            return lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=4, sync=False, metasync=False,
                             readahead=False)
        except lmdb.Error as e:
            aside = path.with_name(f"index.lmdb.broken-{int(time.time())}")
            log.warning("cache index %s unreadable (%s); starting an empty cache", path, e)
            path.rename(aside)
            for seg in self.dir.glob("seg-*.dat"):
                seg.unlink()
            return lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=4, sync=False, metasync=False,
                             readahead=False)

    def _seg_path(self, seg: int) -> Path:
        return self.dir / f"seg-{seg:08d}.dat"

    def _pread(self, seg: int, offset: int, length: int) -> bytes:
        """Read from a segment; an eviction meanwhile waits for us to close the file."""
        with self._lock:
            f = self._files.get(seg)
            if f is None:
                if seg not in self._sizes:
                    return b""
                try:
                    f = self._files[seg] = open(self._seg_path(seg), "r+b")
                except FileNotFoundError:
                    return b""
            self._readers[seg] = self._readers.get(seg, 0) + 1
        try:
            return os.pread(f.fileno(), length, offset)
        finally:
            with self._lock:
                self._readers[seg] -= 1
                if not self._readers[seg]:
                    del self._readers[seg]
                    doomed = self._doomed.pop(seg, None)
                    if doomed is not None:
                        doomed.close()

    def _start_segment(self) -> None:
        """Open a new segment for appends. Called with ``_lock`` held (or from __init__)."""
        self._current += 1
        path = self._seg_path(self._current)
        self._files[self._current] = open(path, "w+b")
        self._sizes[self._current] = 0
        self._append_pos = 0
        with self._env.begin(write=True) as txn:
            txn.put(SEG.pack(self._current), b"", db=self._segments)

    # -- reads ------------------------------------------------------------------------

    def get(self, block_id: bytes) -> bytes | None:
        return self.get_many([block_id])[0]

    def get_many(self, block_ids: list[bytes]) -> list[bytes | None]:
        """Cached bytes for each ID, or None where it is not cached (or failed its check)."""
        with self._env.begin() as txn:
            raws = [txn.get(bid, db=self._blocks) for bid in block_ids]
        out: list[bytes | None] = []
        for block_id, raw in zip(block_ids, raws, strict=True):
            if raw is None:
                self.misses += 1
                out.append(None)
                continue
            seg, offset, length, digest = ENTRY.unpack(raw)
            data = self._pread(seg, offset, length)
            if len(data) != length or xxhash.xxh3_128_digest(data) != digest:
                self.bad += 1
                self.misses += 1
                log.warning("cached block %s failed its checksum; dropping it", block_id.hex()[:16])
                self._drop(block_id, seg)
                out.append(None)
                continue
            self.hits += 1
            out.append(data)
        return out

    def contains(self, block_id: bytes) -> bool:
        with self._env.begin() as txn:
            return txn.get(block_id, db=self._blocks) is not None

    def missing(self, block_ids: list[bytes]) -> list[bytes]:
        """The IDs of ``block_ids`` that are not cached, in order."""
        with self._env.begin() as txn:
            return [b for b in block_ids if txn.get(b, db=self._blocks) is None]

    # -- writes -----------------------------------------------------------------------

    def put(self, block_id: bytes, plain: bytes) -> None:
        with self._lock:
            if self._append_pos >= self.segment_size:
                self._start_segment()
            seg, offset = self._current, self._append_pos
            self._append_pos += len(plain)
            self._sizes[seg] = self._append_pos
            f = self._files[seg]
        os.pwrite(f.fileno(), plain, offset)
        entry = ENTRY.pack(seg, offset, len(plain), xxhash.xxh3_128_digest(plain))
        with self._env.begin(write=True) as txn:
            txn.put(block_id, entry, db=self._blocks)
            txn.put(SEG.pack(seg) + block_id, b"", db=self._members)
        self._evict_if_needed()
        if time.monotonic() - self._last_flush > 5:
            self.flush()

    def _drop(self, block_id: bytes, seg: int) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(block_id, db=self._blocks)
            txn.delete(SEG.pack(seg) + block_id, db=self._members)

    def _evict_if_needed(self) -> None:
        while True:
            with self._lock:
                total = sum(self._sizes.values())
                if total <= self.capacity or len(self._sizes) <= 1:
                    return
                oldest = min(self._sizes)
                if oldest == self._current:
                    return
                del self._sizes[oldest]
                f = self._files.pop(oldest, None)
                if f is not None:
                    if self._readers.get(oldest):
                        self._doomed[oldest] = f
                    else:
                        f.close()
            prefix = SEG.pack(oldest)
            with self._env.begin(write=True) as txn:
                cur = txn.cursor(db=self._members)
                if cur.set_range(prefix):
                    while cur.key()[:4] == prefix:
                        block_id = cur.key()[4:]
                        raw = txn.get(block_id, db=self._blocks)
                        if raw is not None and ENTRY.unpack(raw)[0] == oldest:
                            txn.delete(block_id, db=self._blocks)
                        if not cur.delete():
                            break
                txn.delete(prefix, db=self._segments)
            try:
                self._seg_path(oldest).unlink()
            except FileNotFoundError:
                pass
            log.debug("evicted cache segment %d", oldest)

    # -- housekeeping -----------------------------------------------------------------

    @property
    def size(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def entries(self) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._blocks)["entries"])

    def flush(self) -> None:
        with self._lock:
            files = list(self._files.values())
        for f in files:
            try:
                os.fsync(f.fileno())
            except (OSError, ValueError):
                pass
        self._env.sync(True)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        with self._lock:
            for f in [*self._files.values(), *self._doomed.values()]:
                f.close()
            self._files.clear()
            self._doomed.clear()
        self._env.close()
