"""Writing new blobs: grouping them into packs and uploading those packs.

``PackAssembler`` is the pure part: it holds one open pack per blob kind (data blocks and
manifest pages go to different packs, so a mount that fetches pages does not drag block bytes
along) and hands back each pack that reaches the target size. ``PackUploader`` is the trio part:
workers that PUT finished packs, respecting a rate limit, and collect what they stored into the
``IndexFile`` that the caller writes once every pack is stored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from snapfs.format.index import IndexFile
from snapfs.format.pack import KIND_DATA, KIND_PAGE, PackBuilder, PackEntry
from snapfs.repo.repository import Repository, pack_key
from snapfs.throttle import RateLimiter

FinishedPack = tuple[str, bytes, list[PackEntry]]


class PackAssembler:
    def __init__(self, target_size: int) -> None:
        self.target_size = target_size
        self._open = {KIND_DATA: PackBuilder(), KIND_PAGE: PackBuilder()}
        #: blobs added in this run; with the repository index, what need not be stored again
        self.pending: set[bytes] = set()

    def add(self, blob_id: bytes, kind: int, encoded: bytes, raw_length: int) -> FinishedPack | None:
        self.pending.add(blob_id)
        builder = self._open[kind]
        builder.add(blob_id, kind, encoded, raw_length)
        if builder.size >= self.target_size:
            self._open[kind] = PackBuilder()
            return builder.finish()
        return None

    def flush(self) -> list[FinishedPack]:
        done = [b.finish() for b in self._open.values() if len(b)]
        self._open = {KIND_DATA: PackBuilder(), KIND_PAGE: PackBuilder()}
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

    async def run(self, receive: trio.MemoryReceiveChannel[FinishedPack]) -> None:
        """Upload packs from ``receive`` until it closes. Start several for parallel PUTs."""
        async with receive:
            async for name, data, entries in receive:
                await self.rate.take(len(data))
                started = trio.current_time()
                await trio.to_thread.run_sync(
                    self.repo.store.put, pack_key(name), data, limiter=self.limiter
                )
                if self.pace is not None:
                    await self.pace(trio.current_time() - started)
                self.index_file.packs[name] = entries
                self.stats.objects += 1
                self.stats.packs += 1
                self.stats.bytes += len(data)

    def count(self, nbytes: int) -> None:
        """Account for a non-pack object (index, root) the caller stored."""
        self.stats.objects += 1
        self.stats.bytes += nbytes
