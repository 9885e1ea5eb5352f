"""Checking that snapshots can be restored: every page and block present and intact.

Each referenced blob is fetched (neighbours in one ranged GET), decoded, checked against its
xxh3 checksum and its keyed ID; and every block's length is checked against its place (the
disk's block size, the rest of the disk for its last block), from the index, so that a short
block in the middle of a map (the image would read short from there) is found although the blob
itself is intact. Problems are collected, not raised, so one run reports all of them, each
naming the snapshot and the disk offset it affects. A snapshot root that cannot be read is a
problem too, named by its object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import trio

from snapfs.errors import IntegrityError
from snapfs.format.block import ZERO_ID
from snapfs.format.manifest import SnapshotRoot
from snapfs.progress import NO_PROGRESS, Progress
from snapfs.repo.parallel import map_in_threads, single_error
from snapfs.repo.readplan import Run, RunReader, plan_runs
from snapfs.repo.repository import BlobIndex, Repository, UnreadableRoot, delete_hint


@dataclass
class VerifyReport:
    snapshots: int = 0
    blobs_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    unreadable_roots: list[str] = field(default_factory=list)  # their keys (snapshots/ID)
    deleted: list[str] = field(default_factory=list)  # ids of snapshots deleted meanwhile
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "snapshots": self.snapshots, "blobs_checked": self.blobs_checked,
                "bytes_checked": self.bytes_checked, "problems": self.problems,
                "unreadable_roots": self.unreadable_roots, "deleted_meanwhile": self.deleted,
                "seconds": self.seconds}


async def verify_snapshots(
    repo: Repository, roots: list[SnapshotRoot], progress: Progress = NO_PROGRESS,
    unreadable: list[UnreadableRoot] | None = None,
) -> VerifyReport:
    """Check ``roots``; ``unreadable`` roots (which cannot be checked) are problems at once."""
    started = time.monotonic()
    report = VerifyReport(snapshots=len(roots))
    for u in unreadable or []:
        report.unreadable_roots.append(u.key)
        report.problems.append(f"{u.key} {u.problem}: its snapshot cannot be read; "
                               f"{delete_hint([u])}")
    limiter = trio.CapacityLimiter(repo.store.concurrency)
    index = await trio.to_thread.run_sync(repo.load_index, limiter=limiter)
    reader = RunReader(repo, index)

    # First every blob once (a blob shared by many blocks or snapshots is checked once), with
    # the first place that needs it; then, only if some are bad, every place each bad one
    # serves, read again from the manifests (keeping them all for every blob would cost
    # memory in proportion to the disks' sizes).
    need: set[bytes] = set()
    bad: dict[bytes, str] = {}  # blob ID -> what is wrong with it
    for root in roots:
        need.update(pid for pid in map(bytes.fromhex, root.pages) if pid != ZERO_ID)
        misfits: list[tuple[int, int, int]] = []
        for p, (page_hex, count) in enumerate(zip(root.pages, repo.page_lengths(root), strict=True)):
            try:
                ids = await trio.to_thread.run_sync(
                    reader.read_page, bytes.fromhex(page_hex), count, limiter=limiter
                )
            except IntegrityError as e:
                bad[bytes.fromhex(page_hex)] = str(e)
                continue
            need.update(ids)
            misfits += _misfits(root, p * root.entries_per_page, ids, index)
        if misfits:
            report.problems.append(_misfit_line(root, misfits))
    need.discard(ZERO_ID)

    present = []
    for bid in need:
        if bid in bad:
            continue
        if bid in index:
            present.append(bid)
        else:
            bad[bid] = (f"missing (blob {bid.hex()[:16]} is in no indexed pack; snapfs repair "
                        "index finds it if a pack still holds it)")
    runs = plan_runs(present, index)
    progress.start("verify", sum(loc.length for _, run in runs for _, loc in run))

    def check(job: tuple[str, Run]) -> tuple[int, int, dict[bytes, str]]:
        pack, run = job
        try:
            pieces = reader.read(pack, run, copy=False)
        except IntegrityError as e:
            return 0, 0, {bid: str(e) for bid, _ in run}
        nbytes = 0
        problems = {}
        for bid, plain in pieces:
            if isinstance(plain, IntegrityError):
                problems[bid] = str(plain)
            else:
                nbytes += len(plain)
        return len(run), nbytes, problems

    def done(job: tuple[str, Run], result: tuple[int, int, dict[bytes, str]]) -> None:
        count, nbytes, problems = result
        report.blobs_checked += count
        report.bytes_checked += nbytes
        for bid, problem in problems.items():
            bad.setdefault(bid, problem)
        progress.advance(sum(loc.length for _, loc in job[1]))

    with single_error():
        await map_in_threads(check, runs, limiter, done)
    if bad:
        # Verify takes no lock: a delete or forget elsewhere may have taken a snapshot, and the
        # blobs only it used, while they were read. That is no damage, and such a snapshot is
        # no longer there to verify.
        gone = await trio.to_thread.run_sync(_deleted, repo, roots, limiter=limiter)
        report.deleted = [r.id for r in gone]
        roots = [r for r in roots if r.id not in report.deleted]
        report.snapshots = len(roots)
        report.problems.extend(await _where(repo, reader, roots, bad, limiter))
    report.seconds = round(time.monotonic() - started, 3)
    return report


#: the offsets one problem line lists before it counts the rest
OFFSETS_SHOWN = 8


def _label(root: SnapshotRoot) -> str:
    return f"snapshot {root.name} ({root.id})"


def _misfits(root: SnapshotRoot, first: int, ids: list[bytes], index: BlobIndex,
             ) -> list[tuple[int, int, int]]:
    """(disk offset, length, length its place needs) of each block among ``ids`` (blocks
    ``first``, ``first + 1``, ...) whose plain length does not fit its place in the disk:
    every block is a whole block but the last, which holds the rest of the disk. (A block
    missing from the index is reported as missing.)"""
    bs = root.block_size
    last = root.blocks_total - 1
    tail = root.size - last * bs
    out = []
    for n, bid in enumerate(ids, first):
        if bid == ZERO_ID:
            continue  # a hole is any length
        loc = index.get(bid)
        want = tail if n == last else bs
        if loc is not None and loc.raw_length != want:
            out.append((n * bs, loc.raw_length, want))
    return out


def _misfit_line(root: SnapshotRoot, misfits: list[tuple[int, int, int]]) -> str:
    shown = "; ".join(f"offset {offset} holds {length} bytes, not {want}"
                      for offset, length, want in misfits[:OFFSETS_SHOWN])
    more = f"; and {len(misfits) - OFFSETS_SHOWN} more" if len(misfits) > OFFSETS_SHOWN else ""
    noun = "a block" if len(misfits) == 1 else f"{len(misfits)} blocks"
    return (f"{_label(root)}: {noun} of the wrong length (its image reads wrong from there): "
            f"{shown}{more}")


def _deleted(repo: Repository, roots: list[SnapshotRoot]) -> list[SnapshotRoot]:
    """Those of ``roots`` that are no longer in the repository."""
    return [r for r in roots if not repo.store.exists(f"snapshots/{r.id}")]


async def _where(repo: Repository, reader: RunReader, roots: list[SnapshotRoot],
                 bad: dict[bytes, str], limiter: trio.CapacityLimiter) -> list[str]:
    """One line per bad blob and snapshot that needs it, with every disk offset it serves there
    (the first ``OFFSETS_SHOWN``, then a count) or the manifest page it is."""
    lines = []
    for root in roots:
        label = _label(root)
        offsets: dict[bytes, list[int]] = {}
        per = root.entries_per_page
        for p, (page_hex, count) in enumerate(zip(root.pages, repo.page_lengths(root), strict=True)):
            pid = bytes.fromhex(page_hex)
            if pid in bad:
                lines.append(f"{label}: manifest page {page_hex[:16]}: {bad[pid]}")
                continue
            try:
                ids = await trio.to_thread.run_sync(reader.read_page, pid, count,
                                                    limiter=limiter)
            except IntegrityError:
                continue  # reported by the first pass
            for i, bid in enumerate(ids):
                if bid in bad:
                    offsets.setdefault(bid, []).append((p * per + i) * root.block_size)
        for bid, where in offsets.items():
            shown = ", ".join(str(o) for o in where[:OFFSETS_SHOWN])
            more = f" and {len(where) - OFFSETS_SHOWN} more" if len(where) > OFFSETS_SHOWN else ""
            noun = "offset" if len(where) == 1 else "offsets"
            lines.append(f"{label}: block at {noun} {shown}{more}: {bad[bid]}")
    return lines
