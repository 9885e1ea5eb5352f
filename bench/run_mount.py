#!/usr/bin/env python3
"""Benchmark runner for the lazy mount: ``snapfs mount`` beside restic and raw store reads.

    .venv/bin/python bench/run_mount.py [--runs 3] [--stores s3,local] [--size 1G --data 725M]
        [--latency 20ms] [--random-reads 200] [--out bench/results/mount.json]
        [--work bench/work/mount] [--base-dir bench/work/snapshot]

Set-up, once per benchmark: the realistic ext4 image (``tools/make-image``, cached in
``--base-dir`` as ``base-S-D.img``, shared with ``run_snapshot.py``) is snapshotted (``--name
disk``) into a snapfs repository on every store, and backed up by restic into a restic
repository beside it; a 100 GiB sparse image with 4 MiB of random data at each of 5 offsets is
snapshotted (``--name sparse``) into a second snapfs repository per store. The stores: ``s3``,
one SeaweedFS server on loopback (stopped in ``finally``); ``local``, a directory, which snapfs
mounts with ``--simulate-latency 20ms`` (restic reads its local repository directly: it has no
such option, so its local figures carry no added latency).

Every run then measures, for every store (all figures in README.md of this directory):

- time to first file: fresh ``--cache-dir``, page cache dropped, then ``snapfs mount`` +
  ``losetup -f --show -r MNT/snapshots/disk.img`` + ``mount -o ro,noload`` + read of one small
  file of the image (chosen once: the middle one, in sorted path order, of the files of
  16-64 KiB), with background hydration on (the default) and, for information, off; beside
  ``restic restore`` of the image + loop mount + the same read, and ``restic mount`` + loop
  mount of the image file inside it + the same read (fresh restic cache each time);
- bytes fetched from the store for that file (``stats``: hydrator ``bytes_fetched``);
- cold 4 KiB random reads (``--no-background``, fresh cache): latency of ``--random-reads``
  preads at 4 KiB-aligned offsets inside distinct non-zero blocks, beside ranged GETs of the
  same blobs made directly on the store (boto3 for S3; ``SimulatedStore`` over ``LocalStore``
  for the local store), one at a time;
- cold then warm sequential read of the whole image (``--no-background``, fresh cache, page
  cache dropped before each pass), beside ``restic mount`` (cold) and a trivial pyfuse3
  passthrough of the same image file (``passthrough.py``, page cache dropped too), read right
  after the warm read of each store (and once at the start of each run, for information);
- background hydration of the whole image (default mount; the image is opened as soon as
  the mount is up, as ``losetup`` would: the sweep hydrates the images in use), from ``snapfs
  mount`` until ``stats`` shows no block missing, beside 8 threads doing ranged GETs of the same blobs
  (coalesced like the hydrator's background runs: gaps up to 64 KiB, up to 4 MiB a GET);
- the daemon's RSS: 1 GiB mounted, after reading it; 100 GiB mounted, after reading 100 MiB;
- mount time of the 100 GiB snapshot (``snapfs mount`` start to the image stat-able with its
  size).

Before every snapfs mount the snapshot's access profile (``profiles/ID``, written by the
previous mount's clean shutdown) is deleted from the repository, so that every mount is a first
mount (no hints). Bytes read through any mount are checked (xxh3 of the whole image, sha256 of
the small file); a mismatch aborts the benchmark. Nothing asserts on a time: the machine is
shared, so the JSON keeps every raw figure and the load averages, and the table is medians.

Cleanup, always (``finally``): ext4 and loop mounts, loop devices, snapfs mounts (``snapfs
umount``), restic mounts and the passthrough (unmounted, then their pids signalled), SeaweedFS
(by its pid). Only processes this script started are ever signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import restic_peer as rp  # noqa: E402  (a sibling module, not a package)
import run_snapshot as rs  # noqa: E402
import xxhash  # noqa: E402

SNAPFS = rs.SNAPFS
#: how snapfs is run: the venv's command, or (--tree) a launcher that imports a frozen copy
SNAPFS_CMD: list[str] = [str(SNAPFS)]
PYTHON = ROOT / ".venv" / "bin" / "python"
PASSTHROUGH = BENCH / "passthrough.py"
ACCESS_KEY = rs.ACCESS_KEY
SECRET_KEY = rs.SECRET_KEY
RESTIC_PASSWORD = rs.RESTIC_PASSWORD
SNAPFS_BUCKET = "snapfs-mount-bench"
RESTIC_BUCKET = "restic-mount-bench"
MIB = 1 << 20
GIB = 1 << 30
IMAGE_NAME = "disk"
SPARSE_NAME = "sparse"
SPARSE_CHUNK = 4 * MIB
SPARSE_REGIONS = 5
SPARSE_READS = 25  # of SPARSE_CHUNK each: 100 MiB
READ_BUFFER = 1 * MIB
# Waiting for hydration: a stats request costs the daemon a pass over its missing blocks (for
# the ETA; about 40 ms on its trio thread with 48k missing), so poll once a second, and every
# 0.1 s once few are left (then it is cheap): about 1 s of the trio thread per 30 s, +-0.05 s.
POLL = 1.0
POLL_FINE = 0.1
POLL_FINE_BELOW = 2000
say = rs.say
BenchError = rs.BenchError


@dataclass(frozen=True)
class Config:
    runs: int
    stores: tuple[str, ...]
    size: int
    data: int
    latency: str
    random_reads: int
    sparse_size: int
    out: Path
    work: Path
    base_dir: Path
    keep: bool
    tree: str | None = None
    report: Path | None = None

    @property
    def latency_seconds(self) -> float:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)?", self.latency)
        if not m:
            raise SystemExit(f"not a latency: {self.latency}")
        return float(m.group(1)) * (1.0 if m.group(2) == "s" else 1e-3)


# ---- small helpers -------------------------------------------------------------------------


def drop_caches() -> None:
    if not rp.drop_caches():
        raise BenchError("cannot drop the page cache (needs root)")


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, from the mount table (never stats the path, which
    may be a dead FUSE mount)."""
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


def rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    return sum(cpu_times(pid))


def git_commit() -> str:
    """The checkout's commit, with ``-dirty+HASH`` (of ``git diff HEAD -- snapfs``) if snapfs/
    has uncommitted changes, so that a change during a run is seen."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    diff = git("diff", "HEAD", "--", "snapfs")
    return f"{head}-dirty+{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else head


LAUNCHER = """\
import sys
# the venv's editable install would import snapfs from the checkout: use the frozen tree
sys.meta_path[:] = [f for f in sys.meta_path
                    if not type(f).__module__.startswith("__editable__")]
sys.path.insert(0, {tree!r})
from snapfs.cli import main
sys.argv[0] = "snapfs"
main()
"""


def use_tree(ref: str, work: Path) -> str:
    """Export snapfs/ at git ``ref`` to WORK/tree and run every snapfs (commands, daemons and
    this process's own imports) from there, so edits to the checkout during a run cannot
    change what is measured. Returns the commit measured."""
    global SNAPFS_CMD
    tree = fresh_dir(work / "tree")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "snapfs"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    rs.compile_snapfs(tree)
    launcher = tree / "snapfs-launch.py"
    launcher.write_text(LAUNCHER.format(tree=str(tree)))
    SNAPFS_CMD = [str(PYTHON), str(launcher)]
    if any(name == "snapfs" or name.startswith("snapfs.") for name in sys.modules):
        raise BenchError("snapfs was imported before --tree took effect")
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not type(f).__module__.startswith("__editable__")]  # fmt: skip
    sys.path.insert(0, str(tree))
    check = subprocess.run([str(PYTHON), "-c", LAUNCHER.format(tree=str(tree)).replace(
        "from snapfs.cli import main\nsys.argv[0] = \"snapfs\"\nmain()\n",
        "import snapfs\nprint(snapfs.__file__)\n")], capture_output=True, text=True)  # fmt: skip
    if not check.stdout.strip().startswith(str(tree)):
        raise BenchError(f"the frozen tree is not what gets imported: {check.stdout}{check.stderr}")
    return commit


def read_whole(path: Path) -> dict[str, Any]:
    """Read a file front to back in 1 MiB reads; seconds, bytes, MiB/s and its xxh3-128."""
    buf = bytearray(READ_BUFFER)
    view = memoryview(buf)
    h = xxhash.xxh3_128()
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
            total += n
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    return {"seconds": seconds, "bytes": total, "mib_s": total / MIB / seconds,
            "xxh3": h.hexdigest()}  # fmt: skip


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return h.hexdigest()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.005,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if alive is not None and not alive():
            raise BenchError(f"gave up waiting for {what}: the process exited")
        if time.monotonic() > deadline:
            raise BenchError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(interval)


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ---- kernel mounts ---------------------------------------------------------------------------


@contextlib.contextmanager
def loop_attached(path: Path) -> Iterator[str]:
    dev = rs.run_tool(["losetup", "-f", "--show", "-r", str(path)]).stdout.strip()
    try:
        yield dev
    finally:
        for attempt in range(20):
            proc = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
            if proc.returncode == 0:
                break
            time.sleep(0.1 * (attempt + 1))
        else:
            say(f"warning: could not detach {dev}: {proc.stderr.strip()}")


@contextlib.contextmanager
def ext4_mounted(dev: str, directory: Path) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rs.run_tool(["mount", "-o", "ro,noload", dev, str(directory)])
    try:
        yield directory
    finally:
        for attempt in range(20):
            proc = subprocess.run(["umount", str(directory)], capture_output=True, text=True)
            if proc.returncode == 0 or not mounted(directory):
                break
            time.sleep(0.1 * (attempt + 1))
        else:
            say(f"warning: could not unmount {directory}: {proc.stderr.strip()}")


def fuse_unmount(directory: Path) -> None:
    """Unmount a FUSE mount this script made (not snapfs's: ``snapfs umount`` does those)."""
    for attempt in range(20):
        if not mounted(directory):
            return
        proc = subprocess.run(["fusermount3", "-u", str(directory)], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        time.sleep(0.1 * (attempt + 1))
    subprocess.run(["fusermount3", "-u", "-z", str(directory)], capture_output=True)


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM the process we started, SIGKILL it if it lingers, and reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- stores ----------------------------------------------------------------------------------


class BotoRanges:
    """Ranged GETs straight from boto3, for the store's own latency and throughput."""

    def __init__(self, endpoint_url: str, bucket: str, prefix: str, pool: int = 16) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.bucket = bucket
        self.base = f"{prefix.strip('/')}/" if prefix else ""
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=BotoConfig(max_pool_connections=pool, s3={"addressing_style": "path"}))  # fmt: skip

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        reply = self.client.get_object(Bucket=self.bucket, Key=self.base + key,
                                       Range=f"bytes={offset}-{offset + length - 1}")  # fmt: skip
        data: bytes = reply["Body"].read()
        return data

    def close(self) -> None:
        self.client.close()


@dataclass
class Target:
    """One store: its snapfs repositories (image and sparse), its restic repository."""

    name: str  # "s3" or "local"
    work: Path
    endpoint_url: str | None
    latency: float | None  # snapfs --simulate-latency (seconds), local only
    latency_text: str | None

    @property
    def snapfs_repo(self) -> str:
        return (
            f"s3://{SNAPFS_BUCKET}/image" if self.name == "s3" else str(self.work / "snapfs-image")
        )

    @property
    def sparse_repo(self) -> str:
        return (
            f"s3://{SNAPFS_BUCKET}/sparse"
            if self.name == "s3"
            else str(self.work / "snapfs-sparse")
        )

    @property
    def restic_repo(self) -> str:
        if self.name == "s3":
            assert self.endpoint_url is not None
            return rp.s3_repo_url(self.endpoint_url, RESTIC_BUCKET, "image")
        return str(self.work / "restic-image")

    def snapfs_args(self, repo: str) -> list[str]:
        args = [*SNAPFS_CMD, "-r", repo]
        if self.endpoint_url is not None:
            args += ["--endpoint-url", self.endpoint_url]
        return args

    def mount_options(self) -> list[str]:
        return ["--simulate-latency", self.latency_text] if self.latency_text else []

    def restic_env(self, cache: Path) -> dict[str, str]:
        if self.name == "s3":
            return rp.restic_env(RESTIC_PASSWORD, cache, ACCESS_KEY, SECRET_KEY)
        return rp.restic_env(RESTIC_PASSWORD, cache)

    def open_store(self, repo: str) -> Any:
        """The repository's store, as snapfs opens it (no simulated latency)."""
        from snapfs.store import open_store

        return open_store(repo, self.endpoint_url)

    def reference_store(self, repo: str) -> Any:
        """What the reference GETs go through: boto3 for S3; for the local store, the same
        ``SimulatedStore`` over ``LocalStore`` that ``--simulate-latency`` puts in the daemon."""
        if self.name == "s3":
            assert self.endpoint_url is not None
            bucket, _, prefix = repo[len("s3://") :].partition("/")
            return BotoRanges(self.endpoint_url, bucket, prefix)
        from snapfs.store.local import LocalStore
        from snapfs.store.simulated import SimulatedStore

        return SimulatedStore(LocalStore(repo), self.latency or 0.0)

    def remove_all(self) -> None:
        if self.name == "local":
            for repo in (self.snapfs_repo, self.sparse_repo, self.restic_repo):
                shutil.rmtree(repo, ignore_errors=True)
            return
        assert self.endpoint_url is not None
        for bucket, prefix in ((SNAPFS_BUCKET, "image"), (SNAPFS_BUCKET, "sparse"),
                               (RESTIC_BUCKET, "image")):  # fmt: skip
            rs.delete_s3_prefix(self.endpoint_url, bucket, prefix)


@dataclass
class Facts:
    """What a snapshot holds, read from its repository's index (outside any timing)."""

    snapshot_id: str
    block_size: int
    size: int
    nonzero_positions: int
    first_position: dict[bytes, int]  # unique data block -> its first position in the image
    zero_positions: list[int]  # blocks that are all zeros (answered without any fetch)
    manifest_bytes: int  # stored bytes of the snapshot's block map (its non-zero pages)
    locations: dict[bytes, Any]  # unique data block -> Location
    stored_bytes: int  # sum of the encoded lengths of the image's unique data blocks
    runs: list[tuple[str, int, int]] = field(default_factory=list)  # (pack key, offset, length)


def snapshot_facts(target: Target, repo: str, name: str) -> Facts:
    from snapfs.format.block import ZERO_ID
    from snapfs.repo.repository import Repository, pack_key

    store = target.open_store(repo)
    try:
        repository = Repository.open(store)
        index = repository.load_index()
        root = repository.resolve(name)
        block_map = repository.block_map(index, root)
    finally:
        store.close()
    first: dict[bytes, int] = {}
    zeros: list[int] = []
    nonzero = 0
    for n, bid in enumerate(block_map):
        if bid != ZERO_ID:
            nonzero += 1
            first.setdefault(bid, n)
        else:
            zeros.append(n)
    pages = {bytes.fromhex(h) for h in root.pages} - {ZERO_ID}
    manifest_bytes = sum(index.locate(page).length for page in pages)
    locations = {bid: index.locate(bid) for bid in first}
    # The hydrator's background runs: neighbours in a pack, gaps up to 64 KiB, up to 4 MiB a GET.
    runs: list[tuple[str, int, int]] = []
    by_pack: dict[str, list[Any]] = {}
    for loc in locations.values():
        by_pack.setdefault(loc.pack, []).append(loc)
    for pack, locs in sorted(by_pack.items()):
        locs.sort(key=lambda loc: loc.offset)
        start, end = locs[0].offset, locs[0].offset + locs[0].length
        for loc in locs[1:]:
            if loc.offset - end <= 64 << 10 and loc.offset + loc.length - start <= 4 * MIB:
                end = max(end, loc.offset + loc.length)
            else:
                runs.append((pack_key(pack), start, end - start))
                start, end = loc.offset, loc.offset + loc.length
        runs.append((pack_key(pack), start, end - start))
    return Facts(snapshot_id=root.id, block_size=root.block_size, size=root.size,
                 nonzero_positions=nonzero, first_position=first, zero_positions=zeros,
                 manifest_bytes=manifest_bytes, locations=locations,
                 stored_bytes=sum(loc.length for loc in locations.values()), runs=runs)  # fmt: skip


def delete_profile(target: Target, repo: str, snapshot_id: str) -> None:
    """Forget what earlier mounts read (their access profile), so this mount is a first one."""
    store = target.open_store(repo)
    try:
        store.delete(f"profiles/{snapshot_id}")
    finally:
        store.close()


# ---- snapfs, restic, passthrough mounts -------------------------------------------------------


@dataclass
class SnapfsMount:
    pid: int
    log: Path | None
    command_seconds: float


class Bench:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.work = cfg.work
        self.logs = cfg.work / "logs"
        self.seq = 0

    def _label(self, what: str) -> str:
        self.seq += 1
        return f"{self.seq:03d}-{what}"

    @contextlib.contextmanager
    def snapfs_mounted(self, target: Target, repo: str, mnt: Path, *, background: bool,
                       label: str) -> Iterator[SnapfsMount]:  # fmt: skip
        """``snapfs mount`` with a fresh cache directory; ``snapfs umount`` in finally."""
        cache = fresh_dir(self.work / "cache")
        mnt.mkdir(parents=True, exist_ok=True)
        cmd = [*target.snapfs_args(repo), "mount", str(mnt), "--cache-dir", str(cache),
               *target.mount_options()]  # fmt: skip
        if not background:
            cmd.append("--no-background")
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        log_path: Path | None = None
        try:
            if proc.returncode != 0:
                raise BenchError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                                 f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}")  # fmt: skip
            m = re.search(r"\(pid (\d+), log (.+?)\)\s*$", proc.stdout.strip())
            if m is None:
                raise BenchError(f"cannot find the daemon's pid in: {proc.stdout.strip()}")
            log_path = Path(m.group(2))
            yield SnapfsMount(int(m.group(1)), log_path, seconds)
        finally:
            self._snapfs_umount(mnt)
            if log_path is not None and log_path.exists():
                self.logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(log_path, self.logs / f"{self._label(label)}.log")
            shutil.rmtree(cache, ignore_errors=True)

    def _snapfs_umount(self, mnt: Path) -> None:
        """``snapfs umount``, retried while the kernel still holds the image (a loop device
        lets go of its file a moment after ``losetup -d``)."""
        last = ""
        for attempt in range(20):
            proc = subprocess.run([*SNAPFS_CMD, "umount", str(mnt), "--timeout", "30"],
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode == 0:
                return
            last = proc.stderr.strip()
            if "nothing is mounted" in last and not mounted(mnt):
                return
            time.sleep(0.1 * (attempt + 1))
        say(f"warning: snapfs umount {mnt} kept failing: {last}")

    @contextlib.contextmanager
    def restic_mounted(
        self, target: Target, mnt: Path, image: Path, cache: Path
    ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
        """``restic mount`` in the background; yields once the image file inside it can be
        stat'ed with its full size; unmounts and stops the pid in finally."""
        mnt.mkdir(parents=True, exist_ok=True)
        inside = mnt / "snapshots" / "latest" / str(image).lstrip("/")
        env = {**os.environ, **target.restic_env(cache)}
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{self._label('restic-mount-' + target.name)}.log", "wb")
        proc = subprocess.Popen([rp.restic_binary(), "mount", "--repo", target.restic_repo,
                                 str(mnt)], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
        size = image.stat().st_size

        def ready() -> bool:
            try:
                return os.stat(inside).st_size == size
            except OSError:
                return False

        try:
            wait_for(ready, 120, f"restic mount to show {inside}",
                     alive=lambda: proc.poll() is None)  # fmt: skip
            yield proc, inside
        finally:
            fuse_unmount(mnt)
            stop_pid(proc)
            fuse_unmount(mnt)
            log.close()

    @contextlib.contextmanager
    def passthrough_mounted(self, source: Path, mnt: Path) -> Iterator[Path]:
        mnt.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([str(PYTHON), str(PASSTHROUGH), str(source), str(mnt)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
        inside = mnt / source.name
        try:
            wait_for(lambda: inside.exists(), 30, "the passthrough mount",
                     alive=lambda: proc.poll() is None)  # fmt: skip
            yield inside
        finally:
            stop_pid(proc)
            fuse_unmount(mnt)

    # ---- measurements ------------------------------------------------------------------------

    def read_small_file(self, root: Path, small: dict[str, Any]) -> None:
        data = (root / small["path"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != small["sha256"]:
            raise BenchError(f"wrong bytes: {root / small['path']} is not the file of the image "
                             f"({len(data)} bytes, expected {small['size']})")  # fmt: skip

    def ttff_snapfs(self, target: Target, facts: Facts, small: dict[str, Any],
                    background: bool) -> dict[str, Any]:  # fmt: skip
        delete_profile(target, target.snapfs_repo, facts.snapshot_id)
        mnt, ext4 = self.work / "mnt-snapfs", self.work / "mnt-ext4"
        drop_caches()
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        label = f"ttff-{target.name}-{'bg' if background else 'nobg'}"
        with self.snapfs_mounted(target, target.snapfs_repo, mnt, background=background,
                                 label=label) as m:  # fmt: skip
            t_mount = time.perf_counter()
            with loop_attached(mnt / "snapshots" / f"{IMAGE_NAME}.img") as dev:
                t_loop = time.perf_counter()
                with ext4_mounted(dev, ext4):
                    t_fs = time.perf_counter()
                    self.read_small_file(ext4, small)
                    t_read = time.perf_counter()
                    stats = daemon_stats(mnt)
                    mem = rss(m.pid)
        h = stats["hydrator"]
        return {
            "seconds": t_read - t0,
            "mount_seconds": t_mount - t0,
            "losetup_seconds": t_loop - t_mount,
            "ext4_mount_seconds": t_fs - t_loop,
            "read_seconds": t_read - t_fs,
            "bytes_fetched": h["bytes_fetched"],
            "background_bytes": h["background_bytes"],
            "foreground_bytes": h["bytes_fetched"] - h["background_bytes"],
            "blocks_fetched": h["blocks_fetched"],
            "requests": h["requests"],
            "waiting_reads": h["waiting_reads"],
            "wait_seconds": h["wait_seconds"],
            "fetch_latency_ms_p50": h["fetch_latency_ms_p50"],
            "rss": mem,
            "load1": round(load, 2),
        }

    def ttff_restic_restore(
        self, target: Target, image: Path, small: dict[str, Any]
    ) -> dict[str, Any]:
        restore = fresh_dir(self.work / "restore")
        cache = fresh_dir(self.work / "restic-cache")
        ext4 = self.work / "mnt-ext4"
        env = target.restic_env(cache)
        restored = restore / str(image).lstrip("/")
        drop_caches()
        load = os.getloadavg()[0]
        try:
            t0 = time.perf_counter()
            rp._run_restic(["restore", "latest", "--repo", target.restic_repo, "--target",
                            str(restore)], env)  # fmt: skip
            t_restore = time.perf_counter()
            with loop_attached(restored) as dev:
                with ext4_mounted(dev, ext4):
                    t_fs = time.perf_counter()
                    self.read_small_file(ext4, small)
                    t_read = time.perf_counter()
        finally:
            shutil.rmtree(restore, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
        return {"seconds": t_read - t0, "restore_seconds": t_restore - t0,
                "mount_seconds": t_fs - t_restore, "read_seconds": t_read - t_fs,
                "load1": round(load, 2)}  # fmt: skip

    def ttff_restic_mount(
        self, target: Target, image: Path, small: dict[str, Any]
    ) -> dict[str, Any]:
        cache = fresh_dir(self.work / "restic-cache")
        mnt, ext4 = self.work / "mnt-restic", self.work / "mnt-ext4"
        drop_caches()
        load = os.getloadavg()[0]
        try:
            t0 = time.perf_counter()
            with self.restic_mounted(target, mnt, image, cache) as (_proc, inside):
                t_mount = time.perf_counter()
                with loop_attached(inside) as dev:
                    with ext4_mounted(dev, ext4):
                        t_fs = time.perf_counter()
                        self.read_small_file(ext4, small)
                        t_read = time.perf_counter()
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        return {"seconds": t_read - t0, "mount_seconds": t_mount - t0,
                "loop_mount_seconds": t_fs - t_mount, "read_seconds": t_read - t_fs,
                "load1": round(load, 2)}  # fmt: skip

    def restic_cold_sequential(self, target: Target, image: Path, digest: str) -> dict[str, Any]:
        cache = fresh_dir(self.work / "restic-cache")
        mnt = self.work / "mnt-restic"
        try:
            with self.restic_mounted(target, mnt, image, cache) as (_proc, inside):
                drop_caches()
                load = os.getloadavg()[0]
                r = read_whole(inside)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if r["xxh3"] != digest:
            raise BenchError(f"restic mount gave back other bytes than the image ({r})")
        return {**r, "load1": round(load, 2)}

    def random_reads(self, target: Target, facts: Facts, image: Path, run: int) -> dict[str, Any]:
        """Cold 4 KiB preads in distinct blocks (no background), then the store's own GETs of
        the same blobs."""
        rng = random.Random(run)
        blocks = sorted(facts.first_position.items(), key=lambda kv: kv[1])
        chosen = rng.sample(blocks, min(self.cfg.random_reads, len(blocks)))
        per_block = facts.block_size // 4096
        offsets = [pos * facts.block_size + rng.randrange(per_block) * 4096 for _, pos in chosen]
        zero_offsets = [
            pos * facts.block_size
            for pos in rng.sample(
                facts.zero_positions, min(len(offsets), len(facts.zero_positions))
            )
        ]
        delete_profile(target, target.snapfs_repo, facts.snapshot_id)
        mnt = self.work / "mnt-snapfs"
        drop_caches()
        latencies: list[float] = []
        got: list[bytes] = []
        with self.snapfs_mounted(target, target.snapfs_repo, mnt, background=False,
                                 label=f"random-{target.name}"):  # fmt: skip
            # Opened, the image is in use and the sweep's scan loads every manifest page; let
            # it finish, so that the reads measure block fetches (the scan's end is when stats
            # knows data_blocks).
            fd = os.open(mnt / "snapshots" / f"{IMAGE_NAME}.img", os.O_RDONLY)
            t0 = time.perf_counter()
            try:
                wait_for(lambda: daemon_stats(mnt)["images"][f"{IMAGE_NAME}.img"]["data_blocks"]
                         is not None, 120, "the block-map scan", interval=0.05)  # fmt: skip
            except BaseException:
                os.close(fd)
                raise
            scan_wait = time.perf_counter() - t0
            load = os.getloadavg()[0]
            try:
                for off in offsets:
                    start = time.perf_counter()
                    data = os.pread(fd, 4096, off)
                    latencies.append(time.perf_counter() - start)
                    got.append(data)
                stats = daemon_stats(mnt)
                # The same reads again with the blocks in snapfs's cache (page cache dropped),
                # and reads of zero blocks (no cache, no store): the read path without the GET.
                drop_caches()
                warm = []
                for off in offsets:
                    start = time.perf_counter()
                    os.pread(fd, 4096, off)
                    warm.append(time.perf_counter() - start)
                zero = []
                for off in zero_offsets:
                    start = time.perf_counter()
                    os.pread(fd, 4096, off)
                    zero.append(time.perf_counter() - start)
            finally:
                os.close(fd)
        with open(image, "rb") as f:
            for off, data in zip(offsets, got, strict=True):
                f.seek(off)
                if f.read(4096) != data:
                    raise BenchError(f"wrong bytes at offset {off} of the mounted image")
        # The reference: one ranged GET of each same blob, one at a time, page cache dropped.
        from snapfs.repo.repository import pack_key

        store = target.reference_store(target.snapfs_repo)
        get_latencies: list[float] = []
        try:
            opener = facts.runs[0]
            store.get_range(opener[0], opener[1], 4096)  # open the connection (snapfs's is)
            drop_caches()
            for bid, _pos in chosen:
                loc = facts.locations[bid]
                start = time.perf_counter()
                data = store.get_range(pack_key(loc.pack), loc.offset, loc.length)
                get_latencies.append(time.perf_counter() - start)
                if len(data) != loc.length:
                    raise BenchError("short GET from the store")
        finally:
            store.close()
        lengths = [facts.locations[bid].length for bid, _ in chosen]
        h = stats["hydrator"]
        return {
            "reads": len(offsets),
            "p50_ms": pct(latencies, 50) * 1000,
            "p90_ms": pct(latencies, 90) * 1000,
            "p99_ms": pct(latencies, 99) * 1000,
            "mean_ms": statistics.fmean(latencies) * 1000,
            "warm_p50_ms": pct(warm, 50) * 1000,
            "warm_p99_ms": pct(warm, 99) * 1000,
            "zero_p50_ms": pct(zero, 50) * 1000 if zero else None,
            "zero_p99_ms": pct(zero, 99) * 1000 if zero else None,
            "get_p50_ms": pct(get_latencies, 50) * 1000,
            "get_p90_ms": pct(get_latencies, 90) * 1000,
            "get_p99_ms": pct(get_latencies, 99) * 1000,
            "get_mean_ms": statistics.fmean(get_latencies) * 1000,
            "blob_bytes_median": statistics.median(lengths),
            "daemon_fetch_latency_ms_p50": h["fetch_latency_ms_p50"],
            "daemon_fetch_latency_ms_p99": h["fetch_latency_ms_p99"],
            "daemon_requests": h["requests"],
            "daemon_bytes_fetched": h["bytes_fetched"],
            "daemon_blocks_fetched": h["blocks_fetched"],
            "scan_wait_seconds": scan_wait,
            "latencies_ms": [round(x * 1000, 3) for x in latencies],
            "get_latencies_ms": [round(x * 1000, 3) for x in get_latencies],
            "load1": round(load, 2),
        }

    def sequential(self, target: Target, facts: Facts, digest: str) -> dict[str, Any]:
        """Cold then warm whole-image read (no background), with the daemon's RSS."""
        delete_profile(target, target.snapfs_repo, facts.snapshot_id)
        mnt = self.work / "mnt-snapfs"
        image = mnt / "snapshots" / f"{IMAGE_NAME}.img"
        drop_caches()
        with self.snapfs_mounted(target, target.snapfs_repo, mnt, background=False,
                                 label=f"sequential-{target.name}") as m:  # fmt: skip
            rss_mounted = rss(m.pid)
            drop_caches()
            load_cold = os.getloadavg()[0]
            cpu0 = cpu_seconds(m.pid)
            cold = read_whole(image)
            cpu1 = cpu_seconds(m.pid)
            stats_cold = daemon_stats(mnt)
            drop_caches()
            load_warm = os.getloadavg()[0]
            cpu2 = cpu_seconds(m.pid)
            warm = read_whole(image)
            cpu3 = cpu_seconds(m.pid)
            stats_warm = daemon_stats(mnt)
            rss_read = rss(m.pid)
        for what, r in (("cold", cold), ("warm", warm)):
            if r["xxh3"] != digest:
                raise BenchError(f"snapfs mount gave back other bytes than the image ({what} read)")
        hc, hw = stats_cold["hydrator"], stats_warm["hydrator"]
        return {
            "cold": {**cold, "load1": round(load_cold, 2), "bytes_fetched": hc["bytes_fetched"],
                     "daemon_cpu_seconds": cpu1 - cpu0,
                     "requests": hc["requests"], "waiting_reads": hc["waiting_reads"],
                     "wait_seconds": hc["wait_seconds"],
                     "fetch_latency_ms_p50": hc["fetch_latency_ms_p50"]},
            "warm": {**warm, "load1": round(load_warm, 2), "daemon_cpu_seconds": cpu3 - cpu2,
                     "bytes_fetched_during": hw["bytes_fetched"] - hc["bytes_fetched"],
                     "cache_hits_during": hw["cache_hits"] - hc["cache_hits"]},
            "rss_mounted": rss_mounted,
            "rss_after_reading": rss_read,
        }  # fmt: skip

    def hydration(self, target: Target, facts: Facts) -> dict[str, Any]:
        delete_profile(target, target.snapfs_repo, facts.snapshot_id)
        mnt = self.work / "mnt-snapfs"
        drop_caches()
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with self.snapfs_mounted(target, target.snapfs_repo, mnt, background=True,
                                 label=f"hydration-{target.name}") as m:  # fmt: skip
            t_mount = time.perf_counter()
            polls = 0
            with open(mnt / "snapshots" / f"{IMAGE_NAME}.img", "rb"):  # in use: hydrated
                while True:
                    doc = daemon_stats(mnt)
                    polls += 1
                    img = doc["images"][f"{IMAGE_NAME}.img"]
                    if img["data_blocks"] is not None and img["blocks_missing"] == 0:
                        break
                    if time.perf_counter() - t0 > 900:
                        raise BenchError(f"background hydration not done after 900 s: {img}")
                    missing = img["blocks_missing"]
                    time.sleep(POLL_FINE if missing is not None and missing < POLL_FINE_BELOW
                               else POLL)
                t_done = time.perf_counter()
            mem = rss(m.pid)
            cpu = cpu_seconds(m.pid)
        h = doc["hydrator"]
        seconds = t_done - t0
        return {
            "seconds": seconds,
            "seconds_since_mounted": t_done - t_mount,
            "mount_seconds": t_mount - t0,
            "stored_bytes": facts.stored_bytes,
            "mib_s": facts.stored_bytes / MIB / seconds,
            "mib_s_since_mounted": facts.stored_bytes / MIB / (t_done - t_mount),
            "bytes_fetched": h["bytes_fetched"],
            "background_bytes": h["background_bytes"],
            "requests": h["requests"],
            "mean_request_bytes": h["bytes_fetched"] / max(1, h["requests"]),
            "fetch_latency_ms_p50": h["fetch_latency_ms_p50"],
            "fetch_latency_ms_p99": h["fetch_latency_ms_p99"],
            "hydrated_fraction": img["hydrated_fraction"],
            "data_blocks": img["data_blocks"],
            "rss": mem,
            "daemon_cpu_seconds": cpu,
            "polls": polls,
            "load1": round(load, 2),
        }

    def raw_parallel_gets(self, target: Target, facts: Facts, threads: int = 8) -> dict[str, Any]:
        store = target.reference_store(target.snapfs_repo)
        total = sum(length for _, _, length in facts.runs)
        moved = [0]
        lock = threading.Lock()

        def get(run: tuple[str, int, int]) -> None:
            data = store.get_range(*run)
            if len(data) != run[2]:
                raise BenchError("short GET from the store")
            with lock:
                moved[0] += len(data)

        try:
            warm = facts.runs[0]
            store.get_range(warm[0], warm[1], 4096)
            drop_caches()
            load = os.getloadavg()[0]
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(get, facts.runs))
            seconds = time.perf_counter() - start
        finally:
            store.close()
        return {"seconds": seconds, "threads": threads, "gets": len(facts.runs),
                "bytes": moved[0], "stored_bytes": facts.stored_bytes,
                "mib_s": facts.stored_bytes / MIB / seconds,
                "mib_s_moved": total / MIB / seconds, "load1": round(load, 2)}  # fmt: skip

    def sparse(self, target: Target, facts: Facts, source: Path) -> dict[str, Any]:
        """Mount time and RSS of the 100 GiB sparse snapshot, before and after reading 100 MiB."""
        delete_profile(target, target.sparse_repo, facts.snapshot_id)
        mnt = self.work / "mnt-snapfs"
        image = mnt / "snapshots" / f"{SPARSE_NAME}.img"
        size = facts.size
        drop_caches()
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        with self.snapfs_mounted(target, target.sparse_repo, mnt, background=True,
                                 label=f"sparse-{target.name}") as m:  # fmt: skip
            t_cmd = time.perf_counter()

            def ready() -> bool:
                try:
                    return os.stat(image).st_size == size
                except OSError:
                    return False

            wait_for(ready, 60, f"{image} with its size")
            t_stat = time.perf_counter()
            rss_mounted = rss(m.pid)
            step = size // SPARSE_READS
            offsets = [i * step for i in range(SPARSE_READS)]
            got = []
            fd = os.open(image, os.O_RDONLY)
            try:
                r0 = time.perf_counter()
                for off in offsets:
                    got.append(os.pread(fd, SPARSE_CHUNK, off))
                read_seconds = time.perf_counter() - r0
            finally:
                os.close(fd)
            rss_read = rss(m.pid)
            stats = daemon_stats(mnt)
        with open(source, "rb") as f:
            for off, data in zip(offsets, got, strict=True):
                f.seek(off)
                if f.read(SPARSE_CHUNK) != data:
                    raise BenchError(f"wrong bytes at offset {off} of the mounted sparse image")
        return {
            "mount_seconds": t_stat - t0,
            "mount_command_seconds": t_cmd - t0,
            "size": size,
            "rss_mounted": rss_mounted,
            "rss_after_read": rss_read,
            "read_bytes": SPARSE_CHUNK * len(offsets),
            "read_seconds": read_seconds,
            "bytes_fetched": stats["hydrator"]["bytes_fetched"],
            "load1": round(load, 2),
        }

    def passthrough(self, image: Path, digest: str) -> dict[str, Any]:
        mnt = self.work / "mnt-pass"
        with self.passthrough_mounted(image, mnt) as inside:
            drop_caches()
            load = os.getloadavg()[0]
            r = read_whole(inside)
        if r["xxh3"] != digest:
            raise BenchError("the passthrough gave back other bytes than the image")
        drop_caches()
        direct = read_whole(image)
        return {**r, "load1": round(load, 2), "local_file_mib_s": direct["mib_s"]}


def daemon_stats(mnt: Path) -> dict[str, Any]:
    from snapfs.control import daemon_stats as stats

    return stats(str(mnt))


# ---- set-up ----------------------------------------------------------------------------------


def snapfs_init_and_snapshot(target: Target, repo: str, source: Path, name: str) -> dict[str, Any]:
    rs.run_tool([*target.snapfs_args(repo), "init", "--json"])
    start = time.perf_counter()
    proc = rs.run_tool([*target.snapfs_args(repo), "snapshot", "create", str(source),
                        "--name", name, "--disk", name, "--json"])  # fmt: skip
    doc = json.loads(proc.stdout)
    return {"id": doc["id"], "seconds": time.perf_counter() - start,
            "bytes_uploaded": doc["bytes_uploaded"], "blocks_data": doc["blocks_data"]}  # fmt: skip


def make_sparse(path: Path, size: int) -> list[int]:
    rng = random.Random(100)
    offsets = [k * (size // SPARSE_REGIONS) for k in range(SPARSE_REGIONS)]
    with open(path, "wb") as f:
        f.truncate(size)
        for off in offsets:
            f.seek(off)
            f.write(rng.randbytes(SPARSE_CHUNK))
    return offsets


def choose_small_file(image: Path, work: Path) -> dict[str, Any]:
    """The middle one (sorted by path) of the image's regular files of 16-64 KiB."""
    candidates: list[tuple[str, int]] = []
    root = work / "mnt-probe"
    with loop_attached(image) as dev, ext4_mounted(dev, root):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                st = p.lstat()
                if p.is_file() and not p.is_symlink() and 16 << 10 <= st.st_size <= 64 << 10:
                    candidates.append((str(p.relative_to(root)), st.st_size))
        if not candidates:
            raise BenchError("no file of 16-64 KiB in the image")
        path, size = candidates[len(candidates) // 2]
        sha = hashlib.sha256((root / path).read_bytes()).hexdigest()
    return {"path": path, "size": size, "sha256": sha, "candidates": len(candidates)}


# ---- summary ---------------------------------------------------------------------------------


def store_figures(r: dict[str, Any]) -> dict[str, float]:
    """The scalar figures of one store in one run (what the medians are taken over)."""
    return {
        "ttff_snapfs": r["ttff_snapfs"]["seconds"],
        "ttff_snapfs_mount": r["ttff_snapfs"]["mount_seconds"],
        "ttff_snapfs_nobg": r["ttff_snapfs_nobg"]["seconds"],
        "ttff_restic_restore": r["ttff_restic_restore"]["seconds"],
        "ttff_restic_mount": r["ttff_restic_mount"]["seconds"],
        "first_file_bytes_fetched": r["ttff_snapfs"]["bytes_fetched"],
        "first_file_foreground_bytes": r["ttff_snapfs"]["foreground_bytes"],
        "first_file_bytes_fetched_nobg": r["ttff_snapfs_nobg"]["bytes_fetched"],
        "random_p50_ms": r["random"]["p50_ms"],
        "random_p99_ms": r["random"]["p99_ms"],
        "random_warm_p50_ms": r["random"]["warm_p50_ms"],
        "random_zero_p50_ms": r["random"]["zero_p50_ms"] or 0.0,
        "get_p50_ms": r["random"]["get_p50_ms"],
        "get_p99_ms": r["random"]["get_p99_ms"],
        "daemon_get_p50_ms": r["random"]["daemon_fetch_latency_ms_p50"] or 0.0,
        "cold_seq_mib_s": r["sequential"]["cold"]["mib_s"],
        "restic_cold_seq_mib_s": r["restic_sequential"]["mib_s"],
        "warm_seq_mib_s": r["sequential"]["warm"]["mib_s"],
        "cold_seq_seconds": r["sequential"]["cold"]["seconds"],
        "cold_seq_cpu": r["sequential"]["cold"]["daemon_cpu_seconds"],
        "warm_seq_seconds": r["sequential"]["warm"]["seconds"],
        "warm_seq_cpu": r["sequential"]["warm"]["daemon_cpu_seconds"],
        "hydration_cpu": r["hydration"]["daemon_cpu_seconds"],
        "hydration_mib_s": r["hydration"]["mib_s"],
        "hydration_mib_s_since_mounted": r["hydration"]["mib_s_since_mounted"],
        "hydration_seconds": r["hydration"]["seconds"],
        "raw_gets_mib_s": r["raw_gets"]["mib_s"],
        "rss_1g_mounted": r["sequential"]["rss_mounted"]["VmRSS"],
        "rss_1g_read": r["sequential"]["rss_after_reading"]["VmRSS"],
        "rss_1g_hydrated": r["hydration"]["rss"]["VmRSS"],
        "rss_100g_mounted": r["sparse"]["rss_mounted"]["VmRSS"],
        "rss_100g_read": r["sparse"]["rss_after_read"]["VmRSS"],
        "mount_100g": r["sparse"]["mount_seconds"],
    }


@dataclass(frozen=True)
class Row:
    """A line of the table. Its ratio column is the median over runs of each run's figure
    over the reference measured in that run (on this noisy machine a run's pair shares its
    load), or, for ``paired="difference"``, of each run's figure minus its reference; ``test``
    gets (median, median of the references, that paired median)."""

    label: str
    key: str
    ref_key: str | None
    ref_label: str
    kind: str  # seconds, ms, mibs, bytes
    aim: str = "-"
    test: Callable[[float, float | None, float | None], bool] | None = None
    paired: str = "ratio"  # or "difference"


ROWS = (
    Row("mount, 100 GiB snapshot", "mount_100g", None, "-", "seconds", "< 1 s",
        lambda s, r, p: s < 1.0),
    Row("time to first file", "ttff_snapfs", "ttff_restic_restore", "restic restore + mount",
        "seconds", ">= 10x faster", lambda s, r, p: p is not None and p <= 0.1),
    Row("time to first file", "ttff_snapfs", "ttff_restic_mount", "restic mount",
        "seconds", ">= 5x faster", lambda s, r, p: p is not None and p <= 0.2),
    Row("  of which snapfs mount (info)", "ttff_snapfs_mount", None, "-", "seconds"),
    Row("time to first file, --no-background (info)", "ttff_snapfs_nobg", "ttff_restic_mount",
        "restic mount", "seconds"),
    Row("bytes fetched for the first file", "first_file_bytes_fetched", "small_file_size",
        "the file's size", "bytes"),
    Row("  of which for reads, not the sweep (info)", "first_file_foreground_bytes",
        "small_file_size", "the file's size", "bytes"),
    Row("  same, --no-background (info)", "first_file_bytes_fetched_nobg", "small_file_size",
        "the file's size", "bytes"),
    Row("cold 4 KiB random read p50", "random_p50_ms", "get_p50_ms", "store GET p50", "ms",
        "<= GET + 2 ms", lambda s, r, p: p is not None and p <= 2.0, paired="difference"),
    Row("cold 4 KiB random read p99", "random_p99_ms", "get_p99_ms", "store GET p99", "ms"),
    Row("  same reads, blocks cached (info)", "random_warm_p50_ms", None, "-", "ms"),
    Row("  4 KiB reads of zero blocks (info)", "random_zero_p50_ms", None, "-", "ms"),
    Row("cold sequential read", "cold_seq_mib_s", "restic_cold_seq_mib_s", "restic mount",
        "mibs", ">= 1.5x", lambda s, r, p: p is not None and p >= 1.5),
    Row("  daemon CPU during the cold read (info)", "cold_seq_cpu", "cold_seq_seconds",
        "wall time of the read", "seconds"),
    Row("warm sequential read", "warm_seq_mib_s", "passthrough_mib_s", "pyfuse3 passthrough",
        "mibs", ">= 0.7x", lambda s, r, p: p is not None and p >= 0.7),
    Row("  daemon CPU during the warm read (info)", "warm_seq_cpu", "warm_seq_seconds",
        "wall time of the read", "seconds"),
    Row("background hydration", "hydration_mib_s", "raw_gets_mib_s", "8 threads of raw GETs",
        "mibs", ">= 0.7x", lambda s, r, p: p is not None and p >= 0.7),
    Row("  same, from mount returned (info)", "hydration_mib_s_since_mounted", "raw_gets_mib_s",
        "8 threads of raw GETs", "mibs"),
    Row("  daemon CPU until hydrated (info)", "hydration_cpu", "hydration_seconds",
        "wall time until hydrated", "seconds"),
    Row("daemon RSS, image mounted", "rss_1g_mounted", None, "-", "bytes"),
    Row("daemon RSS, image read twice", "rss_1g_read", None, "-", "bytes"),
    Row("daemon RSS, image hydrated (bg)", "rss_1g_hydrated", None, "-", "bytes"),
    Row("daemon RSS, 100 GiB mounted", "rss_100g_mounted", None, "-", "bytes"),
    Row("daemon RSS, 100 GiB after 100 MiB read", "rss_100g_read", None, "-", "bytes"),
)  # fmt: skip


def fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "seconds":
        return f"{value:.2f} s"
    if kind == "ms":
        return f"{value:.1f} ms"
    if kind == "mibs":
        return f"{value:.0f} MiB/s"
    if kind == "bytes":
        return f"{value / MIB:.1f} MiB" if value >= MIB else f"{value / 1024:.1f} KiB"
    return f"{value:.2f}"


def summarize(cfg: Config, doc: dict[str, Any]) -> str:
    med: dict[str, dict[str, float]] = {}
    per_run: dict[str, list[dict[str, float]]] = {}
    for store in cfg.stores:
        figs = per_run[store] = [store_figures(r["stores"][store]) for r in doc["runs"]]
        for f, r in zip(figs, doc["runs"], strict=True):
            f["passthrough_mib_s"] = r["stores"][store].get("passthrough", r["passthrough"])["mib_s"]
            f["small_file_size"] = float(doc["setup"]["small_file"]["size"])
        med[store] = {k: float(statistics.median([f[k] for f in figs])) for k in figs[0]}
    doc["medians"] = med

    def paired(row: Row, store: str) -> float | None:
        if row.ref_key is None:
            return None
        pairs = [(f[row.key], f[row.ref_key]) for f in per_run[store]]
        if row.paired == "difference":
            return float(statistics.median([s - r for s, r in pairs]))
        if any(r == 0 for _, r in pairs):
            return None
        return float(statistics.median([s / r for s, r in pairs]))

    rows: list[dict[str, Any]] = []
    cells = [("figure", "store", "snapfs", "reference", "ref value", "snapfs/ref, per run", "aim", "met?")]
    for row in ROWS:
        for store in cfg.stores:
            s = med[store][row.key]
            r = med[store].get(row.ref_key) if row.ref_key else None
            ratio = paired(row, store)
            met = row.test(s, r, ratio) if row.test else None
            rows.append({"figure": row.label.strip(), "key": row.key, "store": store,
                         "snapfs": s, "reference": row.ref_label, "reference_value": r,
                         "ratio": ratio if row.paired == "ratio" else None,
                         "difference": ratio if row.paired == "difference" else None,
                         "aim": row.aim, "met": met})  # fmt: skip
            shown = "-" if ratio is None else (f"{ratio:+.1f} {row.kind}" if row.paired == "difference"
                                               else f"{ratio:.2f}")
            cells.append((row.label, store, fmt(s, row.kind), row.ref_label, fmt(r, row.kind),
                          shown, row.aim, "-" if met is None else ("yes" if met else "NO")))  # fmt: skip
    doc["table"] = rows
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    right = {2, 4, 5}
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.rjust(w) if i in right else v.ljust(w)
                               for i, (v, w) in enumerate(zip(c, widths, strict=True))).rstrip())  # fmt: skip
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------


def one_run(bench: Bench, cfg: Config, run: int, targets: list[Target], facts: dict[str, Facts],
            sparse_facts: dict[str, Facts], image: Path, sparse: Path, digest: str,
            small: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    result: dict[str, Any] = {"run": run, "load_start": rs.loadavg(), "stores": {}}
    result["passthrough"] = bench.passthrough(image, digest)
    say(
        f"run {run}: passthrough {result['passthrough']['mib_s']:.0f} MiB/s "
        f"(local file {result['passthrough']['local_file_mib_s']:.0f} MiB/s)"
    )
    for t in targets:
        f = facts[t.name]
        r: dict[str, Any] = {}
        r["ttff_snapfs"] = bench.ttff_snapfs(t, f, small, background=True)
        r["ttff_snapfs_nobg"] = bench.ttff_snapfs(t, f, small, background=False)
        r["ttff_restic_restore"] = bench.ttff_restic_restore(t, image, small)
        r["ttff_restic_mount"] = bench.ttff_restic_mount(t, image, small)
        say(
            f"run {run}: {t.name} first file: snapfs {r['ttff_snapfs']['seconds']:.2f} s "
            f"(mount {r['ttff_snapfs']['mount_seconds']:.2f} s, "
            f"{r['ttff_snapfs']['foreground_bytes']} bytes in the foreground; "
            f"no background {r['ttff_snapfs_nobg']['seconds']:.2f} s, "
            f"{r['ttff_snapfs_nobg']['bytes_fetched']} bytes), "
            f"restic restore {r['ttff_restic_restore']['seconds']:.2f} s, "
            f"restic mount {r['ttff_restic_mount']['seconds']:.2f} s"
        )
        r["random"] = bench.random_reads(t, f, image, run)
        say(
            f"run {run}: {t.name} cold 4K random: p50 {r['random']['p50_ms']:.1f} ms, "
            f"p99 {r['random']['p99_ms']:.1f} ms; store GET p50 {r['random']['get_p50_ms']:.1f} ms, "
            f"p99 {r['random']['get_p99_ms']:.1f} ms (daemon's GET p50 "
            f"{r['random']['daemon_fetch_latency_ms_p50']} ms)"
        )
        r["sequential"] = bench.sequential(t, f, digest)
        # the reference right beside the warm read: on this shared machine the same passthrough
        # read has measured 340 and 800 MiB/s a few minutes apart
        r["passthrough"] = bench.passthrough(image, digest)
        r["restic_sequential"] = bench.restic_cold_sequential(t, image, digest)
        say(
            f"run {run}: {t.name} sequential: cold {r['sequential']['cold']['mib_s']:.0f} MiB/s, "
            f"warm {r['sequential']['warm']['mib_s']:.0f} MiB/s; restic mount "
            f"{r['restic_sequential']['mib_s']:.0f} MiB/s; RSS "
            f"{r['sequential']['rss_mounted']['VmRSS'] / MIB:.0f} -> "
            f"{r['sequential']['rss_after_reading']['VmRSS'] / MIB:.0f} MiB"
        )
        r["hydration"] = bench.hydration(t, f)
        r["raw_gets"] = bench.raw_parallel_gets(t, f)
        say(
            f"run {run}: {t.name} hydration: {r['hydration']['seconds']:.2f} s, "
            f"{r['hydration']['mib_s']:.0f} MiB/s ({r['hydration']['requests']} GETs, mean "
            f"{r['hydration']['mean_request_bytes'] / 1024:.0f} KiB); raw 8-thread GETs "
            f"{r['raw_gets']['mib_s']:.0f} MiB/s ({r['raw_gets']['gets']} GETs)"
        )
        r["sparse"] = bench.sparse(t, sparse_facts[t.name], sparse)
        say(
            f"run {run}: {t.name} 100 GiB: mounted in {r['sparse']['mount_seconds']:.2f} s, RSS "
            f"{r['sparse']['rss_mounted']['VmRSS'] / MIB:.0f} -> "
            f"{r['sparse']['rss_after_read']['VmRSS'] / MIB:.0f} MiB after 100 MiB read"
        )
        result["stores"][t.name] = r
    result["load_end"] = rs.loadavg()
    return result


def parse_args(argv: list[str] | None) -> Config:
    p = argparse.ArgumentParser(description="snapfs mount beside restic and raw store reads.")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--stores", default="s3,local", help="s3, local or both (default s3,local)")
    p.add_argument("--size", type=rs.parse_size, default=rs.parse_size("1G"))
    p.add_argument("--data", type=rs.parse_size, default=rs.parse_size("725M"))
    p.add_argument("--latency", default="20ms", help="--simulate-latency for the local store")
    p.add_argument("--random-reads", type=int, default=200)
    p.add_argument("--sparse-size", type=rs.parse_size, default=rs.parse_size("100G"))
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/mount.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench/work/mount")
    p.add_argument(
        "--base-dir",
        type=Path,
        default=ROOT / "bench/work/snapshot",
        help="where the cached base images are (shared with run_snapshot.py)",
    )
    p.add_argument("--keep", action="store_true", help="keep repositories and images at the end")
    p.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="measure nothing: recompute the medians and table of a saved result, "
        "update them in the file and print the table",
    )
    p.add_argument(
        "--tree",
        metavar="GIT-REF",
        help="measure snapfs as committed at GIT-REF (exported to WORK/tree), not the "
        "checkout's working files, which may change during a run",
    )
    a = p.parse_args(argv)
    stores = tuple(s.strip() for s in a.stores.split(",") if s.strip())
    if not stores or set(stores) - {"s3", "local"}:
        p.error("--stores takes s3, local or s3,local")
    if a.runs < 1:
        p.error("--runs must be at least 1")
    return Config(runs=a.runs, stores=stores, size=a.size, data=a.data, latency=a.latency,
                  random_reads=a.random_reads, sparse_size=a.sparse_size, out=a.out.absolute(),
                  work=a.work.absolute(), base_dir=a.base_dir.absolute(), keep=a.keep,
                  tree=a.tree, report=a.report)  # fmt: skip


def write_and_print(cfg: Config, doc: dict[str, Any], out: Path) -> None:
    text = summarize(cfg, doc)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    say(f"wrote {out}")
    m, c = doc["machine"], doc["config"]
    print(
        f"snapfs mount ({doc['versions'].get('snapfs_commit')}), medians of {c['runs']} run(s); "
        f"image {rs.size_label(c['size'])} with {rs.size_label(c['data'])} of data; local store "
        f"with --simulate-latency {c['latency']} (restic local: none); {m['nproc']} cores; "
        f"load {m['loadavg_start']} at start, {m['loadavg_end']} at end"
    )
    print(text)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.report is not None:
        saved_doc: dict[str, Any] = json.loads(cfg.report.read_text())
        saved = saved_doc["config"]
        report = cfg.report
        cfg = dataclasses.replace(cfg, runs=saved["runs"], stores=tuple(saved["stores"]),
                                  size=saved["size"], data=saved["data"],
                                  latency=saved["latency"])  # fmt: skip
        write_and_print(cfg, saved_doc, report)
        return 0
    if os.geteuid() != 0:
        print("run_mount: needs root (drops the page cache, loop devices, mounts)", file=sys.stderr)
        return 1
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    fresh_dir(cfg.work)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tree_commit = use_tree(cfg.tree, cfg.work) if cfg.tree else None
        if tree_commit is None:
            rs.compile_snapfs()
    except (BenchError, subprocess.CalledProcessError) as e:
        print(f"run_mount: cannot use --tree {cfg.tree}: {e}", file=sys.stderr)
        return 1
    doc: dict[str, Any] = {
        "benchmark": "mount",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {"runs": cfg.runs, "stores": list(cfg.stores), "size": cfg.size,
                   "data": cfg.data, "latency": cfg.latency, "random_reads": cfg.random_reads,
                   "sparse_size": cfg.sparse_size, "tree": cfg.tree},
        "machine": {"nproc": os.cpu_count(), "cpu_model": rs.cpu_model(),
                    "loadavg_start": rs.loadavg(), "hostname": platform.node()},
        "versions": {**rs.versions(),
                     "snapfs_commit": tree_commit or git_commit(),
                     "snapfs_source": f"git archive {tree_commit}" if tree_commit else "checkout"},
    }  # fmt: skip
    say(
        f"machine: {doc['machine']['nproc']} cores, load {doc['machine']['loadavg_start']}; "
        f"snapfs at {doc['versions']['snapfs_commit']}"
    )
    bench = Bench(cfg)
    targets: list[Target] = []
    try:
        with contextlib.ExitStack() as stack:
            base, made = rs.base_image(
                rs.BenchConfig(
                    runs=1,
                    stores=(),
                    size=cfg.size,
                    data=cfg.data,
                    block_sizes=(),
                    out=cfg.out,
                    work=cfg.base_dir,
                    keep=True,
                )
            )
            digest = file_digest(base)
            small = choose_small_file(base, cfg.work)
            say(f"image {base}; small file {small['path']} ({small['size']} bytes)")
            sparse = cfg.work / f"sparse-{rs.size_label(cfg.sparse_size)}.img"
            sparse_offsets = make_sparse(sparse, cfg.sparse_size)
            endpoint = None
            if "s3" in cfg.stores:
                server = rp.start_seaweed(fresh_dir(cfg.work / "seaweed"), ACCESS_KEY, SECRET_KEY)
                stack.callback(lambda: (server.stop(), say("SeaweedFS stopped")))
                endpoint = server.endpoint_url
                say(f"SeaweedFS started at {endpoint} (pid {server.pid})")
            for name in cfg.stores:
                t = Target(name, cfg.work, endpoint if name == "s3" else None,
                           cfg.latency_seconds if name == "local" else None,
                           cfg.latency if name == "local" else None)  # fmt: skip
                targets.append(t)
                if not cfg.keep:
                    stack.callback(t.remove_all)
            setup: dict[str, Any] = {
                "image": {"path": str(base), "size": cfg.size, "data": cfg.data,
                          "make_image": made, "xxh3": digest},
                "small_file": small,
                "sparse": {"size": cfg.sparse_size, "data_offsets": sparse_offsets,
                           "chunk": SPARSE_CHUNK},
                "stores": {},
            }  # fmt: skip
            facts: dict[str, Facts] = {}
            sparse_facts: dict[str, Facts] = {}
            for t in targets:
                s: dict[str, Any] = {}
                s["snapfs_snapshot"] = snapfs_init_and_snapshot(t, t.snapfs_repo, base, IMAGE_NAME)
                s["snapfs_sparse_snapshot"] = snapfs_init_and_snapshot(
                    t, t.sparse_repo, sparse, SPARSE_NAME
                )
                cache = fresh_dir(cfg.work / "restic-cache")
                rp.restic_init(t.restic_repo, t.restic_env(cache))
                s["restic_backup"] = rp.restic_backup(
                    base, t.restic_repo, t.restic_env(cache), cold=False, count_objects=False
                )
                shutil.rmtree(cache, ignore_errors=True)
                facts[t.name] = snapshot_facts(t, t.snapfs_repo, IMAGE_NAME)
                sparse_facts[t.name] = snapshot_facts(t, t.sparse_repo, SPARSE_NAME)
                f = facts[t.name]
                s["facts"] = {"snapshot_id": f.snapshot_id, "block_size": f.block_size,
                              "nonzero_blocks": f.nonzero_positions,
                              "unique_data_blocks": len(f.locations),
                              "stored_bytes": f.stored_bytes, "background_runs": len(f.runs),
                              "manifest_bytes": f.manifest_bytes,
                              "zero_blocks": len(f.zero_positions),
                              "sparse_snapshot_id": sparse_facts[t.name].snapshot_id}  # fmt: skip
                setup["stores"][t.name] = s
                say(
                    f"{t.name}: snapshot {f.snapshot_id[:12]} ({f.stored_bytes / MIB:.1f} MiB "
                    f"stored, {len(f.locations)} unique data blocks), restic backup "
                    f"{s['restic_backup']['seconds']:.1f} s, sparse {sparse_facts[t.name].snapshot_id[:12]}"
                )
            doc["setup"] = setup
            runs: list[dict[str, Any]] = []
            for run in range(1, cfg.runs + 1):
                say(f"run {run}/{cfg.runs}: load {rs.loadavg()}")
                runs.append(one_run(bench, cfg, run, targets, facts, sparse_facts, base, sparse,
                                    digest, small))  # fmt: skip
            doc["runs"] = runs
    except (BenchError, rp.ResticError) as e:
        print(f"run_mount: ABORTED: {e}", file=sys.stderr)
        return 1
    finally:
        if not cfg.keep:
            for name in ("restore", "restic-cache", "cache", "seaweed", "tree"):
                shutil.rmtree(cfg.work / name, ignore_errors=True)
            for img in cfg.work.glob("sparse-*.img"):
                img.unlink()
    doc["machine"]["loadavg_end"] = rs.loadavg()
    doc["versions"]["snapfs_commit_end"] = tree_commit or git_commit()
    if doc["versions"]["snapfs_commit_end"] != doc["versions"]["snapfs_commit"]:
        say(
            f"warning: the checkout changed during the run ({doc['versions']['snapfs_commit']} "
            f"-> {doc['versions']['snapfs_commit_end']})"
        )
    doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_and_print(cfg, doc, cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
