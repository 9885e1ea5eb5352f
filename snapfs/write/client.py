"""The CLI's side of disks: requests to the daemon that serves a repository's disks.

Disks live in a running mount daemon (it serves ``disks/NAME.img`` and owns their state), so
every disk command is a request on that daemon's control socket, found from the repository
alone (``control.find_repository_daemon``). Blocking: for the CLI.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from snapfs.control import find_repository_daemon, request
from snapfs.progress import NO_PROGRESS, Progress

#: a closing waits for every disk's in-flight write and one lmdb commit; a generous bound
CLOSE_TIMEOUT = 60.0
#: how long one request waits for the upload to end before reporting progress
POLL_WAIT = 0.5


def call(repository: str, message: dict[str, Any], timeout: float = CLOSE_TIMEOUT) -> dict[str, Any]:
    return request(find_repository_daemon(repository), message, timeout=timeout)


def snapshot_disks(repository: str, disks: list[str], name: str | None, tags: list[str],
                   freeze: list[str], freeze_timeout: float, wait: bool = True,
                   progress: Progress = NO_PROGRESS) -> dict[str, Any]:
    """Snapshot served disks at one instant (a consistency group if several), with the file
    systems in ``freeze`` frozen just for that instant. Returns the task's summary, after the
    upload unless ``wait`` is False, or once the daemon says the upload has no end in sight
    (``stuck``: it, or the one ahead of it, is kept for disks that read from it)."""
    files = find_repository_daemon(repository)
    if freeze:  # imported only to freeze (here and in ``frozen`` below): it brings logging
        from snapfs.write.freeze import distinct_mountpoints, frozen

        freeze = distinct_mountpoints(freeze)  # checked before freezing anything
    message: dict[str, Any] = {"op": "snapshot", "disks": disks, "name": name, "tags": tags,
                               "consistency": "frozen" if freeze else "crash"}
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        freezes = [stack.enter_context(frozen(mp, freeze_timeout)) for mp in freeze]
        if freezes:
            message["deadline"] = max(0.0, freeze_timeout - (time.monotonic() - started))
        reply = request(files, message, timeout=CLOSE_TIMEOUT)
    task: dict[str, Any] = reply["task"]
    if any(f.thawed_early for f in freezes):
        task["consistency"] = "crash"
    task["frozen_seconds"] = round(max((f.frozen_seconds for f in freezes), default=0.0), 3)
    if not wait:
        return task
    # the bar counts bytes, as every other one does: the changed blocks times their size
    # (a daemon started before the summary said it leaves the bar counting blocks)
    block_size = task.get("block_size", 1)
    progress.start("snapshot", sum(p["blocks"] for p in task["parts"]) * block_size)
    done = 0
    while task["state"] == "progressing" and not task.get("stuck"):
        fresh = request(files, {"op": "task", "id": task["id"], "wait": POLL_WAIT})["task"]
        fresh["frozen_seconds"] = task["frozen_seconds"]
        if task["consistency"] == "crash":
            fresh["consistency"] = "crash"
        task = fresh
        now = sum(p.get("progress", {}).get("blocks_done", 0) for p in task["parts"])
        if now > done:
            progress.advance((now - done) * block_size)
            done = now
    return task
