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
periodically and at close). An lmdb index that cannot be used when the cache opens is moved
aside and the cache starts empty: one lmdb refuses, or one whose data file is shorter than the
pages its meta page names (lmdb would SIGBUS on the first read of a missing page), or one that
a process had open when the machine went down. With ``sync=False`` a power loss in the middle
of the kernel's writeback can leave lmdb's meta page and the pages it names from different
commits, or pages of the last synced tree overwritten by later commits: an index lmdb opens
that then fails its lookups and writes, reads as empty, or worse. So every process that opens
the cache leaves a marker, an empty file ``running-PID-BOOT-RANDOM`` (BOOT: a hash of the boot's
id), on the device before it commits anything and removed after its last sync; a marker of
another boot means that the index may be torn. (A marker of this boot whose process is gone is kill -9's: lmdb's pages were in the
kernel's cache, whole.)

Eviction is by segment, oldest first (a FIFO of segments, as log-structured caches do): when the
total passes the capacity, the oldest segment that no live process is still appending to loses
its entries and its file is unlinked.

The cache also keeps ``reserve`` bytes of its file system free (by default 5% of it, at most
2 GiB, as cachefilesd culls below a share of free space): before each append it evicts until the
append leaves that much (counting this process's appends that passed their check and have not
written yet: several fetch threads append at once), and if it cannot (nothing left to evict, the
space taken by others), it caches nothing until there is room again, and says so once. The
daemon also checks every few seconds (``keep_reserve``), so that the cache gives way to others
and says truly whether it is paused while it caches nothing. Its capacity is a cap, not a
promise: a host whose disk is fuller than the cache's capacity allows gets a smaller cache, not
a full disk. Writable disks keep their overlays beside the cache and ask it to give way
(``ensure_free``) before they write: the cache holds copies, a disk the only one. A segment this
process has stopped appending to is marked closed (and so may be evicted) only once the appends
into it under way have ended: a write never loses its file, and never its segment's record,
which it would otherwise have to recreate for bytes no file holds. (Should another process evict
it anyway, judging this one dead, the write caches nothing.) An evicted segment's file is
emptied before its entries are dropped and it is unlinked, so that its space comes back at once:
other processes sharing the cache keep segment files open for their reads, an unlinked file
would hold its space until they closed it, and on a file system filled to the last block the
lmdb commit that drops the entries needs space. Other processes never find entries for it again;
a pread under way, here or there, may read it short, and a lookup that finds a segment gone
(evicted since its entries were read: a short read of an unlinked file, or no file) is a miss,
not a bad block.

The cache's own I/O errors (its file system full or failing, a damaged lmdb page) never fail a
read: a lookup that fails is a miss, a write that fails leaves the blocks uncached (the caller
has verified them, and serves them anyway). Each kind is logged once, not once per block.

Thread-safe: every method may be called from any worker thread; never call one on the trio
thread (they block). An lmdb transaction never outlives the method that opened it, and
``_lock`` is never taken inside a write transaction (``_start_segment`` takes them the other way
round). ``close`` waits for the calls under way; calls after it are misses and cache nothing
(a fetch thread the hydrator abandoned may come back late).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import lmdb
import xxhash

from snapfs.cache.lmdbenv import open_env
from snapfs.dirsync import fsync_dir, make_dirs
from snapfs.errors import SnapfsError
from snapfs.host import boot_id, pid_alive

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
CLOSE_WAIT = 10.0  # seconds ``close`` waits for the calls under way
RESERVE_SHARE = 0.05  # of the cache's file system kept free, by default ...
RESERVE_MAX = 2 << 30  # ... up to this much


def _boot_tag() -> str:
    """This boot, as a word fit for a file name."""
    return hashlib.sha1(boot_id().encode()).hexdigest()[:16]


def _create_synced(path: Path) -> None:
    """An empty file at ``path``, whose name is on the device (no data block needed: it can
    still be made on a file system that is full)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    fsync_dir(path.parent)


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


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


class BlockCache:
    def __init__(
        self, directory: str | os.PathLike[str], capacity: int,
        segment_size: int = DEFAULT_SEGMENT_SIZE, reserve: int | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.capacity = capacity
        try:
            make_dirs(self.dir)  # the disks' state lives in it too
            probe = self.dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            fs = os.statvfs(self.dir)
        except OSError as e:
            raise SnapfsError(f"cache directory {self.dir} is not writable: {e.strerror}") from None
        fs_size = fs.f_blocks * fs.f_frsize
        #: bytes of its file system the cache leaves free (see the module docstring)
        self.reserve = min(int(fs_size * RESERVE_SHARE), RESERVE_MAX) if reserve is None \
            else reserve
        # a segment is the unit of eviction: small enough that evicting one frees a useful
        # share of a small file system, and that the one being appended to never fills it
        self.segment_size = min(segment_size, max(capacity // 4, 1 << 20),
                                max(fs_size // 16, 1 << 20))
        self.short_of_space = False  # caching paused: the reserve could not be kept
        self._open_index()
        self._lock = threading.Lock()  # guards the append position and the file table
        #: taken around a free-space check and the reservation of what it allowed: appends in
        #: other threads that passed their check but have not written yet count as used
        self._room_lock = threading.Lock()
        self._unwritten = 0  # bytes of appends allowed by their check, not written yet
        self._idle = threading.Condition(self._lock)  # notified when the last call under way ends
        self._calls = 0  # public calls under way (``close`` waits for them)
        self._closed = False
        self._files: OrderedDict[int, IO[bytes]] = OrderedDict()  # open segment files, LRU
        self._users: dict[int, int] = {}  # segment -> preads and pwrites under way in this process
        self._doomed: dict[int, list[IO[bytes]]] = {}  # closed when its last user is done
        self._appending: dict[int, int] = {}  # segment -> pwrites under way (it stays open)
        self._unsealed: set[int] = set()  # no longer ours to append to, marked closed once
        #                                   its pwrites under way have ended
        self._current: int | None = None  # the segment this process appends to
        self._append_pos = 0
        self.hits = 0
        self.misses = 0
        self.bad = 0
        self.errors = 0  # I/O errors of the cache's own files and index
        self._troubles: set[tuple[str, type, int | None]] = set()
        self._troubles_lock = threading.Lock()  # its own: ``_trouble`` may be called under _lock
        self._last_flush = time.monotonic()

    def _open_index(self) -> None:
        """Open the lmdb index, and mark it open by this process; one that cannot be used is
        moved aside, its segments deleted, and the cache starts empty (see the module
        docstring). One process at a time, so that two starting at once after a reboot do not
        both set it aside (the second, the first one's new index)."""
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the directory's own lock: no file of its own
            torn = self._markers_of_other_boots()
            # before anything is committed: a commit may reach the device before a sync
            self._marker: Path | None = self.dir / (
                f"running-{os.getpid()}-{_boot_tag()}-{secrets.token_hex(4)}")
            try:
                _create_synced(self._marker)
            except OSError as e:  # a cache that works still beats none
                log.warning("cache %s: cannot mark it in use (%s); after a power loss it "
                            "would not be known to need setting aside", self.dir, e)
                self._marker = None
            try:
                self._open_index_locked(torn)
            except BaseException:
                if self._marker is not None:
                    self._marker.unlink(missing_ok=True)
                raise
        finally:
            os.close(fd)

    def _open_index_locked(self, torn: list[Path]) -> None:
        path = self.dir / "index.lmdb"
        if torn:
            broken: str | None = (f"{torn[0].name} had it open when the machine went down: a "
                                  "power loss may have torn it")
        else:
            try:
                broken = self._try_open(path)
            except lmdb.Error as e:
                broken = str(e)
        for marker in torn:  # the index they name is set aside below
            marker.unlink(missing_ok=True)
        if broken is None:
            return
        aside = path.with_name(f"index.lmdb.broken-{int(time.time())}-{os.getpid()}")
        log.warning("cache index %s unusable (%s); starting an empty cache", path, broken)
        if path.exists():
            path.rename(aside)
        for seg in self.dir.glob("seg-*.dat"):
            seg.unlink()
        try:
            broken = self._try_open(path)
        except lmdb.Error as e:
            broken = str(e)
        if broken is not None:
            raise SnapfsError(f"cannot create a cache index at {path}: {broken}")

    def _markers_of_other_boots(self) -> list[Path]:
        """Markers of processes that had the cache open in another boot; those of this boot
        whose processes are gone (kill -9) are removed."""
        this_boot = _boot_tag()
        out = []
        for marker in self.dir.glob("running-*"):
            try:
                _, pid_text, boot, _ = marker.name.split("-")
                pid = int(pid_text)
            except ValueError:
                continue
            if boot != this_boot:
                out.append(marker)
            elif pid != os.getpid() and not pid_alive(pid):
                marker.unlink(missing_ok=True)
        return out

    def _try_open(self, path: Path) -> str | None:
        """Open the index at ``path`` and its databases; what is wrong with it if it is
        truncated (closed again then). Raises lmdb.Error if lmdb refuses it."""
        try:
            env = open_env(path, map_size=MAP_SIZE, max_dbs=4, sync=False, metasync=False,
                           readahead=False)
        except OSError as e:  # its file system (full, most likely), not the index: kept
            raise SnapfsError(f"cannot open the cache index {path}: {e.strerror}") from None
        try:
            # every page up to last_pgno must be in the file: lmdb maps the file and would
            # SIGBUS on reading a page past its end, killing the daemon on its first lookup
            need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
            have = os.stat(path / "data.mdb").st_size
            if have < need:
                env.close()
                return f"its data file is truncated: {have} bytes of the {need} its pages need"
            self._blocks = env.open_db(b"blocks")
            self._segments = env.open_db(b"segments")
            self._members = env.open_db(b"members")
            self._meta = env.open_db(b"meta")
        except BaseException:
            env.close()
            raise
        self._env = env
        return None

    def _seg_path(self, seg: int) -> Path:
        return self.dir / f"seg-{seg:08d}.dat"

    # -- calls, errors --------------------------------------------------------------------

    def _enter(self) -> bool:
        """Count a public call under way; False (do nothing) once the cache is closed."""
        with self._lock:
            if self._closed:
                return False
            self._calls += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._calls -= 1
            if not self._calls:
                self._idle.notify_all()

    def _trouble(self, doing: str, e: Exception, then: str) -> None:
        """An I/O error of the cache's own files or index. It costs a miss or a block not cached
        (the store serves it), and comes again for every block while it lasts (a full file
        system, a damaged page): logged once per kind, not per block."""
        kind = (doing, type(e), getattr(e, "errno", None))
        with self._troubles_lock:
            self.errors += 1
            first = kind not in self._troubles
            self._troubles.add(kind)
        if first:
            log.warning("cache %s: cannot %s (%s); %s", self.dir, doing, e, then)
        else:
            log.debug("cache %s: cannot %s (%s)", self.dir, doing, e)

    def _read_trouble(self, doing: str, e: Exception) -> None:
        self._trouble(doing, e, "those blocks are read from the store")

    # -- files ----------------------------------------------------------------------------

    def _pread(self, seg: int, spans: list[tuple[int, int]]) -> list[bytes] | None:
        """Read ``(offset, length)`` spans of one segment; None if the segment is gone."""
        fd = self._use_file(seg)
        if fd is None:
            return None
        try:
            # one pread per block: a pread of a whole stretch and slices of it copy twice
            datas = [os.pread(fd, length, offset) for offset, length in spans]
            if any(len(d) < length for d, (_, length) in zip(datas, spans, strict=True)) \
                    and self._evicted(fd):
                return None
            return datas
        finally:
            self._done_with_file(seg)

    @staticmethod
    def _evicted(fd: int) -> bool:
        """Whether a segment file that read short was evicted (emptied, then unlinked, by
        this process or another) while we read it: its blocks are gone, not bad."""
        st = os.fstat(fd)
        return st.st_nlink == 0 or st.st_size == 0

    def _preadv(self, seg: int, extents: list[tuple[int, list[memoryview]]]) -> list[int] | None:
        """Read each ``(offset, buffers)`` extent of one segment into its buffers (one preadv
        each); how many bytes each got, or None if the segment is gone."""
        fd = self._use_file(seg)
        if fd is None:
            return None
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
            if any(got < sum(len(b) for b in buffers)
                   for got, (_, buffers) in zip(out, extents, strict=True)) and self._evicted(fd):
                return None
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
            self._users[seg] = self._users.get(seg, 0) + 1
            return f.fileno()

    def _done_with_file(self, seg: int) -> None:
        with self._lock:
            self._release_file(seg)

    def _release_file(self, seg: int) -> None:
        """One user of a segment's file is done; the last one closes it if it was retired.
        Lock held."""
        self._users[seg] -= 1
        if not self._users[seg]:
            del self._users[seg]
            for f in self._doomed.pop(seg, []):
                f.close()

    def _retire_file(self, seg: int) -> None:
        """Stop using a segment's file: close it now, or once the preads and pwrites under way
        are done (its fd must not be closed, and so reused by another file, under them). Lock
        held."""
        f = self._files.pop(seg, None)
        if f is None:
            return
        if self._users.get(seg):
            self._doomed.setdefault(seg, []).append(f)
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
        """Allocate a segment of our own for appends. The one we appended to so far is marked
        closed now, or by the last of the appends into it under way. Lock held."""
        old = self._current
        seal = old is not None and not self._appending.get(old)
        f: IO[bytes] | None = None
        try:
            with self._env.begin(write=True) as txn:
                if old is not None and seal:
                    self._set_open(txn, old, False)
                raw = txn.get(NEXT_SEGMENT, db=self._meta)
                seg = SEG.unpack(raw)[0] if raw else 1
                txn.put(NEXT_SEGMENT, SEG.pack(seg + 1), db=self._meta)
                txn.put(SEG.pack(seg), SEGINFO.pack(0, os.getpid(), 1), db=self._segments)
                f = open(self._seg_path(seg), "w+b")
        except BaseException:
            if f is not None:  # the commit failed: no record names this file
                f.close()
                self._seg_path(seg).unlink(missing_ok=True)
            raise
        if old is not None and not seal:
            self._unsealed.add(old)
        self._files[seg] = f
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
        if not self._enter():
            return out
        try:
            gone: list[tuple[bytes, int, int]] = []
            bad: list[tuple[bytes, int, int]] = []
            for seg, entries in self._locate(block_ids).items():
                try:
                    datas = self._pread(seg, [(offset, length) for offset, length, _, _ in entries])
                except OSError as e:
                    self._read_trouble("read a segment", e)
                    continue
                if datas is None:
                    gone += [(block_ids[i], seg, offset) for offset, _, i, _ in entries]
                    continue
                for (offset, length, i, digest), data in zip(entries, datas, strict=True):
                    if len(data) != length or xxhash.xxh3_128_digest(data) != digest:
                        bad.append((block_ids[i], seg, offset))
                        continue
                    out[i] = data
            self._forget(gone, bad)
        finally:
            self._leave()
        hits = sum(1 for d in out if d is not None)
        self.hits += hits
        self.misses += len(block_ids) - hits
        return out

    def _locate(self, block_ids: Sequence[bytes],
                ) -> dict[int, list[tuple[int, int, int, bytes]]]:
        """Where the cached ones of ``block_ids`` lie, by segment: ``(offset, length, index in
        block_ids, xxh3-128)`` each, in one lmdb read transaction (none if it fails)."""
        try:
            with self._env.begin() as txn:
                get = txn.get
                db = self._blocks
                raws = [get(bid, db=db) for bid in block_ids]
        except lmdb.Error as e:
            self._read_trouble("look blocks up", e)
            return {}
        by_seg: dict[int, list[tuple[int, int, int, bytes]]] = {}
        unpack = ENTRY.unpack
        for i, raw in enumerate(raws):
            if raw is not None:
                seg, offset, length, digest = unpack(raw)
                by_seg.setdefault(seg, []).append((offset, length, i, digest))
        return by_seg

    def _forget(self, gone: list[tuple[bytes, int, int]], bad: list[tuple[bytes, int, int]],
                ) -> None:
        """Drop the entries of blocks found at ``(segment, offset)`` in a segment that is gone
        (a miss: an eviction raced the lookup) or that failed their check (counted and said),
        unless they point elsewhere by now (cached again since: that entry is good)."""
        if not gone and not bad:
            return
        self.bad += len(bad)
        for block_id, _, _ in bad:
            log.warning("cached block %s failed its checksum; dropping it", block_id.hex()[:16])
        try:
            with self._env.begin(write=True) as txn:
                for block_id, seg, offset in gone + bad:
                    raw = txn.get(block_id, db=self._blocks)
                    if raw is None or ENTRY.unpack(raw)[:2] != (seg, offset):
                        continue
                    txn.delete(block_id, db=self._blocks)
                    txn.delete(SEG.pack(seg) + block_id, db=self._members)
        except lmdb.Error as e:
            self._read_trouble("drop entries", e)

    def read_into(self, block_ids: Sequence[bytes], targets: Sequence[memoryview]) -> list[bool]:
        """Read each cached block straight into its target (a writable buffer as long as the
        block) and check it there against its xxh3-128: True where the target now holds the
        block's verified bytes. A target marked False may hold anything (a block not cached,
        of another length, or failing its check): the caller must not use its bytes.

        What a reader of many blocks (a read-ahead fill) wants: one lmdb read transaction,
        one preadv per run of blocks that lie end to end in a segment, no copy and no
        allocation per block. The same ID may appear more than once."""
        ok = [False] * len(block_ids)
        if not self._enter():
            return ok
        try:
            gone: list[tuple[bytes, int, int]] = []
            bad: list[tuple[bytes, int, int]] = []
            digest_of = xxhash.xxh3_128_digest
            for seg, entries in self._locate(block_ids).items():
                entries.sort()
                extents: list[tuple[int, list[memoryview]]] = []
                # (index, offset, length, digest) of each block, per extent
                members: list[list[tuple[int, int, int, bytes]]] = []
                end = -1
                for offset, length, i, digest in entries:
                    if length != len(targets[i]):
                        continue  # not the block the caller expects here: a miss
                    if offset != end:
                        extents.append((offset, []))
                        members.append([])
                    extents[-1][1].append(targets[i])
                    members[-1].append((i, offset, length, digest))
                    end = offset + length
                try:
                    got = self._preadv(seg, extents)
                except OSError as e:
                    self._read_trouble("read a segment", e)
                    continue
                if got is None:
                    gone += [(block_ids[i], seg, offset)
                             for blocks in members for i, offset, _, _ in blocks]
                    continue
                for n, blocks in zip(got, members, strict=True):
                    for i, offset, length, digest in blocks:
                        if n >= length and digest_of(targets[i]) == digest:
                            ok[i] = True
                        else:
                            bad.append((block_ids[i], seg, offset))
                        n -= length
            self._forget(gone, bad)
        finally:
            self._leave()
        hits = sum(ok)
        self.hits += hits
        self.misses += len(block_ids) - hits
        return ok

    def contains(self, block_id: bytes) -> bool:
        return not self.missing([block_id])

    def missing(self, block_ids: list[bytes]) -> list[bytes]:
        """The IDs of ``block_ids`` that are not cached, in order (all of them if the index
        cannot be read)."""
        if not self._enter():
            return list(block_ids)
        try:
            with self._env.begin() as txn:
                return [b for b in block_ids if txn.get(b, db=self._blocks) is None]
        except lmdb.Error as e:
            self._read_trouble("look blocks up", e)
            return list(block_ids)
        finally:
            self._leave()

    # -- writes ---------------------------------------------------------------------------

    def put(self, block_id: bytes, plain: bytes) -> bool:
        return self.put_many([(block_id, plain)])

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]],
                 checksums: Sequence[bytes] | None = None) -> bool:
        """Cache each (ID, plain bytes): one append to our segment and one lmdb write
        transaction for all of them (a fetched run is cached at once: a transaction per block
        cost more than decoding it). Entries point at bytes not yet synced; the check on read
        is what makes that safe (see the crash rule above).

        ``checksums``, if given, are the xxh3-128 of each item's plain bytes, already known to
        match them (a decoded blob's header, which ``BlockCodec.decode`` checked): they are
        not computed again.

        Whether they were cached: not if the cache cannot store them now (its file system is
        full or failing, its index damaged: logged once per kind), nor if their segment was
        evicted meanwhile (see the module docstring), nor once the cache is closed. That costs
        the caller nothing but a later refetch: it has the bytes."""
        if not items:
            return True
        if not self._enter():
            return False
        try:
            return self._put_many(items, checksums)
        except (OSError, lmdb.Error) as e:
            self._trouble("cache blocks", e, "blocks are served without being cached")
            return False
        finally:
            self._leave()

    def _put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]],
                  checksums: Sequence[bytes] | None) -> bool:
        if checksums is None:
            checksums = [xxhash.xxh3_128_digest(plain) for _, plain in items]
        nbytes = sum(len(plain) for _, plain in items)
        with self._room_lock:
            if not self._room_for(nbytes + self._unwritten):
                return False
            self._unwritten += nbytes
        try:
            return self._append(items, checksums, nbytes)
        finally:
            with self._room_lock:
                self._unwritten -= nbytes

    def _append(self, items: Sequence[tuple[bytes, bytes | memoryview]],
                checksums: Sequence[bytes], nbytes: int) -> bool:
        with self._lock:
            if self._current is None or self._append_pos >= self.segment_size:
                self._start_segment()
            assert self._current is not None
            seg, start = self._current, self._append_pos
            self._append_pos += nbytes
            # the pwrite is outside the lock (it is most of the time a put takes): count it
            # as a user of the file and an append into the segment, so that neither its fd
            # nor its segment's record goes away under it
            fd = self._files[seg].fileno()
            self._users[seg] = self._users.get(seg, 0) + 1
            self._appending[seg] = self._appending.get(seg, 0) + 1
        try:
            _pwrite_all(fd, [plain for _, plain in items], start)
            total = self._record(seg, start, nbytes, items, checksums)
        finally:
            self._done_appending(seg)
        if total is None:
            log.debug("cache segment %d was evicted while blocks were written to it", seg)
            return False
        if total > self.capacity:
            try:
                self._evict()
            except (OSError, lmdb.Error) as e:  # the blocks are cached all the same
                self._trouble("evict segments", e, "the cache may grow past its capacity")
        if time.monotonic() - self._last_flush > 5:
            self.flush()
        return True

    def _record(self, seg: int, start: int, nbytes: int,
                items: Sequence[tuple[bytes, bytes | memoryview]], checksums: Sequence[bytes],
                ) -> int | None:
        """The entries of blocks just written at ``start`` in ``seg``, in one transaction; the
        cache's new total, or None (nothing recorded) if the segment's record is gone."""
        seg_key = SEG.pack(seg)
        with self._env.begin(write=True) as txn:
            info = txn.get(seg_key, db=self._segments)
            if info is None:  # evicted: recreating it would account bytes no file holds
                return None
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
            size, pid, is_open = SEGINFO.unpack(info)
            grown = max(size, start + nbytes)
            txn.put(seg_key, SEGINFO.pack(grown, pid, is_open), db=self._segments)
            return self._add_total(txn, grown - size)

    def _done_appending(self, seg: int) -> None:
        """An append into ``seg`` has ended; the last one into a segment we no longer append
        to marks it closed (evictable)."""
        with self._lock:
            self._release_file(seg)
            self._appending[seg] -= 1
            if self._appending[seg]:
                return
            del self._appending[seg]
            if seg not in self._unsealed or self._closed:
                return
            try:
                with self._env.begin(write=True) as txn:
                    self._set_open(txn, seg, False)
                self._unsealed.discard(seg)
            except lmdb.Error as e:  # it stays open until ``close`` tries again
                self._trouble("close a segment", e, "it is evicted once this process exits")

    def _add_total(self, txn: lmdb.Transaction, delta: int) -> int:
        raw = txn.get(TOTAL_BYTES, db=self._meta)
        total = max(0, (U64.unpack(raw)[0] if raw else 0) + delta)
        txn.put(TOTAL_BYTES, U64.pack(total), db=self._meta)
        return total

    def _evict(self) -> None:
        """Evict segments, oldest first, until the total is within the capacity. The total is
        read again in each transaction: other threads and processes evict too."""
        while self._evict_oldest(lambda total: total > self.capacity):
            pass

    def _evict_oldest(self, needed: Callable[[int], bool]) -> int:
        """Evict the oldest segment that no live process appends to, if ``needed`` of the
        cache's total says so. Its size (at least 1), or 0 if nothing was evicted.

        Its file is emptied first, then its entries are dropped: an lmdb commit needs free
        pages, and on a file system that others have filled to the last block the commit
        would fail for want of the very space the eviction is for. Entries left pointing into
        an emptied file (the commit failed, or has not happened yet) read short: misses. The
        file is unlinked last; emptied, it holds no space even where another process sharing
        the cache keeps it open for its reads."""
        with self._env.begin() as txn:
            raw = txn.get(TOTAL_BYTES, db=self._meta)
            if not needed(U64.unpack(raw)[0] if raw else 0):
                return 0
            victim = None
            victim_size = 0
            for key, info in txn.cursor(db=self._segments):
                size, pid, is_open = SEGINFO.unpack(info)
                if is_open and (pid == os.getpid() or pid_alive(pid)):
                    continue  # someone still appends to it
                victim, victim_size = SEG.unpack(key)[0], size
                break
        if victim is None:
            return 0
        path = self._seg_path(victim)
        try:
            os.truncate(path, 0)
        except FileNotFoundError:
            pass
        prefix = SEG.pack(victim)
        with self._env.begin(write=True) as txn:
            if txn.get(prefix, db=self._segments) is not None:  # else evicted by another
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
                self._add_total(txn, -victim_size)
        with self._lock:
            self._retire_file(victim)
        path.unlink(missing_ok=True)
        log.debug("evicted cache segment %d", victim)
        return max(victim_size, 1)

    # -- free space -----------------------------------------------------------------------

    def free_space(self) -> int:
        """Bytes of the cache's file system that ordinary writers may still use."""
        fs = os.statvfs(self.dir)
        return fs.f_bavail * fs.f_frsize

    def ensure_free(self, nbytes: int) -> bool:
        """Evict the oldest segments until the cache's file system has ``nbytes`` free beyond
        ``reserve`` (a disk's overlay is about to grow by that much); whether it has. Costs one
        ``statvfs`` when there is room. Blocking, thread-safe."""
        if not self._enter():
            return False
        try:
            with self._room_lock:  # the cache's appends under way will take their space too
                return self._make_room(nbytes + self._unwritten)
        except (OSError, lmdb.Error) as e:
            self._trouble("evict segments", e, "the cache may hold space a disk needs")
            return False
        finally:
            self._leave()

    def _make_room(self, nbytes: int) -> bool:
        want = nbytes + self.reserve
        free = self.free_space()
        if free >= want:
            return True
        # until statvfs agrees: an evicted segment's space comes back at once (its file is
        # emptied), and what it held may differ from its recorded size (holes)
        while free < want:
            if not self._evict_oldest(lambda total: total > 0):
                break
            free = self.free_space()
        return free >= want

    def keep_reserve(self) -> None:
        """Evict what keeps the reserve free, and pause or resume caching, as an append would
        (the daemon calls it every few seconds: space that others take or give back is seen
        while nothing is cached, and ``short_of_space`` stays true to the file system).
        Blocking, thread-safe."""
        if not self._enter():
            return
        try:
            with self._room_lock:
                self._room_for(self._unwritten)
        except OSError as e:  # statvfs: the daemon goes on, and the appends check again
            self._trouble("check its free space", e, "its reserve is kept at the next append")
        finally:
            self._leave()

    def _room_for(self, nbytes: int) -> bool:
        """Whether an append of ``nbytes`` may go ahead, after evicting what keeps the reserve
        free (see the module docstring). Says when caching pauses and resumes; once paused, it
        resumes with twice the reserve free, so that it does not pause and resume by turns
        while the space hovers at the edge."""
        try:
            room = self._make_room(nbytes + (self.reserve if self.short_of_space else 0))
        except (OSError, lmdb.Error) as e:
            self._trouble("evict segments", e, "the cache may grow past its capacity")
            room = True  # the append finds out for itself
        if room and self.short_of_space:
            self.short_of_space = False
            log.info("cache %s: room on its file system again; caching resumed", self.dir)
        elif not room and not self.short_of_space:
            self.short_of_space = True
            log.warning("cache %s: cannot keep %s of its file system free (%s free, %s to "
                        "write, nothing left to evict); blocks are served uncached until there "
                        "is room", self.dir, _mib(self.reserve), _mib(self.free_space()),
                        _mib(nbytes))
        return room

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
        self._last_flush = time.monotonic()
        if not self._enter():
            return
        try:
            with self._lock:
                current = self._files.get(self._current) if self._current is not None else None
                if current is not None:
                    try:
                        os.fsync(current.fileno())
                    except OSError:
                        pass
            self._env.sync(True)
        except lmdb.Error as e:
            self._trouble("sync the index", e, "what it recorded since may be lost in a crash")
        finally:
            self._leave()

    def close(self) -> None:
        """Flush, wait for the calls under way (at most ``CLOSE_WAIT`` seconds), and close.
        Calls after it do nothing."""
        self.flush()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._idle.wait_for(lambda: not self._calls, timeout=CLOSE_WAIT):
                # a thread is stuck in a call (a hung file system): closing lmdb under its
                # transaction could crash the process; the process's exit closes both
                log.warning("cache %s: calls still under way; left open", self.dir)
                return
            seal = list(self._unsealed) + ([self._current] if self._current is not None else [])
            try:
                with self._env.begin(write=True) as txn:
                    for seg in seal:
                        self._set_open(txn, seg, False)
            except lmdb.Error as e:
                self._trouble("close a segment", e, "it is evicted once this process exits")
            for f in [*self._files.values(), *(f for fs in self._doomed.values() for f in fs)]:
                f.close()
            self._files.clear()
            self._doomed.clear()
        try:
            self._env.sync(True)  # the segments' closing above, before the marker goes
            self._env.close()
            if self._marker is not None:
                self._marker.unlink(missing_ok=True)
        except (OSError, lmdb.Error) as e:
            self._trouble("close the index", e, "it is set aside after a reboot")
