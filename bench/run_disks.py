#!/usr/bin/env python3
"""Benchmark runner for writable disks: incremental snapshots from changed-block tracking,
foreground writes during an upload, and rollback, each beside its reference.

    .venv/bin/python bench/run_disks.py [--runs 3] [--stores local,s3] [--size 1G --data 725M]
        [--write-size 256M] [--write-rounds 3] [--rollback-blocks 2000] [--busy-cores 0]
        [--out bench/results/disks.json]
        [--work bench/work/disks] [--base-dir bench/work/snapshot]

Set-up, once per store: the realistic ext4 image (``tools/make-image``, cached in
``--base-dir``, shared with ``run_snapshot.py``) is snapshotted as ``s0`` into a fresh snapfs
repository and backed up by restic into a restic repository (``restic backup`` of the image
file at a fixed path, so that later backups of that path are restic's incremental ones); then
``snapfs mount`` (local store: a directory; s3: one SeaweedFS server on loopback).

Every run, for every store:

1. At once: ``disk create dN-now --from s0``; ``tools/change-image MNT/disks/dN-now.img --seed
   100+N`` changes about 1% of the file data through the filesystem (loop-mounted from the disk
   image, as a user's system would); page cache dropped; ``snapshot create --disk dN-now
   --json`` at once, timed from the command's start to its end (closing, reading and
   compressing the changed blocks, upload, manifest). Only what the daemon staged while the
   change was still being written is ready ahead (the JSON counts it).
2. Staged: ``disk create dN --from s0``, the same kind of change with ``--seed N`` (other data,
   so none of it is in the repository yet); the benchmark waits (on the daemon's socket) until
   the daemon has staged every changed block (read, hashed and compressed them ahead, as it
   does while a disk is quiet) and records that wait; page cache dropped; ``snapshot create
   --disk dN --json``, timed. This is the figure a scheduled snapshot sees.
3. The disk's bytes are copied to a local file (the correctness guard: ``export`` of the new
   snapshot must have the same sha256), then, beside it:
   - a full snapshot of the same disk: ``snapshot create COPY`` into a fresh repository on the
     same store (page cache dropped first);
   - restic: the copy is put at the path restic backed up at set-up and ``restic backup`` runs
     again (page cache dropped first): restic's incremental backup of the same change.

Local store only (they measure the host, not the store), every run:

4. Foreground writes: a disk made from ``s0`` with room to spare (``--size`` grown by 4 times
   ``--write-size``, ``resize2fs``), its ext4 loop-mounted; ``--write-size`` of random data
   written, one unmeasured fio run (its file deleted, so that the measured runs all write
   blocks the filesystem freed before, as a disk in use does), and a snapshot (so nothing is
   left to upload). Then ``fio`` writes ``--write-size`` of new data sequentially (1 MiB
   writes, fsync at the end) alone, and ``--write-rounds`` times: fio's data snapshotted;
   another ``--write-size`` of random data written; ``snapshot create --no-wait`` closes a
   snapshot of it; the same fio job runs while that uploads (the benchmark then waits for the
   upload on the daemon's socket, starting no process meanwhile); the random file is deleted,
   fio's data snapshotted, and the same fio job runs alone again. Each round's ratio is fio
   during the upload over the mean of the runs alone just before and just after it (the same
   job alone has measured 72 and 287 MiB/s within one benchmark here); the table gives the
   median over every round of every run, and the range. The upload's time is recorded so the
   overlap can be checked.
5. Rollback: a 1 GiB disk and a 100 GiB disk made from ``s0`` (in odd runs the 1 GiB disk
   first, in even runs the 100 GiB one: the first follows the writeback of the fio rounds),
   the same ``--rollback-blocks`` scattered blocks written to each (with fsync);
   ``disk rollback NAME s0 --yes --json``,
   timed (the command, and the daemon's own time from its reply); the written blocks must read
   back as ``s0``'s bytes afterwards.

``--busy-cores N`` runs N processes that spin on the CPU (at normal priority) for the whole
benchmark, each ended by its pid: a machine whose other work wants the CPU too, where what a
snapshot's upload takes from the foreground shows most.

Nothing asserts on a time: the machine is shared, so the JSON keeps every raw figure and the
load averages, and the table is medians. Cleanup, always (``finally``): ext4 mounts, loop
devices, snapfs mounts (``snapfs umount``), SeaweedFS (by its pid).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import restic_peer as rp  # noqa: E402  (a sibling module, not a package)
import run_snapshot as rs  # noqa: E402
from run_mount import cpu_seconds  # noqa: E402

if TYPE_CHECKING:
    from snapfs.control import RunFiles

SNAPFS = [str(ROOT / ".venv" / "bin" / "snapfs")]
CHANGE_IMAGE = ROOT / "tools" / "change-image"
MIB = 1 << 20
BLOCK = 16384


@dataclass(frozen=True)
class Config:
    runs: int
    stores: tuple[str, ...]
    size: int
    data: int
    write_size: int
    rollback_blocks: int
    write_rounds: int
    out: Path
    work: Path
    base_dir: Path
    busy_cores: int = 0


say = rs.say


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return rs.run_tool([str(c) for c in cmd], env)


def sha256(path: Path) -> str:
    return rs.sha256_file(path)


class Bench:
    def __init__(self, cfg: Config, store: rs.Store) -> None:
        self.cfg = cfg
        self.store = store
        self.env = rs.snapfs_env(store)
        self.env["SNAPFS_RUNTIME_DIR"] = str(cfg.work / "run")
        os.environ["SNAPFS_RUNTIME_DIR"] = self.env["SNAPFS_RUNTIME_DIR"]  # wait_for_task
        self.repo = store.snapfs_repo(0, BLOCK)
        self.mnt = store.run_dir / "mnt"
        self.cache = store.run_dir / "cache"
        self.fs = store.run_dir / "fs"
        self._loops: list[str] = []

    def snapfs(self, *args: Any) -> subprocess.CompletedProcess[str]:
        return run([*self.store.snapfs_args(self.repo), *map(str, args)], self.env)

    def snapfs_json(self, *args: Any) -> Any:
        return json.loads(self.snapfs(*args, "--json").stdout)

    def disk_path(self, name: str) -> Path:
        return self.mnt / "disks" / f"{name}.img"

    @contextlib.contextmanager
    def mounted(self) -> Iterator[None]:
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.snapfs("mount", self.mnt, "--cache-dir", self.cache, "--cache-size", "8G")
        try:
            yield
        finally:
            for _ in range(20):
                proc = subprocess.run([*SNAPFS, "umount", str(self.mnt)], env=self.env,
                                      capture_output=True, text=True)
                if proc.returncode == 0:
                    break
                time.sleep(0.5)
            else:
                say(f"warning: snapfs umount {self.mnt}: {proc.stderr.strip()}")

    @contextlib.contextmanager
    def ext4(self, image: Path) -> Iterator[Path]:
        loop = run(["losetup", "-f", "--show", image]).stdout.strip()
        self.fs.mkdir(parents=True, exist_ok=True)
        try:
            run(["mount", loop, self.fs])
            try:
                yield self.fs
            finally:
                run(["umount", self.fs])
        finally:
            run(["losetup", "-d", loop])


def timed(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    proc = run(cmd, env)
    return proc, time.perf_counter() - start


def fio_write(directory: Path, size: int, name: str) -> dict[str, Any]:
    target = directory / name
    proc = run(["fio", "--name=fg", f"--filename={target}", "--rw=write", "--bs=1M",
                f"--size={size}", "--ioengine=psync", "--end_fsync=1", "--output-format=json"])
    job = json.loads(proc.stdout)["jobs"][0]["write"]
    target.unlink()
    return {"bytes": job["io_bytes"], "seconds": job["runtime"] / 1000,
            "mib_per_s": job["bw_bytes"] / MIB}


def write_random_file(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(rng.randbytes(MIB))
        f.flush()
        os.fsync(f.fileno())


def one_run(b: Bench, n: int, base: Path, restic_path: Path, writes: bool) -> dict[str, Any]:
    store = b.store
    out: dict[str, Any] = {"load_before": os.getloadavg()}
    # right after the change: the daemon had no time to stage anything ahead
    first = f"d{n}-now"
    b.snapfs("disk", "create", first, "--from", "s0")
    say(f"[{store.name} run {n}] changing 1% of {first} through its filesystem")
    run([sys.executable, CHANGE_IMAGE, b.disk_path(first), "--seed", 100 + n])
    rp.drop_caches()
    out["incremental_now"], _snap = incremental(b, first)
    b.snapfs("disk", "delete", first)
    # the measured one: the same kind of change (another seed, so that nothing of it is in the
    # repository yet), then the snapshot once the daemon has staged the change (as a scheduled
    # snapshot finds it); the wait is recorded, not timed into the snapshot
    disk = f"d{n}"
    b.snapfs("disk", "create", disk, "--from", "s0")
    say(f"[{store.name} run {n}] changing 1% of {disk} through its filesystem")
    run([sys.executable, CHANGE_IMAGE, b.disk_path(disk), "--seed", n])
    settled = wait_staged(b, disk)
    rp.drop_caches()
    out["incremental"], snap = incremental(b, disk)
    out["incremental"]["staging_seconds"] = settled
    copy = store.run_dir / "changed.img"
    run(["cp", "--sparse=always", b.disk_path(disk), copy])
    exported = store.run_dir / "export.img"
    b.snapfs("export", snap["id"], exported)
    if sha256(exported) != sha256(copy):
        raise rs.BenchError(f"export of {snap['name']} differs from the disk it was taken of")
    exported.unlink()
    # the full snapshot of the same disk, into a fresh repository
    full_repo = store.snapfs_repo(n, BLOCK)
    store.remove(full_repo)
    rs.snapfs_init(store, full_repo, BLOCK)
    proc, full_wall, _cpu = rs.timed([*store.snapfs_args(full_repo), "snapshot", "create",
                                      str(copy), "--json"], b.env)
    full = json.loads(proc.stdout)
    out["full"] = {"seconds": full_wall, "bytes_uploaded": full["bytes_uploaded"]}
    store.remove(full_repo)
    say(f"[{store.name} run {n}] full: {full_wall:.2f} s")
    # restic, incremental after the same change (same path as its set-up backup)
    shutil.copyfile(copy, restic_path)
    restic = rp.restic_backup(restic_path, store.restic_repo(0), store.restic_env())
    out["restic_incremental"] = {"seconds": restic["seconds"],
                                 "stored_bytes_added": restic["stored_bytes_added"]}
    say(f"[{store.name} run {n}] restic incremental: {restic['seconds']:.2f} s")
    shutil.copyfile(base, restic_path)  # the next run's change starts from s0 again
    rp.restic_backup(restic_path, store.restic_repo(0), store.restic_env(), count_objects=False)
    copy.unlink()
    if writes:
        out["writes"] = foreground_writes(b, n)
        out["rollback"] = rollback(b, n)
    b.snapfs("disk", "delete", disk)
    out["load_after"] = os.getloadavg()
    return out


def incremental(b: Bench, disk: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``snapshot create --disk DISK``, timed from the command's start to its end."""
    proc, seconds = timed([*b.store.snapfs_args(b.repo), "snapshot", "create", "--disk", disk,
                           "--json"], b.env)
    snap = json.loads(proc.stdout)["parts"][0]["snapshot"]
    say(f"[{b.store.name}] incremental of {disk}: {seconds:.2f} s, {snap['blocks_read']} blocks"
        f" read, {snap.get('blocks_staged', 0)} of them staged ahead")
    return {"seconds": seconds, "daemon_seconds": snap["seconds"],
            "blocks_read": snap["blocks_read"], "blocks_staged": snap.get("blocks_staged", 0),
            "blocks_changed": snap["blocks_changed"], "blocks_uploaded": snap["blocks_uploaded"],
            "bytes_uploaded": snap["bytes_uploaded"], "pages_written": snap["pages_written"],
            "daemon_timings": snap.get("timings", {})}, snap


def wait_staged(b: Bench, disk: str, limit: float = 30.0) -> float:
    """Seconds from now until the daemon has staged every changed block of ``disk`` (at most
    ``limit``), polling its socket (no process per poll)."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        listed = disk_counters(b, disk)
        if listed["blocks_staged_now"] >= listed["blocks_changed"]:
            break
        time.sleep(0.1)
    return time.perf_counter() - started


def foreground_writes(b: Bench, n: int) -> dict[str, Any]:
    """fio alone and fio while a snapshot uploads, in alternation, on a disk of ``s0`` grown
    to have room: alone, then ``--write-rounds`` times (during an upload, alone)."""
    size = b.cfg.write_size
    disk = f"w{n}"
    b.snapfs("disk", "create", disk, "--from", "s0", "--size", b.cfg.size + 4 * size)
    check = subprocess.run(["e2fsck", "-f", "-y", str(b.disk_path(disk))], capture_output=True,
                           text=True)
    if check.returncode not in (0, 1):
        raise rs.BenchError(f"e2fsck of {disk} failed: {check.stdout}{check.stderr}")
    run(["resize2fs", b.disk_path(disk)])
    rounds: list[dict[str, Any]] = []
    with b.ext4(b.disk_path(disk)) as fs:
        write_random_file(fs / f"before-{n}.dat", size, seed=n)
        run(["sync"])
        # a first fio run whose file is deleted, so that every measured run writes the same
        # kind of blocks (freed by an earlier file, as on a disk in use), none never-written
        fio_write(fs, size, "warmup.dat")
        b.snapfs("snapshot", "create", "--disk", disk)  # nothing left to upload
        alone = fio_write(fs, size, "alone.dat")
        for k in range(b.cfg.write_rounds):
            upload_file = fs / f"upload-{n}-{k}.dat"
            b.snapfs("snapshot", "create", "--disk", disk)  # fio's data: nothing left to upload
            write_random_file(upload_file, size, seed=100 * n + k)
            run(["sync"])
            started = time.perf_counter()
            task = b.snapfs_json("snapshot", "create", "--disk", disk, "--no-wait")  # closed
            closed = time.perf_counter() - started
            before = daemon_figures(b, disk)
            during = fio_write(fs, size, "during.dat")
            fio_end = time.perf_counter() - started
            during["daemon"] = daemon_figures(b, disk, since=before)
            cowed = during["daemon"]["blocks_copied_on_write"]
            task = wait_for_task(b.repo, task["id"])
            upload = time.perf_counter() - started
            if task["state"] != "accomplished":
                raise rs.BenchError(f"snapshot during writes ended {task['state']}: "
                                    f"{task['reason']}")
            upload_file.unlink()  # room for the next round
            b.snapfs("snapshot", "create", "--disk", disk)  # nothing left to upload
            before = daemon_figures(b, disk)
            after = fio_write(fs, size, "alone.dat")
            after["daemon"] = daemon_figures(b, disk, since=before)
            reference = (alone["mib_per_s"] + after["mib_per_s"]) / 2
            rounds.append({"alone_before": alone, "during": during, "alone_after": after,
                           "closing_seconds": closed, "blocks_copied_on_write_during": cowed,
                           "during_snapshot_seconds": upload, "fio_finished_at": fio_end,
                           "upload_blocks": task["parts"][0]["blocks"],
                           "ratio": during["mib_per_s"] / reference})
            say(f"[writes run {n}.{k + 1}] alone {alone['mib_per_s']:.0f} and "
                f"{after['mib_per_s']:.0f} MiB/s, during an upload {during['mib_per_s']:.0f}"
                f" MiB/s (upload {upload:.1f} s, fio {during['seconds']:.1f} s, {cowed} blocks "
                f"copied on write; the daemon during / after: "
                f"{during['daemon']['mean_write_bytes'] >> 10} / "
                f"{after['daemon']['mean_write_bytes'] >> 10} KiB a write, "
                f"{during['daemon']['cpu_seconds']:.2f} / {after['daemon']['cpu_seconds']:.2f} "
                "CPU s)")
            alone = after
    b.snapfs("disk", "delete", disk)
    alones = [rounds[0]["alone_before"]["mib_per_s"]] + [r["alone_after"]["mib_per_s"]
                                                         for r in rounds]
    return {"rounds": rounds, "alone_mib_s": median(alones),
            "during_mib_s": median([r["during"]["mib_per_s"] for r in rounds]),
            "ratio": median([r["ratio"] for r in rounds])}


def daemon_figures(b: Bench, disk: str, since: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """The disk's counters (writes and bytes the kernel sent, fsyncs, blocks copied on write)
    and the daemon's CPU seconds, or their growth ``since`` an earlier call: what a fio job
    cost the daemon, to tell a slow round's cause."""
    from snapfs.control import find_repository_daemon

    files = find_repository_daemon(b.repo)
    counters = disk_counters(b, disk, files)
    out: dict[str, Any] = {k: counters[k] for k in ("writes", "bytes_written", "fsyncs",
                                                    "blocks_copied_on_write")}
    out["cpu_seconds"] = cpu_seconds(int(Path(files.pid_file).read_text()))
    if since is not None:
        out = {k: round(v - since[k], 3) for k, v in out.items()}
        out["mean_write_bytes"] = out["bytes_written"] // max(1, out["writes"])
    return out


def disk_counters(b: Bench, disk: str, files: RunFiles | None = None) -> dict[str, Any]:
    """The daemon's figures for ``disk``, asked on its socket (no process started; ``files``:
    the daemon's, if the caller has found them already)."""
    from snapfs.control import find_repository_daemon, request

    disks = request(files or find_repository_daemon(b.repo), {"op": "disk-list"})["disks"]
    found: dict[str, Any] = next(d for d in disks if d["name"] == disk)
    return found


def wait_for_task(repo: str, task_id: str) -> dict[str, Any]:
    """Wait on the daemon's socket (no process per poll: fio is being measured meanwhile)."""
    from snapfs.control import find_repository_daemon, request

    files = find_repository_daemon(repo)
    while True:
        task: dict[str, Any] = request(files, {"op": "task", "id": task_id, "wait": 5})["task"]
        if task["state"] != "progressing":
            return task


def rollback(b: Bench, n: int) -> dict[str, Any]:
    rng = random.Random(1000 + n)
    nblocks = b.cfg.size // BLOCK
    blocks = sorted(rng.sample(range(nblocks), b.cfg.rollback_blocks))
    s0 = b.store.run_dir / "s0.img"
    out: dict[str, Any] = {}
    sizes = [("1G", None), ("100G", "100G")]
    if n % 2 == 0:  # the first one follows the fio rounds' writeback: take turns being it
        sizes.reverse()
    for label, size in sizes:
        name = f"rb{n}-{label}"
        args = ["disk", "create", name, "--from", "s0"] + (["--size", size] if size else [])
        b.snapfs(*args)
        path = b.disk_path(name)
        fd = os.open(path, os.O_WRONLY)
        try:
            for blk in blocks:
                os.pwrite(fd, rng.randbytes(BLOCK), blk * BLOCK)
            os.fsync(fd)
        finally:
            os.close(fd)
        proc, wall = timed([*b.store.snapfs_args(b.repo), "disk", "rollback", name, "s0",
                            "--yes", "--json"], b.env)
        reply = json.loads(proc.stdout)
        with open(path, "rb") as disk, open(s0, "rb") as ref:
            for blk in blocks:
                disk.seek(blk * BLOCK)
                ref.seek(blk * BLOCK)
                if disk.read(BLOCK) != ref.read(BLOCK):
                    raise rs.BenchError(f"{name}: block {blk} differs from s0 after rollback")
        b.snapfs("disk", "delete", name)
        out[label] = {"seconds": wall, "daemon_seconds": reply["seconds"],
                      "blocks_reset": reply["blocks_reset"]}
        say(f"[rollback run {n}] {label}: {wall:.3f} s (daemon {reply['seconds']:.4f} s, "
            f"{reply['blocks_reset']} blocks reset)")
    return out


def bench_store(cfg: Config, store: rs.Store, base: Path) -> dict[str, Any]:
    b = Bench(cfg, store)
    shutil.rmtree(store.run_dir, ignore_errors=True)
    store.run_dir.mkdir(parents=True)
    store.remove(b.repo)
    rs.snapfs_init(store, b.repo, BLOCK)
    b.snapfs("snapshot", "create", base, "--name", "s0", "--disk", "base")
    shutil.copyfile(base, store.run_dir / "s0.img")
    restic_path = store.run_dir / "restic" / "disk.img"
    restic_path.parent.mkdir()
    shutil.copyfile(base, restic_path)
    store.remove(store.restic_repo(0))
    rp.restic_init(store.restic_repo(0), store.restic_env())
    rp.restic_backup(restic_path, store.restic_repo(0), store.restic_env(), count_objects=False)
    runs = []
    with b.mounted():
        for n in range(1, cfg.runs + 1):
            runs.append(one_run(b, n, base, restic_path, writes=store.name == "local"))
    store.remove(b.repo)
    store.remove(store.restic_repo(0))
    shutil.rmtree(store.run_dir, ignore_errors=True)
    return {"runs": runs}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarize(doc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for store, result in doc["stores"].items():
        runs = result["runs"]
        s: dict[str, Any] = {
            "incremental_seconds": median([r["incremental"]["seconds"] for r in runs]),
            "incremental_daemon_seconds": median([r["incremental"]["daemon_seconds"]
                                                  for r in runs]),
            "incremental_blocks_read": median([r["incremental"]["blocks_read"] for r in runs]),
            "incremental_bytes_uploaded": median([r["incremental"]["bytes_uploaded"] for r in runs]),
            "incremental_staged_blocks": median([r["incremental"]["blocks_staged"] for r in runs]),
            "staging_seconds": median([r["incremental"]["staging_seconds"] for r in runs]),
            "incremental_now_seconds": median([r["incremental_now"]["seconds"] for r in runs]),
            "incremental_now_daemon_seconds": median([r["incremental_now"]["daemon_seconds"]
                                                      for r in runs]),
            "full_seconds": median([r["full"]["seconds"] for r in runs]),
            "restic_incremental_seconds": median([r["restic_incremental"]["seconds"] for r in runs]),
        }
        s["incremental_to_full"] = median([r["incremental"]["seconds"] / r["full"]["seconds"]
                                           for r in runs])
        s["restic_to_incremental"] = median([r["restic_incremental"]["seconds"]
                                             / r["incremental"]["seconds"] for r in runs])
        s["incremental_now_to_full"] = median([r["incremental_now"]["seconds"]
                                               / r["full"]["seconds"] for r in runs])
        s["restic_to_incremental_now"] = median([r["restic_incremental"]["seconds"]
                                                 / r["incremental_now"]["seconds"] for r in runs])
        if all("writes" in r for r in runs):
            s["write_alone_mib_s"] = median([r["writes"]["alone_mib_s"] for r in runs])
            s["write_during_mib_s"] = median([r["writes"]["during_mib_s"] for r in runs])
            s["write_ratio"] = median([round_["ratio"] for r in runs
                                       for round_ in r["writes"]["rounds"]])
            s["write_ratio_range"] = [min(round_["ratio"] for r in runs
                                          for round_ in r["writes"]["rounds"]),
                                      max(round_["ratio"] for r in runs
                                          for round_ in r["writes"]["rounds"])]
            for label in ("1G", "100G"):
                s[f"rollback_{label}_seconds"] = median([r["rollback"][label]["seconds"]
                                                         for r in runs])
                s[f"rollback_{label}_daemon_seconds"] = median(
                    [r["rollback"][label]["daemon_seconds"] for r in runs])
            s["rollback_100G_to_1G"] = median([r["rollback"]["100G"]["daemon_seconds"]
                                               / r["rollback"]["1G"]["daemon_seconds"]
                                               for r in runs])
        out[store] = s
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["| figure | store | snapfs | reference | ratio | aim |",
             "| --- | --- | --- | --- | --- | --- |"]
    for store, s in summary.items():
        lines.append(f"| incremental snapshot after 1% change (staged, {s['staging_seconds']:.1f} s"
                     f" after the writes) | {store} | "
                     f"{s['incremental_seconds']:.2f} s | full {s['full_seconds']:.2f} s | "
                     f"{s['incremental_to_full']:.3f} | < 0.05 |")
        lines.append(f"| incremental snapshot at once after the writes (nothing staged) | {store} | "
                     f"{s['incremental_now_seconds']:.2f} s (daemon "
                     f"{s['incremental_now_daemon_seconds']:.2f} s) | full {s['full_seconds']:.2f} s"
                     f" | {s['incremental_now_to_full']:.3f} | < 0.05 |")
        lines.append(f"| incremental, upload alone (daemon) | {store} | "
                     f"{s['incremental_daemon_seconds']:.2f} s | full {s['full_seconds']:.2f} s | "
                     f"{s['incremental_daemon_seconds'] / s['full_seconds']:.3f} | < 0.05 |")
        lines.append(f"| incremental snapshot after 1% change (staged) | {store} | "
                     f"{s['incremental_seconds']:.2f} s | restic {s['restic_incremental_seconds']:.2f} s"
                     f" | {s['restic_to_incremental']:.1f}x faster | >= 10x |")
        lines.append(f"| incremental snapshot at once after the writes | {store} | "
                     f"{s['incremental_now_seconds']:.2f} s | restic "
                     f"{s['restic_incremental_seconds']:.2f} s"
                     f" | {s['restic_to_incremental_now']:.1f}x faster | >= 10x |")
        if "write_ratio" in s:
            lines.append(f"| fio write during an upload | {store} | {s['write_during_mib_s']:.0f} MiB/s"
                         f" | alone {s['write_alone_mib_s']:.0f} MiB/s | {s['write_ratio']:.2f} "
                         f"({s['write_ratio_range'][0]:.2f}-{s['write_ratio_range'][1]:.2f}) |"
                         " >= 0.90 |")
            lines.append(f"| rollback, same blocks changed | {store} | 100 GiB "
                         f"{s['rollback_100G_daemon_seconds'] * 1000:.1f} ms "
                         f"({s['rollback_100G_seconds']:.2f} s with the CLI) | 1 GiB "
                         f"{s['rollback_1G_daemon_seconds'] * 1000:.1f} ms "
                         f"({s['rollback_1G_seconds']:.2f} s) | {s['rollback_100G_to_1G']:.2f} |"
                         " about 1 |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--stores", default="local,s3")
    p.add_argument("--size", type=rs.parse_size, default=rs.parse_size("1G"))
    p.add_argument("--data", type=rs.parse_size, default=rs.parse_size("725M"))
    p.add_argument("--write-size", type=rs.parse_size, default=rs.parse_size("256M"))
    p.add_argument("--rollback-blocks", type=int, default=2000)
    p.add_argument("--write-rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "disks.json")
    p.add_argument("--work", type=Path, default=BENCH / "work" / "disks")
    p.add_argument("--base-dir", type=Path, default=BENCH / "work" / "snapshot")
    p.add_argument("--busy-cores", type=int, default=0)
    a = p.parse_args(argv)
    stores = tuple(s for s in a.stores.split(",") if s)
    return Config(a.runs, stores, a.size, a.data, a.write_size, a.rollback_blocks,
                  a.write_rounds, a.out, a.work.resolve(), a.base_dir.resolve(), a.busy_cores)


@contextlib.contextmanager
def busy_cores(n: int) -> Iterator[None]:
    """``n`` processes spinning on the CPU meanwhile, ended by their pids."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(n)]
    try:
        yield
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if os.geteuid() != 0:
        print("run_disks.py needs root (loop devices, mounts, dropping caches)", file=sys.stderr)
        return 1
    cfg.work.mkdir(parents=True, exist_ok=True)
    rs.compile_snapfs()
    snap_cfg = rs.BenchConfig(runs=1, stores=cfg.stores, size=cfg.size, data=cfg.data,
                              block_sizes=(BLOCK,), out=cfg.out, work=cfg.base_dir, keep=False)
    base, _ = rs.base_image(snap_cfg)
    doc: dict[str, Any] = {"config": {k: str(v) for k, v in cfg.__dict__.items()},
                           "machine": {"cpu": rs.cpu_model(), "cores": os.cpu_count()},
                           "versions": rs.versions(), "stores": {}}
    seaweed_cfg = rs.BenchConfig(runs=1, stores=cfg.stores, size=cfg.size, data=cfg.data,
                                 block_sizes=(BLOCK,), out=cfg.out, work=cfg.work, keep=False)
    with (tempfile.TemporaryDirectory(dir=cfg.work), rs.seaweed(seaweed_cfg) as endpoint,
          busy_cores(cfg.busy_cores)):
        for name in cfg.stores:
            store = rs.Store(name, cfg.work / f"store-{name}",
                             endpoint if name == "s3" else None)
            doc["stores"][name] = bench_store(cfg, store, base)
    doc["summary"] = summarize(doc)
    doc["table"] = table(doc["summary"])
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(doc["table"])
    say(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
