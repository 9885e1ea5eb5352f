"""Commands that run at the same time on one repository, as on a host where backups run from
cron while someone prunes, mounts are read and served disks upload: nothing may cost a snapshot.

Each round of a seeded history starts several real ``snapfs`` processes at once against one
repository: snapshots of image files (incremental, or after a ``--parent``), snapshots of disks
that a running daemon serves, ``disk create --from``, ``disk rollback``, ``snapshot delete``,
``snapshot forget --keep-last``, ``prune``, ``repair index``, ``verify``, ``export`` and
``snapshot list``, while a thread reads snapshot images through the mount. Each command either
succeeds or fails in one line with the exit code README.md gives for what ran beside it (the
repository locked, by processes of that round doing what the line says they do; a snapshot
deleted meanwhile; a disk busy with its own snapshot), and then it changed nothing. None may
run longer than ``COMMAND_BOUND``: a command waiting for a lock held by one that waits for it
would hang there.

The model holds the bytes of every image file and served disk, changed only between rounds
(images by unaligned writes, growing and shrinking by sectors; disks by writes through the
mount, fsync'd), and of every snapshot: its source's bytes when it was taken. After each round
the repository lists exactly the model's snapshots, each verifies and exports to its bytes, the
mount serves them with those bytes, every disk reads back as its model with its base and
parent still stored, and no lock is left. At the end a prune and a verify succeed, and the
store holds no pack that nothing indexes or needs, nor an index naming a pack that is gone.

The suite runs one seed per store. ``SNAPFS_CONCURRENT_SEEDS`` (``3-40``, or ``5,9``) runs
others by hand, and ``SNAPFS_CONCURRENT_ROUNDS`` longer histories.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio
from mountutil import MOUNTS, MountedDaemon, end_stopped, make_env, mounted, stopped_at, wait_for
from testkit import (
    EXIT_GENERAL,
    EXIT_LOCKED,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    Snapfs,
    check_collected,
    one_error,
    reap,
)

from snapfs.repo.export import export_snapshot
from snapfs.repo.repository import Repository, pack_key
from snapfs.repo.verify import verify_snapshots
from snapfs.store import ObjectStore
from snapfs.store.local import LocalStore

pytestmark = MOUNTS
BS = 16 * 1024  # the repository's block size (snapfs init's default)
SECTOR = 512
#: small packs, so that deletions leave some mostly dead and prune repacks them
PACK_SIZE = 256 * 1024
#: image file labels: one is no snapshot name as it is (a slash)
LABELS = ("web", "db/main")
MAX_DISKS = 4
ROUNDS = int(os.environ.get("SNAPFS_CONCURRENT_ROUNDS", "7"))
#: seconds any command may take; generous (a snapshot waits 10 s for a collection's lock, a
#: disk's upload three times that long), so that only a wait with no end reaches it
COMMAND_BOUND = 240.0
#: one holder in the "locked" line: PURPOSE (pid PID on HOST, since TIME)
HOLDER = re.compile(r"(.+?) \(pid (\d+) on ([^,]+), since [^)]*\)(?:; |$)")


def seeds(default: int) -> list[int]:
    """The seeds to run: ``SNAPFS_CONCURRENT_SEEDS`` (``A-B`` or ``A,B,…``) or ``default``."""
    given = os.environ.get("SNAPFS_CONCURRENT_SEEDS")
    if not given:
        return [default]
    if "-" in given:
        first, last = given.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in given.split(",")]


@dataclass
class Snap:
    id: str
    label: str  # the disk label: an image file's, or a served disk's name
    content: bytes
    created: str


@dataclass
class Command:
    """One ``snapfs`` process of a round, with what it is about."""

    kind: str
    args: tuple[Any, ...]
    #: the purpose of the repository lock it takes itself (for a disk command, the daemon
    #: takes one: ``History.check_holders``)
    purpose: str | None = None
    makes: str | None = None  # the snapshot or disk it makes
    target: str | None = None  # the snapshot it reads, deletes, starts from or rolls back to
    disk: str | None = None  # the image label it snapshots, or the served disk it rolls back
    group: tuple[str, ...] = ()  # the served disks it snapshots (several: a consistency group)
    targets: tuple[str, ...] = ()  # what a delete deletes
    keep: int = 0  # a forget's --keep-last
    out: Path | None = None  # an export's file
    result: subprocess.CompletedProcess[str] | None = None
    pid: int = 0

    def snapshots_made(self) -> list[str]:
        """The names of the snapshots it makes (a consistency group's are NAME-DISK)."""
        if self.kind == "snapshot_disk" and len(self.group) > 1:
            return [f"{self.makes}-{d}" for d in self.group]
        return [self.makes] if self.makes is not None and self.kind != "disk_create" else []

    def describe(self) -> str:
        shown = " ".join(str(a) for a in self.args)
        if self.result is None:
            return shown
        line = (self.result.stderr.strip().splitlines() or [""])[0]
        return f"{shown} -> {self.result.returncode} {line}".rstrip()


@dataclass
class Round:
    """What a round started, and what the snapshots and disks were when it began."""

    number: int
    commands: list[Command] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # snapshot images read through the mount
    read_errors: dict[str, str] = field(default_factory=dict)
    start_disks: dict[str, bytes] = field(default_factory=dict)

    def of(self, kind: str) -> list[Command]:
        return [c for c in self.commands if c.kind == kind]

    def doomed(self, snap: str, besides: Command | None = None) -> bool:
        """Whether a command of this round (other than ``besides``) may delete ``snap``."""
        return any(c.kind == "forget" or snap in c.targets for c in self.commands
                   if c is not besides)


class History:
    """The image files, disks and snapshots as the model says they are, and the rounds."""

    def __init__(self, snapfs: Snapfs, repo: Repository, daemon: MountedDaemon,
                 rng: random.Random, tmp: Path) -> None:
        self.snapfs = snapfs
        self.repo = repo
        self.daemon = daemon
        self.rng = rng
        self.tmp = tmp
        self.images: dict[str, bytearray] = {}
        self.paths: dict[str, Path] = {}
        self.disks: dict[str, bytearray] = {}
        self.snaps: dict[str, Snap] = {}  # by name
        self.count = 0
        self.log: list[str] = []

    def note(self, what: str) -> None:
        self.log.append(what)

    def history(self) -> str:
        return "history:\n  " + "\n  ".join(self.log[-60:])

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def disk_path(self, name: str) -> Path:
        return self.daemon.mountpoint / "disks" / f"{name}.img"

    def image_path(self, snap: str) -> Path:
        return self.daemon.mountpoint / "snapshots" / f"{snap}.img"

    # -- between rounds: the sources change -----------------------------------------------------

    def add_image(self, label: str) -> None:
        path = self.tmp / f"image-{len(self.paths)}.img"
        palette = [bytes(BS)] + [self.rng.randbytes(BS) for _ in range(4)]
        blocks = self.rng.randrange(24, 48)
        data = b"".join(self.rng.choice(palette) for _ in range(blocks))
        path.write_bytes(data)
        self.images[label], self.paths[label] = bytearray(data), path

    def change_images(self) -> None:
        for label, model in self.images.items():
            path = self.paths[label]
            for _ in range(self.rng.randrange(0, 4)):
                offset = self.rng.randrange(0, len(model))
                data = self.rng.randbytes(min(len(model) - offset, self.rng.randrange(1, 3 * BS)))
                with open(path, "r+b") as f:
                    f.seek(offset)
                    f.write(data)
                model[offset : offset + len(data)] = data
            if self.rng.random() < 0.2:  # grown or cut short by whole sectors
                size = max(8 * BS, len(model) + SECTOR * self.rng.randrange(-40, 40))
                os.truncate(path, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            assert path.read_bytes() == model

    def write_disks(self) -> None:
        """A few writes to each disk through the mount, fsync'd: what a snapshot must hold."""
        for name, model in self.disks.items():
            fd = os.open(self.disk_path(name), os.O_RDWR)
            try:
                for _ in range(self.rng.randrange(0, 3)):
                    offset = self.rng.randrange(0, len(model))
                    data = self.rng.randbytes(min(len(model) - offset,
                                                  self.rng.randrange(1, 2 * BS)))
                    assert os.pwrite(fd, data, offset) == len(data)
                    model[offset : offset + len(data)] = data
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- a round's commands -------------------------------------------------------------------

    def plan(self, rnd: Round) -> None:
        kinds = {"create": 5, "create_parent": 2, "snapshot_disk": 4, "disk_create": 1,
                 "rollback": 2, "delete": 2, "forget": 2, "prune": 2, "repair": 1,
                 "verify": 1, "export": 2, "list": 1}
        names, weights = list(kinds), list(kinds.values())
        wanted = self.rng.randrange(3, 7)
        tries = 0
        while len(rnd.commands) < wanted and tries < 50:
            tries += 1
            command = getattr(self, f"plan_{self.rng.choices(names, weights)[0]}")(rnd)
            if command is not None:
                rnd.commands.append(command)
        if self.rng.random() < 0.5:
            rnd.reads = self.rng.sample(sorted(self.snaps), min(2, len(self.snaps)))

    def plan_create(self, rnd: Round, parent: str | None = None) -> Command:
        label = self.rng.choice(LABELS)
        name = self.fresh("i")
        path = self.paths[label]
        args: tuple[Any, ...] = ("snapshot", "create", path, "--disk", label, "--name", name)
        if parent is not None:
            args += ("--parent", parent)
        return Command("create", (*args, "--json"), f"snapshot create of {path}", makes=name,
                       target=parent, disk=label)

    def plan_create_parent(self, rnd: Round) -> Command:
        return self.plan_create(rnd, self.rng.choice(sorted(self.snaps)))

    def plan_snapshot_disk(self, rnd: Round) -> Command | None:
        free = [d for d in rnd.start_disks if all(d not in c.group for c in rnd.of("snapshot_disk"))]
        if not free:
            return None
        group = tuple(self.rng.sample(free, 2 if len(free) > 1 and self.rng.random() < 0.3
                                      else 1))
        name = self.fresh("s")
        return Command("snapshot_disk", ("snapshot", "create", *(a for d in group for a in
                                                                   ("--disk", d)),
                                         "--name", name, "--json"), makes=name, group=group)

    def plan_disk_create(self, rnd: Round) -> Command | None:
        if len(self.disks) + len(rnd.of("disk_create")) >= MAX_DISKS:
            return None
        source = self.rng.choice(sorted(self.snaps))
        name = self.fresh("d")
        return Command("disk_create", ("disk", "create", name, "--from", source, "--json"),
                       makes=name, target=source)

    def plan_rollback(self, rnd: Round) -> Command | None:
        free = [d for d in rnd.start_disks if all(c.disk != d for c in rnd.of("rollback"))]
        if not free:
            return None
        disk = self.rng.choice(free)
        target = self.rng.choice(sorted(self.snaps))
        return Command("rollback", ("disk", "rollback", disk, target, "--yes", "--json"),
                       disk=disk, target=target)

    def plan_delete(self, rnd: Round) -> Command | None:
        if len(self.snaps) < 3:
            return None
        doomed = tuple(self.rng.sample(sorted(self.snaps), self.rng.choice([1, 1, 2])))
        return Command("delete", ("snapshot", "delete", *doomed, "--json"), "snapshot delete",
                       targets=doomed)

    def plan_forget(self, rnd: Round) -> Command:
        keep = self.rng.randrange(1, 4)
        args: tuple[Any, ...] = ("snapshot", "forget", "--keep-last", keep)
        if self.rng.random() < 0.5:
            args += ("--disk", self.rng.choice(sorted({s.label for s in self.snaps.values()})))
        return Command("forget", (*args, "--json"), "snapshot forget", keep=keep)

    def plan_prune(self, rnd: Round) -> Command:
        return Command("prune", ("prune", "--json"), "prune")

    def plan_repair(self, rnd: Round) -> Command:
        return Command("repair", ("repair", "index", "--json"), "repair index")

    def plan_verify(self, rnd: Round) -> Command:
        return Command("verify", ("verify", "--json"))

    def plan_list(self, rnd: Round) -> Command:
        return Command("list", ("snapshot", "list", "--json"))

    def plan_export(self, rnd: Round) -> Command:
        snap = self.rng.choice(sorted(self.snaps))
        out = self.tmp / "exports" / f"r{rnd.number}-{len(rnd.commands)}.img"
        return Command("export", ("export", snap, out, "--json"), target=snap, out=out)

    # -- running a round ----------------------------------------------------------------------

    def run(self, rnd: Round) -> None:
        """Every command of ``rnd`` started at once, and the mount read meanwhile; each must end
        within ``COMMAND_BOUND``."""
        (self.tmp / "exports").mkdir(exist_ok=True)
        procs: list[subprocess.Popen[str]] = []
        reader = threading.Thread(target=self.read_images, args=(rnd,))
        reading = False
        try:
            for command in rnd.commands:
                proc = self.snapfs.popen(*command.args)
                procs.append(proc)
                command.pid = proc.pid
            reader.start()
            reading = True
            deadline = time.monotonic() + COMMAND_BOUND
            for command, proc in zip(rnd.commands, procs, strict=True):
                try:
                    out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    hung = [c.describe() for c, p in zip(rnd.commands, procs, strict=True)
                            if p.poll() is None]
                    raise AssertionError(f"round {rnd.number}: still running after "
                                         f"{COMMAND_BOUND:.0f} s: {hung}\n{self.history()}") from None
                command.result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        finally:
            for proc in procs:
                reap(proc)
            if reading:
                reader.join()
        self.note(f"round {rnd.number}" + (f" (reading {', '.join(rnd.reads)})"
                                           if rnd.reads else ""))
        for command in rnd.commands:
            self.note("  " + command.describe())
        for snap, error in rnd.read_errors.items():
            self.note(f"  read of {snap}: {error}")

    def read_images(self, rnd: Round) -> None:
        """Read snapshot images through the mount while the commands run: each reads as its
        model, or (one that a command of the round may delete) fails to open or read."""
        for snap in rnd.reads:
            try:
                got = self.image_path(snap).read_bytes()
            except OSError as e:
                rnd.read_errors[snap] = str(e)
                continue
            if got != self.snaps[snap].content:
                rnd.read_errors[snap] = "wrong bytes"

    # -- what the round did to the model --------------------------------------------------------

    def settle(self, rnd: Round) -> None:
        """Check each command's outcome, and change the model as those that succeeded did:
        first what was made (a forget may have found it made already), then what was deleted."""
        made: dict[str, Snap] = {}
        # deletions last: a forget judges the snapshots made in the round too
        for command in sorted(rnd.commands, key=lambda c: c.kind in ("delete", "forget")):
            result = command.result
            assert result is not None
            if result.returncode == 0:
                assert result.stderr == "", (command.describe(), self.history())
                getattr(self, f"did_{command.kind}")(rnd, command, json.loads(result.stdout),
                                                     made)
            else:
                self.refused(rnd, command)
        for snap, error in rnd.read_errors.items():
            assert error != "wrong bytes" and rnd.doomed(snap), \
                f"reading {snap} through the mount: {error}\n{self.history()}"
        self.snaps.update(made)
        gone = self.deleted(rnd, made)
        for name in gone:
            del self.snaps[name]
        # a disk made from a snapshot or rolled back to it needs it: nothing may delete it
        for command in rnd.of("disk_create") + rnd.of("rollback"):
            if command.result is not None and command.result.returncode == 0:
                assert command.target not in gone, (command.describe(), self.history())

    def refused(self, rnd: Round, command: Command) -> None:
        """A command that failed: in one line, with an exit code that what ran beside it
        explains; a lock's holders are processes of the round doing what the line says."""
        result = command.result
        assert result is not None
        code = result.returncode
        line = one_error(result, code)
        context = f"{command.describe()}\n{self.history()}"
        if "is locked by" in line:
            self.check_holders(rnd, line, context)
        if code == EXIT_LOCKED:
            assert command.kind in ("create", "create_parent", "disk_create", "rollback",
                                    "delete", "forget", "prune", "repair"), context
            assert "is locked by" in line, context
            return
        if code == EXIT_NOT_FOUND and command.kind == "forget":
            # every snapshot of its --disk deleted by another command of the round
            assert "no snapshots of disk" in line, context
            assert any(c.kind in ("delete", "forget") for c in rnd.commands if c is not command), \
                context
            return
        if code == EXIT_NOT_FOUND:
            # a snapshot it names, deleted by a delete or forget of the round
            assert command.target is not None or command.targets, context
            assert any(rnd.doomed(s, besides=command)
                       for s in [command.target, *command.targets] if s), context
            return
        if code == EXIT_USAGE and command.kind == "delete":
            # needed: a disk's base or parent, or an image read through the mount
            assert re.search(r"is the (base|parent) of disk|is open at|needs", line), context
            return
        if code == EXIT_GENERAL and command.kind == "rollback":
            assert "a snapshot of it is being taken" in line or "is still uploading" in line, \
                context
            assert any(command.disk in c.group for c in rnd.of("snapshot_disk")), context
            return
        if code == EXIT_GENERAL and command.kind == "snapshot_disk":
            # its upload waited for a collection's lock, three times in vain
            assert "is locked by" in line, context
            return
        raise AssertionError(f"unexpected failure: {context}")

    def check_holders(self, rnd: Round, line: str, context: str) -> None:
        """Each holder a "locked" line names is a process of the round (or the daemon for its
        disks) that takes a lock for just what the line says."""
        what = line.split(" is locked by ", 1)[1].split("; try again when it ends", 1)[0]
        found = list(HOLDER.finditer(what))
        assert "".join(m.group(0) for m in found) == what, (what, context)
        holders = [m.groups() for m in found]
        for purpose, pid, _host in holders:
            if int(pid) == self.daemon.pid:
                doing = [f"snapshot of disks {', '.join(c.group)}" for c in rnd.of("snapshot_disk")]
                doing += [f"snapshot of disk {d}" for c in rnd.of("snapshot_disk") for d in c.group]
                doing += [f"disk create {c.makes} (snapfs daemon)" for c in rnd.of("disk_create")]
                doing += [f"disk rollback {c.disk} (snapfs daemon)" for c in rnd.of("rollback")]
                assert purpose in doing, (purpose, doing, context)
                continue
            holder = [c for c in rnd.commands if c.pid == int(pid)]
            assert holder, (f"the lock of pid {pid} ({purpose}) is no process of the round's",
                            context)
            assert holder[0].purpose == purpose, (purpose, holder[0].describe(), context)

    def did_create(self, rnd: Round, command: Command, doc: dict[str, Any],
                   made: dict[str, Snap]) -> None:
        assert command.makes is not None and command.disk is not None
        assert (doc["name"], doc["disk"]) == (command.makes, command.disk), doc
        if command.target is not None:
            assert doc["parent"] == self.snaps[command.target].id, (doc, command.describe())
        made[command.makes] = Snap(doc["id"], command.disk, bytes(self.images[command.disk]),
                                   doc["created"])

    did_create_parent = did_create

    def did_snapshot_disk(self, rnd: Round, command: Command, task: dict[str, Any],
                          made: dict[str, Snap]) -> None:
        """Each disk's snapshot holds the disk as it was when the round began, or, where a
        rollback of it in the round came first, as the rollback left it."""
        assert task["state"] == "accomplished", task
        assert [p["name"] for p in task["parts"]] == command.snapshots_made(), task
        assert len({p["snapshot"]["group"] for p in task["parts"]}) == 1, task
        for disk, part in zip(command.group, task["parts"], strict=True):
            root = self.repo.resolve(part["snapshot_id"])
            content = self.repo_bytes(root.id)
            before = rnd.start_disks[disk]
            rolled = [c for c in rnd.of("rollback") if c.disk == disk
                      and c.result is not None and c.result.returncode == 0]
            after = [self.rolled_back(before, self.snaps[c.target].content) for c in rolled
                     if c.target is not None]
            assert content in [before, *after], (part["name"], command.describe(),
                                                 self.history())
            made[part["name"]] = Snap(root.id, disk, content, root.created)

    def did_disk_create(self, rnd: Round, command: Command, doc: dict[str, Any],
                        made: dict[str, Snap]) -> None:
        assert command.makes is not None and command.target is not None
        assert doc["base"] == self.snaps[command.target].id, doc
        self.disks[command.makes] = bytearray(self.snaps[command.target].content)

    def did_rollback(self, rnd: Round, command: Command, doc: dict[str, Any],
                     made: dict[str, Snap]) -> None:
        assert command.disk is not None and command.target is not None
        assert doc["snapshot"] == self.snaps[command.target].id, doc
        self.disks[command.disk] = bytearray(
            self.rolled_back(rnd.start_disks[command.disk], self.snaps[command.target].content))

    @staticmethod
    def rolled_back(disk: bytes, snapshot: bytes) -> bytes:
        """A disk rolled back to ``snapshot``: its bytes, and zeros past them (a disk never
        shrinks)."""
        return snapshot + bytes(max(0, len(disk) - len(snapshot)))

    def did_delete(self, rnd: Round, command: Command, doc: dict[str, Any],
                   made: dict[str, Snap]) -> None:
        assert sorted(doc["deleted"]) == sorted(self.snaps[s].id for s in command.targets), doc

    def did_forget(self, rnd: Round, command: Command, doc: dict[str, Any],
                   made: dict[str, Snap]) -> None:
        """What a forget deleted is its own choice of what it listed (snapshots made in the
        round may be among them); each had ``--keep-last`` newer ones of its disk."""
        known = {**self.snaps, **made}
        by_id = {s.id: (name, s) for name, s in known.items()}
        for snap_id in doc["forgotten"]:
            assert snap_id in by_id, (snap_id, doc, self.history())
            name, snap = by_id[snap_id]
            # (newest first as forget ranks them: by time, a tie by id, so that two snapshots
            # of a disk made in the same millisecond by commands of one round still count)
            newer = [s for s in known.values() if s.label == snap.label
                     and (s.created, s.id) > (snap.created, snap.id)]
            assert len(newer) >= command.keep, (name, command.describe(), self.history())

    def did_prune(self, rnd: Round, command: Command, doc: dict[str, Any],
                  made: dict[str, Snap]) -> None:
        assert doc["packs_written"] >= 0

    def did_repair(self, rnd: Round, command: Command, doc: dict[str, Any],
                   made: dict[str, Snap]) -> None:
        # nothing was wrong, so nothing is written
        assert (doc["rewritten"], doc["packs_added"], doc["packs_gone"], doc["incomplete"]) \
            == (False, 0, 0, {}), (doc, self.history())

    def did_verify(self, rnd: Round, command: Command, doc: dict[str, Any],
                   made: dict[str, Snap]) -> None:
        assert doc["ok"] and doc["problems"] == [], (doc, self.history())

    def did_list(self, rnd: Round, command: Command, docs: list[dict[str, Any]],
                 made: dict[str, Snap]) -> None:
        # everything there when it began but what the round may delete, and nothing it did not make
        listed = {d["name"] for d in docs if d["state"] == "accomplished"}
        assert {s for s in self.snaps if not rnd.doomed(s)} <= listed, (listed, self.history())
        assert listed <= set(self.snaps) | {n for c in rnd.commands for n in c.snapshots_made()}, \
            listed

    def did_export(self, rnd: Round, command: Command, doc: dict[str, Any],
                   made: dict[str, Snap]) -> None:
        assert command.out is not None and command.target is not None
        assert command.out.read_bytes() == self.snaps[command.target].content, \
            (command.describe(), self.history())

    def deleted(self, rnd: Round, made: dict[str, Snap]) -> set[str]:
        by_id = {s.id: name for name, s in self.snaps.items()}
        gone: set[str] = set()
        for command in rnd.of("delete") + rnd.of("forget"):
            result = command.result
            if result is None or result.returncode != 0:
                continue
            doc = json.loads(result.stdout)
            gone.update(by_id[i] for i in doc["deleted" if command.kind == "delete"
                                              else "forgotten"])
        return gone

    def repo_bytes(self, snap_id: str) -> bytes:
        out = self.tmp / "exports" / f"check-{snap_id}.img"
        trio.run(export_snapshot, self.repo, self.repo.resolve(snap_id), str(out))
        try:
            return out.read_bytes()
        finally:
            out.unlink()

    # -- after a round: everything as the model says ---------------------------------------------

    def check(self, rnd: Round) -> None:
        store = self.repo.store
        # a daemon's upload lets go of its lock just after it says the snapshot is stored
        wait_for(lambda: not list(store.list("locks/")), 30, "every lock to be let go of")
        listing = self.repo.list_snapshots()
        assert listing.unreadable == []
        assert {r.name: r.id for r in listing.roots} == {n: s.id for n, s in self.snaps.items()}, \
            self.history()
        report = trio.run(verify_snapshots, self.repo, listing.roots)
        assert report.ok, (report.problems, self.history())
        for root in listing.roots:
            assert self.repo_bytes(root.id) == self.snaps[root.name].content, \
                (root.name, self.history())
        # the exports that succeeded, and no partial file of those that failed
        exported = {c.out.name for c in rnd.of("export") if c.out is not None
                    and c.result is not None and c.result.returncode == 0}
        assert {p.name for p in (self.tmp / "exports").iterdir()} == exported
        for path in (self.tmp / "exports").iterdir():
            path.unlink()
        # the mount lists the snapshot list again at most every --refresh-interval
        wait_for(lambda: {p.name.removesuffix(".img") for p in self.image_path("x").parent.iterdir()}
                 == set(self.snaps), 30, "the mount to serve the model's snapshots")
        for name, snap in self.snaps.items():
            assert self.image_path(name).read_bytes() == snap.content, (name, self.history())
        facts = {d["name"]: d for d in self.snapfs.json("disk", "list")}
        assert set(facts) == set(self.disks)
        ids = {s.id for s in self.snaps.values()}
        for name, model in self.disks.items():
            assert self.disk_path(name).read_bytes() == model, (name, self.history())
            assert {facts[name]["base"], facts[name]["parent"]} <= ids, (facts[name],
                                                                         self.history())


@pytest.mark.parametrize(("store_url", "seed"), [
    *(pytest.param("local", s, id=f"local-{s}") for s in seeds(1)),
    *(pytest.param("s3", s, id=f"s3-{s}", marks=pytest.mark.s3) for s in seeds(2)),
], indirect=["store_url"])
def test_commands_at_the_same_time_cost_no_snapshot(
        store_url: str, store_endpoint: str | None, tmp_path: Path, runtime_dir: Path,
        make_store: Callable[..., ObjectStore], request: pytest.FixtureRequest,
        seed: int) -> None:
    """``ROUNDS`` rounds from ``seed`` (module docstring): two image files with a snapshot
    each and a served disk made from each, then in every round the sources change and several
    commands run at once. A failure shows the history, each command with its exit code and
    line, so that the seed runs it again."""
    s3 = store_url.startswith("s3://")
    rng = random.Random(seed)
    snapfs = Snapfs(store_url, store_endpoint, make_env(runtime_dir, request, s3))
    repo = Repository.init(make_store(store_url), pack_size=PACK_SIZE)
    # background hydration moves blocks into the cache while collections move them in packs
    options = () if seed % 2 else ("--no-background",)
    with mounted(snapfs, tmp_path / "mnt", tmp_path / "cache", "--refresh-interval", "0.5",
                 *options) as daemon:
        history = History(snapfs, repo, daemon, rng, tmp_path)
        for label in LABELS:
            history.add_image(label)
            name = history.fresh("i")
            doc = snapfs.json("snapshot", "create", history.paths[label], "--disk", label,
                              "--name", name)
            history.snaps[name] = Snap(doc["id"], label, bytes(history.images[label]),
                                       doc["created"])
        for source in list(history.snaps):
            name = history.fresh("d")
            snapfs.ok("disk", "create", name, "--from", source)
            history.disks[name] = bytearray(history.snaps[source].content)
        for number in range(ROUNDS):
            history.change_images()
            history.write_disks()
            rnd = Round(number, start_disks={n: bytes(m) for n, m in history.disks.items()})
            history.plan(rnd)
            history.run(rnd)
            history.settle(rnd)
            history.check(rnd)
        # at the end, alone: a prune, a verify, and nothing left that nothing needs
        snapfs.json("prune")
        assert snapfs.json("verify")["ok"]
        assert {d["name"] for d in snapfs.json("snapshot", "list")} == set(history.snaps)
        check_collected(repo)
        for name in list(history.disks):
            snapfs.ok("disk", "delete", name)


# -- what the stress test can only hit by chance, made to happen every time -------------------


def run_to_the_end(proc: subprocess.Popen[str], pid: int) -> tuple[str, str]:
    """Resume a command that ``stopped_at`` stopped, and every later stop of it: strace counts
    the calls of each thread apart, and another worker thread's first call stops it again."""
    deadline = time.monotonic() + 60
    while True:
        os.kill(pid, signal.SIGCONT)
        try:
            return proc.communicate(timeout=0.5)
        except subprocess.TimeoutExpired:
            assert time.monotonic() < deadline, "the command did not end"


@pytest.fixture
def local_repo(tmp_path: Path, runtime_dir: Path, request: pytest.FixtureRequest,
               ) -> tuple[Snapfs, Path]:
    """A local repository with snapshots ``kept`` and ``gone`` of two unrelated images."""
    snapfs = Snapfs(str(tmp_path / "repo"), None, make_env(runtime_dir, request, False))
    snapfs.ok("init")
    for seed, name in enumerate(("kept", "gone")):
        image = tmp_path / f"{name}.img"
        image.write_bytes(random.Random(seed).randbytes(20 * BS))
        snapfs.ok("snapshot", "create", image, "--name", name)
    return snapfs, tmp_path / "repo"


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("command", ["verify", "verify-named", "export"])
def test_a_snapshot_deleted_while_it_is_read_is_no_damage(
        command: str, local_repo: tuple[Snapfs, Path], tmp_path: Path) -> None:
    """``verify`` (of every snapshot) and ``export`` list the snapshots, then load the index:
    a ``delete`` in between (stopped there with strace, as it lists ``index/``) collects what
    only the deleted snapshot used. Verify reported its manifest page as missing ("snapfs
    repair index finds it", exit 4), and export said the same where README promises "was
    deleted while it was exported" (exit 3): a cron job's false alarm of lost data. A
    snapshot named to ``verify`` and deleted meanwhile was not verified, which exit 0 would
    deny: exit 3, as export."""
    snapfs, repo = local_repo
    args: tuple[Any, ...] = {
        "verify": ("verify", "--json"),
        "verify-named": ("verify", "gone", "--json"),
        "export": ("export", "gone", tmp_path / "out.img")}[command]
    gone = snapfs.json("snapshot", "show", "gone")["id"]
    proc, pid = stopped_at(snapfs, args, "openat", tmp_path / "strace.out", path=repo / "index",
                           when=1)
    try:
        snapfs.ok("snapshot", "delete", "gone")
        os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        end_stopped(proc, pid)
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if command == "verify":
        assert (result.returncode, result.stderr) == (0, ""), (result.stdout, result.stderr)
        report = json.loads(out)
        assert (report["ok"], report["problems"], report["snapshots"],
                report["deleted_meanwhile"]) == (True, [], 1, [gone]), report
    elif command == "verify-named":
        assert one_error(result, EXIT_NOT_FOUND) == (
            f"snapfs: not verified: snapshot {gone} was deleted while it was verified")
        report = json.loads(out)
        assert (report["ok"], report["snapshots"], report["deleted_meanwhile"]) == (
            True, 0, [gone]), report
    else:
        assert "was deleted while it was exported" in one_error(result, EXIT_NOT_FOUND)
        assert list(tmp_path.glob("out.img*")) == []


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_manifest_page_moved_while_verify_reads_is_read_where_it_went(
        tmp_path: Path, runtime_dir: Path, request: pytest.FixtureRequest) -> None:
    """A delete repacks the pack that holds a manifest page a kept snapshot shares with the
    deleted one, while ``verify`` of the kept one has read the index but not that page yet
    (stopped with strace as it opens the pack of the snapshot it checks first). README says
    blocks that a collection moves meanwhile are read where they went; pages were not (the old
    pack was gone: "missing", exit 4), though they are blobs in packs like any block.

    With 4 KiB blocks a manifest page covers 16 MiB: ``old`` has data in two pages' ranges,
    ``new`` rewrites the second range and shares the first page. Deleting ``old`` leaves its
    pack (its blocks, then its pages) with only the first range's few blocks and that page
    live: it is repacked."""
    url = tmp_path / "repo"
    snapfs = Snapfs(str(url), None, make_env(runtime_dir, request, False))
    repo = Repository.init(LocalStore(url), block_size=4096, pack_size=PACK_SIZE)
    rng = random.Random(7)
    first = tmp_path / "first.img"
    first.write_bytes(rng.randbytes(8 * 4096))
    snapfs.ok("snapshot", "create", first, "--name", "first")
    image = tmp_path / "image.img"
    with open(image, "wb") as f:
        f.write(rng.randbytes(8 * 4096))  # blocks 0-7, in the first page's range
        f.seek(4096 * 4096)
        f.write(rng.randbytes(32 * 4096))  # blocks 4096-4127, the second page's
    snapfs.ok("snapshot", "create", image, "--name", "old")
    with open(image, "r+b") as f:
        f.seek(4096 * 4096)
        f.write(rng.randbytes(32 * 4096))
    snapfs.ok("snapshot", "create", image, "--name", "new")
    index = repo.load_index()
    old, new, kept = (repo.resolve(n) for n in ("old", "new", "first"))
    shared = bytes.fromhex(new.pages[0])
    assert new.pages[0] == old.pages[0] and new.pages[1] != old.pages[1]
    moved_from = index.locate(shared).pack
    first_pack = repo.store.root / pack_key(index.locate(bytes.fromhex(kept.pages[0])).pack)

    proc, pid = stopped_at(snapfs, ("verify", "first", "new", "--json"), "openat",
                           tmp_path / "strace.out", path=first_pack, when=1)
    try:
        deleted = snapfs.json("snapshot", "delete", "old")
        out, err = run_to_the_end(proc, pid)
    finally:
        end_stopped(proc, pid)
    assert deleted["packs_repacked"] >= 1
    assert repo.load_index().locate(shared).pack != moved_from  # the page moved meanwhile
    assert (proc.returncode, err) == (0, ""), (out, err)
    report = json.loads(out)
    assert (report["ok"], report["snapshots"]) == (True, 2), report


def futex_waiters_in(pid: int, mapped: str) -> list[int]:
    """The threads of ``pid`` waiting on a futex (a pthread mutex) that lies in its mapping of
    the file ``mapped``: for lmdb's lock file, the writers waiting for its write lock."""
    spans = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == mapped:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    waiting = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            call = (task / "syscall").read_text().split()
        except OSError:  # (the thread ended)
            continue
        if call and call[0] == "202" and any(a <= int(call[1], 16) < b for a, b in spans):
            waiting.append(int(task.name))
    return waiting


def test_a_snapshot_closed_right_after_a_rollback_that_grew_the_disk_holds_all_of_it(
        tmp_path: Path, runtime_dir: Path, request: pytest.FixtureRequest) -> None:
    """A snapshot of a disk asked for while a rollback of it to a bigger snapshot is under
    way closes once the rollback is done, after it: of the disk as the rollback left it. It
    took the disk's size when it was asked for, before it waited for the disk, so it held the
    rolled back disk cut to its old size (blocks lost; the stress test's seed 19, at times).

    The rollback is held inside its change for real: the test holds the write lock of the
    disks' lmdb state, which the rollback needs to commit. The snapshot is asked for once the
    rollback waits there, and the lock let go once the snapshot is being closed (a rollback of
    the disk is refused for that reason then)."""
    snapfs = Snapfs(str(tmp_path / "repo"), None, make_env(runtime_dir, request, False))
    snapfs.ok("init")
    rng = random.Random(11)
    small, big = rng.randbytes(8 * BS), rng.randbytes(12 * BS)
    for name, data in (("small", small), ("big", big)):
        (tmp_path / f"{name}.img").write_bytes(data)
        snapfs.ok("snapshot", "create", tmp_path / f"{name}.img", "--name", name)
    with mounted(snapfs, tmp_path / "mnt", tmp_path / "cache", "--no-background") as daemon:
        snapfs.ok("disk", "create", "d", "--from", "small")
        [state] = (tmp_path / "cache" / "disks").glob("*/state.lmdb")
        env = lmdb.open(str(state), readahead=False)
        procs: list[subprocess.Popen[str]] = []
        try:
            txn = env.begin(write=True)
            try:
                procs.append(snapfs.popen("disk", "rollback", "d", "big", "--yes", "--json"))
                wait_for(lambda: futex_waiters_in(daemon.pid, str(state / "lock.mdb")), 60,
                         "the rollback to wait for the disks' state")
                procs.append(snapfs.popen("snapshot", "create", "--disk", "d", "--name", "after",
                                          "--no-wait", "--json"))
                wait_for(lambda: "a snapshot of it is being taken" in snapfs(
                    "disk", "rollback", "d", "no-such-snapshot", "--yes").stderr, 60,
                         "the snapshot to be closing")
            finally:
                txn.abort()
            rolled, closed = (p.communicate(timeout=60) for p in procs)
        finally:
            env.close()
            for proc in procs:
                reap(proc)
        assert [p.returncode for p in procs] == [0, 0], (rolled, closed)
        assert (daemon.mountpoint / "disks" / "d.img").read_bytes() == big
        wait_for(lambda: {s["name"]: s["state"] for s in snapfs.json("snapshot", "list")}
                 .get("after") == "accomplished", 60, "the snapshot to be stored")
        shown = snapfs.json("snapshot", "show", "after")
        assert shown["size"] == len(big), shown
        snapfs.ok("export", "after", tmp_path / "after.img")
        assert (tmp_path / "after.img").read_bytes() == big
        snapfs.ok("disk", "delete", "d")
