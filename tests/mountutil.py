"""Running the real ``snapfs`` command and its mount daemon from tests.

``mounted(...)`` is the mount fixture's body: it runs ``snapfs mount`` (which daemonizes), waits
until the path is a mount point, and in ``finally`` unmounts with ``fusermount3 -u -z``, waits
for the daemon's pid to exit, and kills it if it lingers (``MountedDaemon.kill``, the same code
the kill -9 test uses, so the cleanup branch is exercised). The daemon's run files live in a
short per-session directory (``SNAPFS_RUNTIME_DIR``) so tests never touch /run/snapfs.

``attached`` and ``ext4_mounted`` put a served disk (or any image) on a loop device and its ext4
on a directory, undone in ``finally``; used inside the FUSE mount's context, they are gone before
the FUSE mount is.

``browse_env`` runs ``browse`` and ``restore-files`` with a runtime directory and cache of a
test's own, and fails the test that leaves a browse, a mount, a loop device or a daemon behind
(found as the kernel tells it: ``mounts_under``, ``loops_under``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from diskimages import have_root
from testkit import Snapfs, reap, store_env

from snapfs.control import RunFiles, mount_entry, mount_key, request

FUSERMOUNT = "fusermount3"

#: ``pytestmark`` of a module whose tests mount (FUSE, loop devices): they need root
MOUNTS = [
    pytest.mark.root,
    pytest.mark.skipif(not have_root() or not os.path.exists("/dev/fuse"),
                       reason="needs root and /dev/fuse (FUSE and loop mounts)"),
]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def stopped_at(snapfs: Snapfs, args: tuple[Any, ...], syscall: str, trace: Path, *,
               path: Path | None = None, when: int | None = None, follow: bool = True,
               ) -> tuple[subprocess.Popen[str], int]:
    """``snapfs ARGS`` run under strace, which stops it (SIGSTOP) when it makes ``syscall``
    (only on ``path``, if given; only the ``when``-th such call, if given, else the first and
    only one; in every thread unless not ``follow``): strace's process, and snapfs's pid once
    it has stopped there. A test acts on it there, whatever its own pace, then sends it
    SIGCONT; in ``finally``, ``end_stopped``."""
    inject = f"inject={syscall}:signal=SIGSTOP" + (f":when={when}" if when is not None else "")
    proc = subprocess.Popen(
        ["strace", *(["-f"] if follow else []), "-qq", "-o", str(trace),
         *(["-P", str(path)] if path is not None else []), "-e", f"trace={syscall}",
         "-e", inject, *snapfs.command(args)],
        env=snapfs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (trace.exists() and "stopped by SIGSTOP" in trace.read_text())
                 or proc.poll() is not None, 60,
                 f"snapfs to stop at its {syscall}" + (f" of {path}" if path else ""))
        assert proc.poll() is None, proc.communicate()
        return proc, traced_child(proc)
    except BaseException:
        reap(proc)
        raise


def traced_child(proc: subprocess.Popen[Any]) -> int:
    """The pid of the command that ``strace`` (``proc``) runs, once it runs it: a signal for
    the command goes there, not to strace (which would let it go on, or pass the signal on
    late). As it starts, strace forks short-lived copies of itself that probe the kernel's
    ptrace, so its first child may be one of those, gone a moment later (a ^C sent there went
    nowhere, and a test saw its command end undisturbed: in CI, under load). The command is
    the child whose command line is neither strace's nor empty: a probe that has exited and
    that strace has not reaped yet is a zombie, whose command line reads empty (taking one
    for the command failed the test again in CI at cac8b96)."""
    def cmdline(pid: int) -> bytes | None:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None

    own = cmdline(proc.pid)
    found: list[int] = []

    def command_started() -> bool:
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            return False
        found[:] = [int(c) for c in children if cmdline(int(c)) not in (None, b"", own)]
        return bool(found)

    wait_for(command_started, 30, "strace to start the command")
    return found[0]


def end_stopped(proc: subprocess.Popen[str], pid: int) -> None:
    """``reap`` for ``stopped_at``: a stopped snapfs would outlive strace."""
    if proc.poll() is None:
        os.kill(pid, signal.SIGKILL)
    reap(proc)


def pread(path: Path, offset: int, length: int, direct: bool = False) -> bytes:
    """One ``pread`` of ``path`` (``O_DIRECT`` if ``direct``: the kernel's page cache is not
    asked, every byte comes from the daemon)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def is_mount_point(path: Path) -> bool:
    """Like ``os.path.ismount``, but also true for a FUSE mount whose daemon died."""
    return mount_entry(str(path)) is not None


@dataclasses.dataclass
class MountedDaemon:
    mountpoint: Path
    pid: int
    cache_dir: Path
    runtime_dir: Path
    said: str = ""  # what ``snapfs mount`` printed on stderr

    @property
    def images(self) -> Path:
        return self.mountpoint / "snapshots"

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / f"{mount_key(str(self.mountpoint))}.pid"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / f"{mount_key(str(self.mountpoint))}.sock"

    @property
    def log(self) -> Path:
        return self.cache_dir / f"daemon-{mount_key(str(self.mountpoint))}.log"

    def ask(self, op: str) -> dict[str, Any]:
        """The daemon's answer to ``{"op": OP}`` on its control socket, from this process."""
        files = RunFiles(str(self.mountpoint), mount_key(str(self.mountpoint)), self.pid_file,
                         self.socket)
        return request(files, {"op": op}, timeout=60)

    def stats(self) -> dict[str, Any]:
        """What ``snapfs stats --json`` prints, asked of the daemon's socket from this process:
        for polls, since a CLI's start-up takes seconds on a loaded machine."""
        stats: dict[str, Any] = self.ask("stats")["stats"]
        return stats

    def snapshots_open(self) -> dict[str, dict[str, Any]]:
        """The snapshots a process holds open on this mount, by id, as ``snapshot delete``
        asks the daemon before it deletes one."""
        held: dict[str, dict[str, Any]] = self.ask("snapshots-open")["open"]
        return held

    def kill(self) -> None:
        """SIGKILL the daemon and wait until it is gone."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(lambda: not pid_running(self.pid), 10, f"daemon {self.pid} to die")


@contextmanager
def mounted(snapfs: Snapfs, mountpoint: Path, cache_dir: Path, *args: Any) -> Iterator[MountedDaemon]:
    """``snapfs mount MOUNTPOINT --cache-dir CACHE ARGS...``, unmounted and reaped afterwards."""
    mountpoint.mkdir(exist_ok=True)
    runtime_dir = Path(snapfs.env["SNAPFS_RUNTIME_DIR"])
    result = snapfs("mount", mountpoint, "--cache-dir", cache_dir, *args)
    assert result.returncode == 0, (result.stdout, result.stderr)
    pid_file = runtime_dir / f"{mount_key(str(mountpoint))}.pid"
    daemon = MountedDaemon(mountpoint, int(pid_file.read_text()), cache_dir, runtime_dir,
                           result.stderr)
    try:
        wait_for(lambda: os.path.ismount(mountpoint), 10, f"{mountpoint} to be mounted")
        yield daemon
    finally:
        if is_mount_point(mountpoint):
            subprocess.run([FUSERMOUNT, "-u", "-z", str(mountpoint)], capture_output=True)
        try:
            wait_for(lambda: not pid_running(daemon.pid), 30, f"daemon {daemon.pid} to exit")
        except AssertionError:
            daemon.kill()
            raise


@dataclasses.dataclass
class Served:
    """A running mount of a repository, and the disk commands on it."""

    snapfs: Snapfs
    daemon: MountedDaemon
    tmp: Path

    @property
    def mountpoint(self) -> Path:
        return self.daemon.mountpoint

    def disk(self, name: str) -> Path:
        return self.mountpoint / "disks" / f"{name}.img"

    def image(self, name: str) -> Path:
        return self.mountpoint / "snapshots" / f"{name}.img"

    def disks(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.snapfs.json("disk", "list")}

    def snapshot(self, *args: Any) -> dict[str, Any]:
        """``snapshot create ARGS --json``: the task."""
        task: dict[str, Any] = self.snapfs.json("snapshot", "create", *args)
        return task

    def snapshots(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.snapfs.json("snapshot", "list")}

    def export(self, snap: str) -> Path:
        out = self.tmp / f"export-{snap}.img"
        self.snapfs.ok("export", snap, out, "--force")
        return out

    def copy(self, name: str, label: str) -> Path:
        """A copy of disk ``name`` as it is now (read through the mount)."""
        out = self.tmp / f"copy-{name}-{label}.img"
        shutil.copyfile(self.disk(name), out)
        return out

    def hydrator(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.snapfs.json("stats", self.mountpoint)["hydrator"]
        return stats


# -- loop devices and ext4, always undone ------------------------------------------------------


@contextmanager
def attached(image: Path, read_only: bool = False) -> Iterator[str]:
    """``image`` attached to a loop device (read-write unless ``read_only``), detached
    afterwards."""
    loop = subprocess.run(["losetup", "-f", "--show", *(["-r"] if read_only else []),
                           str(image)], check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


@contextmanager
def ext4_mounted(device: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *(["-o", ",".join(options)] if options else []), device, str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fsck_clean(image: Path | str) -> None:
    """``fsck.ext4 -n -f``: the file system is consistent as it is (no journal to replay)."""
    result = subprocess.run(["fsck.ext4", "-n", "-f", str(image)], capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout, result.stderr)


def make_env(runtime_dir: Path, request: pytest.FixtureRequest, s3: bool) -> dict[str, str]:
    """``store_env``, with daemons' run files in ``runtime_dir``."""
    env = store_env(request, s3)
    env["SNAPFS_RUNTIME_DIR"] = str(runtime_dir)
    return env


# -- what the kernel says, read without snapfs ----------------------------------------------


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")


def mounts_under(root: Path) -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount at or below ``root``, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            where = _unescape(fields[4])
            if where == str(root) or where.startswith(f"{root}/"):
                found.append((where, fields[fields.index("-") + 1]))
    return sorted(found, key=lambda m: -m[0].count("/"))


def loops_under(root: Path, settle: float = 5.0) -> dict[str, str]:
    """Loop device -> backing file, for the loop devices whose file is below ``root``, or is an
    image on a snapfs mount that is no longer in the mount table (the kernel then names it by
    its path inside the mount, ``/snapshots/NAME.img``: such a device is a leak once it stays).
    Which test such a device is from cannot be told, and another test's is named so for a
    moment while its browse is undone (its daemon unmounted as the device is let go): one is
    counted only if it is still there after ``settle`` seconds."""
    def scan() -> dict[str, str]:
        found = {}
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                path = backing.read_text().strip()
            except OSError:
                continue  # detached meanwhile
            if path.startswith((f"{root}/", "/snapshots/", "/disks/")):
                found[f"/dev/{backing.parent.parent.name}"] = path
        return found

    found = scan()
    deadline = time.monotonic() + settle
    while any(not path.startswith(f"{root}/") for path in found.values()) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        again = scan()
        found = {dev: path for dev, path in found.items()
                 if path.startswith(f"{root}/") or again.get(dev) == path}
    return found


# -- browse and restore-files, and what they must not leave behind ----------------------------

_browse_envs = itertools.count()


@dataclasses.dataclass
class Env:
    """``snapfs`` on a test's repository, with its own runtime directory (pid files, sockets,
    browse states) and cache directory (``browse_env``)."""

    snapfs: Snapfs
    tmp: Path
    runtime: Path
    cache: Path

    def empty_dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir()
        return path

    def browse(self, snap: str, directory: Path, *args: Any) -> dict[str, Any]:
        doc: dict[str, Any] = self.snapfs.json("browse", snap, directory, *args)
        return doc

    def unbrowse(self, directory: Path) -> str:
        return self.snapfs.ok("unbrowse", directory)

    def browse_states(self) -> list[Path]:
        return sorted(self.runtime.glob("browse-*.json"))

    def daemon_pid_files(self) -> list[Path]:
        return sorted(self.runtime.glob("*.pid"))

    def left_behind(self) -> list[str]:
        """Browses, mounts, loop devices and daemons of this test; each is undone."""
        left = []
        for state in self.browse_states():
            directory = json.loads(state.read_text())["directory"]
            left.append(f"a browse of {directory}")
            self.snapfs("unbrowse", directory)
        for where, fstype in mounts_under(self.tmp):
            if fstype != "fuse.snapfs":
                left.append(f"a {fstype} mount at {where}")
                subprocess.run(["umount", "-l", where], capture_output=True)
        for loop, backing in loops_under(self.tmp).items():
            left.append(f"{loop} on {backing}")
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        for where, _ in mounts_under(self.tmp):
            left.append(f"a snapfs mount at {where}")
            if self.snapfs("umount", where, "--timeout", "10").returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", where], capture_output=True)
        for pid_file in self.daemon_pid_files():
            left.append(f"a daemon ({pid_file.name})")
            pid = int(pid_file.read_text() or 0)
            if pid and pid_running(pid):
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda pid=pid: not pid_running(pid), 10, f"daemon {pid} to die")
        return left


@contextmanager
def browse_env(snapfs: Snapfs, tmp: Path) -> Iterator[Env]:
    """An ``Env`` for ``snapfs`` (its repository and environment) below ``tmp``, with a runtime
    directory and a cache of its own; afterwards whatever it left behind (a browse, a mount, a
    loop device, a daemon) is undone, and named in an assertion that fails the test."""
    # short, because a Unix socket path must fit in 108 bytes
    runtime = Path(f"/tmp/snapfs-test-browse-{os.getpid()}-{next(_browse_envs)}")
    runtime.mkdir(mode=0o700)
    cache = tmp / "cache"
    environment = Env(dataclasses.replace(snapfs, env={
        **snapfs.env, "SNAPFS_RUNTIME_DIR": str(runtime), "SNAPFS_CACHE_DIR": str(cache)}),
        tmp, runtime, cache)
    try:
        yield environment
    finally:
        left = environment.left_behind()
        shutil.rmtree(runtime, ignore_errors=True)
    assert left == [], f"the test left behind: {left}"
