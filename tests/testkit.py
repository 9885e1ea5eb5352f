"""What several test files share: running the real ``snapfs`` command, checking its one-line
errors, damaging a stored object the way bit rot would, checking that a prune left no pack
behind that nothing needs, a small file system that fills up for real, holding a running
daemon's uploads back, waiting in trio for state that other tasks own, waiting for a restarted
store to serve packs again, and how long a test's SeaweedFS gets to stop."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from snapfs.errors import SnapfsError
from snapfs.format.index import IndexFile
from snapfs.repo.gc import live_blobs
from snapfs.repo.lock import RepositoryLock
from snapfs.repo.repository import Repository
from snapfs.store import ObjectStore, open_store
from snapfs.store.local import TMP_SUFFIX, LocalStore

#: the exit codes README.md gives (written out here, not imported from snapfs)
EXIT_GENERAL, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTEGRITY, EXIT_STORE, EXIT_LOCKED = 1, 2, 3, 4, 5, 6

SNAPFS = str(Path(sys.executable).with_name("snapfs"))

#: seconds a test's SeaweedFS gets to exit on SIGTERM before it is killed (``stop_timeout``):
#: weed takes about 15 s, so the default 5 s always ran out and the pid was killed anyway; its
#: data is a test's temporary directory, with nothing to keep
SEAWEED_STOP_TIMEOUT = 0.5


@dataclasses.dataclass
class Snapfs:
    """``snapfs [-r REPO] [--endpoint-url URL] ARGS...`` as a subprocess."""

    repo: str | None
    endpoint: str | None
    env: dict[str, str]

    def command(self, args: tuple[Any, ...]) -> list[str]:
        cmd = [SNAPFS]
        if self.repo is not None:
            cmd += ["-r", self.repo]
        if self.endpoint:
            cmd += ["--endpoint-url", self.endpoint]
        return cmd + [str(a) for a in args]

    def __call__(self, *args: Any, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args), capture_output=True, text=True,
                              timeout=timeout, env=kwargs.pop("env", self.env), **kwargs)

    def ok(self, *args: Any) -> str:
        result = self(*args)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert result.stderr == "", result.stderr
        return result.stdout

    def json(self, *args: Any) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def popen(self, *args: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env)

    def each(self, *commands: tuple[Any, ...], timeout: float = 120
             ) -> list[tuple[tuple[Any, ...], subprocess.CompletedProcess[str]]]:
        """Run independent commands side by side; (args, result) of each, in order."""
        procs = [(args, self.popen(*args)) for args in commands]
        results = []
        for args, proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            results.append((args, subprocess.CompletedProcess(proc.args, proc.returncode,
                                                              stdout, stderr)))
        return results

    def with_repo(self, repo: str | None) -> Snapfs:
        return dataclasses.replace(self, repo=repo)

    def on_terminal(self, *args: Any, timeout: float = 120) -> tuple[int, str]:
        """``snapfs ARGS`` with stdin, stdout and stderr on a pseudo-terminal, as a user at a
        shell runs it: its exit code and everything it drew, escape sequences removed."""
        code, drawn, _ = self._on_terminal(args, timeout, piped_stdout=False)
        return code, drawn

    def stderr_on_terminal(self, *args: Any, timeout: float = 120) -> tuple[int, str, str]:
        """As ``on_terminal``, but with stdout piped (``snapfs ARGS > file`` at a shell): the
        exit code, what was drawn on the terminal, and stdout."""
        return self._on_terminal(args, timeout, piped_stdout=True)

    def _on_terminal(self, args: tuple[Any, ...], timeout: float, piped_stdout: bool,
                     ) -> tuple[int, str, str]:
        main, tty = pty.openpty()
        env = {**self.env, "TERM": "xterm", "COLUMNS": "120"}
        try:
            proc = subprocess.Popen(self.command(args), stdin=tty,
                                    stdout=subprocess.PIPE if piped_stdout else tty, stderr=tty,
                                    env=env, close_fds=True)
        finally:
            os.close(tty)
        chunks = []
        try:
            while True:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: every end of the terminal's other side is closed
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            out = proc.stdout.read().decode() if proc.stdout is not None else ""
            code = proc.wait(timeout)
        finally:
            os.close(main)
            reap(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        drawn = b"".join(chunks).decode(errors="replace")
        return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn), out


def store_env(request: Any, s3: bool) -> dict[str, str]:
    """The environment of a ``snapfs`` run by a test: none of the caller's ``AWS_`` and
    ``SNAPFS_`` settings, and with ``s3`` the session's SeaweedFS credentials (``request``: the
    test's ``pytest.FixtureRequest``, which starts the server if no test has yet)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and not k.startswith("SNAPFS_")}
    if s3:
        seaweed = request.getfixturevalue("seaweed")
        env.update(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
                   AWS_DEFAULT_REGION="us-east-1",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it still runs (a test's ``finally``: an assertion failed before the
    process ended), and wait for it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


#: what a progress bar of rich's shows of its task: done/total and their unit (decimal)
BAR_FIGURES = re.compile(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?) (bytes|kB|MB|GB)")
_BAR_UNITS = {"bytes": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def bar_totals(drawn: str) -> list[float]:
    """The totals, in bytes, of every progress bar frame in ``drawn`` (``on_terminal``)."""
    return [float(total) * _BAR_UNITS[unit] for _done, total, unit in BAR_FIGURES.findall(drawn)]


def first_difference(got: bytes, want: bytes) -> int:
    """The offset of the first byte where ``got`` and ``want`` differ (the shorter's length
    if one is the other's beginning): what a failed comparison of images reports."""
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)))


def one_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a failed command, after checking the exit code and form."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("snapfs: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def flip_byte(store: ObjectStore, key: str, offset: int) -> None:
    """Damage one byte of a stored object in place, as bit rot or a bad disk would."""
    if isinstance(store, LocalStore):
        with open(store.root / key, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x40]))
    else:
        data = bytearray(store.get(key))
        data[offset] ^= 0x40
        store.put(key, bytes(data))


def indexed_packs(store: ObjectStore) -> dict[str, set[bytes]]:
    """Every pack the index objects name, with the blobs they say it holds."""
    packs: dict[str, set[bytes]] = {}
    for key, _ in store.list("index/"):
        for pack, entries in IndexFile.decode(store.get(key)).packs.items():
            packs.setdefault(pack, set()).update(e.blob_id for e in entries)
    return packs


def check_collected(repo: Repository) -> None:
    """After a prune: every stored pack is indexed and holds a blob some snapshot uses, and
    every indexed pack is stored, in one index object; a local directory holds no temporary
    file of a write that never ended."""
    store = repo.store
    stored = {key.rpartition("/")[2] for key, _ in store.list("packs/")}
    indexed = indexed_packs(store)
    assert stored == set(indexed)
    live = live_blobs(repo, repo.load_index(), repo.snapshots())
    assert [p for p, blobs in indexed.items() if not blobs & live] == []
    assert len(list(store.list("index/"))) == 1
    if isinstance(store, LocalStore):
        assert [p for p in store.root.rglob(f"*{TMP_SUFFIX}") if p.parent.name != "locks"] == []


def wait_until_packs_read(store: ObjectStore, seconds: float = 60) -> None:
    """Until a pack of the repository in ``store`` reads again: a restarted SeaweedFS answers
    S3 before its volume server is back, so an answer alone does not say it is back."""
    pack = next(key for key, _ in store.list("packs/"))
    deadline = time.monotonic() + seconds
    while True:
        try:
            store.get_range(pack, 0, 1)
            return
        except SnapfsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def wait_until(condition: Callable[[], bool], seconds: float) -> None:
    """Poll ``condition`` (state owned by other tasks) until it holds; fail after ``seconds``."""
    with trio.fail_after(seconds):
        while True:
            if condition():
                return
            await trio.sleep(0.05)


@contextmanager
def tmpfs(mountpoint: Path, size: str, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` (``2M``) and at most ``inodes`` files and directories (its root
    included) at ``mountpoint`` (created) while the block runs: a file system that fills up
    for real. Needs root. Detached lazily at the end, so that a failed test that left a file
    open in it leaves no mount behind once the file is closed."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


@contextmanager
def uploads_held(snapfs: Snapfs) -> Iterator[Path | None]:
    """An exclusive repository lock held by this (live) process, as ``prune`` holds it: a
    disk's snapshot closes, but its upload cannot take its shared lock (it retries) until the
    block ends. Yields the lock object's file in a local repository (every locker reads it)."""
    store = open_store(str(snapfs.repo))
    try:
        lock = RepositoryLock(store, "exclusive", "test: holding uploads back").acquire()
        try:
            yield Path(os.path.realpath(snapfs.repo), lock.key) \
                if "://" not in str(snapfs.repo) else None
        finally:
            lock.release()
    finally:
        store.close()


@contextmanager
def answering_once(path: Path, answer: Callable[[bytes], bytes]) -> Iterator[None]:
    """A Unix socket at ``path``, as a daemon's control socket: it accepts one connection on a
    thread, reads one line and sends ``answer(line)``, then closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(60)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(answer(conn.makefile("rb").readline()))

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            yield
        finally:
            thread.join()
