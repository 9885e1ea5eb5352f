#!/usr/bin/env python3
"""Benchmark runner for snapshots: snapfs beside ``restic backup`` of the same disk image.

    .venv/bin/python bench/run_snapshot.py [--runs 3] [--stores local,s3] [--size 1G --data 725M]
        [--block-sizes 16K] [--out bench/results/snapshot.json] [--work bench/work/snapshot]

What one run measures, for every store (a local directory, and S3 on a SeaweedFS server on
loopback) and for snapfs at every block size:

1. a full snapshot of a fresh copy of a realistic ext4 image (``tools/make-image``): snapfs
   (``snapshot create --json``), then ``restic backup`` of the same image state;
2. ``tools/change-image`` changes about 1% of the image's file data (seed = run number), once
   per run, shared by every store and both tools;
3. an incremental snapshot of the changed image, snapfs then restic, for every store;
4. ``snapfs export`` of the incremental snapshot, whose sha256 must equal the changed image's
   (a correctness guard: a mismatch aborts the benchmark, keeping the run's files);
5. what each repository holds in storage, and the bytes fetched to read one 4 KiB piece of the
   image: the encoded (compressed) length of the snapfs block containing it.

The page cache is dropped before every timed step. Times are wall times around the process, as
a user sees them (start-up, key derivation and repository open included). The machine may be
shared, so the summary is medians over runs and the JSON keeps every raw figure and the load
average; nothing here asserts on a time.

What it must not do: change the repository format or the tools it measures, or leave a
SeaweedFS server running (it is stopped in ``finally``). It owns ``--work``: the base image
is cached there (keyed by size and data), everything else there is per run and removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import restic_peer as rp  # noqa: E402  (a sibling module, not a package)

SNAPFS = ROOT / ".venv" / "bin" / "snapfs"
MAKE_IMAGE = ROOT / "tools" / "make-image"
CHANGE_IMAGE = ROOT / "tools" / "change-image"

ACCESS_KEY = "snapfsbench"
SECRET_KEY = "snapfsbench-secret-0123456789"
RESTIC_PASSWORD = "snapfs-bench"
SNAPFS_BUCKET = "snapfs-bench"
RESTIC_BUCKET = "restic-bench"
DISK = "bench"
MIB = 1 << 20


class BenchError(RuntimeError):
    """The benchmark cannot go on: a tool failed, or snapfs gave back the wrong bytes."""


@dataclass(frozen=True)
class BenchConfig:
    runs: int
    stores: tuple[str, ...]
    size: int
    data: int
    block_sizes: tuple[int, ...]
    out: Path
    work: Path
    keep: bool
    report: bool = False  # measure nothing: re-summarize the saved result at ``out``


# ---- small helpers -------------------------------------------------------------------------

_T0 = time.monotonic()


def say(message: str) -> None:
    """One progress line on stderr, with the time since start."""
    elapsed = time.monotonic() - _T0
    print(f"[{elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 16K, 1G)")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def size_label(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def compile_snapfs(tree: Path | None = None) -> None:
    """Compile the snapfs package measured (``tree``/snapfs, default the checkout's) to
    bytecode first, as an installed package is: with PYTHONDONTWRITEBYTECODE set (this machine
    sets it) every process would otherwise compile each edited module as it starts."""
    package = (tree if tree is not None else Path(__file__).resolve().parents[1]) / "snapfs"
    run_tool([sys.executable, "-m", "compileall", "-q", str(package)])


def run_tool(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise BenchError naming the command and its output."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str]:
    from snapfs.testing.seaweedfs import find_weed

    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        except OSError as e:
            return f"unavailable ({e})"
        return out.strip().splitlines()[0] if out.strip() else "unknown"

    return {
        "snapfs": first_line([str(SNAPFS), "--version"]),
        "restic": first_line([rp.restic_binary(), "version"]),
        "weed": first_line([find_weed(), "version"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# ---- stores --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    """Where one run's repositories live: a local directory or a SeaweedFS bucket."""

    name: str  # "local" or "s3"
    run_dir: Path
    endpoint_url: str | None = None

    def snapfs_repo(self, run: int, block_size: int) -> str:
        tag = f"run-{run}-{size_label(block_size)}"
        if self.name == "s3":
            return f"s3://{SNAPFS_BUCKET}/{tag}"
        return str(self.run_dir / f"snapfs-{tag}")

    def restic_repo(self, run: int) -> str:
        if self.name == "s3":
            assert self.endpoint_url is not None
            return rp.s3_repo_url(self.endpoint_url, RESTIC_BUCKET, f"run-{run}")
        return str(self.run_dir / f"restic-run-{run}")

    def restic_env(self) -> dict[str, str]:
        cache = self.run_dir / f"restic-cache-{self.name}"
        if self.name == "s3":
            return rp.restic_env(RESTIC_PASSWORD, cache, ACCESS_KEY, SECRET_KEY)
        return rp.restic_env(RESTIC_PASSWORD, cache)

    def snapfs_args(self, repo: str) -> list[str]:
        args = [str(SNAPFS), "-r", repo]
        if self.endpoint_url is not None:
            args += ["--endpoint-url", self.endpoint_url]
        return args

    def usage(self, snapfs_repo: str) -> tuple[int, int]:
        """(objects, bytes) a snapfs repository holds in storage, counted there."""
        if snapfs_repo.startswith("s3://"):
            assert self.endpoint_url is not None
            bucket, _, prefix = snapfs_repo[len("s3://") :].partition("/")
            return rp.repo_usage(
                rp.s3_repo_url(self.endpoint_url, bucket, prefix), self.restic_env()
            )
        return rp.repo_usage(snapfs_repo, {})

    def remove(self, repo: str) -> None:
        """Delete a repository (either tool's) and everything in it."""
        if self.name == "local":
            shutil.rmtree(repo, ignore_errors=True)
            return
        assert self.endpoint_url is not None
        if repo.startswith("s3://"):
            bucket, _, prefix = repo[len("s3://") :].partition("/")
        else:
            bucket, _, prefix = repo.split("/", 3)[3].partition("/")
        delete_s3_prefix(self.endpoint_url, bucket, prefix)


def s3_client(endpoint_url: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def delete_s3_prefix(endpoint_url: str, bucket: str, prefix: str) -> None:
    client = s3_client(endpoint_url)
    try:
        keys: list[dict[str, str]] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix.rstrip("/") + "/"
        ):
            keys += [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
    except Exception as e:  # cleanup only: the figures are already taken
        say(f"warning: could not delete s3://{bucket}/{prefix}: {e}")
    finally:
        client.close()


# ---- the measured steps --------------------------------------------------------------------


def timed(
    cmd: list[str], env: dict[str, str] | None
) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run after dropping the page cache; (process, wall seconds, CPU seconds of the child)."""
    if not rp.drop_caches():
        raise BenchError("cannot drop the page cache (needs root)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = run_tool(cmd, env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc, wall, cpu


def snapfs_env(store: Store) -> dict[str, str]:
    env = dict(os.environ)
    if store.name == "s3":
        env.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=SECRET_KEY,
            AWS_DEFAULT_REGION="us-east-1",
        )
    return env


def snapfs_init(store: Store, repo: str, block_size: int) -> None:
    cmd = [*store.snapfs_args(repo), "init", "--block-size", size_label(block_size), "--json"]
    doc = json.loads(run_tool(cmd, snapfs_env(store)).stdout)
    if doc.get("block_size") != block_size:
        raise BenchError(f"snapfs init made block size {doc.get('block_size')}, not {block_size}")


def snapfs_snapshot(store: Store, repo: str, image: Path) -> dict[str, Any]:
    before = store.usage(repo)
    cmd = [*store.snapfs_args(repo), "snapshot", "create", str(image), "--disk", DISK, "--json"]
    load = os.getloadavg()[0]
    proc, wall, cpu = timed(cmd, snapfs_env(store))
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"snapfs printed no JSON: {' '.join(cmd)}\n{proc.stdout}") from None
    after = store.usage(repo)
    objects = int(doc["objects_written"])
    uploaded = int(doc["bytes_uploaded"])
    return {
        "id": doc["id"],
        "seconds": wall,
        "snapfs_seconds": float(doc["seconds"]),
        "cpu_seconds": cpu,
        "bytes_uploaded": uploaded,
        "objects_written": objects,
        "blocks_uploaded": int(doc["blocks_uploaded"]),
        "blocks_data": int(doc["blocks_data"]),
        "blocks_zero": int(doc["blocks_zero"]),
        "blocks_changed": doc.get("blocks_changed"),
        "bytes_read": int(doc["bytes_read"]),
        "mib_per_object": uploaded / objects / MIB if objects else 0.0,
        # Counted in storage, outside the timed part: a cross-check of what snapfs reports.
        "stored_objects_added": after[0] - before[0],
        "stored_bytes_added": after[1] - before[1],
        "stored_bytes": after[1],
        "load1": round(load, 2),
        "report": doc,
    }


def restic_snapshot(store: Store, repo: str, image: Path) -> dict[str, Any]:
    load = os.getloadavg()[0]
    r = rp.restic_backup(image, repo, store.restic_env(), cold=True, count_objects=True)
    if not r["cold"]:
        raise BenchError("restic ran with a warm page cache (cannot drop caches)")
    objects = int(r["objects_written"])
    # restic 0.14's data_added is before compression; what landed in storage is the figure.
    uploaded = int(r["stored_bytes_added"])
    return {
        **r,
        "bytes_uploaded": uploaded,
        "mib_per_object": uploaded / objects / MIB if objects else 0.0,
        "load1": round(load, 2),
    }


def snapfs_export(
    store: Store, repo: str, snap: str, out: Path, expected_sha: str
) -> dict[str, Any]:
    cmd = [*store.snapfs_args(repo), "export", snap, str(out), "--force", "--json"]
    proc, wall, cpu = timed(cmd, snapfs_env(store))
    doc = json.loads(proc.stdout)
    got = sha256_file(out)
    if got != expected_sha:
        raise BenchError(
            f"snapfs export of {snap} from {repo} is not the image it snapshotted:\n"
            f"  command: {' '.join(cmd)}\n  sha256 {got} (export {out})\n"
            f"  sha256 {expected_sha} (changed image)\n  export said: {proc.stdout.strip()}"
        )
    out.unlink()
    return {"seconds": wall, "snapfs_seconds": float(doc["seconds"]), "cpu_seconds": cpu,
            "sha256_ok": True, "report": doc}  # fmt: skip


def read_amplification(store: Store, repo: str, snap: str) -> dict[str, Any]:
    """Bytes fetched to read one random 4 KiB of the image's data: the encoded length of the
    block that holds it (one ranged GET). Two medians: over the distinct data blobs of the
    repository index, and over the nonzero block positions of snapshot ``snap`` (which counts
    a deduplicated block once per place it appears, as a random read would meet it)."""
    from snapfs.format.block import ZERO_ID
    from snapfs.format.pack import KIND_DATA
    from snapfs.repo.repository import Repository
    from snapfs.store import open_store

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in snapfs_env(store).items() if k.startswith("AWS_")})
    try:
        repository = Repository.open(open_store(repo, store.endpoint_url))
        index = repository.load_index()
        lengths = [loc.length for loc in index.blobs.values() if loc.kind == KIND_DATA]
        root = repository.resolve(snap)
        per_block = [
            index.locate(b).length for b in repository.block_map(index, root) if b != ZERO_ID
        ]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    bs = repository.block_size
    median_blob = statistics.median(lengths)
    median_pos = statistics.median(per_block)
    raw = sum(loc.raw_length for loc in index.blobs.values() if loc.kind == KIND_DATA)
    return {
        "block_size": bs,
        "data_blobs": len(lengths),
        "median_blob_bytes": median_blob,
        "mean_blob_bytes": statistics.fmean(lengths),
        "median_bytes_per_4k_read": median_blob,
        "ratio_to_4096": median_blob / 4096,
        "median_bytes_per_4k_read_by_position": median_pos,
        "ratio_to_4096_by_position": median_pos / 4096,
        "compression_ratio": raw / max(1, sum(lengths)),
    }


# ---- one run ---------------------------------------------------------------------------------


def base_image(cfg: BenchConfig) -> tuple[Path, str]:
    """The cached pristine image for --size/--data, built by tools/make-image if missing."""
    path = cfg.work / f"base-{size_label(cfg.size)}-{size_label(cfg.data)}.img"
    if path.exists():
        say(f"reusing base image {path}")
        return path, "cached"
    say(f"building base image {path} ({size_label(cfg.size)}, {size_label(cfg.data)} of data)")
    path.parent.mkdir(parents=True, exist_ok=True)  # bench/work is not in a fresh clone
    out = run_tool([sys.executable, str(MAKE_IMAGE), str(path), "--size", str(cfg.size),
                    "--data", str(cfg.data)]).stdout.strip()  # fmt: skip
    say(out)
    return path, out


def one_run(cfg: BenchConfig, run: int, base: Path, endpoint: str | None) -> dict[str, Any]:
    run_dir = cfg.work / f"run-{run}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # Each run its own restic cache (in run_dir), kept from its full to its incremental backup.
    stores = [Store(name, run_dir, endpoint if name == "s3" else None) for name in cfg.stores]
    image = run_dir / "disk.img"
    run_tool(["cp", "--sparse=always", str(base), str(image)])
    say(f"run {run}: copied the base image to {image}")
    result: dict[str, Any] = {"run": run, "seed": run, "load_start": loadavg(), "stores": {}}
    snap_repos = {(s.name, bs): s.snapfs_repo(run, bs) for s in stores for bs in cfg.block_sizes}
    restic_repos = {s.name: s.restic_repo(run) for s in stores}
    ok = False
    try:
        for s in stores:
            for bs in cfg.block_sizes:
                snapfs_init(s, snap_repos[(s.name, bs)], bs)
            rp.restic_init(restic_repos[s.name], s.restic_env())
            result["stores"][s.name] = {
                "snapfs": {size_label(bs): {} for bs in cfg.block_sizes},
                "restic": {},
            }

        for phase in ("full", "incremental"):
            if phase == "incremental":
                out = run_tool([sys.executable, str(CHANGE_IMAGE), str(image),
                                "--seed", str(run)]).stdout.strip()  # fmt: skip
                result["change"] = out
                say(f"run {run}: {out}")
            result[f"image_sha256_{phase}"] = sha256_file(image)
            for s in stores:
                figures = result["stores"][s.name]
                for bs in cfg.block_sizes:
                    m = snapfs_snapshot(s, snap_repos[(s.name, bs)], image)
                    figures["snapfs"][size_label(bs)][phase] = m
                    say(f"run {run}: {s.name} snapfs {size_label(bs)} {phase}: "
                        f"{m['seconds']:.2f} s (reported {m['snapfs_seconds']:.2f} s), "
                        f"{mib(m['bytes_uploaded'])} in {m['objects_written']} objects, "
                        f"{m['blocks_uploaded']} blocks")  # fmt: skip
                    if (m["stored_bytes_added"], m["stored_objects_added"]) != (
                        m["bytes_uploaded"],
                        m["objects_written"],
                    ):
                        say(f"  note: storage grew by {m['stored_bytes_added']} bytes in "
                            f"{m['stored_objects_added']} objects; snapfs reported "
                            f"{m['bytes_uploaded']} in {m['objects_written']}")  # fmt: skip
                r = restic_snapshot(s, restic_repos[s.name], image)
                figures["restic"][phase] = r
                say(f"run {run}: {s.name} restic {phase}: {r['seconds']:.2f} s, "
                    f"{mib(r['bytes_uploaded'])} stored in {r['objects_written']} objects")  # fmt: skip

        expected = result["image_sha256_incremental"]
        for s in stores:
            figures = result["stores"][s.name]
            figures["restic"]["stored_bytes"] = figures["restic"]["incremental"]["stored_bytes"]
            for bs in cfg.block_sizes:
                repo = snap_repos[(s.name, bs)]
                f = figures["snapfs"][size_label(bs)]
                snap = f["incremental"]["id"]
                f["export"] = snapfs_export(s, repo, snap, run_dir / "export.img", expected)
                say(f"run {run}: {s.name} snapfs {size_label(bs)} export: "
                    f"{f['export']['seconds']:.2f} s, sha256 matches the changed image")  # fmt: skip
                f["stored_bytes"] = s.usage(repo)[1]
                f["read_amplification"] = read_amplification(s, repo, snap)
                ra = f["read_amplification"]
                say(f"run {run}: {s.name} snapfs {size_label(bs)}: stored {mib(f['stored_bytes'])}; "
                    f"a 4 KiB read fetches {ra['median_bytes_per_4k_read']:.0f} bytes (median)")  # fmt: skip
        result["load_end"] = loadavg()
        ok = True
        return result
    finally:
        if ok or not cfg.keep:
            for s in stores:
                for bs in cfg.block_sizes:
                    s.remove(snap_repos[(s.name, bs)])
                s.remove(restic_repos[s.name])
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            say(
                f"run {run} failed: its files are kept in {run_dir} (and the S3 prefixes run-{run}*)"
            )


# ---- summary -------------------------------------------------------------------------------


def median_of(values: list[float]) -> float:
    return float(statistics.median(values))


SNAPFS_FIGURES: dict[str, Callable[[dict[str, Any]], float]] = {
    "full_seconds": lambda f: f["full"]["seconds"],
    "full_snapfs_seconds": lambda f: f["full"]["snapfs_seconds"],
    "full_cpu_seconds": lambda f: f["full"]["cpu_seconds"],
    "full_bytes_uploaded": lambda f: f["full"]["bytes_uploaded"],
    "full_objects_written": lambda f: f["full"]["objects_written"],
    "full_mib_per_object": lambda f: f["full"]["mib_per_object"],
    "incremental_seconds": lambda f: f["incremental"]["seconds"],
    "incremental_snapfs_seconds": lambda f: f["incremental"]["snapfs_seconds"],
    "incremental_cpu_seconds": lambda f: f["incremental"]["cpu_seconds"],
    "incremental_bytes_uploaded": lambda f: f["incremental"]["bytes_uploaded"],
    "incremental_objects_written": lambda f: f["incremental"]["objects_written"],
    "incremental_mib_per_object": lambda f: f["incremental"]["mib_per_object"],
    "incremental_blocks_uploaded": lambda f: f["incremental"]["blocks_uploaded"],
    "incremental_blocks_changed": lambda f: f["incremental"]["blocks_changed"] or 0,
    "stored_bytes": lambda f: f["stored_bytes"],
    "export_seconds": lambda f: f["export"]["seconds"],
    "read_bytes_per_4k": lambda f: f["read_amplification"]["median_bytes_per_4k_read"],
    "read_ratio_to_4096": lambda f: f["read_amplification"]["ratio_to_4096"],
    "read_bytes_per_4k_by_position": lambda f: f["read_amplification"][
        "median_bytes_per_4k_read_by_position"
    ],
}

RESTIC_FIGURES: dict[str, Callable[[dict[str, Any]], float]] = {
    "full_seconds": lambda f: f["full"]["seconds"],
    "full_cpu_seconds": lambda f: f["full"]["cpu_seconds"],
    "full_bytes_uploaded": lambda f: f["full"]["bytes_uploaded"],
    "full_objects_written": lambda f: f["full"]["objects_written"],
    "full_mib_per_object": lambda f: f["full"]["mib_per_object"],
    "incremental_seconds": lambda f: f["incremental"]["seconds"],
    "incremental_cpu_seconds": lambda f: f["incremental"]["cpu_seconds"],
    "incremental_bytes_uploaded": lambda f: f["incremental"]["bytes_uploaded"],
    "incremental_bytes_added_raw": lambda f: f["incremental"]["bytes_added"],
    "incremental_objects_written": lambda f: f["incremental"]["objects_written"],
    "incremental_mib_per_object": lambda f: f["incremental"]["mib_per_object"],
    "stored_bytes": lambda f: f["stored_bytes"],
}


def medians(cfg: BenchConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for store in cfg.stores:
        per_store: dict[str, Any] = {"snapfs": {}, "restic": {}}
        for bs in map(size_label, cfg.block_sizes):
            figs = [r["stores"][store]["snapfs"][bs] for r in runs]
            per_store["snapfs"][bs] = {k: median_of([fn(f) for f in figs])
                                       for k, fn in SNAPFS_FIGURES.items()}  # fmt: skip
        figs = [r["stores"][store]["restic"] for r in runs]
        per_store["restic"] = {
            k: median_of([fn(f) for f in figs]) for k, fn in RESTIC_FIGURES.items()
        }
        out[store] = per_store
    return out


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    kind: str  # "seconds", "bytes", "count", "mib"
    aim: str = "-"
    # The aim as a test on (snapfs median, restic median); None: no aim.
    test: Callable[[float, float], bool] | None = None


ROWS = (
    Row("full snapshot seconds", "full_seconds", "seconds", "<= 0.5x restic", lambda s, r: s <= 0.5 * r),
    Row("incremental seconds", "incremental_seconds", "seconds", "< restic", lambda s, r: s < r),
    Row("full CPU seconds (info)", "full_cpu_seconds", "seconds"),
    Row("incremental CPU seconds (info)", "incremental_cpu_seconds", "seconds"),
    Row("incremental bytes uploaded", "incremental_bytes_uploaded", "bytes", "<= 0.5x restic",
        lambda s, r: s <= 0.5 * r),
    Row("full bytes uploaded", "full_bytes_uploaded", "bytes"),
    Row("objects written, full", "full_objects_written", "count"),
    Row("objects written, incremental", "incremental_objects_written", "count"),
    Row("MiB per object written, full", "full_mib_per_object", "mib", ">= 1 MiB", lambda s, r: s >= 1),
    Row("MiB per object written, incr.", "incremental_mib_per_object", "mib", ">= 1 MiB",
        lambda s, r: s >= 1),
    Row("stored bytes after both", "stored_bytes", "bytes", "<= restic", lambda s, r: s <= r),
    Row("export seconds (incremental)", "export_seconds", "seconds"),
)  # fmt: skip


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "seconds":
        return f"{value:.2f} s"
    if kind == "bytes":
        return mib(value)
    if kind == "mib":
        return f"{value:.2f}"
    return f"{value:.0f}"


def table(cfg: BenchConfig, med: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    rows: list[dict[str, Any]] = []
    for row in ROWS:
        for store in cfg.stores:
            restic = med[store]["restic"].get(row.key)
            for bs in map(size_label, cfg.block_sizes):
                snap = med[store]["snapfs"][bs][row.key]
                ratio = snap / restic if restic else None
                met = None if row.test is None or restic is None else row.test(snap, restic)
                rows.append({"metric": row.label, "key": row.key, "store": store,
                             "block_size": bs, "snapfs": snap, "restic": restic, "ratio": ratio,
                             "aim": row.aim, "met": met, "kind": row.kind})  # fmt: skip
    header = ("metric", "store", "block", "snapfs", "restic", "snapfs/restic", "aim", "met?")
    cells: list[tuple[str, ...]] = [header]
    for r in rows:
        met_text = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        ratio_text = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        cells.append((r["metric"], r["store"], r["block_size"], fmt(r["snapfs"], r["kind"]),
                      fmt(r["restic"], r["kind"]), ratio_text, r["aim"], met_text))  # fmt: skip
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    right = {3, 4, 5}
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.rjust(w) if i in right else v.ljust(w)
                               for i, (v, w) in enumerate(zip(c, widths, strict=True))).rstrip())  # fmt: skip
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    # Read amplification: snapfs only, one line per store and block size.
    lines.append("")
    lines.append("read amplification of a 4 KiB read (median bytes fetched = encoded block length)")
    for store in cfg.stores:
        for bs in map(size_label, cfg.block_sizes):
            m = med[store]["snapfs"][bs]
            lines.append(f"  {store:5} {bs:>4}: {m['read_bytes_per_4k']:8.0f} bytes per 4 KiB read "
                         f"= {m['read_ratio_to_4096']:.2f}x 4096 (by image position: "
                         f"{m['read_bytes_per_4k_by_position']:.0f} bytes)")  # fmt: skip
    return rows, "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------


@contextlib.contextmanager
def seaweed(cfg: BenchConfig) -> Iterator[str | None]:
    """A SeaweedFS server for the s3 store (stopped in ``finally``), or None without one."""
    if "s3" not in cfg.stores:
        yield None
        return
    data_dir = cfg.work / "seaweed"
    shutil.rmtree(data_dir, ignore_errors=True)
    server = rp.start_seaweed(data_dir, ACCESS_KEY, SECRET_KEY)
    say(f"SeaweedFS started at {server.endpoint_url} (pid {server.pid})")
    try:
        yield server.endpoint_url
    finally:
        server.stop()
        say("SeaweedFS stopped")
        if not cfg.keep:
            shutil.rmtree(data_dir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        description="snapfs vs restic: full and incremental snapshot of a realistic ext4 image."
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--stores", default="local,s3", help="local, s3 or both (default local,s3)")
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"), help="image size")
    parser.add_argument("--data", type=parse_size, default=parse_size("725M"),
                        help="file data in the image")  # fmt: skip
    parser.add_argument("--block-sizes", default="16K",
                        help="snapfs block sizes, comma-separated (default 16K)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/snapshot.json")
    parser.add_argument("--work", type=Path, default=ROOT / "bench/work/snapshot")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="measure nothing: recompute the medians and table of a saved result "
                             "from its raw runs, update them in the file and print the table")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="keep a failed run's repositories and image for inspection")  # fmt: skip
    args = parser.parse_args(argv)
    stores = tuple(s.strip() for s in args.stores.split(",") if s.strip())
    if not stores or set(stores) - {"local", "s3"}:
        parser.error("--stores takes local, s3 or local,s3")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    sizes = tuple(sorted({parse_size(s) for s in args.block_sizes.split(",") if s.strip()}))
    if not sizes:
        parser.error("no block sizes")
    if args.report is not None:
        return saved_config(args.report)
    return BenchConfig(runs=args.runs, stores=stores, size=args.size, data=args.data,
                       block_sizes=sizes, out=args.out.absolute(), work=args.work.absolute(),
                       keep=args.keep)  # fmt: skip


def saved_config(path: Path) -> BenchConfig:
    c = json.loads(path.read_text())["config"]
    return BenchConfig(runs=c["runs"], stores=tuple(c["stores"]), size=c["size"], data=c["data"],
                       block_sizes=tuple(parse_size(b) for b in c["block_sizes"]),
                       out=path.absolute(), work=Path(), keep=False, report=True)  # fmt: skip


def summarize(cfg: BenchConfig, doc: dict[str, Any]) -> None:
    """Medians and table from the raw runs; write the JSON; print the table."""
    doc["medians"] = medians(cfg, doc["runs"])
    rows, text = table(cfg, doc["medians"])
    doc["table"] = rows
    tmp = cfg.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(cfg.out)
    say(f"wrote {cfg.out}")
    machine = doc["machine"]
    print(f"snapfs vs restic, medians of {cfg.runs} run(s); image {size_label(cfg.size)} with "
          f"{size_label(cfg.data)} of data; {machine['nproc']} cores; load "
          f"{machine['loadavg_start']} at start, {machine['loadavg_end']} at end")  # fmt: skip
    print(text)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.report:
        summarize(cfg, json.loads(cfg.out.read_text()))
        return 0
    if os.geteuid() != 0:
        print(
            "run_snapshot: needs root (drops the page cache, loop-mounts the image)",
            file=sys.stderr,
        )
        return 1
    cfg.work.mkdir(parents=True, exist_ok=True)
    compile_snapfs()
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "benchmark": "snapshot",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"runs": cfg.runs, "stores": list(cfg.stores), "size": cfg.size,
                   "data": cfg.data, "block_sizes": [size_label(b) for b in cfg.block_sizes]},
        "machine": {"nproc": os.cpu_count(), "cpu_model": cpu_model(),
                    "loadavg_start": loadavg(), "hostname": platform.node()},
        "versions": versions(),
    }  # fmt: skip
    say(f"machine: {doc['machine']['nproc']} cores, {doc['machine']['cpu_model']}, "
        f"load {doc['machine']['loadavg_start']}")  # fmt: skip
    try:
        base, made = base_image(cfg)
        doc["image"] = {"path": str(base), "size": cfg.size, "data": cfg.data,
                        "make_image": made, "sha256": sha256_file(base)}  # fmt: skip
        runs: list[dict[str, Any]] = []
        with seaweed(cfg) as endpoint:
            for run in range(1, cfg.runs + 1):
                say(f"run {run}/{cfg.runs}: load {loadavg()}")
                runs.append(one_run(cfg, run, base, endpoint))
    except BenchError as e:
        print(f"run_snapshot: ABORTED: {e}", file=sys.stderr)
        return 1
    except rp.ResticError as e:
        print(f"run_snapshot: ABORTED: {e}", file=sys.stderr)
        return 1
    doc["machine"]["loadavg_end"] = loadavg()
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc["runs"] = runs
    summarize(cfg, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
