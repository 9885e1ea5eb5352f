"""Rebuilding the repository index from the packs (``snapfs repair index``), and taking
damaged blobs out of the packs (``snapfs repair packs``).

The index (``index/``) is a map, not data: every pack ends with a trailer naming the blobs it
holds and where (``format.pack``), so an index object that was deleted, or damaged so that it
cannot be decoded, loses no block. Until it is repaired, though, the blocks it named cannot be
found (reads fail with EIO, ``verify`` reports them missing, garbage collection refuses), and a
damaged index object stops everything that loads the index.

``repair_index``, under the exclusive lock (no snapshot is being stored meanwhile):
1. reads every index object it can; one that cannot be decoded is replaced, never trusted;
2. lists the packs and reads the trailer of each pack that no readable index object names
   (every pack with ``read_all_packs``): one ranged GET of its last ``TAIL_GUESS`` bytes, a
   second one if its trailer is longer;
3. if anything was missing, damaged, or names packs that are gone, or (``read_all_packs``) a
   readable index object says of a pack other than its trailer does: writes one index object
   of every stored pack it knows, superseding all the others, then deletes them (the order of
   ``gc``: a crash in between leaves both, which readers resolve through ``supersedes``).
   Otherwise it writes nothing, with ``read_all_packs`` too;
4. reports what each snapshot still lacks: blobs that no stored pack holds (lost for good,
   unless the pack is put back), found by reading its manifest pages through the new index.

A trailer is trusted as far as its structure goes; every blob it names is still checked
against its ID whenever it is read, as every blob always is. A pack whose trailer cannot be
read is reported; what a readable index object says of it is kept, and a pack no readable
index object names stays out of the index (its blobs missing; ``prune`` deletes it once no
snapshot needs what it would hold).

Progress phases: "reading index" (index objects), "reading pack trailers" (packs), "deleting
index" (replaced index objects), "reading manifests" (manifest pages).

``repair_packs``, under the exclusive lock, is for blobs that are damaged where they are stored
(bit rot, a bad disk: ``verify`` reports them). While the index names a damaged blob, a new
snapshot of a source that still holds its bytes references the damaged copy (the index says
the repository has it), so nothing mends it. ``repair_packs`` reads every indexed pack whole
and checks each blob against its checksum and its ID; each pack that holds a damaged one is
rewritten with its intact blobs (verified again on the way), and the damaged copies go with the
old pack, from the index and from the trailers alike (so that ``repair index`` cannot bring
them back). A blob that then no stored pack holds is missing: reads of it fail, as they did,
and the next ``snapshot create`` of a source that holds those bytes stores them again, which
mends every snapshot that uses them (blobs are found by content). The crash rule is
``prune``'s: new packs, the new index, then the old index objects and packs. Progress: "reading
index", "checking packs" (packs), "rewriting packs" (packs), "deleting index", "deleting
packs", "reading manifests".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from snapfs.errors import FormatError, IntegrityError, ObjectNotFound
from snapfs.format.block import ZERO_ID
from snapfs.format.index import IndexFile
from snapfs.format.pack import PackEntry, read_tail, trailer_size
from snapfs.plural import counted
from snapfs.progress import NO_PROGRESS, Progress
from snapfs.repo.gc import copy_blobs, replace_index
from snapfs.repo.lock import exclusively
from snapfs.repo.parallel import map_in_threads
from snapfs.repo.repository import BlobIndex, Repository, pack_key

log = logging.getLogger(__name__)

#: bytes read from a pack's end to find its trailer at once (about 1450 entries; a 16 MiB pack
#: of 16 KiB blocks has about 1000-3000: a second GET for the rest when needed)
TAIL_GUESS = 64 * 1024


@dataclass
class RepairReport:
    index_objects: int = 0  # read (readable and not)
    damaged_index: list[str] = field(default_factory=list)  # names of those that were not
    packs: int = 0  # stored
    packs_read: int = 0  # whose trailer was read
    packs_added: int = 0  # stored packs no readable index object named, now indexed
    packs_unreadable: dict[str, str] = field(default_factory=dict)  # pack -> why
    #: those of them a readable index object names: what it says of them is kept
    packs_unreadable_indexed: list[str] = field(default_factory=list)
    packs_gone: int = 0  # named by the index, not stored
    #: indexed packs whose trailer (read with ``read_all_packs``) lists other entries
    packs_corrected: int = 0
    rewritten: bool = False  # a new index object replaced the others
    blobs_indexed: int = 0
    #: snapshot name -> blobs it uses that no stored pack holds
    incomplete: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"index_objects": self.index_objects, "damaged_index": self.damaged_index,
                "packs": self.packs, "packs_read": self.packs_read,
                "packs_added": self.packs_added, "packs_unreadable": self.packs_unreadable,
                "packs_unreadable_indexed": self.packs_unreadable_indexed,
                "packs_gone": self.packs_gone, "packs_corrected": self.packs_corrected,
                "rewritten": self.rewritten,
                "blobs_indexed": self.blobs_indexed, "incomplete": self.incomplete,
                "seconds": self.seconds}


async def repair_index(repo: Repository, read_all_packs: bool = False,
                       progress: Progress = NO_PROGRESS) -> RepairReport:
    started = time.monotonic()
    limiter = trio.CapacityLimiter(repo.store.concurrency)
    async with exclusively(repo.store, "repair index", limiter):
        report, index = await _rebuild(repo, read_all_packs, limiter, progress)
    # outside the lock: reading manifests changes nothing
    report.incomplete = await _incomplete(repo, index, limiter, progress)
    report.seconds = round(time.monotonic() - started, 3)
    return report


async def _rebuild(repo: Repository, read_all_packs: bool, limiter: trio.CapacityLimiter,
                   progress: Progress) -> tuple[RepairReport, BlobIndex]:
    report = RepairReport()
    names = sorted(await trio.to_thread.run_sync(repo.list_index_names, limiter=limiter))
    report.index_objects = len(names)
    files: dict[str, IndexFile] = {}

    def fetch(name: str) -> IndexFile | str | None:
        try:
            return IndexFile.decode(repo.store.get(f"index/{name}"))
        except ObjectNotFound:
            return None  # deleted since the listing: not ours to replace
        except (IntegrityError, FormatError) as e:  # not the store's failures: those raise
            return e.message

    def fetched(name: str, result: IndexFile | str | None) -> None:
        progress.advance(1)
        if isinstance(result, IndexFile):
            files[name] = result
        elif isinstance(result, str):
            report.damaged_index.append(name)

    progress.start("reading index", len(names), "object")
    await map_in_threads(fetch, names, limiter, fetched)
    report.damaged_index.sort()

    stored = dict(await trio.to_thread.run_sync(lambda: list(repo.store.list("packs/")),
                                                limiter=limiter))
    sizes = {key.rpartition("/")[2]: size for key, size in stored.items()}
    report.packs = len(sizes)
    # what the readable index objects say, as readers take it (superseded objects left out)
    known = Repository.index_from_files(files).packs
    report.packs_gone = sum(1 for pack in known if pack not in sizes)
    packs = {pack: entries for pack, entries in known.items() if pack in sizes}
    to_read = sorted(sizes if read_all_packs else (p for p in sizes if p not in packs))

    def trailer(pack: str) -> list[PackEntry] | str:
        size = sizes[pack]
        try:
            tail = repo.store.get_range(pack_key(pack), max(0, size - TAIL_GUESS),
                                        min(size, TAIL_GUESS))
            need = trailer_size(tail, size)
            if need > len(tail):
                tail = repo.store.get_range(pack_key(pack), size - need, need)
            return read_tail(tail, size)
        except ObjectNotFound:
            return "deleted while it was read"
        except (IntegrityError, FormatError) as e:
            return e.message

    def read(pack: str, result: list[PackEntry] | str) -> None:
        progress.advance(1)
        report.packs_read += 1
        if isinstance(result, str):  # what a readable index object says of it stays
            report.packs_unreadable[pack] = result
            if pack in packs:
                report.packs_unreadable_indexed.append(pack)
        else:
            if pack not in packs:
                report.packs_added += 1
            elif sorted(packs[pack]) != sorted(result):
                report.packs_corrected += 1
            packs[pack] = result

    progress.start("reading pack trailers", len(to_read), "pack")
    await map_in_threads(trailer, to_read, limiter, read)

    index = BlobIndex()
    for pack, entries in packs.items():
        index.add_pack(pack, entries)
    report.blobs_indexed = len(index)
    # a pack whose trailer agrees with the index needs no new index object: rewriting one
    # anyway made every --read-all-packs on a healthy repository replace the whole index
    if (report.damaged_index or report.packs_gone or report.packs_added
            or report.packs_corrected):
        new = IndexFile(packs=packs, supersedes=[*files, *report.damaged_index])
        await trio.to_thread.run_sync(repo.write_index, new, limiter=limiter)
        old = [*files, *report.damaged_index]
        progress.start("deleting index", len(old), "object")
        await map_in_threads(lambda name: repo.store.delete(f"index/{name}"), old, limiter,
                             lambda _n, _r: progress.advance(1))
        report.rewritten = True
    return report, index


async def _incomplete(repo: Repository, index: BlobIndex, limiter: trio.CapacityLimiter,
                      progress: Progress) -> dict[str, int]:
    """Snapshot name -> how many of the blobs it uses (pages and blocks) ``index`` lacks."""
    listing = await trio.to_thread.run_sync(repo.list_snapshots, limiter=limiter)
    progress.start("reading manifests", sum(len(r.pages) for r in listing.roots), "page")
    out: dict[str, int] = {}
    for root in listing.roots:
        missing: set[bytes] = set()
        for page_hex, count in zip(root.pages, repo.page_lengths(root), strict=True):
            progress.advance(1)
            page_id = bytes.fromhex(page_hex)
            if page_id == ZERO_ID:
                continue
            if page_id not in index:
                missing.add(page_id)
                continue
            try:
                ids = await trio.to_thread.run_sync(repo.read_page, index, page_id, count,
                                                    limiter=limiter)
            except IntegrityError:
                missing.add(page_id)
                continue
            missing.update(i for i in ids if i != ZERO_ID and i not in index)
        if missing:
            out[root.name] = len(missing)
    return out


@dataclass
class PackRepairReport:
    packs: int = 0  # indexed packs read
    blobs_checked: int = 0
    bytes_checked: int = 0
    #: pack -> the blobs in it that failed their check, "ID: why"
    damaged: dict[str, list[str]] = field(default_factory=dict)
    #: indexed packs that could not be read at all (gone): ``repair index`` drops them
    packs_unreadable: dict[str, str] = field(default_factory=dict)
    packs_rewritten: int = 0
    blobs_kept: int = 0  # intact blobs copied out of the damaged packs
    #: snapshot name -> blobs it uses that no stored pack holds, after the repair
    incomplete: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"packs": self.packs, "blobs_checked": self.blobs_checked,
                "bytes_checked": self.bytes_checked, "damaged": self.damaged,
                "packs_unreadable": self.packs_unreadable,
                "packs_rewritten": self.packs_rewritten, "blobs_kept": self.blobs_kept,
                "incomplete": self.incomplete, "seconds": self.seconds}


async def repair_packs(repo: Repository, progress: Progress = NO_PROGRESS) -> PackRepairReport:
    started = time.monotonic()
    limiter = trio.CapacityLimiter(repo.store.concurrency)
    async with exclusively(repo.store, "repair packs", limiter):
        report, index = await _rewrite_damaged(repo, limiter, progress)
    # outside the lock: reading manifests changes nothing
    report.incomplete = await _incomplete(repo, index, limiter, progress)
    report.seconds = round(time.monotonic() - started, 3)
    return report


async def _rewrite_damaged(repo: Repository, limiter: trio.CapacityLimiter,
                           progress: Progress) -> tuple[PackRepairReport, BlobIndex]:
    report = PackRepairReport()
    index = await trio.to_thread.run_sync(repo.load_index, None, progress, limiter=limiter)
    packs = dict(index.packs)
    report.packs = len(packs)

    def check(pack: str) -> tuple[list[PackEntry], int] | str:
        """The entries of ``pack`` that fail their check, and the bytes read; or why the
        pack cannot be read. Nothing of its data is kept: a pack is read again to be
        rewritten, so that only one pack a thread is held in memory."""
        try:
            data = memoryview(repo.store.get(pack_key(pack)))
        except ObjectNotFound:
            return "not in the store"
        bad = []
        for e in packs[pack]:
            try:
                repo.decode_verified(e.blob_id, data[e.offset : e.offset + e.length], "blob")
            except IntegrityError:
                bad.append(e)
        return bad, len(data)

    damaged: dict[str, list[PackEntry]] = {}

    def checked(pack: str, result: tuple[list[PackEntry], int] | str) -> None:
        progress.advance(1)
        if isinstance(result, str):
            report.packs_unreadable[pack] = result
            return
        bad, nbytes = result
        report.blobs_checked += len(packs[pack])
        report.bytes_checked += nbytes
        if bad:
            damaged[pack] = bad

    progress.start("checking packs", len(packs), "pack")
    await map_in_threads(check, sorted(packs), limiter, checked)
    if not damaged:
        return report, index
    for pack, bad in sorted(damaged.items()):
        report.damaged[pack] = [f"{e.blob_id.hex()}: does not match its checksum or ID"
                                for e in bad]
        log.warning("pack %s: %s damaged; the pack is rewritten without %s", pack[:12],
                    counted(len(bad), "blob"), "it" if len(bad) == 1 else "them")

    intact = [(pack, [e for e in packs[pack] if e not in damaged[pack]])
              for pack in sorted(damaged)]
    progress.start("rewriting packs", len(intact), "pack")
    # one at a time: a damaged pack's intact blobs are most of it
    uploader = await copy_blobs(repo, intact, limiter, progress, at_once=1)
    report.packs_rewritten = len(damaged)
    report.blobs_kept = sum(len(entries) for _pack, entries in intact)
    kept = {pack: entries for pack, entries in packs.items() if pack not in damaged}
    new = IndexFile(packs={**kept, **uploader.index_file.packs}, supersedes=index.index_names)
    await replace_index(repo, new, sorted(damaged), limiter, progress)
    repaired = BlobIndex()
    for pack, entries in new.packs.items():
        repaired.add_pack(pack, entries)
    return report, repaired


def pack_summary(report: PackRepairReport) -> list[str]:
    """What ``snapfs repair packs`` says, a line each."""
    lines = [f"pack {pack[:12]}: cannot be read ({why}); repair index drops it from the index"
             for pack, why in sorted(report.packs_unreadable.items())]
    for pack, blobs in sorted(report.damaged.items()):
        lines += [f"pack {pack[:12]}: blob {line}" for line in blobs]
    for name, count in sorted(report.incomplete.items()):
        lines.append(f"snapshot {name} uses {counted(count, 'blob')} that no stored pack "
                     "holds: a new snapshot of a source that still holds those blocks stores "
                     "them again, and mends it")
    checked = (f"checked {counted(report.packs, 'pack')}, {counted(report.blobs_checked, 'blob')}")
    if not report.damaged:
        lines.append(f"{checked}: no damaged blob; nothing to repair")
    else:
        damaged = sum(len(b) for b in report.damaged.values())
        lines.append(f"{checked}: rewrote {counted(report.packs_rewritten, 'pack')} without "
                     f"{counted(damaged, 'damaged blob')} (kept "
                     f"{counted(report.blobs_kept, 'intact blob')})")
    return lines


def summary(report: RepairReport) -> list[str]:
    """What ``snapfs repair index`` says, a line each."""
    # a pack a readable index object names keeps its entries (--read-all-packs read it too):
    # saying its blobs were not indexed sent the user looking for blobs that are
    lines = [f"pack {pack[:12]}: its trailer cannot be read ({why}); "
             + ("the index keeps what it says of its blobs"
                if pack in report.packs_unreadable_indexed else "its blobs are not indexed")
             for pack, why in sorted(report.packs_unreadable.items())]
    for name, count in sorted(report.incomplete.items()):
        lines.append(f"snapshot {name} uses {counted(count, 'blob')} that no stored pack "
                     "holds: those blocks cannot be read (verify names them)")
    if not report.rewritten:
        lines.append(f"the index is complete: {counted(report.packs, 'pack')}, "
                     f"{counted(report.blobs_indexed, 'blob')}; nothing to repair")
        return lines
    what = []
    if report.damaged_index:
        what.append(f"replaced {counted(len(report.damaged_index), 'damaged index object')}")
    if report.packs_added:
        what.append(f"added {counted(report.packs_added, 'pack')} no index named")
    if report.packs_gone:
        what.append(f"dropped {counted(report.packs_gone, 'pack')} no longer stored")
    if report.packs_corrected:
        what.append(f"corrected what it said of {counted(report.packs_corrected, 'pack')}")
    lines.append(f"rebuilt the index: {counted(report.packs, 'pack')}, "
                 f"{counted(report.blobs_indexed, 'blob')}"
                 + (f" ({'; '.join(what)})" if what else ""))
    return lines
