"""BlockCache: block ID -> plain bytes, in append-only segment files indexed by lmdb.

One cache directory serves every process on the host that opens it (several mount daemons may
share it): lmdb is multi-process safe, and each process appends only to segments it allocated
itself, so no two writers ever share a file.

Layout of the cache directory::

    index.lmdb/          lmdb: "blocks"   id -> segment u32 | offset u64 | length u32 | xxh3-128
                               "segments" segment u32 -> bytes u64 | writer pid u32 | open u8
                               "members"  segment u32 | id -> nothing (what goes with a segment)
                               "meta"     next segment number, total bytes
    seg-00000001.dat     plain block bytes, appended by the segment's writer

The crash rule: a cached block is returned only if its bytes match the xxh3-128 recorded beside
its location, so a crash that leaves an entry pointing at bytes that never reached the disk (or a
torn segment) costs a refetch, never a wrong read. That is why neither the segment writes nor lmdb
are synced per block (lmdb runs with ``sync=False``; ``flush`` syncs both, and is called
periodically and at close). An lmdb file that cannot be opened is moved aside and the cache
starts empty.

Eviction is by segment, oldest first (a FIFO of segments, as log-structured caches do): when the
total passes the capacity, the oldest segment that no live process is still appending to loses
its entries and its file is unlinked. A pread already under way in this process finishes first
(its file is closed after); other processes never find entries for it again, and their open file
handles keep the bytes readable until they close them.

Thread-safe: every method may be called from any worker thread; never call one on the trio
thread (they block). An lmdb transaction never outlives the method that opened it.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import lmdb
import xxhash

from snapfs.errors import SnapfsError
from snapfs.host import pid_alive

log = logging.getLogger(__name__)

ENTRY = struct.Struct("<IQI16s")
SEG = struct.Struct(">I")  # big-endian so lmdb's byte order is numeric order
SEGINFO = struct.Struct("<QIB")
U64 = struct.Struct("<Q")
NEXT_SEGMENT = b"next-segment"
TOTAL_BYTES = b"total-bytes"
DEFAULT_SEGMENT_SIZE = 64 << 20
MAP_SIZE = 1 << 36  # address space only; lmdb grows the file as needed
OPEN_FILES = 64
IOV_MAX = 1024


def _pwrite_all(fd: int, parts: list[bytes | memoryview], offset: int) -> None:
    """Write ``parts`` end to end at ``offset``, however the kernel splits the writes."""
    for i in range(0, len(parts), IOV_MAX):
        chunk: list[bytes | memoryview] = list(parts[i : i + IOV_MAX])
        while chunk:
            n = os.pwritev(fd, chunk, offset)
            if n <= 0:
                raise OSError(f"pwritev wrote {n} bytes")
            offset += n
            while chunk and n >= len(chunk[0]):
                n -= len(chunk[0])
                chunk.pop(0)
            if chunk and n:
                chunk[0] = memoryview(chunk[0])[n:]


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
            probe = self.dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SnapfsError(f"cache directory {self.dir} is not writable: {e.strerror}") from None
        self._env = self._open_env()
        self._blocks = self._env.open_db(b"blocks")
        self._segments = self._env.open_db(b"segments")
        self._members = self._env.open_db(b"members")
        self._meta = self._env.open_db(b"meta")
        self._lock = threading.Lock()  # guards the append position and the file table
        self._files: OrderedDict[int, IO[bytes]] = OrderedDict()  # open segment files, LRU
        self._readers: dict[int, int] = {}  # segment -> preads under way in this process
        self._doomed: dict[int, IO[bytes]] = {}  # closed when its last pread ends
        self._current: int | None = None  # the segment this process appends to
        self._append_pos = 0
        self.hits = 0
        self.misses = 0
        self.bad = 0
        self._last_flush = time.monotonic()

    def _open_env(self) -> lmdb.Environment:
        path = self.dir / "index.lmdb"
        def open_env() -> lmdb.Environment:
            return lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=4, sync=False,
                             metasync=False, readahead=False)

        try:
            return open_env()
        except lmdb.Error as e:
            aside = path.with_name(f"index.lmdb.broken-{int(time.time())}")
            log.warning("cache index %s unreadable (%s); starting an empty cache", path, e)
            path.rename(aside)
            for seg in self.dir.glob("seg-*.dat"):
                seg.unlink()
            return open_env()

    def _seg_path(self, seg: int) -> Path:
        return self.dir / f"seg-{seg:08d}.dat"

    # -- files ----------------------------------------------------------------------------

    def _pread(self, seg: int, spans: list[tuple[int, int]]) -> list[bytes]:
        """Read ``(offset, length)`` spans of one segment (b"" each if it is gone)."""
        fd = self._use_file(seg)
        if fd is None:
            return [b""] * len(spans)
        try:
            # one pread per block: a pread of a whole stretch and slices of it copy twice
            return [os.pread(fd, length, offset) for offset, length in spans]
        finally:
            self._done_with_file(seg)

    def _preadv(self, seg: int, extents: list[tuple[int, list[memoryview]]]) -> list[int]:
        """Read each ``(offset, buffers)`` extent of one segment into its buffers (one preadv
        each); how many bytes each got (0 each if the segment is gone)."""
        fd = self._use_file(seg)
        if fd is None:
            return [0] * len(extents)
        try:
            out = []
            for offset, buffers in extents:
                got = 0
                for i in range(0, len(buffers), IOV_MAX):
                    chunk = buffers[i : i + IOV_MAX]
                    want = sum(len(b) for b in chunk)
                    n = os.preadv(fd, chunk, offset + got)
                    got += n
                    if n < want:  # the end of the file: a torn segment
                        break
                out.append(got)
            return out
        finally:
            self._done_with_file(seg)

    def _use_file(self, seg: int) -> int | None:
        """The fd of a segment's file, kept open until ``_done_with_file`` (an eviction
        meanwhile waits for us to close it); None if the segment is gone."""
        with self._lock:
            f = self._files.get(seg)
            if f is None:
                try:
                    f = open(self._seg_path(seg), "rb")
                except FileNotFoundError:
                    return None
                self._files[seg] = f
                self._trim_files()
            else:
                self._files.move_to_end(seg)
            self._readers[seg] = self._readers.get(seg, 0) + 1
            return f.fileno()

    def _done_with_file(self, seg: int) -> None:
        with self._lock:
            self._readers[seg] -= 1
            if not self._readers[seg]:
                del self._readers[seg]
                doomed = self._doomed.pop(seg, None)
                if doomed is not None:
                    doomed.close()

    def _retire_file(self, seg: int) -> None:
        """Stop using a segment's file: close it now, or after the preads under way. Lock held."""
        f = self._files.pop(seg, None)
        if f is None:
            return
        if self._readers.get(seg):
            self._doomed[seg] = f
        else:
            f.close()

    def _trim_files(self) -> None:
        """Keep at most OPEN_FILES segment files open (not our own). Lock held."""
        for seg in list(self._files):
            if len(self._files) <= OPEN_FILES:
                return
            if seg != self._current:
                self._retire_file(seg)

    def _start_segment(self) -> None:
        """Allocate a segment of our own for appends. Lock held."""
        with self._env.begin(write=True) as txn:
            if self._current is not None:
                self._set_open(txn, self._current, False)
            raw = txn.get(NEXT_SEGMENT, db=self._meta)
            seg = SEG.unpack(raw)[0] if raw else 1
            txn.put(NEXT_SEGMENT, SEG.pack(seg + 1), db=self._meta)
            txn.put(SEG.pack(seg), SEGINFO.pack(0, os.getpid(), 1), db=self._segments)
        self._files[seg] = open(self._seg_path(seg), "w+b")
        self._current = seg
        self._append_pos = 0

    def _set_open(self, txn: lmdb.Transaction, seg: int, is_open: bool) -> None:
        raw = txn.get(SEG.pack(seg), db=self._segments)
        if raw is not None:
            size, pid, _ = SEGINFO.unpack(raw)
            txn.put(SEG.pack(seg), SEGINFO.pack(size, pid, int(is_open)), db=self._segments)

    # -- reads ----------------------------------------------------------------------------

    def get(self, block_id: bytes) -> bytes | None:
        return self.get_many([block_id])[0]

    def get_many(self, block_ids: list[bytes]) -> list[bytes | None]:
        """Cached bytes for each ID, or None where it is not cached (or failed its check).
        One lmdb read transaction for all of them, the segment files' lock taken once per
        segment, and each block checked against its xxh3-128."""
        out: list[bytes | None] = [None] * len(block_ids)
        for seg, entries in self._locate(block_ids).items():
            datas = self._pread(seg, [(offset, length) for offset, length, _, _ in entries])
            for (_, length, i, digest), data in zip(entries, datas, strict=True):
                if len(data) != length or xxhash.xxh3_128_digest(data) != digest:
                    self._reject(block_ids[i], seg)
                    continue
                out[i] = data
        hits = sum(1 for d in out if d is not None)
        self.hits += hits
        self.misses += len(block_ids) - hits
        return out

    def _locate(self, block_ids: Sequence[bytes],
                ) -> dict[int, list[tuple[int, int, int, bytes]]]:
        """Where the cached ones of ``block_ids`` lie, by segment: ``(offset, length, index in
        block_ids, xxh3-128)`` each, in one lmdb read transaction."""
        with self._env.begin() as txn:
            get = txn.get
            db = self._blocks
            raws = [get(bid, db=db) for bid in block_ids]
        by_seg: dict[int, list[tuple[int, int, int, bytes]]] = {}
        unpack = ENTRY.unpack
        for i, raw in enumerate(raws):
            if raw is not None:
                seg, offset, length, digest = unpack(raw)
                by_seg.setdefault(seg, []).append((offset, length, i, digest))
        return by_seg

    def _reject(self, block_id: bytes, seg: int) -> None:
        """A cached block failed its check on read: count it, say so, and drop it."""
        self.bad += 1
        log.warning("cached block %s failed its checksum; dropping it", block_id.hex()[:16])
        self._drop(block_id, seg)

    def read_into(self, block_ids: Sequence[bytes], targets: Sequence[memoryview]) -> list[bool]:
        """Read each cached block straight into its target (a writable buffer as long as the
        block) and check it there against its xxh3-128: True where the target now holds the
        block's verified bytes. A target marked False may hold anything (a block not cached,
        of another length, or failing its check): the caller must not use its bytes.

        What a reader of many blocks (a read-ahead fill) wants: one lmdb read transaction,
        one preadv per run of blocks that lie end to end in a segment, no copy and no
        allocation per block. The same ID may appear more than once."""
        ok = [False] * len(block_ids)
        digest_of = xxhash.xxh3_128_digest
        for seg, entries in self._locate(block_ids).items():
            entries.sort()
            extents: list[tuple[int, list[memoryview]]] = []
            members: list[list[tuple[int, int, bytes]]] = []  # (index, length, digest) per extent
            end = -1
            for offset, length, i, digest in entries:
                if length != len(targets[i]):
                    continue  # not the block the caller expects here: a miss
                if offset != end:
                    extents.append((offset, []))
                    members.append([])
                extents[-1][1].append(targets[i])
                members[-1].append((i, length, digest))
                end = offset + length
            got = self._preadv(seg, extents)
            for n, blocks in zip(got, members, strict=True):
                for i, length, digest in blocks:
                    if n >= length and digest_of(targets[i]) == digest:
                        ok[i] = True
                    else:
                        self._reject(block_ids[i], seg)
                    n -= length
        hits = sum(ok)
        self.hits += hits
        self.misses += len(block_ids) - hits
        return ok

    def contains(self, block_id: bytes) -> bool:
        with self._env.begin() as txn:
            return txn.get(block_id, db=self._blocks) is not None

    def missing(self, block_ids: list[bytes]) -> list[bytes]:
        """The IDs of ``block_ids`` that are not cached, in order."""
        with self._env.begin() as txn:
            return [b for b in block_ids if txn.get(b, db=self._blocks) is None]

    # -- writes ---------------------------------------------------------------------------

    def put(self, block_id: bytes, plain: bytes) -> None:
        self.put_many([(block_id, plain)])

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]],
                 checksums: Sequence[bytes] | None = None) -> None:
        """Cache each (ID, plain bytes): one append to our segment and one lmdb write
        transaction for all of them (a fetched run is cached at once: a transaction per block
        cost more than decoding it). Entries point at bytes not yet synced; the check on read
        is what makes that safe (see the crash rule above).

        ``checksums``, if given, are the xxh3-128 of each item's plain bytes, already known to
        match them (a decoded blob's header, which ``BlockCodec.decode`` checked): they are
        not computed again."""
        if not items:
            return
        if checksums is None:
            checksums = [xxhash.xxh3_128_digest(plain) for _, plain in items]
        nbytes = sum(len(plain) for _, plain in items)
        with self._lock:
            if self._current is None or self._append_pos >= self.segment_size:
                self._start_segment()
            assert self._current is not None
            seg, start = self._current, self._append_pos
            self._append_pos += nbytes
            f = self._files[seg]
        _pwrite_all(f.fileno(), [plain for _, plain in items], start)
        seg_key = SEG.pack(seg)
        with self._env.begin(write=True) as txn:
            offset = start
            for (block_id, plain), digest in zip(items, checksums, strict=True):
                entry = ENTRY.pack(seg, offset, len(plain), digest)
                old = txn.replace(block_id, entry, db=self._blocks)
                txn.put(seg_key + block_id, b"", db=self._members)
                if old is not None:  # another thread or process cached it too: keep one entry
                    old_seg = ENTRY.unpack(old)[0]
                    if old_seg != seg:
                        txn.delete(SEG.pack(old_seg) + block_id, db=self._members)
                offset += len(plain)
            info = txn.get(seg_key, db=self._segments)
            size, pid, is_open = SEGINFO.unpack(info) if info else (0, os.getpid(), 1)
            grown = max(size, start + nbytes)
            txn.put(seg_key, SEGINFO.pack(grown, pid, is_open), db=self._segments)
            total = self._add_total(txn, grown - size)
        if total > self.capacity:
            self._evict(total)
        if time.monotonic() - self._last_flush > 5:
            self.flush()

    def _add_total(self, txn: lmdb.Transaction, delta: int) -> int:
        raw = txn.get(TOTAL_BYTES, db=self._meta)
        total = max(0, (U64.unpack(raw)[0] if raw else 0) + delta)
        txn.put(TOTAL_BYTES, U64.pack(total), db=self._meta)
        return total

    def _drop(self, block_id: bytes, seg: int) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(block_id, db=self._blocks)
            txn.delete(SEG.pack(seg) + block_id, db=self._members)

    def _evict(self, total: int) -> None:
        while total > self.capacity:
            victim = None
            victim_size = 0
            with self._env.begin(write=True) as txn:
                for key, info in txn.cursor(db=self._segments):
                    size, pid, is_open = SEGINFO.unpack(info)
                    if is_open and (pid == os.getpid() or pid_alive(pid)):
                        continue  # someone still appends to it
                    victim, victim_size = SEG.unpack(key)[0], size
                    break
                if victim is None:
                    return
                prefix = SEG.pack(victim)
                cur = txn.cursor(db=self._members)
                if cur.set_range(prefix):
                    while cur.key()[:4] == prefix:
                        block_id = cur.key()[4:]
                        raw = txn.get(block_id, db=self._blocks)
                        if raw is not None and ENTRY.unpack(raw)[0] == victim:
                            txn.delete(block_id, db=self._blocks)
                        if not cur.delete():
                            break
                txn.delete(prefix, db=self._segments)
                total = self._add_total(txn, -victim_size)
            with self._lock:
                self._retire_file(victim)
            try:
                self._seg_path(victim).unlink()
            except FileNotFoundError:
                pass
            log.debug("evicted cache segment %d", victim)

    # -- housekeeping ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes in all segments, from every process sharing this cache."""
        with self._env.begin() as txn:
            raw = txn.get(TOTAL_BYTES, db=self._meta)
        return U64.unpack(raw)[0] if raw else 0

    def entries(self) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._blocks)["entries"])

    def flush(self) -> None:
        with self._lock:
            current = self._files.get(self._current) if self._current is not None else None
            if current is not None:
                try:
                    os.fsync(current.fileno())
                except OSError:
                    pass
        self._env.sync(True)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._current is not None:
                with self._env.begin(write=True) as txn:
                    self._set_open(txn, self._current, False)
            for f in [*self._files.values(), *self._doomed.values()]:
                f.close()
            self._files.clear()
            self._doomed.clear()
        self._env.close()
