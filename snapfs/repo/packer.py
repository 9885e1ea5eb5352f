"""Writing new blobs: grouping them into packs and uploading those packs.

``PackAssembler`` is the pure part: it holds one open pack per blob kind (data blocks and
manifest pages go to different packs, so a mount that fetches pages does not drag block bytes
along) and hands back each pack that reaches the target size, still a ``PackBuilder``.
``PackUploader`` is the trio part: workers that finish each full pack (its bytes and its name,
a copy and a hash of many MiB: in a worker thread, never on the trio thread, which a daemon's
FUSE requests share) and PUT it, respecting a rate limit, and collect what they stored into
the ``IndexFile`` that the caller writes once every pack is stored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from snapfs.format.index import IndexFile
from snapfs.format.pack import KIND_DATA, KIND_PAGE, PackBuilder
from snapfs.repo.repository import Repository, pack_key
from snapfs.throttle import RateLimiter

#: a pack that reached its size (or was flushed): the uploader finishes and stores it
FullPack = PackBuilder

#: the smallest piece ``flush`` splits a pack into. One PUT of 8 MiB took 68 ms on SeaweedFS
#: here, and 2, 4 or 8 pieces of it side by side 52–56 ms; a cloud store's PUTs gain more, as
#: each stream has its own bandwidth. Below 1 MiB a piece is mostly its request.
MIN_PIECE = 1 << 20


class PackAssembler:
    def __init__(self, target_size: int) -> None:
        self.target_size = target_size
        self._open = {KIND_DATA: PackBuilder(), KIND_PAGE: PackBuilder()}
        #: blobs added in this run; with the repository index, what need not be stored again
        self.pending: set[bytes] = set()

    def add(self, blob_id: bytes, kind: int, encoded: bytes | memoryview,
            raw_length: int) -> FullPack | None:
        self.pending.add(blob_id)
        builder = self._open[kind]
        builder.add(blob_id, kind, encoded, raw_length)
        if builder.size >= self.target_size:
            self._open[kind] = PackBuilder()
            return builder
        return None

    def flush(self, kinds: tuple[int, ...] = (KIND_DATA, KIND_PAGE),
              pieces: int = 1) -> list[FullPack]:
        """The open packs of ``kinds`` that hold a blob, to be stored: each as up to ``pieces``
        packs of at least ``MIN_PIECE`` bytes. An upload's last pack is most of a small
        upload, and its pieces go out as PUTs side by side, where the packs before it did."""
        done = []
        for k in kinds:
            pack = self._open[k]
            if len(pack):
                done += pack.split(min(pieces, pack.size // MIN_PIECE))
            self._open[k] = PackBuilder()
        return done


@dataclass
class UploadStats:
    objects: int = 0
    bytes: int = 0
    packs: int = 0


@dataclass
class PackUploader:
    repo: Repository
    limiter: trio.CapacityLimiter
    rate: RateLimiter
    index_file: IndexFile = field(default_factory=IndexFile)
    stats: UploadStats = field(default_factory=UploadStats)
    #: awaited after each PUT with the seconds it took (a disk's uploads yield to its I/O)
    pace: Callable[[float], Awaitable[None]] | None = None

    async def run(self, receive: trio.MemoryReceiveChannel[FullPack]) -> None:
        """Finish and upload packs from ``receive`` until it closes. Start several for
        parallel PUTs."""
        async with receive:
            async for pack in receive:
                await self.rate.take(pack.size)
                started = trio.current_time()
                name, size = await trio.to_thread.run_sync(self._store, pack, limiter=self.limiter)
                if self.pace is not None:
                    await self.pace(trio.current_time() - started)
                self.index_file.packs[name] = pack.entries
                self.stats.objects += 1
                self.stats.packs += 1
                self.stats.bytes += size

    def _store(self, pack: FullPack) -> tuple[str, int]:
        """Worker thread: the pack's bytes and name, then its PUT."""
        name, data, _ = pack.finish()
        self.repo.store.put(pack_key(name), data)
        return name, len(data)

    def count(self, nbytes: int) -> None:
        """Account for a non-pack object (index, root) the caller stored."""
        self.stats.objects += 1
        self.stats.bytes += nbytes
