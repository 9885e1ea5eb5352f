#!/usr/bin/env python3
"""A/B of a served disk's staged incremental snapshot between two snapfs revisions, on a local
repository whose daemon adds a round trip to every store request (``--simulate-latency``), or
on SeaweedFS on loopback (``--store s3``).

    .venv/bin/python bench/ab_incremental.py --rev main~2 --rev main [--latency 20ms|none]
        [--store local|s3] [--rounds 4] [--cycles 3] [--blocks 1700] [--at-once]
        [--out bench/results/ab-incremental.json] [--work bench/work/ab-incremental]

Why: an incremental snapshot of a served disk is a handful of store requests one after
another (the lock, the index, the parent's pages, the packs, the index object, the root), so
on a remote store its time is mostly round trips. SeaweedFS on loopback answers in 2–5 ms and
hides them; 20 ms a request is closer to a cloud store's.

Set-up, once: each revision's ``snapfs`` package is taken out of git (``git archive``) into
WORK/trees/REV and compiled; a repository in WORK (or in a bucket of a SeaweedFS server
started on 127.0.0.1 for the run, and stopped by its pid at the end) holds ``s0``, a 256 MiB image (64 MiB random
data, the rest zeros). Then ``--cycles`` times, for each revision in turn: ``snapfs mount``
with that tree first on PYTHONPATH (the CLI too), ``--simulate-latency``, its own cache
directory and ``--no-background``; a disk ``dN`` from ``s0``; ``--rounds`` times: ``--blocks``
random 16 KiB blocks of it written (half random, half zeros: about 2:1 compressible) with an
fsync, a wait on the daemon's socket until it has staged them, and ``snapshot create --disk dN
--json`` timed from the command's start to its end (``--at-once``: right after the fsync,
not waiting for the staging, so that the snapshot reads and compresses the blocks itself);
then ``snapfs umount``. The JSON keeps
every round (wall time, the daemon's time and its steps) and the medians per revision.
Processes are ended by their pid; the mount is unmounted in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BS = 16 << 10


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``cmd``, in ``/``: ``python -m`` puts the working directory first on sys.path, and the
    checkout's own snapfs would shadow the tree on PYTHONPATH."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd="/")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")
    return proc


def tree_of(rev: str, work: Path) -> Path:
    """The ``snapfs`` package of ``rev``, out of git into WORK/trees/REV, compiled."""
    commit = run(["git", "-C", str(HERE), "rev-parse", "--short", rev], dict(os.environ))
    tree = work / "trees" / commit.stdout.strip()
    if not (tree / "snapfs").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(HERE), "archive", rev, "snapfs"],
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    run([PYTHON, "-m", "compileall", "-q", str(tree / "snapfs")], dict(os.environ))
    return tree


def staged(repo: str, disk: str, limit: float = 30.0) -> float:
    """Seconds until the daemon has staged every changed block of ``disk``, asked on its
    socket from this process (as ``run_disks.wait_staged`` does: a process a poll would load
    the machine just before the timed command)."""
    from snapfs.control import find_repository_daemon, request

    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        disks = request(find_repository_daemon(repo), {"op": "disk-list"})["disks"]
        found = next(d for d in disks if d["name"] == disk)
        if found["blocks_staged_now"] >= found["blocks_changed"]:
            break
        time.sleep(0.1)
    return time.perf_counter() - started


def write_blocks(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        for n in rng.sample(range(size // BS), count):
            os.pwrite(fd, rng.randbytes(BS // 2) + bytes(BS // 2), n * BS)
        os.fsync(fd)
    finally:
        os.close(fd)


def cycle(rev: str, tree: Path, work: Path, repo: list[str], args: argparse.Namespace, n: int,
          seed: int) -> list[dict[str, Any]]:
    """One mount of ``rev``'s daemon, ``args.rounds`` snapshots; ``seed``: of the data written
    (new to the repository each round, for every revision). ``repo``: its ``-r`` options."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    snapfs = [PYTHON, "-m", "snapfs", *repo]
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    latency = ["--simulate-latency", args.latency] if args.latency != "none" else []
    run([*snapfs, "mount", str(mnt), "--cache-dir", str(work / f"cache-{rev}"), *latency,
         "--no-background"], env)
    rounds = []
    try:
        disk = f"d{seed}"
        run([*snapfs, "disk", "create", disk, "--from", "s0"], env)
        for r in range(args.rounds):
            write_blocks(mnt / "disks" / f"{disk}.img", args.blocks, seed=1000 * seed + r)
            settled = 0.0 if args.at_once else staged(repo[1], disk)
            started = time.perf_counter()
            out = run([*snapfs, "snapshot", "create", "--disk", disk, "--json"], env)
            wall = time.perf_counter() - started
            snap = json.loads(out.stdout)["parts"][0]["snapshot"]
            rounds.append({"rev": rev, "cycle": n, "wall_seconds": round(wall, 4),
                           "daemon_seconds": snap["seconds"], "timings": snap["timings"],
                           "blocks_staged": snap["blocks_staged"],
                           "blocks_uploaded": snap["blocks_uploaded"],
                           "staging_seconds": round(settled, 3),
                           "load": os.getloadavg()})
            print(f"[{rev} cycle {n}] {wall:.3f} s (daemon {snap['seconds']:.3f} s) "
                  f"{snap['timings']}", file=sys.stderr)
        run([*snapfs, "disk", "delete", disk], env)
    finally:
        subprocess.run([PYTHON, "-m", "snapfs", "umount", str(mnt)], env=env,
                       capture_output=True, check=False, cwd="/")
    return rounds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", action="append", required=True, help="a git revision (give two)")
    p.add_argument("--latency", help="added to every request (default: 20ms on the local "
                   "store, none on s3; 'none': the store as it is)")
    p.add_argument("--store", choices=("local", "s3"), default="local")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--blocks", type=int, default=1700)
    p.add_argument("--at-once", action="store_true",
                   help="snapshot right after the writes' fsync, not once they are staged")
    p.add_argument("--out", default=str(HERE / "bench/results/ab-incremental.json"))
    p.add_argument("--work", default=str(HERE / "bench/work/ab-incremental"))
    args = p.parse_args()
    if args.latency is None:
        args.latency = "20ms" if args.store == "local" else "none"
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["SNAPFS_RUNTIME_DIR"] = str(work / "run")  # the daemons', for ``staged`` too
    trees = {rev: tree_of(rev, work) for rev in args.rev}
    with repository(args.store, work, "ab-bench") as repo:
        return measure(args, trees, work, repo)


@contextmanager
def repository(store: str, work: Path, bucket: str) -> Iterator[list[str]]:
    """The CLI's options naming a new repository while the block runs: a directory in WORK,
    or (``s3``) a prefix of ``bucket`` on a SeaweedFS server started on 127.0.0.1 for the
    block and stopped by its pid after it."""
    if store != "s3":
        yield ["-r", tempfile.mkdtemp(prefix="repo-", dir=work)]
        return
    from snapfs.testing.seaweedfs import SeaweedServer

    server = SeaweedServer(tempfile.mkdtemp(prefix="seaweed-", dir=work))
    server.start()
    try:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "snapfsbench")  # (any identity will do)
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "snapfsbench-secret")
        yield ["-r", f"s3://{bucket}/{os.getpid()}", "--endpoint-url", server.endpoint_url]
    finally:
        server.stop()


def measure(args: argparse.Namespace, trees: dict[str, Path], work: Path, repo: list[str],
            ) -> int:
    image = work / "s0.img"
    with open(image, "wb") as f:
        f.write(random.Random(0).randbytes(64 << 20))
        f.truncate(256 << 20)
    env = {**os.environ, "PYTHONPATH": str(trees[args.rev[-1]])}
    run([PYTHON, "-m", "snapfs", *repo, "init"], env)
    run([PYTHON, "-m", "snapfs", *repo, "snapshot", "create", str(image), "--name", "s0"], env)
    rounds: list[dict[str, Any]] = []
    for n in range(args.cycles):
        for i, rev in enumerate(args.rev):
            rounds += cycle(rev, trees[rev], work, repo, args, n, seed=n * len(args.rev) + i)
    medians = {}
    for rev in args.rev:
        mine = [r for r in rounds if r["rev"] == rev]
        medians[rev] = {
            "wall_seconds": statistics.median(r["wall_seconds"] for r in mine),
            "daemon_seconds": statistics.median(r["daemon_seconds"] for r in mine),
            "steps": {k: statistics.median(r["timings"].get(k, 0.0) for r in mine)
                      for k in mine[0]["timings"]},
            "rounds": len(mine)}
    first, last = args.rev[0], args.rev[-1]
    doc = {"benchmark": "ab-incremental", "config": vars(args),
           "commits": {rev: tree.name for rev, tree in trees.items()},
           "machine": {"cores": os.cpu_count()}, "rounds": rounds, "medians": medians,
           "ratio_wall": round(medians[last]["wall_seconds"] / medians[first]["wall_seconds"], 3),
           "ratio_daemon": round(medians[last]["daemon_seconds"]
                                 / medians[first]["daemon_seconds"], 3)}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(medians, indent=1))
    print(f"{last} / {first}: wall {doc['ratio_wall']}, daemon {doc['ratio_daemon']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
