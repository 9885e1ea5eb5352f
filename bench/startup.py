#!/usr/bin/env python3
"""Start-up costs of the CLI and of ``snapfs mount``: what "time to first file" pays before a read.

    .venv/bin/python bench/startup.py [--runs 7] [--stores local,s3] [--image IMG]
        [--work bench/work/startup] [--out bench/results/startup.json] [--index-cache]
        [--tree DIR]

Set-up, once: a repository per store (a local directory; a bucket on a SeaweedFS started on
loopback for ``s3``, stopped in ``finally``) holding one snapshot of IMG (default: the 1 GiB
realistic image that ``run_mount.py`` uses, ``bench/work/snapshot/base-1G-725M.img``).

Per run (medians of ``--runs``; the page cache is left warm: this measures CPU, not disk):
- ``snapfs --help``, ``snapfs --version`` and ``snapfs snapshot list``: wall time of the process;
- ``python -X importtime``: the import time of ``snapfs.cli`` (what every command pays), of what
  the mount command imports before it forks (``mount_parent``: ``snapfs.cli`` + ``snapfs.mount``)
  and of everything a mount imports (+ ``snapfs.daemon``, the daemon's side, which a tree from
  before it existed had in ``snapfs.mount``; + ``snapfs.store.s3`` on S3);
- ``snapfs mount --no-background`` (local: ``--simulate-latency 20ms``) from start until it
  returns (the daemon said ready), with a fresh cache directory each time (``mount_cold``), and
  again with the previous run's cache directory (``mount_warm``); then ``snapfs umount``;
- in one process: ``Repository.load_index()`` from the store, and through an ``IndexCache``
  (empty, then holding the file).

``--index-cache`` runs the daemon with the index cache wired in as proposed for ``mount.py``
(``SnapshotCatalog(..., index_cache=IndexCache(options.cache_dir))``), by wrapping the CLI in a
small launcher that patches ``SnapshotCatalog.__init__``; without it, the daemon as committed.
``--tree DIR`` measures the snapfs package in DIR instead (e.g. ``git archive HEAD snapfs | tar
-x -C DIR``, for a before/after pair from the same venv): it goes first on PYTHONPATH and every
process runs in ``/``; the in-process index figures are left out if DIR has no index cache.
Only processes this script started are signalled; mounts it made are unmounted in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY = str(ROOT / ".venv" / "bin" / "python")
BUCKET = "snapfs-startup-bench"

#: runs the CLI with the index cache passed to the catalog (the proposed one-line mount.py change)
LAUNCHER = """
import snapfs.image.catalog as catalog
from snapfs.repo.indexcache import IndexCache
import sys
cache_dir = sys.argv[sys.argv.index("--cache-dir") + 1] if "--cache-dir" in sys.argv else None
original = catalog.SnapshotCatalog.__init__
def patched(self, repo, hydrator, interval=2.0, index_cache=None):
    original(self, repo, hydrator, interval, index_cache or IndexCache(cache_dir))
catalog.SnapshotCatalog.__init__ = patched
from snapfs.cli import main
sys.argv[0] = "snapfs"
main()
"""


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   cwd="/")
    return time.perf_counter() - t


def import_ms(modules: list[str], env: dict[str, str]) -> dict[str, float]:
    """Cumulative import time (ms) of each of ``modules`` imported in that order."""
    # a module that a --tree from before does not have is left out (it counts 0)
    code = "\n".join(f"try:\n    import {m}\nexcept ModuleNotFoundError:\n    pass"
                     for m in modules)
    out = subprocess.run([PY, "-X", "importtime", "-c", code], env=env, check=True,
                         capture_output=True, text=True, cwd="/").stderr
    found: dict[str, float] = {}
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line)  # top level only
        if m and m.group(2) in modules:
            found[m.group(2)] = int(m.group(1)) / 1000
    return {"total": round(sum(found.values()), 1), **{m: round(found.get(m, 0.0), 1) for m in modules}}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


class Store:
    def __init__(self, name: str, repo: str, env: dict[str, str], extra: list[str]) -> None:
        self.name = name
        self.repo = repo
        self.env = env
        self.extra = extra  # mount options


def setup_store(name: str, work: Path, image: Path, seaweed: Any) -> Store:
    env = dict(os.environ)
    if name == "local":
        repo = str(work / "repo-local")
        extra = ["--simulate-latency", "20ms"]
    else:
        repo = f"s3://{BUCKET}/startup"
        env["AWS_ENDPOINT_URL"] = seaweed.endpoint_url
        env.setdefault("AWS_ACCESS_KEY_ID", "bench")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        extra = []
    snapfs = [PY, "-m", "snapfs", "-r", repo]
    listed = subprocess.run([*snapfs, "snapshot", "list", "--json"], env=env,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        say(f"{name}: creating the repository and a snapshot of {image.name}")
        subprocess.run([*snapfs, "init"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*snapfs, "snapshot", "create", str(image), "--name", "disk"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
    return Store(name, repo, env, extra)


def measure_mount(store: Store, work: Path, cache: Path, index_cache: bool) -> float:
    mnt = work / f"mnt-{store.name}"
    mnt.mkdir(parents=True, exist_ok=True)
    head = [PY, "-c", LAUNCHER] if index_cache else [PY, "-m", "snapfs"]
    cmd = [*head, "-r", store.repo, "mount", str(mnt), "--cache-dir", str(cache),
           "--no-background", *store.extra]
    try:
        return timed(cmd, store.env)
    finally:
        subprocess.run([PY, "-m", "snapfs", "umount", str(mnt)], env=store.env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def load_index_in_process(store: Store, work: Path) -> dict[str, float]:
    code = f"""
import json, shutil, sys, time
from snapfs.repo.indexcache import IndexCache
from snapfs.repo.repository import Repository
from snapfs.store import open_store
repo = Repository.open(open_store({store.repo!r}))
cache_dir = {str(work / ("index-cache-" + store.name))!r}
shutil.rmtree(cache_dir, ignore_errors=True)
out = {{}}
for label, cache in (("store", None), ("cache_miss", IndexCache(cache_dir)),
                     ("cache_hit", IndexCache(cache_dir))):
    t = time.perf_counter()
    index = repo.load_index(cache)
    out[label] = time.perf_counter() - t
out["blobs"] = len(index)
print(json.dumps(out))
"""
    done = subprocess.run([PY, "-c", code], env=store.env, capture_output=True, text=True,
                          cwd="/")
    if done.returncode != 0 and "snapfs.repo.indexcache" in done.stderr:
        return {}  # a --tree from before the index cache
    done.check_returncode()
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--stores", default="local")
    ap.add_argument("--image", default=str(ROOT / "bench/work/snapshot/base-1G-725M.img"))
    ap.add_argument("--work", default=str(ROOT / "bench/work/startup"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/startup.json"))
    ap.add_argument("--index-cache", action="store_true")
    ap.add_argument("--tree", help="measure the snapfs package in this directory instead")
    args = ap.parse_args()
    if args.tree:
        os.environ["PYTHONPATH"] = os.path.abspath(args.tree)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stores = args.stores.split(",")
    seaweed = None
    results: dict[str, Any] = {"runs": args.runs, "index_cache": args.index_cache,
                               "tree": args.tree or str(ROOT),
                               "loadavg": [os.getloadavg()]}
    try:
        if "s3" in stores:
            import boto3

            from snapfs.testing.seaweedfs import SeaweedServer

            seaweed = SeaweedServer(work / "seaweed")
            seaweed.start()
            client = boto3.session.Session().client(
                "s3", endpoint_url=seaweed.endpoint_url, aws_access_key_id="bench",
                aws_secret_access_key="bench", region_name="us-east-1",
            )
            try:
                client.create_bucket(Bucket=BUCKET)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass  # kept from an earlier run in the same --work
        env = dict(os.environ)
        cli: dict[str, list[float]] = {"help": [], "version": [], "snapshot_list": []}
        local = setup_store("local", work, Path(args.image), None)
        for _ in range(args.runs):
            cli["help"].append(timed([PY, "-m", "snapfs", "--help"], env))
            cli["version"].append(timed([PY, "-m", "snapfs", "--version"], env))
            cli["snapshot_list"].append(timed([PY, "-m", "snapfs", "-r", local.repo, "snapshot",
                                               "list"], env))
        results["cli_seconds"] = {k: median(v) for k, v in cli.items()}
        results["import_ms"] = {
            "cli": import_ms(["snapfs.cli"], env),
            "mount_parent": import_ms(["snapfs.cli", "snapfs.mount"], env),
            "mount_local": import_ms(["snapfs.cli", "snapfs.mount", "snapfs.daemon"], env),
            "mount_s3": import_ms(["snapfs.cli", "snapfs.mount", "snapfs.store.s3",
                                   "snapfs.daemon"], env),
        }
        for name in stores:
            store = local if name == "local" else setup_store(name, work, Path(args.image), seaweed)
            cold, warm, loads = [], [], []
            for run in range(args.runs):
                cache = work / f"cache-{name}-{run}"
                shutil.rmtree(cache, ignore_errors=True)
                cold.append(measure_mount(store, work, cache, args.index_cache))
                warm.append(measure_mount(store, work, cache, args.index_cache))
                shutil.rmtree(cache, ignore_errors=True)
                loads.append(load_index_in_process(store, work))
            results[name] = {
                "mount_cold_seconds": median(cold),
                "mount_warm_seconds": median(warm),
                "mount_cold_all": [round(x, 3) for x in cold],
                "mount_warm_all": [round(x, 3) for x in warm],
                "load_index_seconds": {k: median([x[k] for x in loads])
                                       for k in ("store", "cache_miss", "cache_hit")
                                       if loads[0]},
                "blobs": loads[0].get("blobs"),
            }
            say(f"{name}: {json.dumps(results[name])}")
        results["loadavg"].append(os.getloadavg())
    finally:
        if seaweed is not None:
            seaweed.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
