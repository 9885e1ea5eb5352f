"""Planning reads of many blobs: grouping them into ranged GETs of neighbouring bytes.

Used by export, verify and repack. A run is a list of (blob ID, Location) in one pack, sorted by
offset, whose span is at most ``max_span`` bytes and whose gaps are at most ``max_gap``: one GET
per run instead of one per blob, without fetching much that nobody asked for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from snapfs.repo.repository import BlobIndex, Location

Run = list[tuple[bytes, Location]]

MAX_GAP = 256 * 1024
MAX_SPAN = 8 << 20


def plan_runs(
    blob_ids: Iterable[bytes], index: BlobIndex, max_gap: int = MAX_GAP, max_span: int = MAX_SPAN
) -> list[tuple[str, Run]]:
    by_pack: dict[str, Run] = defaultdict(list)
    for bid in blob_ids:
        loc = index.locate(bid)
        by_pack[loc.pack].append((bid, loc))
    runs: list[tuple[str, Run]] = []
    for pack, blobs in by_pack.items():
        blobs.sort(key=lambda b: b[1].offset)
        run: Run = []
        for bid, loc in blobs:
            if run:
                start = run[0][1].offset
                prev_end = run[-1][1].offset + run[-1][1].length
                if loc.offset - prev_end > max_gap or loc.offset + loc.length - start > max_span:
                    runs.append((pack, run))
                    run = []
            run.append((bid, loc))
        if run:
            runs.append((pack, run))
    return runs
