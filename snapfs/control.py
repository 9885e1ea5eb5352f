"""Finding and talking to a running mount daemon: its run files, its control socket, unmounting.

A daemon is found from its mount point alone, so ``umount`` and ``stats`` need nothing else. Its
run files live in a per-user runtime directory, named by the SHA-1 of the mount point's real
path (``KEY`` below, 16 hex digits)::

    RUNDIR/KEY.pid     the daemon's pid; the daemon holds an exclusive flock on it while it lives
    RUNDIR/KEY.sock    its control socket (mode 0600)
    RUNDIR/KEY.json    what it serves: repository, repository id, mount point, pid, disks (bool)

RUNDIR is ``$SNAPFS_RUNTIME_DIR`` if set, else ``$XDG_RUNTIME_DIR/snapfs``, else ``/run/snapfs``
for root and ``/tmp/snapfs-UID`` for anyone else; it is created mode 0700 and must belong to the
user. It is not under the cache directory because a cache directory can be chosen per mount (and
a Unix socket path must stay under 108 bytes).

Whether a daemon lives is decided by the lock, never by the pid alone: a lock is released the
moment its process dies (even by kill -9, even while it lingers as a zombie), and a recycled pid
holds no lock.

The protocol: the client connects, sends one JSON object on one line, and reads one JSON object
on one line back. ``{"op": "stats"}`` answers ``{"ok": true, "stats": {...}}``; ``{"op":
"shutdown"}`` answers ``{"ok": true}`` and the daemon then unmounts and exits; the disk and
snapshot requests (and ``refresh``) are listed in ``daemon``. A refusal is ``{"ok": false,
"error": "...", "code": N}``, which ``request`` raises as a ``SnapfsError`` with that message and exit code.

Commands that work on a repository's disks find its daemon with ``find_repository_daemon``
(the live daemons whose ``KEY.json`` names the same repository).

This module blocks (it is for the CLI); the daemon's side of the socket is in ``mount``. Its
paths are strings (``os.path``), not ``pathlib``'s: every disk command imports this module, and
pathlib brings urllib.parse and ipaddress along (5 ms of a start on a cold page cache).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from snapfs.errors import MountBusy, MountError, NoDiskDaemon, NotMounted, SnapfsError

FSNAME = "snapfs"
FSTYPE = "fuse.snapfs"  # fuse.SUBTYPE, from the subtype= mount option
MAX_MESSAGE = 1 << 20
REQUEST_TIMEOUT = 10.0
FUSERMOUNT = "fusermount3"


# -- where things are ----------------------------------------------------------------------------


def _runtime_path() -> str:
    explicit = os.environ.get("SNAPFS_RUNTIME_DIR")
    if explicit:
        return explicit
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "snapfs")
    if os.geteuid() == 0:
        return "/run/snapfs"
    return f"/tmp/snapfs-{os.geteuid()}"


def runtime_dir(create: bool = True) -> str:
    """The directory of pid files and sockets (see the module docstring); created if missing
    (``create=False``: not, for a caller that only looks for daemons: with no directory there
    are none)."""
    path = _runtime_path()
    try:
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        if not create and isinstance(e, FileNotFoundError):
            return path  # (listing it finds nothing)
        raise MountError(f"runtime directory {path} cannot be used: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise MountError(f"runtime directory {path} is not a directory owned by this user")
    return path


def mount_key(mountpoint: str) -> str:
    import hashlib  # here: loading OpenSSL costs every command ~15 ms when the page cache is cold

    return hashlib.sha1(os.fsencode(real_path(mountpoint))).hexdigest()[:16]


def real_path(path: str) -> str:
    """``os.path.realpath(path)``, without asking the daemon of a mount point at ``path``.

    realpath lstat()s every component, and a FUSE mount point's own attributes come from its
    daemon (unless the kernel still has them from a recent look): ``stats`` or ``umount`` of a
    daemon that hangs would hang with it, in the kernel, where ^C cannot end them. So the
    parent is resolved, and PARENT/NAME is the answer when the mount table lists it (a mount
    point cannot be replaced by a symlink). A path with ``..`` is left to realpath, which
    resolves a symlink before the ``..`` after it."""
    if ".." not in path.split("/"):
        parent, name = os.path.split(os.path.abspath(path))
        if name:
            candidate = os.path.join(os.path.realpath(parent), name)
            if any(target == candidate for target, _, _ in _mount_table()):
                return candidate
    return os.path.realpath(path)


@dataclass(frozen=True)
class RunFiles:
    """The pid file and control socket of the daemon of one mount point."""

    mountpoint: str
    key: str
    pid_file: str | os.PathLike[str]
    socket: str | os.PathLike[str]

    @classmethod
    def for_mountpoint(cls, mountpoint: str) -> RunFiles:
        path = real_path(mountpoint)
        key = mount_key(path)
        directory = runtime_dir()
        return cls(path, key, os.path.join(directory, f"{key}.pid"),
                   os.path.join(directory, f"{key}.sock"))

    @classmethod
    def of_pid_file(cls, pid_file: str, mountpoint: str = "") -> RunFiles:
        """The run files of the daemon whose pid file is ``pid_file`` (``RUNDIR/KEY.pid``),
        found by listing the runtime directory: its mount point is not known yet
        (``mountpoint`` is what messages call it meanwhile)."""
        key = os.path.basename(pid_file).removesuffix(".pid")
        return cls(mountpoint, key, pid_file, _beside(pid_file, ".sock"))

    @property
    def info(self) -> str:
        return _beside(self.pid_file, ".json")

    def write_info(self, info: dict[str, Any]) -> None:
        tmp = _beside(self.pid_file, ".json.tmp")
        _write_text(tmp, json.dumps(info))
        os.replace(tmp, self.info)

    def read_info(self) -> dict[str, Any] | None:
        try:
            with open(self.info, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    @property
    def died(self) -> str:
        """The facts of a daemon that died with its mount attached, kept until it is detached."""
        return _beside(self.pid_file, ".died")

    def log_file(self, cache_dir: str | os.PathLike[str]) -> str:
        return os.path.join(cache_dir, f"daemon-{self.key}.log")

    def remove(self) -> None:
        for path in (self.socket, self.info, self.pid_file):
            _unlink_if_there(path)


def _beside(path: str | os.PathLike[str], suffix: str) -> str:
    """``path`` with its suffix (``.pid``) replaced by ``suffix``."""
    return os.path.splitext(os.fspath(path))[0] + suffix


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _unlink_if_there(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def runtime_files(suffix: str, create: bool = True) -> list[str]:
    """The files of the runtime directory named ``*SUFFIX``, sorted."""
    directory = runtime_dir(create)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(directory, n) for n in names if n.endswith(suffix))


# -- mount table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str

    @property
    def is_snapfs(self) -> bool:
        return self.fstype == FSTYPE


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_entry(path: str) -> MountEntry | None:
    """What is mounted at ``path`` (the topmost mount), from /proc/self/mountinfo.

    Unlike ``os.path.ismount``, this sees a FUSE mount whose daemon died (stat fails there),
    and it never asks the daemon anything (``real_path``)."""
    target = real_path(path)
    found = None
    for where, fstype, source in _mount_table():
        if where == target:
            found = MountEntry(target, fstype, source)
    return found


def _mount_table() -> Iterator[tuple[str, str, str]]:
    """(mount point, type, source) of each mount in /proc/self/mountinfo, in its order."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
            except ValueError:
                continue
            if len(fields) > sep + 2:
                yield _unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])


def fusermount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a FUSE mount; raises ``MountError`` with fusermount's reason."""
    import subprocess  # here, as signal in _kill: a command that only sends requests needs neither

    cmd = [FUSERMOUNT, "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise MountError(f"{FUSERMOUNT} is not installed (apt-get install fuse3)") from None
    if result.returncode != 0:
        reason = result.stderr.strip().rpartition(": ")[2] or f"exit status {result.returncode}"
        if "busy" in reason.lower():
            raise MountBusy(f"{mountpoint} is busy: a process still uses it (see fuser -m)")
        raise MountError(f"cannot unmount {mountpoint}: {reason}")


# -- the pid file and its lock -------------------------------------------------------------------


class PidFile:
    """A pid file whose exclusive flock this process holds for as long as it lives."""

    def __init__(self, path: str | os.PathLike[str], fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def try_claim(cls, path: str | os.PathLike[str]) -> PidFile | None:
        """Lock ``path`` exclusively for this process (and the children it forks to), or None
        if another process holds it.

        Retries if the file was replaced between open and lock, so two claimants can never
        both believe they own the path (the classic pid-file race)."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return cls(path, fd)
            os.close(fd)

    @staticmethod
    def holder(path: str | os.PathLike[str]) -> int | None:
        """The pid written in ``path`` (for messages about who holds it)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return _read_pid(fd)
        finally:
            os.close(fd)

    def write_pid(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def close(self) -> None:
        os.close(self.fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        return None


@dataclass
class Daemon:
    """A live daemon, seen from outside: its pid and an open descriptor of its pid file."""

    pid: int | None
    fd: int

    def alive(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return False

    def wait(self, timeout: float) -> bool:
        """Wait until the daemon has exited; whether it did within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> None:
        os.close(self.fd)


def find_daemon(files: RunFiles) -> Daemon | None:
    """The live daemon of a mount point, or None (stale run files are removed)."""
    try:
        fd = os.open(files.pid_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return Daemon(_read_pid(fd), fd)
    try:
        # Stale: removed while we hold the lock, so a daemon starting now cannot lose its files.
        info = files.read_info()
        files.remove()
        if info is not None and _still_attached(str(info.get("mountpoint", ""))):
            # what the dead mount served, for the line that says to detach it (dead_mounts)
            _write_text(files.died, json.dumps(info))
    finally:
        os.close(fd)
    return None


# -- requests ------------------------------------------------------------------------------------


def request(files: RunFiles, message: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """Send one request to the daemon of ``files`` and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(files.socket))
            sock.sendall(json.dumps(message).encode() + b"\n")
            reply = bytearray()
            while b"\n" not in reply and len(reply) < MAX_MESSAGE:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotMounted(f"no snapfs daemon answers for {files.mountpoint}") from None
        except TimeoutError:
            raise MountError(f"the snapfs daemon of {files.mountpoint} did not answer "
                             f"within {timeout:.0f} s") from None
        except OSError as e:
            raise MountError(f"cannot talk to the snapfs daemon of {files.mountpoint}: "
                             f"{e.strerror}") from None
    if not reply:  # the connection closed without a byte: the daemon stopped (or was killed)
        raise MountError(f"the snapfs daemon of {files.mountpoint} stopped before it replied; "
                         "what was asked may or may not be done")
    try:
        doc = json.loads(reply)
    except ValueError:
        raise MountError(f"the snapfs daemon of {files.mountpoint} sent a garbled reply") from None
    if not isinstance(doc, dict):
        raise MountError(f"the snapfs daemon of {files.mountpoint} sent a garbled reply")
    if not doc.get("ok"):
        if isinstance(doc.get("code"), int) and doc.get("error"):
            raise SnapfsError(str(doc["error"]), doc["code"])
        raise MountError(f"the snapfs daemon of {files.mountpoint} refused: {doc.get('error')}")
    return doc


def same_repository(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def repository_daemons(repository: str) -> list[tuple[RunFiles, dict[str, Any]]]:
    """The run files and facts of every live daemon that mounts ``repository`` on this host."""
    found: list[tuple[RunFiles, dict[str, Any]]] = []
    for pid_file in runtime_files(".pid", create=False):
        files = RunFiles.of_pid_file(pid_file)
        info = files.read_info()
        if info is None or not same_repository(str(info.get("repository", "")), repository):
            continue
        daemon = find_daemon(files)
        if daemon is None:
            continue
        daemon.close()
        files = RunFiles(str(info.get("mountpoint", "")), files.key, files.pid_file, files.socket)
        found.append((files, info))
    return found


def disk_daemons(repository: str) -> list[RunFiles]:
    """The run files of every live daemon serving disks of ``repository`` on this host: one,
    unless mounts of it on different cache directories each serve their own."""
    return [files for files, info in repository_daemons(repository) if info.get("disks")]


def find_repository_daemon(repository: str) -> RunFiles:
    """The run files of the live daemon serving ``repository``'s disks on this host."""
    found = repository_daemons(repository)
    serving = [files for files, info in found if info.get("disks")]
    if len(serving) > 1:  # each from its own cache directory: which one is meant is unknown
        raise SnapfsError(f"{len(serving)} snapfs mounts of {repository} on this host serve "
                          f"disks, each from its own cache directory "
                          f"({', '.join(f.mountpoint for f in serving)}): the disk commands "
                          "cannot tell which is meant; unmount all but one")
    if serving:
        return serving[0]
    if found:
        orphaned = [(files, info) for files, info in found
                    if info.get("disk_state") and flock_held(os.path.join(info["disk_state"], "lock"))
                    is False]
        if orphaned:  # its lock's holder died (kill -9) or unmounted: nothing serves the disks
            files, info = orphaned[0]
            raise NotMounted(
                f"no snapfs mount of {repository} serves its disks: the daemon that did has "
                f"stopped, and {files.mountpoint} serves snapshots only; to serve them, mount "
                f"it again: snapfs umount {files.mountpoint} && snapfs -r {repository} mount "
                f"{files.mountpoint} --cache-dir {info.get('cache_dir', 'CACHE')}")
        raise NotMounted(f"the snapfs mounts of {repository} on this host do not serve disks "
                         f"(another daemon holds their state directory); see their logs")
    raise no_disk_daemon(repository)


def no_disk_daemon(repository: str, caches: list[str] | None = None) -> NoDiskDaemon:
    """The error for a repository that no mount on this host serves, saying how to start one:
    with ``--cache-dir`` when this host's disks of it are known to be in ``caches``, and after
    detaching the mount whose daemon served them and died (mounting there again is refused
    until then, and the user's first try is the mount point the disks were served at)."""
    where = cache = ""
    if caches:
        where = (f"; its disks here are in the cache directory {caches[0]}" if len(caches) == 1
                 else f"; its disks here are in the cache directories {', '.join(caches)}")
        cache = f" --cache-dir {caches[0] if len(caches) == 1 else 'CACHE'}"
    line = f"no snapfs mount of {repository} runs on this host{where}"
    dead = dead_mounts(repository)
    if not dead:
        return NoDiskDaemon(f"{line}{';' if not caches else ':'} start one with: "
                            f"snapfs -r {repository} mount MOUNTPOINT{cache}")
    if len(dead) == 1:
        mountpoint, its_cache = dead[0]
        cache = cache or f" --cache-dir {its_cache}"  # (a disk made empty has no hold)
        return NoDiskDaemon(f"{line}; the daemon of the snapfs mount at {mountpoint} died and "
                            f"the mount is still attached: detach it and mount again with: "
                            f"snapfs umount {mountpoint} && snapfs -r {repository} mount "
                            f"{mountpoint}{cache}")
    return NoDiskDaemon(f"{line}; the daemons of the snapfs mounts at "
                        f"{', '.join(m for m, _ in dead)} died and the mounts are still "
                        "attached: detach the one that served it and mount again with: snapfs "
                        f"umount MOUNTPOINT && snapfs -r {repository} mount MOUNTPOINT{cache}")


def dead_mounts(repository: str) -> list[tuple[str, str]]:
    """(mount point, cache directory) of each mount serving ``repository``'s disks whose
    daemon died (kill -9, a crash) and left the mount attached: everything there fails with
    "Transport endpoint is not connected" until ``snapfs umount`` detaches it. Known from the
    facts ``find_daemon`` kept of them; those of mounts detached meanwhile (fusermount3, a
    reboot) are removed."""
    found = []
    for died in runtime_files(".died"):
        try:
            with open(died, encoding="utf-8") as f:
                info = json.load(f)
            where, cache = str(info["mountpoint"]), str(info["cache_dir"])
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if not _still_attached(where):
            _unlink_if_there(died)
        elif info.get("disks") and same_repository(str(info.get("repository", "")), repository):
            found.append((where, cache))
    return found


def _still_attached(mountpoint: str) -> bool:
    """Whether a snapfs mount at ``mountpoint`` is attached with no daemon answering it."""
    if not mountpoint:
        return False
    entry = mount_entry(mountpoint)
    return entry is not None and entry.is_snapfs and not _answers(mountpoint)


def flock_held(path: str | os.PathLike[str]) -> bool | None:
    """Whether some process holds a flock on ``path`` (read from ``/proc/locks``, taking no
    lock: a daemon starting that moment must not find it taken); None if it cannot be told."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(fields[1:2] == ["FLOCK"] and where in fields
               for fields in (line.split() for line in lines))


def daemon_stats(mountpoint: str) -> dict[str, Any]:
    files = RunFiles.for_mountpoint(mountpoint)
    daemon = find_daemon(files)
    if daemon is None:
        entry = mount_entry(files.mountpoint)
        if entry is not None and entry.is_snapfs:
            raise NotMounted(f"the snapfs daemon of {files.mountpoint} has died; "
                             f"clean up with: snapfs umount {files.mountpoint}")
        raise NotMounted(f"no snapfs daemon serves {files.mountpoint}")
    daemon.close()
    stats: dict[str, Any] = request(files, {"op": "stats"})["stats"]
    return stats


# -- unmounting ----------------------------------------------------------------------------------


def unmount(mountpoint: str, timeout: float = 60.0) -> str:
    """Unmount a snapfs mount and wait until its daemon has exited; a one-line account of it.

    The normal way is ``fusermount3 -u`` (refused while files are open), after which the daemon
    sees its session end, saves its access profiles and exits. A daemon that is alive but not
    mounted (starting or stopping) is asked to shut down through its socket. A daemon that does
    not exit within ``timeout`` seconds is killed. A mount whose daemon died (the mount point
    says "Transport endpoint is not connected") is detached with ``fusermount3 -u -z``.
    """
    files = RunFiles.for_mountpoint(mountpoint)
    mp = files.mountpoint
    entry = mount_entry(mp)
    if entry is not None and not entry.is_snapfs:
        raise MountError(f"{mp} is not a snapfs mount (it is {entry.fstype} from {entry.source})")
    daemon = find_daemon(files)
    if daemon is None:
        if entry is None:
            raise NotMounted(f"nothing is mounted at {mp}")
        if _answers(mp):  # a live daemon this runtime directory does not know: not ours to cut
            raise MountError(f"{mp} is served by a snapfs daemon that {runtime_dir()} does not "
                             "know (started with another SNAPFS_RUNTIME_DIR?); unmount it with "
                             "that setting, or with fusermount3 -u")
        fusermount(mp, lazy=True)
        _unlink_if_there(files.died)
        return f"detached {mp}: its daemon had died"
    try:
        if entry is not None:
            fusermount(mp)
        else:
            try:
                request(files, {"op": "shutdown"})
            except NotMounted:
                pass  # it is on its way out already
        if daemon.wait(timeout):
            return f"unmounted {mp}"
        _kill(daemon.pid)
        daemon.wait(10)
        if mount_entry(mp) is not None:
            fusermount(mp, lazy=True)
        files.remove()
        return f"unmounted {mp}; its daemon (pid {daemon.pid}) did not exit in {timeout:.0f} s and was killed"
    finally:
        daemon.close()


def _answers(mountpoint: str, patience: float = 5.0) -> bool:
    """Whether a FUSE mount's daemon may still be alive: a dead one's mount point fails at once
    with ENOTCONN ("Transport endpoint is not connected"). A listing that does not return within
    ``patience`` (a daemon alive but stuck) counts as alive; it is left on a daemon thread."""
    import threading  # only here: the commands that import this module start faster without

    outcome: list[bool] = []

    def look() -> None:
        try:
            os.listdir(mountpoint)  # not stat: the kernel may answer that from its cache
        except OSError as e:
            outcome.append(e.errno not in (errno.ENOTCONN, errno.ECONNABORTED))
        else:
            outcome.append(True)

    thread = threading.Thread(target=look, daemon=True)
    thread.start()
    thread.join(patience)
    return outcome[0] if outcome else True


def _kill(pid: int | None) -> None:
    import signal

    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        raise SnapfsError(f"cannot kill the snapfs daemon (pid {pid}): {e.strerror}") from None
