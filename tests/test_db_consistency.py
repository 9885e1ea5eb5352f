"""A database on a served disk, for real: does the disk come back as the application left it?

SQLite (``dbwriter``, a process of its own) commits transactions without pause into ext4 on a
disk the daemon serves, attached to a loop device; each commit inserts row n and sets a head row
to n, and is reported (``Acks``) only after SQLite acknowledged it (``synchronous``: the fsync
that makes it durable returned). While it runs, the disk is snapshotted, and each snapshot is
brought back as an operator would: a disk created from it, attached, its ext4 mounted (the
kernel replays the journal, as after a crash) and unmounted, then

- ``fsck.ext4 -fn`` finds the replayed file system clean (a snapshot taken with ``--freeze``
  must be clean before any replay: the freeze wrote everything back and closed the journal);
- SQLite, opening the database (and recovering it from its WAL or hot journal, as after a
  crash), finds it whole (``PRAGMA integrity_check``), its rows 1..n without a hole, each as
  written, and its head row at n;
- n is a point in time between the command's start and its return: at least the last commit
  acknowledged before ``snapshot create`` started (acknowledged means durable, so the snapshot
  must hold it) and at most one past the last acknowledged when it returned (the commit in
  flight then may or may not be in it; the next one had not started).

A consistency group snapshots two disks, whose databases the writer commits in turn (row n on
A, then row n on B): in any instant B's n ≤ A's n ≤ B's n + 1, and so in the group's snapshot.
Finally, kill -9 of the daemon while the database commits: after a restart the disk itself must
replay to a clean file system and a whole database holding every acknowledged commit.

Journal modes: WAL with ``synchronous=FULL`` (a commit is durable once it returns), and the
rollback journal (``DELETE``) with ``synchronous=EXTRA``: with FULL, SQLite does not sync the
directory after deleting the journal, so a crash just after a commit may find the journal and
roll that commit back (SQLite's documentation of ``PRAGMA synchronous``); that is SQLite's
promise, not a loss of snapfs's, so the test asks for the mode that promises durability.

Snapshots are taken with ``--no-wait`` (the command returns once the disks' generations are
closed, so the bounds are tight). Some are restored from their pending views while their uploads
are held back and the writer rewrites the blocks they closed, and again once stored; one is
closed just before the kill, and stored by the next daemon.

The checks were seen to fail for real: a pending view that read the disk's current blocks instead
of the copies kept for it (integrity_check: malformed), a daemon that forgot a write's present
marks over kill -9 (the replayed ext4 would not mount), and two single-disk snapshots standing
in for a group (B's n > A's n).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from dbwriter import Acks, expected_row
from mountutil import MOUNTS, Served, attached, ext4_mounted, fsck_clean, mounted, wait_for
from testkit import Snapfs, uploads_held

pytestmark = MOUNTS

DBWRITER = Path(__file__).with_name("dbwriter.py")
DISK_SIZE = "64M"
#: journal mode and the synchronous setting that makes its commits durable (see above)
MODES = {"wal": ("WAL", "FULL"), "delete": ("DELETE", "EXTRA")}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def snapfs(tmp_path: Path, runtime_dir: Path) -> Snapfs:
    """``snapfs`` on a new, empty local repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SNAPFS_"))}
    env["SNAPFS_RUNTIME_DIR"] = str(runtime_dir)
    s = Snapfs(str(tmp_path / "repo"), None, env)
    s.ok("init")
    return s


@contextmanager
def serving(snapfs: Snapfs, tmp_path: Path) -> Iterator[Served]:
    with mounted(snapfs, tmp_path / "mnt", tmp_path / "cache") as daemon:
        yield Served(snapfs, daemon, tmp_path)


# -- ext4 and the database -----------------------------------------------------------------------


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)


def make_ext4(device: str) -> None:
    result = run("mkfs.ext4", "-q", "-F", "-b", "4096", device)
    assert result.returncode == 0, result.stderr


def needs_recovery(device: str) -> bool:
    result = run("dumpe2fs", "-h", device)
    assert result.returncode == 0, result.stderr
    (features,) = (line for line in result.stdout.splitlines()
                   if line.startswith("Filesystem features:"))
    return "needs_recovery" in features.split()


@dataclasses.dataclass
class Writer:
    """The ``dbwriter`` process and its acknowledged commits (one slot per database)."""

    proc: subprocess.Popen[str]
    acks: Acks

    def wait_for(self, n: int, slot: int = 0) -> None:
        wait_for(lambda: self.acks[slot] >= n or self.proc.poll() is not None, 60,
                 f"the database writer to commit {n}")
        assert self.proc.poll() is None, f"the writer failed: {self.proc.communicate()[1]}"

    def stop(self) -> list[int]:
        """Stop it after its round in progress. The last commits it made."""
        self.acks.request_stop()
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return self.acks.snapshot()


@contextmanager
def writing(where: Path, mode: str, databases: list[Path]) -> Iterator[Writer]:
    """``dbwriter`` committing to ``databases`` in ``mode`` while the block runs; killed (and
    reaped) afterwards if it still runs."""
    ack_file = where / f"acks-{uuid.uuid4().hex[:8]}"
    acks = Acks(ack_file, len(databases), create=True)
    proc = subprocess.Popen([sys.executable, str(DBWRITER), str(ack_file), *MODES[mode],
                             *map(str, databases)], stderr=subprocess.PIPE, text=True)
    try:
        yield Writer(proc, acks)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        acks.close()


def check_database(path: Path, low: int, high: int, where: str) -> int:
    """The database at ``path`` (recovered by SQLite as it opens) is whole, holds rows 1..n as
    written, without a hole, with its head row at n, and ``low <= n <= high``. Returns n."""
    assert path.exists(), f"{where}: {path.name} is gone"
    con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)  # never made
    try:
        problems = con.execute("PRAGMA integrity_check").fetchall()
        assert problems == [("ok",)], f"{where}: {problems}"
        (head,) = con.execute("SELECT n FROM head").fetchone()
        n = 0
        for n_row, key, payload in con.execute("SELECT n, key, payload FROM rows ORDER BY n"):
            n += 1
            assert n_row == n, f"{where}: row {n} is missing (the next row is {n_row})"
            assert (key, payload) == expected_row(n), f"{where}: row {n} is not as written"
        (by_key,) = con.execute("SELECT count(*) FROM rows INDEXED BY rows_by_key "
                                "WHERE key >= x''").fetchone()
    except sqlite3.DatabaseError as e:  # "database disk image is malformed" and its kin
        raise AssertionError(f"{where}: {e}") from e
    finally:
        con.close()
    assert head == n, f"{where}: the head row says {head}, the table holds rows 1..{n}"
    assert by_key == n, f"{where}: the index holds {by_key} rows, the table {n}"
    assert low <= n <= high, \
        f"{where}: holds commit {n}, not between {low} and {high}: not that point in time"
    return n


@contextmanager
def replayed(device: str, where: Path) -> Iterator[Path]:
    """The ext4 on ``device`` as after a crash: mounted (the kernel replays its journal) and
    unmounted, found clean by fsck, and mounted again at ``where``."""
    with ext4_mounted(device, where):
        pass
    assert not needs_recovery(device)
    fsck_clean(device)
    with ext4_mounted(device, where) as fs:
        yield fs


@dataclasses.dataclass
class Cut:
    """A snapshot taken while the writer ran: per disk, its snapshot's name, and the writer's
    acknowledged commits when the command started and when it returned."""

    names: dict[str, str]
    before: list[int]
    returned: list[int]
    frozen: bool


def take(s: Served, disks: list[str], name: str, writer: Writer, freeze: tuple[Path, ...] = ()
         ) -> Cut:
    before = writer.acks.snapshot()
    task = s.snapshot(*(a for d in disks for a in ("--disk", d)), "--name", name, "--no-wait",
                      *(a for f in freeze for a in ("--freeze", f)))
    returned = writer.acks.snapshot()
    assert task["consistency"] == ("frozen" if freeze else "crash"), task
    return Cut({p["disk"]: p["name"] for p in task["parts"]}, before, returned, bool(freeze))


def restore(s: Served, snapshot: str, stack: ExitStack, label: str = "r", frozen: bool = False
            ) -> Path:
    """A disk made from ``snapshot`` (named ``LABEL-SNAPSHOT``), attached, its ext4
    ``replayed`` and mounted (undone when ``stack`` closes): where its files are."""
    disk = f"{label}-{snapshot}"
    s.snapfs.ok("disk", "create", disk, "--from", snapshot)
    loop = stack.enter_context(attached(s.disk(disk)))
    if frozen:  # the freeze closed the journal: clean as it is
        assert not needs_recovery(loop), snapshot
        fsck_clean(loop)
    return stack.enter_context(replayed(loop, s.tmp / "restored" / disk))


def seed(s: Served, mode: str, commits: int = 20) -> int:
    """A stored snapshot named ``base`` of a disk whose ext4 holds the database after
    ``commits`` commits or a few more (the application stopped cleanly, the file system was
    unmounted), for disks to be made from; their writes then land in blocks the base holds
    (partly: a 4 KiB ext4 block is a quarter of a snapfs block), read through the cache. The
    last commit made."""
    s.snapfs.ok("disk", "create", "seed", "--size", DISK_SIZE)
    with attached(s.disk("seed")) as loop:
        make_ext4(loop)
        with ext4_mounted(loop, s.tmp / "seed") as fs, \
                writing(s.tmp, mode, [fs / "app.db"]) as writer:
            writer.wait_for(commits)
            (last,) = writer.stop()
    assert s.snapshot("--disk", "seed", "--name", "base")["state"] == "accomplished"
    return last


def wait_stored(s: Served, names: list[str]) -> None:
    def stored() -> bool:
        listed = s.snapshots()
        for name in names:
            assert listed[name]["state"] != "failed", listed[name]
        return all(listed[name]["state"] == "accomplished" for name in names)

    wait_for(stored, 60, f"snapshots {names} to be stored")


# -- one disk ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_snapshots_of_a_committing_database_are_points_in_time(
    snapfs: Snapfs, tmp_path: Path, mode: str
) -> None:
    """A disk made from a snapshot of the database (``seed``), the application started again
    on it; four snapshots (the third with ``--freeze``) while it commits and their uploads are
    held back. The first and the last are restored from their pending views at once, while the
    writer goes on rewriting the blocks they closed (their contents at the closing come from
    the copies kept for them; the last one's untouched blocks from the pending views below it),
    and all of them from the stored snapshots later: the same commit both times."""
    with serving(snapfs, tmp_path) as s:
        seeded = seed(s, mode)
        s.snapfs.ok("disk", "create", "d", "--from", "base")
        cuts: list[Cut] = []
        with attached(s.disk("d")) as loop:
            with ext4_mounted(loop, tmp_path / "fs") as fs, \
                    writing(tmp_path, mode, [fs / "app.db"]) as writer:
                writer.wait_for(seeded + 20)
                with uploads_held(s.snapfs):
                    for i, freeze in enumerate((False, False, True, False)):
                        cuts.append(take(s, ["d"], f"s{i}", writer, (fs,) if freeze else ()))
                        writer.wait_for(cuts[-1].returned[0] + 15)
                    listed = s.snapshots()
                    assert {listed[f"s{i}"]["state"] for i in range(4)} == {"progressing"}
                    while_pending = {}
                    for i in (0, 3):
                        with ExitStack() as stack:
                            restored = restore(s, f"s{i}", stack, "pending")
                            while_pending[i] = check_database(
                                restored / "app.db", cuts[i].before[0], cuts[i].returned[0] + 1,
                                f"snapshot s{i}, pending")
                        writer.wait_for(writer.acks[0] + 15)
                (last,) = writer.stop()
            # the disk itself, unmounted cleanly: every commit, nothing to replay
            assert not needs_recovery(loop)
            fsck_clean(loop)
            with ext4_mounted(loop, tmp_path / "fs") as fs:
                check_database(fs / "app.db", last, last, "the disk")

        wait_stored(s, [name for cut in cuts for name in cut.names.values()])
        found = []
        for cut in cuts:
            (snap,) = cut.names.values()
            with ExitStack() as stack:
                restored = restore(s, snap, stack, "stored", frozen=cut.frozen)
                found.append(check_database(restored / "app.db", cut.before[0],
                                            cut.returned[0] + 1, f"snapshot {snap}"))
        assert {i: found[i] for i in while_pending} == while_pending
        assert found == sorted(found) and found[0] > seeded, found


# -- a consistency group -------------------------------------------------------------------------


def test_a_consistency_group_holds_two_databases_at_one_instant(
    snapfs: Snapfs, tmp_path: Path
) -> None:
    """Row n is committed on A, then on B: a group snapshot must hold B's n ≤ A's n ≤ B's n + 1;
    two snapshots of the disks one at a time, between which the writer goes on, would not.
    Three group snapshots, the second with both file systems frozen."""
    with serving(snapfs, tmp_path) as s:
        cuts: list[Cut] = []
        with ExitStack() as stack:
            dbs = []
            for name in ("a", "b"):
                s.snapfs.ok("disk", "create", name, "--size", DISK_SIZE)
                loop = stack.enter_context(attached(s.disk(name)))
                make_ext4(loop)
                dbs.append(stack.enter_context(ext4_mounted(loop, tmp_path / f"fs-{name}"))
                           / "app.db")
            with writing(tmp_path, "wal", dbs) as writer:
                writer.wait_for(20, slot=1)
                for i in range(3):
                    freeze = tuple(db.parent for db in dbs) if i == 1 else ()
                    cuts.append(take(s, ["a", "b"], f"g{i}", writer, freeze))
                    writer.wait_for(cuts[-1].returned[1] + 15, slot=1)
                writer.stop()

        for cut in cuts:
            with ExitStack() as stack:
                n = {}
                for slot, disk in enumerate(("a", "b")):
                    fs = restore(s, cut.names[disk], stack, frozen=cut.frozen)
                    n[disk] = check_database(fs / "app.db", cut.before[slot],
                                             cut.returned[slot] + 1, f"snapshot {cut.names[disk]}")
            assert n["b"] <= n["a"] <= n["b"] + 1, (cut.names, n)
        wait_stored(s, [name for cut in cuts for name in cut.names.values()])


# -- kill -9 -------------------------------------------------------------------------------------


def test_kill_9_of_the_daemon_while_a_database_commits_keeps_every_acknowledged_commit(
    snapfs: Snapfs, tmp_path: Path
) -> None:
    """On a disk made from a snapshot of the database (so a block whose present mark were lost
    would read as the base's, not as zeros), with a snapshot closed while the database commits
    and its upload held back, so that the kill also finds copies kept for it: after the
    restart, the disk holds every acknowledged commit, that snapshot is stored as it was
    closed, the disk's next snapshot (incremental: only the blocks its changed set names) is the
    disk as it reads, and the repository verifies clean."""
    with serving(snapfs, tmp_path) as s:
        seeded = seed(s, "wal")
        s.snapfs.ok("disk", "create", "d", "--from", "base")
        with attached(s.disk("d")) as loop:
            fs = tmp_path / "fs"
            with ext4_mounted(loop, fs), writing(tmp_path, "wal", [fs / "app.db"]) as writer:
                writer.wait_for(seeded + 30)
                with uploads_held(s.snapfs):
                    cut = take(s, ["d"], "before-kill", writer)
                    writer.wait_for(cut.returned[0] + 30)
                    s.daemon.kill()
                writer.proc.wait(60)  # its next commit fails
                _, err = writer.proc.communicate()
                assert writer.proc.returncode == 3, err
                (last,) = writer.acks.snapshot()
        assert "daemon had died" in snapfs.ok("umount", s.mountpoint)

    with serving(snapfs, tmp_path) as s:
        with attached(s.disk("d")) as loop:
            with replayed(loop, tmp_path / "fs") as fs:
                # the commit that failed may be there whole, or not at all
                now = check_database(fs / "app.db", last, last + 1, "the disk after kill -9")
            after = s.snapshot("--disk", "d", "--name", "after-kill")
        assert after["parts"][0]["snapshot"]["source"] == "changed-block tracking", after
        wait_stored(s, ["before-kill"])
        with ExitStack() as stack:
            fs = restore(s, "before-kill", stack)
            check_database(fs / "app.db", cut.before[0], cut.returned[0] + 1,
                           "snapshot before-kill")
        with ExitStack() as stack:
            fs = restore(s, "after-kill", stack)
            check_database(fs / "app.db", now, now, "snapshot after-kill")
        s.snapfs.ok("verify")
