"""Planning reads of many blobs: grouping them into ranged GETs of neighbouring bytes.

Used by export, verify and repack. A run is a list of (blob ID, Location) in one pack, sorted by
offset, whose span is at most ``max_span`` bytes and whose gaps are at most ``max_gap``: one GET
per run instead of one per blob, without fetching much that nobody asked for.

``RunReader`` reads runs and manifest pages for export and verify, which hold no lock: a garbage
collection (a ``delete``, ``forget`` or ``prune`` elsewhere) may repack a pack after they read
the index and delete it. Its blobs are then read where the index, read again, says they went,
as the mount does (``HydrationScheduler._relocated``); a pack gone whose blobs went nowhere is
missing.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable

from snapfs.errors import IntegrityError, PackMissing
from snapfs.repo.repository import BlobIndex, Location, Repository

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


class RunReader:
    """Reads runs of ``plan_runs`` from worker threads, decoded and verified, following blobs
    that garbage collection moved since ``index`` was read (see the module's docstring)."""

    def __init__(self, repo: Repository, index: BlobIndex) -> None:
        self.repo = repo
        self.index = index
        self._reloading = threading.Lock()
        self._gone: set[str] = set()  # packs found missing

    def read(self, pack: str, run: Run, copy: bool = True
             ) -> list[tuple[bytes, bytes | memoryview | IntegrityError]]:
        """(blob ID, its plain bytes or what is wrong with it) for every blob of ``run``;
        ``PackMissing`` if ``pack`` is gone and the index has them nowhere else."""
        try:
            return self._fetched(pack, run, copy)
        except PackMissing:
            return self._moved(pack, run, copy)

    def _fetched(self, pack: str, run: Run, copy: bool
                 ) -> list[tuple[bytes, bytes | memoryview | IntegrityError]]:
        data = self.repo.fetch_run(pack, run)
        return list(zip((bid for bid, _ in run),
                        self.repo.decode_pieces(data, run[0][1].offset, run, copy=copy),
                        strict=True))

    def _moved(self, pack: str, run: Run, copy: bool
               ) -> list[tuple[bytes, bytes | memoryview | IntegrityError]]:
        index = self._index_without(pack)
        moved = [index.get(bid) for bid, _ in run]
        if any(loc is None or loc.pack == pack for loc in moved):
            raise PackMissing(f"pack {pack[:12]} is missing from {self.repo.store.url}")
        out: list[tuple[bytes, bytes | memoryview | IntegrityError]] = []
        for new_pack, new_run in plan_runs((bid for bid, _ in run), index):
            out.extend(self._fetched(new_pack, new_run, copy))
        return out

    def read_page(self, page_id: bytes, count: int) -> list[bytes]:
        """``Repository.read_page``, following a page that garbage collection moved since the
        index was read, as ``read`` follows blocks: a manifest page is a blob in a pack like
        any other, and a pack repacked for its dead blocks may hold a page still in use."""
        index = self.index
        try:
            return self.repo.read_page(index, page_id, count)
        except PackMissing:
            pack = index.locate(page_id).pack
            moved = self._index_without(pack)
            loc = moved.get(page_id)
            if loc is None or loc.pack == pack:
                raise
            return self.repo.read_page(moved, page_id, count)

    def _index_without(self, pack: str) -> BlobIndex:
        """The index once ``pack`` was found gone: read again, once for a pack that went (not
        once for each of its runs)."""
        with self._reloading:
            if pack not in self._gone:
                self._gone.add(pack)
                if pack in self.index.packs:
                    self.index = self.repo.load_index()
            return self.index
