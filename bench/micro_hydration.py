#!/usr/bin/env python3
"""Micro-benchmarks of the lazy read path, without FUSE: cache writes, cold and warm sequential
reads through ``ImageView.read``, the background sweep, and cold 4 KiB random reads.

    .venv/bin/python bench/micro_hydration.py [--mib 64] [--runs 3] [--only put,cold,warm,sweep,random]

The image is built once (``--work``, default ``/tmp/snapfs-micro``) from files under ``/usr/lib``
(real, compressible data, like the mount benchmark's image), snapshotted into a local
repository with 16 KiB blocks. Every figure is the median of ``--runs`` runs, each with a fresh
cache directory (and a fresh hydrator, so nothing is in memory):

- ``put``: ``BlockCache.put`` of 16 KiB blocks one by one, and ``put_many`` in runs of 64 (when
  the cache has it), in MiB/s of plain bytes.
- ``cold``: the whole image read in 128 KiB reads (``--streams`` concurrent readers over
  consecutive slices, like the kernel's async read-ahead), every block fetched from the local
  store behind ``--latency`` (default 3 ms, about a SeaweedFS GET on loopback); MiB/s of image
  bytes and CPU seconds of this process.
- ``warm``: the same reads again with a fresh hydrator over the filled cache.
- ``sweep``: background hydration of the whole image from an empty cache: MiB/s of stored
  bytes of the image's unique blocks until nothing is missing, and the GETs issued.
- ``random``: ``--random-reads`` cold 4 KiB reads at distinct blocks, one at a time, after the
  sweep's scan of the block map (as in the mount benchmark): p50 minus the simulated latency.

Writes JSON to ``--out`` if given. Reads are checked against the image (xxh3 of each read).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snapfs.cache import BlockCache
from snapfs.hydration.scheduler import HydrationConfig, Hydrator
from snapfs.image.catalog import SnapshotCatalog
from snapfs.image.sweep import Sweeper
from snapfs.image.view import ImageView
from snapfs.repo.create import CreateOptions, create_snapshot
from snapfs.repo.repository import Repository
from snapfs.store.local import LocalStore
from snapfs.store.simulated import SimulatedStore

BS = 16384
READ = 128 << 10


def build(work: Path, mib: int) -> Path:
    image = work / f"image-{mib}m.img"
    repo_dir = work / f"repo-{mib}m"
    if image.exists() and (repo_dir / "config").exists():
        return repo_dir
    shutil.rmtree(repo_dir, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    want = mib << 20
    parts: list[bytes] = []
    have = 0
    for root, dirs, files in os.walk("/usr/lib"):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read(want - have)
            except OSError:
                continue
            parts.append(data)
            parts.append(bytes(-len(data) % 4096))  # files start on 4 KiB, as in ext4
            have += len(data) + (-len(data) % 4096)
            if have >= want:
                break
        if have >= want:
            break
    image.write_bytes(b"".join(parts)[:want].ljust(want, b"\0"))
    repo = Repository.init(LocalStore(repo_dir), block_size=BS)
    trio.run(create_snapshot, repo, str(image), CreateOptions(name="disk"))
    return repo_dir


def cpu() -> float:
    t = os.times()
    return t.user + t.system


async def with_view(repo: Repository, cache: BlockCache, config: HydrationConfig,
                    body: Callable[[Hydrator, SnapshotCatalog, ImageView], Awaitable[Any]]) -> Any:
    hydrator = Hydrator(repo, repo.load_index(), cache, config)
    catalog = SnapshotCatalog(repo, hydrator)
    await catalog.refresh(force=True)
    view = catalog.images()["disk.img"]
    async with trio.open_nursery() as nursery:
        await nursery.start(hydrator.run)
        result = await body(hydrator, catalog, view)
        nursery.cancel_scope.cancel()
    return result


async def poll(condition: Callable[[], bool]) -> None:
    """Until ``condition`` (state other tasks own) holds."""
    while True:
        if condition():
            return
        await trio.sleep(0.01)


async def read_all(view: ImageView, streams: int, expect: list[bytes]) -> None:
    n = -(-view.size // READ)
    per = -(-n // streams)

    # what the FUSE adapter calls (a buffer, not always a bytes copy), where the view has it
    read = getattr(view, "read_buffer", view.read)

    async def stream(i: int) -> None:
        for k in range(i * per, min(n, (i + 1) * per)):
            await trio.lowlevel.checkpoint()  # as a FUSE request waits for the kernel's next one
            data = await read(k * READ, READ)
            if xxhash.xxh3_128_digest(data) != expect[k]:
                raise SystemExit(f"wrong bytes at {k * READ}")

    async with trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(stream, i)


def bench_put(work: Path, blocks: int = 2048) -> dict[str, float]:
    rng = random.Random(1)
    payload = [rng.randbytes(BS) for _ in range(blocks)]
    ids = [xxhash.xxh3_128_digest(p) + bytes(16) for p in payload]
    out: dict[str, float] = {}
    for mode in ("put", "put_many"):
        d = work / f"cache-{mode}"
        shutil.rmtree(d, ignore_errors=True)
        cache = BlockCache(d, capacity=1 << 34)
        if mode == "put_many" and not hasattr(cache, "put_many"):
            cache.close()
            continue
        t = time.perf_counter()
        if mode == "put":
            for bid, p in zip(ids, payload, strict=True):
                cache.put(bid, p)
        else:
            for i in range(0, blocks, 64):
                cache.put_many(list(zip(ids[i : i + 64], payload[i : i + 64], strict=True)))  # type: ignore[attr-defined]
        took = time.perf_counter() - t
        assert cache.get_many(ids[:10]) == payload[:10]
        cache.close()
        shutil.rmtree(d, ignore_errors=True)
        out[f"{mode}_mib_s"] = blocks * BS / took / 2**20
        out[f"{mode}_us_per_block"] = took / blocks * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.003)
    ap.add_argument("--random-reads", type=int, default=200)
    ap.add_argument("--only", default="put,cold,warm,sweep,random")
    ap.add_argument("--work", default="/tmp/snapfs-micro")
    ap.add_argument("--out")
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = Path(args.work)
    repo_dir = build(work, args.mib)
    image = (work / f"image-{args.mib}m.img").read_bytes()
    expect = [xxhash.xxh3_128_digest(image[i : i + READ]) for i in range(0, len(image), READ)]
    repo = Repository.open(SimulatedStore(LocalStore(repo_dir), latency=args.latency))
    index = repo.load_index()
    stored = 0
    seen: set[bytes] = set()
    runs: dict[str, list[dict[str, float]]] = {}

    def record(name: str, figures: dict[str, float]) -> None:
        runs.setdefault(name, []).append(figures)
        print(name, {k: round(v, 2) for k, v in figures.items()}, flush=True)

    for run in range(args.runs):
        if "put" in only:
            record("put", bench_put(work))
        cache_dir = work / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        if "cold" in only or "warm" in only:
            cache = BlockCache(cache_dir, capacity=1 << 34)

            async def cold(h: Hydrator, c: SnapshotCatalog, v: ImageView) -> dict[str, float]:
                t, c0 = time.perf_counter(), cpu()
                await read_all(v, args.streams, expect)
                took, used = time.perf_counter() - t, cpu() - c0
                return {"mib_s": len(image) / took / 2**20, "cpu_s": used, "wall_s": took,
                        "gets": h.counters.requests}

            figures = trio.run(with_view, repo, cache, HydrationConfig(background=False), cold)
            if "cold" in only:
                record("cold", figures)
            if "warm" in only:
                async def warm(h: Hydrator, c: SnapshotCatalog, v: ImageView) -> dict[str, float]:
                    t, c0 = time.perf_counter(), cpu()
                    await read_all(v, args.streams, expect)
                    took, used = time.perf_counter() - t, cpu() - c0
                    return {"mib_s": len(image) / took / 2**20, "cpu_s": used,
                            "gets": h.counters.requests}

                record("warm", trio.run(with_view, repo, cache, HydrationConfig(background=False), warm))
            cache.close()
            shutil.rmtree(cache_dir, ignore_errors=True)
        if "sweep" in only:
            cache = BlockCache(cache_dir, capacity=1 << 34)
            config = HydrationConfig(background=True)

            async def sweep(h: Hydrator, c: SnapshotCatalog, v: ImageView,
                            config: HydrationConfig = config) -> dict[str, float]:
                nonlocal stored
                t, c0 = time.perf_counter(), cpu()
                c.use(v.root.id)  # opened: the sweep hydrates it
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(Sweeper(c, h, config).run)
                    await poll(lambda: v.data_blocks is not None and not v.pending)
                    nursery.cancel_scope.cancel()
                took, used = time.perf_counter() - t, cpu() - c0
                if not stored:
                    for p in range(len(v.root.pages)):
                        for b in await v.page(p):
                            if b not in seen and b in index and any(b):
                                seen.add(b)
                                stored += index.locate(b).length
                return {"mib_s": stored / took / 2**20, "cpu_s": used, "gets": h.counters.requests,
                        "kib_per_get": h.counters.bytes_fetched / max(1, h.counters.requests) / 1024}

            record("sweep", trio.run(with_view, repo, cache, config, sweep))
            cache.close()
            shutil.rmtree(cache_dir, ignore_errors=True)
        if "random" in only:
            cache = BlockCache(cache_dir, capacity=1 << 34)
            rng = random.Random(run)
            blocks = [n for n in range(len(image) // BS) if any(image[n * BS : n * BS + 4096])]
            picks = rng.sample(blocks, min(args.random_reads, len(blocks)))

            async def rand(h: Hydrator, c: SnapshotCatalog, v: ImageView,
                           picks: list[int] = picks) -> dict[str, float]:
                # the sweep's scan of the block map, as the mount benchmark waits for it
                c.use(v.root.id)  # opened: the sweep scans it
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(Sweeper(c, h, HydrationConfig(background=False)).run)
                    await poll(lambda: v.data_blocks is not None)
                    nursery.cancel_scope.cancel()
                lat = []
                for n in picks:
                    t = time.perf_counter()
                    data = await v.read(n * BS, 4096)
                    lat.append(time.perf_counter() - t)
                    assert data == image[n * BS : n * BS + 4096]
                return {"p50_over_ms": (statistics.median(lat) - args.latency) * 1000}

            record("random", trio.run(with_view, repo, cache, HydrationConfig(background=False), rand))
            cache.close()
            shutil.rmtree(cache_dir, ignore_errors=True)

    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print("medians:")
    for name, figures in medians.items():
        print(f"  {name:7s}", {k: round(v, 2) for k, v in figures.items()})
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs, "medians": medians},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
