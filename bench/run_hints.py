#!/usr/bin/env python3
"""Benchmark: the first mount of a disk's newest snapshot, with and without hints borrowed from
the profile an earlier mount of its parent stored.

    .venv/bin/python bench/run_hints.py [--runs 4] [--stores local,s3] [--latency 20ms]
        [--out bench/results/hints.json] [--work bench/work/hints]

What it stands for: a user restores from yesterday's snapshot, which no mount has read yet;
the day before's snapshot of the same disk was mounted once (to look at some other file). The
newest snapshot of a lineage takes its nearest ancestor's access profile as hints
(``snapfs.image.sweep``), so the filesystem's mount and whatever that earlier mount read come
ahead of the reads. The reference is the same first mount with no profile in the repository,
measured in the same run, in alternation.

Set-up, once per store: the realistic 1 GiB ext4 image (``tools/make-image``, cached in
``bench/work/snapshot``, shared with ``run_snapshot.py``) is snapshotted as ``s0`` (disk
``d``); ``snapfs mount`` (fresh cache), the image's ext4 mounted and OTHER read (a file in
another directory than the one timed below), unmounted: the daemon stores ``s0``'s profile.
``tools/change-image --seed 5`` changes about 1% of the image's file data, and ``s1`` (disk
``d``, parent ``s0``) is snapshotted.

Every run, for every store, in alternating order: ``s1``'s own profile deleted (each mount is
its first), and ``s0``'s kept ("borrowed") or deleted ("none"); page cache dropped; from
nothing mounted, ``snapfs mount`` with a fresh cache directory (on the local store with
``--simulate-latency``), ``losetup -r`` of ``snapshots/s1.img``, ``mount -o ro,noload``, and
the small file the mount benchmark times (``run_mount.choose_small_file``) read and checked.
Figures: time to the file's bytes, the part after ``snapfs mount`` returned, the reads that
waited on the store and their time waiting (``stats``), and the bytes fetched in the
foreground. Nothing asserts on a time; the JSON keeps every raw figure and the load averages.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import run_mount as rm  # noqa: E402  (a sibling module, not a package)
import run_snapshot as rs  # noqa: E402

BLOCK = 16384
say = rs.say


@dataclass
class Config:
    runs: int
    stores: tuple[str, ...]
    latency: str
    out: Path
    work: Path


class Bench:
    def __init__(self, cfg: Config, store: rs.Store, work: Path) -> None:
        self.cfg = cfg
        self.store = store
        self.work = work
        self.env = rs.snapfs_env(store)
        self.env["SNAPFS_RUNTIME_DIR"] = str(work / "run")
        os.environ["SNAPFS_RUNTIME_DIR"] = self.env["SNAPFS_RUNTIME_DIR"]  # daemon_stats
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            if key in self.env:  # for the store opened here, to move profiles
                os.environ[key] = self.env[key]
        self.repo = store.snapfs_repo(0, BLOCK)
        self.mnt = work / "mnt"
        self.fs = work / "fs"

    def snapfs(self, *args: Any) -> subprocess.CompletedProcess[str]:
        return rs.run_tool([*self.store.snapfs_args(self.repo), *map(str, args)], self.env)

    @contextlib.contextmanager
    def mounted(self, latency: bool) -> Iterator[None]:
        cache = self.work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        extra = ["--simulate-latency", self.cfg.latency] if latency else []
        self.snapfs("mount", self.mnt, "--cache-dir", cache, *extra)
        try:
            yield
        finally:
            proc = subprocess.run([*self.store.snapfs_args(self.repo), "umount", str(self.mnt)],
                                  env=self.env, capture_output=True, text=True)
            if proc.returncode != 0:
                say(f"warning: snapfs umount {self.mnt}: {proc.stderr.strip()}")

    def read_file(self, image: str, path: str) -> bytes:
        with rm.loop_attached(self.mnt / "snapshots" / image) as dev, \
                rm.ext4_mounted(dev, self.fs) as root:
            return (root / path).read_bytes()

    def profile(self, snapshot_id: str) -> bytes | None:
        from snapfs.errors import ObjectNotFound
        from snapfs.store import open_store

        store = open_store(self.repo, self.store.endpoint_url)
        try:
            return store.get(f"profiles/{snapshot_id}")
        except ObjectNotFound:
            return None
        finally:
            store.close()

    def set_profile(self, snapshot_id: str, data: bytes | None) -> None:
        from snapfs.store import open_store

        store = open_store(self.repo, self.store.endpoint_url)
        try:
            if data is None:
                store.delete(f"profiles/{snapshot_id}")
            else:
                store.put(f"profiles/{snapshot_id}", data)
        finally:
            store.close()


def other_file(image: Path, small: dict[str, Any], work: Path) -> str:
    """A file of 16-64 KiB in another directory than ``small``'s: what the earlier mount read."""
    here = os.path.dirname(small["path"])
    root = work / "mnt-probe"
    with rm.loop_attached(image) as dev, rm.ext4_mounted(dev, root):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                rel = str(p.relative_to(root))
                st = p.lstat()
                if p.is_file() and not p.is_symlink() and 16 << 10 <= st.st_size <= 64 << 10 \
                        and os.path.dirname(rel) != here:
                    return rel
    raise rs.BenchError("no other file of 16-64 KiB in the image")


def first_file(b: Bench, small: dict[str, Any], latency: bool) -> dict[str, Any]:
    rm.drop_caches()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with b.mounted(latency):
        t_mount = time.perf_counter()
        data = b.read_file("s1.img", small["path"])
        t_read = time.perf_counter()
        stats = rm.daemon_stats(b.mnt)["hydrator"]
    if hashlib.sha256(data).hexdigest() != small["sha256_s1"]:
        raise rs.BenchError(f"wrong bytes: {small['path']} in s1.img")
    return {"seconds": t_read - t0, "after_mount_seconds": t_read - t_mount,
            "waiting_reads": stats["waiting_reads"], "wait_seconds": stats["wait_seconds"],
            "foreground_bytes": stats["bytes_fetched"] - stats["background_bytes"],
            "load1": round(load, 2)}


def bench_store(cfg: Config, store: rs.Store, base: Path, small: dict[str, Any]) -> dict[str, Any]:
    work = cfg.work / store.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    b = Bench(cfg, store, work)
    store.remove(b.repo)
    rs.snapfs_init(store, b.repo, BLOCK)
    image = work / "disk.img"
    shutil.copyfile(base, image)
    b.snapfs("snapshot", "create", image, "--name", "s0", "--disk", "d")
    other = other_file(image, small, work)
    with b.mounted(latency=False):
        b.read_file("s0.img", other)
    rs.run_tool([str(ROOT / "tools" / "change-image"), str(image), "--seed", "5"])
    b.snapfs("snapshot", "create", image, "--name", "s1", "--disk", "d")
    with rm.loop_attached(image) as dev, rm.ext4_mounted(dev, work / "fs-source") as root:
        small["sha256_s1"] = hashlib.sha256((root / small["path"]).read_bytes()).hexdigest()
    ids = {s["name"]: s["id"] for s in json.loads(b.snapfs("snapshot", "list", "--json").stdout)}
    borrowed = b.profile(ids["s0"])
    if borrowed is None:
        raise rs.BenchError("the mount of s0 stored no access profile")
    runs: dict[str, list[dict[str, Any]]] = {"borrowed": [], "none": []}
    latency = store.name == "local"
    for n in range(cfg.runs):
        for mode in ("none", "borrowed") if n % 2 == 0 else ("borrowed", "none"):
            b.set_profile(ids["s1"], None)  # a first mount of s1, every time
            b.set_profile(ids["s0"], borrowed if mode == "borrowed" else None)
            r = first_file(b, small, latency)
            runs[mode].append(r)
            say(f"[{store.name} run {n + 1}] {mode}: first file {r['seconds']:.2f} s "
                f"({r['after_mount_seconds']:.2f} s after the mount), {r['waiting_reads']} "
                f"reads waited {r['wait_seconds']:.2f} s, {r['foreground_bytes']} B fetched")
    store.remove(b.repo)
    return {"other_file": other, "profile_bytes": len(borrowed), "runs": runs}


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, result in doc["stores"].items():
        runs = result["runs"]
        s: dict[str, Any] = {}
        for mode in ("borrowed", "none"):
            for key in ("seconds", "after_mount_seconds", "waiting_reads", "wait_seconds",
                        "foreground_bytes"):
                s[f"{mode}_{key}"] = statistics.median(r[key] for r in runs[mode])
        # each pair measured back to back: the median of the per-pair ratios
        s["ratio_seconds"] = statistics.median(
            a["seconds"] / z["seconds"] for a, z in zip(runs["borrowed"], runs["none"],
                                                         strict=True))
        out[name] = s
    return out


def table(summary: dict[str, Any], latency: str) -> str:
    lines = ["| figure | store | borrowed hints | no profile | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        where = f"local+{latency}" if name == "local" else "SeaweedFS"
        lines.append(f"| time to first file | {where} | {s['borrowed_seconds']:.2f} s | "
                     f"{s['none_seconds']:.2f} s | {s['ratio_seconds']:.2f} |")
        lines.append(f"| of which after `snapfs mount` | {where} | "
                     f"{s['borrowed_after_mount_seconds']:.2f} s | "
                     f"{s['none_after_mount_seconds']:.2f} s | |")
        lines.append(f"| reads that waited on the store (their wait) | {where} | "
                     f"{s['borrowed_waiting_reads']:.0f} ({s['borrowed_wait_seconds']:.2f} s) | "
                     f"{s['none_waiting_reads']:.0f} ({s['none_wait_seconds']:.2f} s) | |")
        lines.append(f"| bytes fetched in the foreground | {where} | "
                     f"{s['borrowed_foreground_bytes'] / 1024:.0f} KiB | "
                     f"{s['none_foreground_bytes'] / 1024:.0f} KiB | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--stores", default="local,s3")
    p.add_argument("--latency", default="20ms")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "hints.json")
    p.add_argument("--work", type=Path, default=BENCH / "work" / "hints")
    a = p.parse_args(argv)
    cfg = Config(a.runs, tuple(s for s in a.stores.split(",") if s), a.latency, a.out,
                 a.work.resolve())
    if os.geteuid() != 0:
        print("run_hints.py needs root (loop devices, mounts, dropping caches)", file=sys.stderr)
        return 1
    cfg.work.mkdir(parents=True, exist_ok=True)
    rs.compile_snapfs()
    snap_cfg = rs.BenchConfig(runs=1, stores=cfg.stores, size=rs.parse_size("1G"),
                              data=rs.parse_size("725M"), block_sizes=(BLOCK,), out=cfg.out,
                              work=BENCH / "work" / "snapshot", keep=False)
    base, _ = rs.base_image(snap_cfg)
    small = rm.choose_small_file(base, cfg.work)
    doc: dict[str, Any] = {"config": {k: str(v) for k, v in vars(cfg).items()},
                           "machine": {"cpu": rs.cpu_model(), "cores": os.cpu_count()},
                           "versions": rs.versions(), "small_file": small, "stores": {},
                           "load_before": rs.loadavg()}
    seaweed_cfg = dataclasses.replace(snap_cfg, work=cfg.work)
    with tempfile.TemporaryDirectory(dir=cfg.work), rs.seaweed(seaweed_cfg) as endpoint:
        for name in cfg.stores:
            store = rs.Store(name, cfg.work / f"store-{name}", endpoint if name == "s3" else None)
            doc["stores"][name] = bench_store(cfg, store, base, dict(small))
    doc["load_after"] = rs.loadavg()
    doc["summary"] = summarize(doc)
    doc["table"] = table(doc["summary"], cfg.latency)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["table"])
    say(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
