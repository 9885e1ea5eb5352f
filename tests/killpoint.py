"""``python killpoint.py SNAPFS-ARGS...``: the ``snapfs`` command, killed with SIGKILL right
before its Nth change to a repository, or run whole while each change is written down.

A change is what a crash between two of them could leave half done: a file opened for writing,
a rename or an unlink under the repository's directory (``KILLPOINT_SCOPE``), or an S3 request
that changes objects (PUT, DELETE, POST) under ``s3://bucket/prefix`` (the scope given so).
Each is seen through Python's audit hooks, which run in the thread that makes the call, before
the system call or the request is made, so the kill leaves the change undone, as a ``kill -9``
at that instant would. ``strace -e inject=…:signal=SIGKILL:when=N`` counts calls per thread and per system
call, and garbage collection spreads its deletes over a pool of threads, so its Nth is not the
command's Nth change; this count is the command's, across every thread.

``KILLPOINT_AT=N`` kills at the Nth change, ``KILLPOINT_BEFORE=LABEL`` at the first change so
labelled; ``KILLPOINT_RECORD=FILE`` appends a line per change instead, its label (``rename
packs``, ``DELETE index``: what and in which top-level folder), so that a test learns how many
there are and where each phase begins.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

KINDS = ("locks", "snapshots", "profiles", "holds", "index", "packs", "policies", "config")
METHODS = (b"PUT ", b"DELETE ", b"POST ")


def kind_of(where: str) -> str:
    top = where.split("/", 1)[0]
    return top if top in KINDS else "other"


class Killpoint:
    def __init__(self, scope: str, kill_at: int | None, before: str | None,
                 record: str | None) -> None:
        # a local repository's directory, or s3://bucket/prefix (its requests: /bucket/prefix/)
        self.local = not scope.startswith("s3://")
        self.scope = (os.path.realpath(scope) + os.sep if self.local
                      else scope.removeprefix("s3:/").rstrip("/") + "/")
        self.kill_at = kill_at
        self.before = before
        self.record = record
        self.count = 0
        self.lock = threading.Lock()

    def change(self, what: str, where: str) -> None:
        label = f"{what} {kind_of(where)}"
        with self.lock:
            self.count += 1
            if (self.kill_at is not None and self.count >= self.kill_at) or label == self.before:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.record is not None:
                with open(self.record, "a") as f:
                    f.write(label + "\n")

    def local_path(self, path: Any) -> str | None:
        """The path relative to the repository, or None if it is not in there."""
        if isinstance(path, int) or path is None:
            return None
        full = os.path.realpath(os.fsdecode(path))
        return full[len(self.scope):] if full.startswith(self.scope) else None

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.local:
            if event == "open":
                path, mode, flags = args
                writing = (flags if isinstance(flags, int) and flags >= 0 else 0) & (
                    os.O_WRONLY | os.O_RDWR | os.O_CREAT)
                if isinstance(mode, str) and set(mode) & set("wax+"):
                    writing = 1
                where = self.local_path(path) if writing else None
                if where is not None:
                    self.change("open", where)
            elif event in ("os.rename", "os.remove"):
                where = self.local_path(args[0])
                if where is not None:
                    self.change(event.removeprefix("os."), where)
        elif event == "http.client.send":
            data = args[1]
            if isinstance(data, (bytes, bytearray)) and data.startswith(METHODS):
                method, target = bytes(data).split(b" ", 2)[:2]
                path = target.decode(errors="replace").split("?", 1)[0]
                if path.startswith(self.scope):
                    self.change(method.decode(), path[len(self.scope):])


def main() -> None:
    at = os.environ.get("KILLPOINT_AT")
    sys.addaudithook(Killpoint(os.environ["KILLPOINT_SCOPE"], int(at) if at else None,
                               os.environ.get("KILLPOINT_BEFORE"),
                               os.environ.get("KILLPOINT_RECORD")))
    sys.argv = ["snapfs", *sys.argv[1:]]
    from snapfs.cli import main as snapfs

    snapfs()


if __name__ == "__main__":
    main()
