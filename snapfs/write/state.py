"""The durable state of a host's writable disks: one lmdb environment per repository.

Lives in ``STATE/disks/REPO-ID/state.lmdb`` (STATE is the daemon's cache directory) beside each
disk's overlay and copy-on-write files (``overlay``) and ``journal.lmdb`` (below). Named
databases:

``disks``    name -> ``DiskRecord`` (JSON)
``present``  disk id (8 bytes) + block (8) -> ``b""``: the block lives in the overlay
``changed``  disk id + generation (4) + block -> ``b""``: written during that generation
``cow``      disk id + generation + block -> offset (8) in that generation's copy-on-write file
``tasks``    task id -> ``SnapshotTask`` (JSON): snapshots being uploaded, and how they ended
``meta``     ``boot_id`` and ``clean``: was the last daemon stopped cleanly in this boot;
             ``holder``: this state's hold in the repository (``holds/HOLDER``)

A generation is the set of writes between two snapshots. The open one is the record's ``gen``;
closing it for a snapshot records the task and opens ``gen + 1`` in one transaction (one per
consistency group), which is the snapshot's instant. Its ``changed`` entries stay after its upload
(they tell ``rollback`` what changed since each snapshot); its ``cow`` entries go with its upload.

Durability, and what a power cut may leave. ``state.lmdb`` is durable: lmdb syncs every
commit to it, and lmdb's commits are crash-safe only so (opened without a sync per commit, a
power cut in the middle of the kernel's writeback leaves a meta page naming pages that never
reached the device, or pages of the last synced tree overwritten by later commits: the whole
environment can read as empty). A write's marks (``mark``) and copy-on-write entries
(``put_cow``) are committed before the write is acknowledged, but to ``journal.lmdb``, which is
never synced: one cheap commit each, which survives kill -9 (the pages are in the kernel's
cache). ``sync`` (from an fsync of a disk image) folds a disk's journal entries into the durable
environment, in this order: read them, flush the disk's files (overlay and copy-on-write files),
commit them durably, delete them from the journal; so no mark is ever durable before the bytes
it stands for, which another disk's fsync or the kernel's writeback would otherwise make it. The
closing of a generation (``put_task`` with ``flush``) folds the same way, in its own durable
commit; a rollback folds (as ``sync``) before its commit, which deletes marks.

After a reboot ``start`` deletes the journal without reading it (it may be torn). If the reboot
was not preceded by a clean shutdown, every write since its disk's last fsync may have lost its
marks while its bytes reached the overlay: the daemon then distrusts the changed sets
(``trusted``), and the next snapshot of each disk compares checksums instead. In the same boot
(kill -9) the journal is whole, and the daemon folds it once it has flushed the disks' files.

Deleting a disk, and ending an upload (``drop_cow``), is a durable commit followed by the rest
(the journal's entries, then the files): a cut in between leaves entries and files that nothing
names. The next start deletes them (``drop_leftovers``, and ``DiskService`` the files).

Every method is one transaction and blocks: call it from a worker thread, never across an
``await`` (an lmdb transaction never moves between threads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import lmdb

from snapfs.cache.lmdbenv import open_env
from snapfs.errors import SnapfsError
from snapfs.host import machine_id

log = logging.getLogger(__name__)

MAP_SIZE = 1 << 36
_BLOCK = struct.Struct(">Q")
_GEN = struct.Struct(">I")
_OFFSET = struct.Struct("<Q")


@dataclass
class DiskRecord:
    name: str
    id: str  # 16 hex digits, the key prefix of everything this disk owns
    size: int
    block_size: int
    base: str | None  # the snapshot untouched blocks are read from (None: all zeros)
    parent: str | None  # what the next snapshot is incremental to (None: a full one)
    source: str | None  # the snapshot the disk was created from, for people
    created: str
    gen: int = 1  # the open generation
    #: [snapshot id, last generation it holds] of this disk's own snapshots and of ``base``,
    #: oldest first: what ``rollback`` can reach by resetting only what changed since
    lineage: list[list[Any]] = field(default_factory=list)
    #: False after an unclean reboot: the changed sets may miss writes
    trusted: bool = True

    @property
    def key(self) -> bytes:
        return bytes.fromhex(self.id)

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.block_size)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> DiskRecord:
        doc = json.loads(data)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass
class SnapshotPart:
    """One disk's share of a snapshot task."""

    disk: str
    disk_id: str
    gen: int  # the closed generation
    snapshot_id: str
    name: str
    parent: str | None
    size: int
    blocks: int = 0  # changed blocks to upload
    done: bool = False  # its root is stored
    #: closed while the disk's changed sets were not trusted: every block it ever wrote is in
    #: the generation, and the snapshot differs from its parent where a checksum does
    compared: bool = False


@dataclass
class SnapshotTask:
    id: str
    state: str  # progressing | accomplished | failed
    created: str
    parts: list[SnapshotPart]
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    reason: str | None = None
    finished: str | None = None
    consistency: str = "crash"  # or "frozen" when --freeze held for the instant
    #: disks whose base is a snapshot of this task that can never be stored: it stays until
    #: they no longer read from it
    read_by: list[str] = field(default_factory=list)
    #: disks that read from a snapshot of this task, for which its upload, failed as many times
    #: as a task is tried, is retried without end
    retried_for: list[str] = field(default_factory=list)
    #: a consistency group whose roots began to be stored (durably so before the first PUT):
    #: some may be, so giving the task up would leave the group half-stored; it is retried
    #: without end instead
    roots_begun: bool = False
    #: ``roots_begun``, and failed as many times as a task is tried: retried without end
    group_retried: bool = False

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> SnapshotTask:
        doc = json.loads(data)
        doc["parts"] = [SnapshotPart(**p) for p in doc.get("parts", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})


def _present_key(disk: bytes, block: int) -> bytes:
    return disk + _BLOCK.pack(block)


def _gen_key(disk: bytes, gen: int, block: int) -> bytes:
    return disk + _GEN.pack(gen) + _BLOCK.pack(block)


class DiskState:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            self._env = open_env(directory / "state.lmdb", map_size=MAP_SIZE, max_dbs=8,
                                 readahead=False)
        except (OSError, lmdb.Error) as e:
            raise SnapfsError(f"disk state in {directory} cannot be opened: {e}") from None
        self._disks = self._env.open_db(b"disks")
        self._present = self._env.open_db(b"present")
        self._changed = self._env.open_db(b"changed")
        self._cow = self._env.open_db(b"cow")
        self._tasks = self._env.open_db(b"tasks")
        self._meta = self._env.open_db(b"meta")
        self._journal: Journal | None = None  # opened by ``start`` or on first use
        #: set by ``start``: this state had never been started (a new directory, or one whose
        #: environment was lost): files beside it are not known to be leftovers
        self.fresh = False

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            self._journal = Journal(self.dir / "journal.lmdb")
        return self._journal

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
        self._env.close()

    # -- folding the journal ---------------------------------------------------------------------

    def sync(self, record: DiskRecord, flush: Callable[[], None]) -> None:
        """Make the marks of ``record``'s acknowledged writes durable: ``flush`` makes their
        bytes durable first (the disk's overlay and copy-on-write files)."""
        taken = self.journal.entries(record.key)
        flush()
        if any(taken.values()):
            with self._env.begin(write=True) as txn:
                self._put_entries(txn, taken)
            self.journal.delete(taken)

    def _put_entries(self, txn: lmdb.Transaction, taken: dict[str, list[tuple[bytes, bytes]]]
                     ) -> None:
        for name, entries in taken.items():
            db = self._dbs()[name]
            for k, v in entries:
                txn.put(k, v, db=db)

    def _dbs(self) -> dict[str, Any]:
        return {"present": self._present, "changed": self._changed, "cow": self._cow}

    # -- the clean-shutdown marker -----------------------------------------------------------

    def start(self, boot_id: str) -> bool:
        """Record that a daemon runs in this boot; True if the state can be trusted (the last
        daemon stopped cleanly, or this boot is the one it ran in). A journal of another boot
        is deleted unread: after an unclean stop it may be torn, and after a clean one it holds
        nothing that is not durable already (but its deletions were not synced either)."""
        with self._env.begin(write=True, db=self._meta) as txn:
            fresh = self.fresh = txn.get(b"boot_id") is None
            clean = fresh or txn.get(b"clean") == b"1"
            same_boot = txn.get(b"boot_id") == boot_id.encode()
            txn.put(b"boot_id", boot_id.encode())
            txn.put(b"clean", b"0")
        if not same_boot:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            shutil.rmtree(self.dir / "journal.lmdb", ignore_errors=True)
        return clean or same_boot

    def holder_id(self) -> str:
        """This state's name among the repository's holds (``holds/ID``): a random value made
        once and kept here, mixed with the machine and the state's path, so that a copy of the
        directory (a cloned machine, a restored backup) holds under a name of its own and
        lifting its hold never lifts the original's."""
        with self._env.begin(write=True, db=self._meta) as txn:
            found = txn.get(b"holder")
            if found is None:
                found = secrets.token_hex(8).encode()
                txn.put(b"holder", found)
        where = b"\0".join([machine_id().encode(), os.uname().nodename.encode(),
                            os.fsencode(os.path.realpath(self.dir)), bytes(found)])
        return hashlib.sha256(where).hexdigest()[:16]

    def stop(self) -> None:
        """A clean stop: every disk was ``sync``'d (the journal holds nothing of them)."""
        with self._env.begin(write=True, db=self._meta) as txn:
            txn.put(b"clean", b"1")

    def drop_leftovers(self, disk_ids: set[str], uploading: set[tuple[str, int]]) -> int:
        """Delete the entries, durable or journaled, of disks other than ``disk_ids`` (a
        ``delete_disk`` cut between its durable commit and its journal's) and the copy-on-write
        entries of generations other than ``uploading`` ((disk id, generation) of parts still to
        upload: an upload's end cut before ``drop_cow``). After the journal was folded: a
        folded entry is durable. How many entries were deleted."""
        disks = {bytes.fromhex(d) for d in disk_ids}
        gens = {bytes.fromhex(d) + _GEN.pack(g) for d, g in uploading}
        with self._env.begin(write=True) as txn:
            dropped = _drop_unknown(txn, self._dbs(), disks, gens)
        return dropped + self.journal.drop_unless(disks, gens)

    # -- records ---------------------------------------------------------------------------------

    def disks(self) -> list[DiskRecord]:
        with self._env.begin(db=self._disks) as txn:
            return [DiskRecord.decode(v) for _, v in txn.cursor()]

    def tasks(self) -> list[SnapshotTask]:
        with self._env.begin(db=self._tasks) as txn:
            return sorted((SnapshotTask.decode(v) for _, v in txn.cursor()), key=lambda t: t.created)

    def put_disk(self, record: DiskRecord) -> None:
        with self._env.begin(write=True, db=self._disks) as txn:
            txn.put(record.name.encode(), record.encode())

    def put_task(self, task: SnapshotTask, records: Iterable[DiskRecord] = (),
                 flush: Callable[[], None] | None = None) -> None:
        """Store a task and the records it changed, durably and atomically. With ``flush`` (a
        closing: the caller holds the disks' write locks), the journal entries of those disks
        are folded in the same commit, after ``flush`` made their bytes durable: the closed
        generation is durable whole, with its task, before the closing is acknowledged."""
        records = list(records)
        taken: dict[str, list[tuple[bytes, bytes]]] = {}
        if flush is not None:
            for record in records:
                for name, entries in self.journal.entries(record.key).items():
                    taken.setdefault(name, []).extend(entries)
            flush()
        with self._env.begin(write=True) as txn:
            self._put_entries(txn, taken)
            txn.put(task.id.encode(), task.encode(), db=self._tasks)
            for record in records:
                txn.put(record.name.encode(), record.encode(), db=self._disks)
        if taken:
            self.journal.delete(taken)

    def delete_task(self, task_id: str) -> None:
        with self._env.begin(write=True, db=self._tasks) as txn:
            txn.delete(task_id.encode())

    def delete_disk(self, record: DiskRecord) -> None:
        key = record.key
        with self._env.begin(write=True) as txn:
            txn.delete(record.name.encode(), db=self._disks)
            for db in (self._present, self._changed, self._cow):
                _delete_prefix(txn, db, key)
        self.journal.delete_prefix(key)

    # -- blocks ----------------------------------------------------------------------------------

    def present(self, record: DiskRecord) -> list[int]:
        keys = {*_keys(self._env, self._present, record.key),
                *self.journal.keys("present", record.key)}
        return sorted(_BLOCK.unpack_from(k, 8)[0] for k in keys)

    def changed(self, record: DiskRecord) -> dict[int, list[int]]:
        """Every generation's changed blocks (open, closed and uploaded ones)."""
        keys = {*_keys(self._env, self._changed, record.key),
                *self.journal.keys("changed", record.key)}
        out: dict[int, list[int]] = {}
        for k in sorted(keys):
            out.setdefault(_GEN.unpack_from(k, 8)[0], []).append(_BLOCK.unpack_from(k, 12)[0])
        return out

    def cow(self, record: DiskRecord, gen: int) -> dict[int, int]:
        prefix = record.key + _GEN.pack(gen)
        with self._env.begin(db=self._cow) as txn:
            entries = list(_prefixed(txn, self._cow, prefix))
        entries += self.journal.items("cow", prefix)
        return {_BLOCK.unpack_from(k, 12)[0]: _OFFSET.unpack(v)[0] for k, v in entries}

    def mark(self, record: DiskRecord, gen: int, present: Iterable[int], changed: Iterable[int]) -> None:
        """Blocks now in the overlay, and blocks written in generation ``gen`` (journaled)."""
        key = record.key
        self.journal.put([("present", _present_key(key, n)) for n in present]
                         + [("changed", _gen_key(key, gen, n)) for n in changed])

    def put_cow(self, record: DiskRecord, gen: int, entries: Iterable[tuple[int, int]]) -> None:
        self.journal.put([("cow", _gen_key(record.key, gen, n), _OFFSET.pack(offset))
                          for n, offset in entries])

    def drop_cow(self, record: DiskRecord, gen: int) -> None:
        prefix = record.key + _GEN.pack(gen)
        self.journal.delete_prefix(prefix, "cow")
        with self._env.begin(write=True, db=self._cow) as txn:
            _delete_prefix(txn, self._cow, prefix)

    def fail_task(self, task: SnapshotTask,
                  merges: Iterable[tuple[DiskRecord, int, int]] = ()) -> None:
        """A failed upload, in one durable commit: ``task`` stored (failed) and, for each
        (record, from_gen, into_gen), generation ``from_gen``'s blocks counted as changed in
        ``into_gen`` (so the next snapshot uploads them), its own entries gone. One commit,
        because a cut between the two would leave a task still ``progressing`` whose closed
        generation had lost its blocks: the resumed upload would store a snapshot without them.
        (The closing made the generation's marks durable; what the journal holds of it, which
        later copy-on-write entries may be, is folded in the same commit, then deleted.)"""
        merges = list(merges)
        journaled = [self.journal.keys("changed", r.key + _GEN.pack(g)) for r, g, _ in merges]
        with self._env.begin(write=True) as txn:
            for (record, from_gen, into_gen), keys in zip(merges, journaled, strict=True):
                prefix = record.key + _GEN.pack(from_gen)
                blocks = {_BLOCK.unpack_from(k, 12)[0]
                          for k in [*keys, *(k for k, _ in _prefixed(txn, self._changed, prefix))]}
                _delete_prefix(txn, self._changed, prefix)
                _delete_prefix(txn, self._cow, prefix)
                for n in blocks:
                    txn.put(_gen_key(record.key, into_gen, n), b"", db=self._changed)
            txn.put(task.id.encode(), task.encode(), db=self._tasks)
        for record, from_gen, _ in merges:  # what a cut leaves here, a start drops (leftovers)
            self.journal.delete_prefix(record.key + _GEN.pack(from_gen), "changed", "cow")

    def rollback(self, record: DiskRecord, unpresent: Iterable[int], drop_gens: Iterable[int],
                 clear_present: bool, flush: Callable[[], None] = lambda: None) -> None:
        """Forget overlay blocks (all of them with ``clear_present``) and generations, and store
        the new record, in one durable transaction (the caller holds the write lock).

        The disk's journal is folded before, in a commit of its own (``sync``, after ``flush``):
        a kill -9 between a commit and the deletion of what it folded leaves those entries in
        the journal, and the next start folds them again. That is harmless after ``sync``, but
        folded again after this commit they would mark present once more the blocks it resets:
        the disk read their old bytes while its changed set said nothing had changed since the
        snapshot, so its next snapshot did not hold them."""
        key = record.key
        self.sync(record, flush)
        with self._env.begin(write=True) as txn:
            if clear_present:
                _delete_prefix(txn, self._present, key)
            else:
                for n in unpresent:
                    txn.delete(_present_key(key, n), db=self._present)
            for gen in drop_gens:
                _delete_prefix(txn, self._changed, key + _GEN.pack(gen))
                _delete_prefix(txn, self._cow, key + _GEN.pack(gen))
            txn.put(record.name.encode(), record.encode(), db=self._disks)


class Journal:
    """The marks and copy-on-write entries of writes not fsync'd yet: the ``present``,
    ``changed`` and ``cow`` databases of ``DiskState`` (same keys and values), in an
    environment that is never synced. Read only in the boot that wrote it."""

    NAMES = ("present", "changed", "cow")

    def __init__(self, path: Path) -> None:
        try:
            self._env = open_env(path, map_size=MAP_SIZE, max_dbs=4, sync=False,
                                 metasync=False, readahead=False)
        except (OSError, lmdb.Error) as e:
            raise SnapfsError(f"disk state journal {path} cannot be opened: {e}") from None
        self._dbs = {name: self._env.open_db(name.encode()) for name in self.NAMES}

    def close(self) -> None:
        self._env.close()

    def put(self, entries: list[tuple[str, bytes]] | list[tuple[str, bytes, bytes]]) -> None:
        if not entries:
            return
        with self._env.begin(write=True) as txn:
            for entry in entries:
                txn.put(entry[1], entry[2] if len(entry) == 3 else b"", db=self._dbs[entry[0]])

    def entries(self, prefix: bytes) -> dict[str, list[tuple[bytes, bytes]]]:
        """Every entry whose key starts with ``prefix``, by database."""
        with self._env.begin() as txn:
            return {name: list(_prefixed(txn, db, prefix)) for name, db in self._dbs.items()}

    def keys(self, name: str, prefix: bytes) -> list[bytes]:
        return [k for k, _ in self.items(name, prefix)]

    def items(self, name: str, prefix: bytes) -> list[tuple[bytes, bytes]]:
        with self._env.begin() as txn:
            return list(_prefixed(txn, self._dbs[name], prefix))

    def delete(self, taken: dict[str, list[tuple[bytes, bytes]]]) -> None:
        """Delete entries folded into the durable environment. One written again meanwhile
        (the same key: the same block of the same generation) is durable already."""
        if not any(taken.values()):
            return
        with self._env.begin(write=True) as txn:
            for name, entries in taken.items():
                for k, _ in entries:
                    txn.delete(k, db=self._dbs[name])

    def drop_unless(self, disks: set[bytes], gens: set[bytes]) -> int:
        """``DiskState.drop_leftovers`` for the journal."""
        with self._env.begin(write=True) as txn:
            return _drop_unknown(txn, self._dbs, disks, gens)

    def delete_prefix(self, prefix: bytes, *names: str) -> None:
        """Delete the entries of ``names`` (all of them if none) whose keys start with
        ``prefix`` (a generation's prefix is for ``changed`` and ``cow`` only)."""
        with self._env.begin(write=True) as txn:
            for name in names or self.NAMES:
                _delete_prefix(txn, self._dbs[name], prefix)


def _keys(env: lmdb.Environment, db: Any, prefix: bytes) -> list[bytes]:
    with env.begin(db=db) as txn:
        return [k for k, _ in _prefixed(txn, db, prefix)]


def _prefixed(txn: lmdb.Transaction, db: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of the entries of ``db`` whose key starts with ``prefix``, in key order."""
    cursor = txn.cursor(db=db)
    if cursor.set_range(prefix):
        # keys and values are bytes: the environment is not opened with buffers=True
        for k, v in cast(Iterator[tuple[bytes, bytes]], cursor.iternext()):
            if not k.startswith(prefix):
                break
            yield k, v


def _delete_prefix(txn: lmdb.Transaction, db: Any, prefix: bytes) -> int:
    """Delete the entries of ``db`` whose keys start with ``prefix``; how many."""
    cursor = txn.cursor(db=db)
    deleted = 0
    if not cursor.set_range(prefix):
        return 0
    while bytes(cursor.key()).startswith(prefix):
        if not cursor.delete():
            break
        deleted += 1
    return deleted


def _drop_unless(txn: lmdb.Transaction, db: Any, width: int, keep: Callable[[bytes], bool]) -> int:
    """Delete the entries of ``db`` whose key's first ``width`` bytes ``keep`` refuses: one seek
    per prefix kept (a disk's changed sets may hold millions of entries), not a walk of them
    all. How many were deleted."""
    cursor = txn.cursor(db=db)
    dropped = 0
    found = cursor.first()
    while found:
        prefix = bytes(cursor.key())[:width]
        if keep(prefix):
            after = _successor(prefix)
            found = after is not None and cursor.set_range(after)
        else:
            dropped += _delete_prefix(txn, db, prefix)
            found = cursor.set_range(prefix)  # the first key after the deleted ones
    return dropped


def _drop_unknown(txn: lmdb.Transaction, dbs: dict[str, Any], disks: set[bytes],
                  gens: set[bytes]) -> int:
    """``DiskState.drop_leftovers`` in the databases ``dbs`` (the state's or the journal's)."""
    return (_drop_unless(txn, dbs["present"], 8, disks.__contains__)
            + _drop_unless(txn, dbs["changed"], 8, disks.__contains__)
            + _drop_unless(txn, dbs["cow"], 12, gens.__contains__))


def _successor(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with ``prefix`` (None: there is none)."""
    value = int.from_bytes(prefix, "big") + 1
    if value >> (8 * len(prefix)):
        return None
    return value.to_bytes(len(prefix), "big")
