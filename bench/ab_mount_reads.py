#!/usr/bin/env python3
"""A/B of the lazy mount's reads between snapfs revisions: cold and warm sequential reads of an
image, and its background hydration, on a local repository whose daemon adds a round trip to
every store request (``--simulate-latency``), or on SeaweedFS on loopback (``--store s3``).

    .venv/bin/python bench/ab_mount_reads.py --rev main~1 --rev main [--rounds 3]
        [--store local|s3] [--latency 20ms|none] [--image bench/work/snapshot/base-1G-725M.img]
        [--out bench/results/ab-mount-reads.json] [--work bench/work/ab-mount-reads]

Why: ``run_mount.py`` takes five minutes and measures much else; a change to the read path
(the cache's writes, the fetch workers) wants alternated pairs of just these figures, since
this machine's speed drifts within minutes (bench/README.md, "New memory is dear").

Set-up, once: each revision's ``snapfs`` package is taken out of git into WORK/trees/REV
(``ab_incremental.tree_of``); a repository in WORK (or in a bucket of a SeaweedFS server
started on 127.0.0.1 for the run, and stopped by its pid at the end) holds one snapshot of IMAGE
(default: the realistic 1 GiB image of ``run_mount.py``; made with the first revision). The
latency is added on the local store only, by default (``--latency none`` to add none). Then
``--rounds`` times, for each revision in turn (in the reverse order every other round), with
that tree first on PYTHONPATH (the CLI too), after dropping the page cache and a pause of
``--pause`` seconds before every mount:
- ``cold``: ``snapfs mount --no-background`` with a fresh cache directory, the image read
  whole in 1 MiB reads (``run_mount.read_whole``, which hashes them), ``snapfs umount``;
- ``warm``: the same cache mounted again and the image read again (its blocks come from the
  cache's files, not the store);
- ``hydration``: ``snapfs mount`` (background on) with a fresh cache directory, the image
  opened as ``losetup`` would, ``stats --json`` polled until no block is missing; MiB/s of
  stored bytes fetched, from the command's start.
Each pass records the daemon's user and system CPU seconds. Reads are checked: every pass's
xxh3-128 of the image must equal the source's. The JSON keeps every pass and the medians per
revision; medians of the per-round ratios to the first revision are printed. Processes are
ended by their pid (``snapfs umount``); the mount is unmounted in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ab_incremental import HERE, PYTHON, repository, run, tree_of
from restic_peer import drop_caches
from run_mount import cpu_times, read_whole

IMAGE = HERE / "bench" / "work" / "snapshot" / "base-1G-725M.img"
MIB = 1 << 20


def snapfs_cmd(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([PYTHON, "-m", "snapfs", *args], dict(os.environ, **env))


class Mounted:
    """``snapfs mount`` of the repository (``repo``: the CLI's options naming it) at MNT with
    a tree first on PYTHONPATH, unmounted at the end."""

    def __init__(self, tree: Path, repo: list[str], mnt: Path, cache: Path,
                 latency: str | None, background: bool) -> None:
        self.env = {"PYTHONPATH": str(tree)}
        self.mnt = mnt
        args = [*repo, "mount", str(mnt), "--cache-dir", str(cache)]
        if latency is not None:
            args += ["--simulate-latency", latency]
        self.args = args if background else [*args, "--no-background"]

    def __enter__(self) -> Mounted:
        snapfs_cmd(self.args, self.env)
        stats = json.loads(snapfs_cmd(["stats", str(self.mnt), "--json"], self.env).stdout)
        self.pid = int(stats["pid"])
        return self

    def __exit__(self, *exc: object) -> None:
        snapfs_cmd(["umount", str(self.mnt)], self.env)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def settle(pause: float) -> None:
    drop_caches()
    time.sleep(pause)


def image_digest(path: Path) -> tuple[str, int]:
    """xxh3-128 of the file read front to back (``run_mount.read_whole``), and its size."""
    r = read_whole(path)
    return r["xxh3"], r["bytes"]


def one_round(tree: Path, repo: list[str], work: Path, args: argparse.Namespace,
              want: tuple[str, int], latency: str | None) -> dict[str, Any]:
    mnt = work / "mnt"
    image = mnt / "snapshots" / "disk.img"
    out: dict[str, Any] = {}
    cache = fresh(work / "cache")
    for label in ("cold", "warm"):
        settle(args.pause)
        with Mounted(tree, repo, mnt, cache, latency, background=False) as m:
            r = read_whole(image)
            got, seconds = (r["xxh3"], r["bytes"]), r["seconds"]
            user, system = cpu_times(m.pid)
        if got != want:
            raise SystemExit(f"{label} read of {image} differs from the source image")
        out[label] = {"seconds": seconds, "mib_s": want[1] / MIB / seconds,
                      "daemon_user": user, "daemon_system": system}
    cache = fresh(work / "cache")
    settle(args.pause)
    t0 = time.perf_counter()
    with Mounted(tree, repo, mnt, cache, latency, background=True) as m:
        with open(image, "rb"):  # in use: the sweep hydrates it
            while True:
                stats = json.loads(snapfs_cmd(["stats", str(mnt), "--json"], m.env).stdout)
                img = stats["images"]["disk.img"]
                if img["data_blocks"] is not None and img["blocks_missing"] == 0:
                    break
                if time.perf_counter() - t0 > 600:
                    raise SystemExit(f"hydration not done after 600 s: {img}")
                time.sleep(0.1)
            seconds = time.perf_counter() - t0
            user, system = cpu_times(m.pid)
        got = image_digest(image)  # all from the cache now
    if got != want:
        raise SystemExit(f"the hydrated {image} differs from the source image")
    fetched = stats["hydrator"]["bytes_fetched"]
    out["hydration"] = {"seconds": seconds, "mib_s": fetched / MIB / seconds,
                        "bytes_fetched": fetched, "daemon_user": user, "daemon_system": system}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", action="append", required=True, help="a git revision (twice or more)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--store", choices=["local", "s3"], default="local")
    p.add_argument("--latency", help="--simulate-latency (default 20ms locally, none on s3)")
    p.add_argument("--pause", type=float, default=3.0, help="seconds after dropping the cache")
    p.add_argument("--image", type=Path, default=IMAGE)
    p.add_argument("--work", type=Path, default=HERE / "bench" / "work" / "ab-mount-reads")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if len(args.rev) < 2:
        p.error("give --rev at least twice")
    if not args.image.is_file():
        p.error(f"{args.image}: no such image (run bench/run_mount.py once, or give --image)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "mnt").mkdir(exist_ok=True)
    if args.latency is None:
        args.latency = "20ms" if args.store == "local" else "none"
    latency = None if args.latency == "none" else args.latency
    trees = {rev: tree_of(rev, work) for rev in args.rev}
    with repository(args.store, work, "ab-mount-reads") as repo:
        return measure(args, trees, work, repo, latency)


def measure(args: argparse.Namespace, trees: dict[str, Path], work: Path, repo: list[str],
            latency: str | None) -> int:
    first = {"PYTHONPATH": str(trees[args.rev[0]])}
    snapfs_cmd([*repo, "init"], first)
    snapfs_cmd([*repo, "snapshot", "create", str(args.image), "--name", "disk"], first)
    want = image_digest(args.image)
    rounds: dict[str, list[dict[str, Any]]] = {rev: [] for rev in args.rev}
    load = []
    try:
        for n in range(args.rounds):
            # ABBA: the order turns every round, so that neither revision always follows the
            # other (a pass leaves the machine's memory in a state the next one pays for)
            for rev in args.rev if n % 2 == 0 else args.rev[::-1]:
                load.append(os.getloadavg()[0])
                r = one_round(trees[rev], repo, work, args, want, latency)
                rounds[rev].append(r)
                print(f"round {n + 1} {rev}: cold {r['cold']['mib_s']:.0f} MiB/s, warm "
                      f"{r['warm']['mib_s']:.0f} MiB/s, hydration {r['hydration']['seconds']:.2f} s "
                      f"(daemon {r['hydration']['daemon_user']:.2f} user "
                      f"{r['hydration']['daemon_system']:.2f} system)", flush=True)
    finally:
        if subprocess.run(["mountpoint", "-q", str(work / "mnt")]).returncode == 0:
            subprocess.run([PYTHON, "-m", "snapfs", "umount", str(work / "mnt")], cwd="/")
    medians = {rev: {kind: {key: statistics.median(r[kind][key] for r in rs)
                            for key in rs[0][kind]} for kind in rs[0]}
               for rev, rs in rounds.items()}
    base = args.rev[0]
    ratios = {rev: {kind: statistics.median(r[kind]["seconds"] / b[kind]["seconds"]
                                            for r, b in zip(rounds[rev], rounds[base], strict=True))
                    for kind in rounds[rev][0]} for rev in args.rev[1:]}
    for rev, by_kind in ratios.items():
        print(f"{rev} / {base}, time, median of the rounds' ratios: " +
              ", ".join(f"{kind} {ratio:.2f}" for kind, ratio in by_kind.items()))
    doc = {"benchmark": "ab_mount_reads", "revs": args.rev, "store": args.store,
           "latency": args.latency,
           "image": str(args.image), "image_bytes": want[1], "load1": load,
           "rounds": rounds, "medians": medians, "time_ratios_to_first": ratios}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
