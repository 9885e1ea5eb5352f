"""Checking that snapshots can be restored: every page and block present and intact.

Each referenced blob is fetched (neighbours in one ranged GET), decoded, checked against its
xxh3 checksum and its keyed ID. Problems are collected, not raised, so one run reports all of
them, each naming the snapshot and the disk offset it affects.
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
from snapfs.repo.readplan import Run, plan_runs
from snapfs.repo.repository import Repository


@dataclass
class VerifyReport:
    snapshots: int = 0
    blobs_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "snapshots": self.snapshots, "blobs_checked": self.blobs_checked,
                "bytes_checked": self.bytes_checked, "problems": self.problems,
                "seconds": self.seconds}


async def verify_snapshots(
    repo: Repository, roots: list[SnapshotRoot], progress: Progress = NO_PROGRESS
) -> VerifyReport:
    started = time.monotonic()
    report = VerifyReport(snapshots=len(roots))
    limiter = trio.CapacityLimiter(repo.store.concurrency)
    index = await trio.to_thread.run_sync(repo.load_index, limiter=limiter)

    # blob ID -> the first place that needs it, for messages
    users: dict[bytes, str] = {}
    for root in roots:
        label = f"snapshot {root.name} ({root.id})"
        pages = {}
        for page_hex in root.pages:
            pid = bytes.fromhex(page_hex)
            if pid != ZERO_ID:
                pages[pid] = page_hex
        users.update({pid: f"{label}: manifest page {h[:16]}" for pid, h in pages.items()})
        per = root.entries_per_page
        for p, (page_hex, count) in enumerate(zip(root.pages, repo.page_lengths(root), strict=True)):
            try:
                ids = await trio.to_thread.run_sync(
                    repo.read_page, index, bytes.fromhex(page_hex), count, limiter=limiter
                )
            except IntegrityError as e:
                report.problems.append(f"{label}: manifest page {page_hex[:16]}: {e}")
                continue
            for i, bid in enumerate(ids):
                if bid != ZERO_ID and bid not in users:
                    offset = (p * per + i) * root.block_size
                    users[bid] = f"{label}: block at offset {offset}"

    present = []
    for bid, who in users.items():
        if bid in index:
            present.append(bid)
        else:
            report.problems.append(f"{who}: missing (blob {bid.hex()[:16]} is in no pack)")
    runs = plan_runs(present, index)
    progress.start("verify", sum(loc.length for _, run in runs for _, loc in run))

    def check(job: tuple[str, Run]) -> tuple[int, int, list[str]]:
        pack, run = job
        problems = []
        try:
            data = repo.fetch_run(pack, run)
        except IntegrityError as e:
            return 0, 0, [f"{users[bid]}: {e}" for bid, _ in run]
        nbytes = 0
        for (bid, _), plain in zip(run, repo.decode_pieces(data, run[0][1].offset, run, copy=False),
                                   strict=True):
            if isinstance(plain, IntegrityError):
                problems.append(f"{users[bid]}: {plain}")
            else:
                nbytes += len(plain)
        return len(run), nbytes, problems

    def done(job: tuple[str, Run], result: tuple[int, int, list[str]]) -> None:
        count, nbytes, problems = result
        report.blobs_checked += count
        report.bytes_checked += nbytes
        report.problems.extend(problems)
        progress.advance(sum(loc.length for _, loc in job[1]))

    with single_error():
        await map_in_threads(check, runs, limiter, done)
    report.seconds = round(time.monotonic() - started, 3)
    return report
