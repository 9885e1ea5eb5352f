"""Garbage collection (``snapfs.repo.gc``) killed at every step: ``snapshot delete``, ``snapshot
forget`` and ``prune``, each a real ``snapfs`` process killed with SIGKILL right before one of
its changes to the repository (``killpoint.py``), on a local directory and on SeaweedFS.

After every kill the snapshots that were not being deleted must all be there, verify clean and
export to exactly the bytes of their sources; ``prune`` run again must finish, leave verify
clean and leave no pack that nothing needs.

A run whole first lists the command's changes (27 to 31 here); it is then killed at the
first, the second and the last change of each run of changes of one kind (``remove packs``
×12 is one run; on S3, where a run costs three times more, the first and the last), so every
phase is cut as it begins, once under way and at its end: 13 to 19 kills a command, then one
run past its last change, which must end as an unkilled one does.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio
from diskimages import MiB, random_image, sha256_file, write_at
from testkit import Snapfs, check_collected, flip_byte, reap, store_env

from snapfs.repo.create import CreateOptions, create_snapshot
from snapfs.repo.export import export_snapshot
from snapfs.repo.repository import Repository, pack_key
from snapfs.repo.verify import verify_snapshots
from snapfs.store import ObjectStore

MakeStore = Callable[..., ObjectStore]

KILLPOINT = str(Path(__file__).with_name("killpoint.py"))
BLOCK = 16 * 1024
#: small packs, so that a few MiB of blocks fill many and a delete leaves some mostly dead
PACK_SIZE = 256 * 1024


@pytest.fixture
def env(store_url: str, request: pytest.FixtureRequest) -> dict[str, str]:
    return store_env(request, store_url.startswith("s3://"))


def rewrite(image: Path, blocks: list[int], seed: int) -> None:
    rng = random.Random(seed)
    for n in blocks:
        write_at(image, n * BLOCK, rng.randbytes(BLOCK))


def build(repo: Repository, tmp_path: Path) -> dict[str, str]:
    """vm-0, vm-1 and vm-2 of disk vm (3 MiB, 192 incompressible blocks, about 16 to a pack),
    each rewriting part of the one before: three quarters of blocks 0-63 and all of 64-95 for
    vm-1, 96-111 for vm-2; db-0 of disk db shares blocks 128-159 with vm-0. Deleting vm-0 then
    leaves the packs of blocks 0-63 mostly dead (repacked) and those of 64-95 dead (deleted)."""
    image = random_image(tmp_path / "vm.img", 3 * MiB, seed=1)
    sources = {}

    def take(source: Path, disk: str, name: str) -> None:
        trio.run(create_snapshot, repo, str(source), CreateOptions(disk=disk, name=name))
        sources[name] = sha256_file(source)

    take(image, "vm", "vm-0")
    shared = image.read_bytes()[128 * BLOCK : 160 * BLOCK]
    db = random_image(tmp_path / "db.img", 2 * MiB, seed=2)
    write_at(db, 0, shared)
    rewrite(image, [n for n in range(64) if n % 4] + list(range(64, 96)), seed=3)
    take(image, "vm", "vm-1")
    rewrite(image, list(range(96, 112)), seed=4)
    take(image, "vm", "vm-2")
    take(db, "db", "db-0")
    return sources


def copy_repository(make_store: MakeStore, src: str, dst: str) -> None:
    if not src.startswith("s3://"):
        shutil.copytree(src, dst)
        return
    source, target = make_store(src), make_store(dst)
    with ThreadPoolExecutor(source.concurrency) as pool:
        list(pool.map(lambda key: target.put(key, source.get(key)),
                      [key for key, _size in source.list("")]))


def check_snapshots(repo: Repository, sources: dict[str, str], tmp_path: Path,
                    export: bool = True) -> list[str]:
    """The names of the snapshots listed, after checking that each verifies and (``export``)
    exports to exactly its source's bytes."""
    listing = repo.list_snapshots()
    assert listing.unreadable == []
    report = trio.run(verify_snapshots, repo, listing.roots)
    assert report.ok, report.problems
    assert report.snapshots == len(listing.roots)
    for root in listing.roots if export else []:
        out = tmp_path / f"{root.name}.img"
        trio.run(export_snapshot, repo, root, str(out))
        assert sha256_file(out) == sources[root.name], root.name
        out.unlink()
    return sorted(r.name for r in listing.roots)


def kill_points(changes: list[str], under_way: bool = True) -> list[int]:
    """Which changes to kill the command at (1-based): the first and the last of every run of
    changes of one kind (``remove packs`` ×7 is one run) and, ``under_way``, the second, so
    that each phase is cut at its start, once under way and at its end, without a run for
    every pack."""
    points = set()
    start = 0
    for i in range(1, len(changes) + 1):
        if i == len(changes) or changes[i] != changes[start]:
            points.update({start + 1, i} | ({min(start + 2, i)} if under_way else set()))
            start = i
    return sorted(points)


def run_killed(snapfs: Snapfs, url: str, args: tuple[str, ...], kill_at: int | None = None,
               before: str | None = None, record: Path | None = None
               ) -> subprocess.CompletedProcess[str]:
    env = {**snapfs.env, "KILLPOINT_SCOPE": url}
    if kill_at is not None:
        env["KILLPOINT_AT"] = str(kill_at)
    if before is not None:
        env["KILLPOINT_BEFORE"] = before
    if record is not None:
        env["KILLPOINT_RECORD"] = str(record)
    command = [sys.executable, KILLPOINT, *snapfs.with_repo(url).command(args)[1:]]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        reap(proc)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def location(store_url: str, tmp_path: Path, label: str) -> str:
    return f"{store_url}-{label}" if store_url.startswith("s3://") else str(tmp_path / label)


# (what the command is given, the snapshots it deletes, those deleted before it runs)
COMMANDS = {
    "delete": (("snapshot", "delete", "vm-0"), {"vm-0"}, set()),
    "forget": (("snapshot", "forget", "--keep-last", "1", "--disk", "vm"), {"vm-0", "vm-1"},
               set()),
    "prune": (("prune",), set(), {"vm-0", "vm-1"}),
}


@pytest.mark.parametrize(("store_url", "command"), [
    ("local", "delete"), ("local", "forget"), ("local", "prune"),
    # forget does what delete does, for two roots
    pytest.param("s3", "forget", marks=pytest.mark.s3),
], indirect=["store_url"])
def test_a_collection_killed_at_any_step_costs_no_snapshot(
        command: str, store_url: str, store_endpoint: str | None, env: dict[str, str],
        make_store: MakeStore, tmp_path: Path) -> None:
    """The command is killed (SIGKILL) right before its 1st change to the repository, its
    2nd, ..., its last (``kill_points``): letting go of the lock of a snapshot killed before
    and taking its own, deleting roots, deleting the temporary file that snapshot left,
    writing repacked packs and the new index, deleting old index objects and packs (the
    killed snapshot's too), letting its lock go. A whole run first counts the changes and
    says where each phase begins."""
    args, doomed, gone_before = COMMANDS[command]
    repo = Repository.init(make_store(store_url), pack_size=PACK_SIZE)
    sources = build(repo, tmp_path)
    for name in gone_before:  # deleted by a command that was killed before it collected
        repo.delete_root(repo.resolve(name).id)
    snapfs = Snapfs(store_url, store_endpoint, env)
    kept = sorted(set(sources) - doomed - gone_before)
    s3 = store_url.startswith("s3://")
    # what a snapshot killed before it stored its index leaves: packs that no index names and
    # (in a local directory) the index's temporary file, which collection deletes too
    cut = run_killed(snapfs, store_url, ("snapshot", "create",
                                         random_image(tmp_path / "cut.img", MiB, seed=5)),
                     before="PUT index" if s3 else "rename index")
    assert cut.returncode == -signal.SIGKILL, cut.stderr

    # the whole command once, every change written down
    changes_file = tmp_path / "changes"
    whole = location(store_url, tmp_path, "whole")
    copy_repository(make_store, store_url, whole)
    done = run_killed(snapfs, whole, (*args, "--json"), record=changes_file)
    assert done.returncode == 0, done.stderr
    changes = changes_file.read_text().splitlines()
    stats = json.loads(done.stdout)
    assert stats["packs_repacked"] >= 2 and stats["packs_deleted"] > stats["packs_repacked"]
    assert stats["partial_objects_deleted"] == (0 if s3 else 1)
    # a collection that deletes a temporary file, repacks, and deletes old packs (between
    # taking its lock, which lets the killed snapshot's go, and letting its own go)
    phases = [c for i, c in enumerate(changes) if i == 0 or changes[i - 1] != c]
    assert [c for c in phases if not c.endswith(("locks", "snapshots", "profiles"))] == (
        ["PUT packs", "PUT index", "DELETE index", "DELETE packs"] if s3 else
        ["remove index", "open packs", "rename packs", "open index", "rename index",
         "remove index", "remove packs"]), changes
    whole_repo = Repository.open(make_store(whole))
    assert check_snapshots(whole_repo, sources, tmp_path) == kept
    check_collected(whole_repo)

    points = kill_points(changes, under_way=not s3)  # a run on S3 costs three times more
    for n in [*points, len(changes) + 1]:
        url = location(store_url, tmp_path, f"kill-{n}")
        copy_repository(make_store, store_url, url)
        result = run_killed(snapfs, url, args, kill_at=n)
        where = changes[n - 1] if n <= len(changes) else "after its last change"
        if n <= len(changes):
            assert result.returncode == -signal.SIGKILL, (n, where, result.stderr)
        else:  # past its last change: the command ends as it would unkilled
            assert result.returncode == 0, (n, result.stderr)
        repo = Repository.open(make_store(url))
        left = check_snapshots(repo, sources, tmp_path)
        assert set(kept) <= set(left) <= set(kept) | doomed, (n, where, left)
        if n > len(changes):
            assert left == kept
        pruned = snapfs.with_repo(url)("prune")
        assert (pruned.returncode, pruned.stderr) == (0, ""), (n, where, pruned.stderr)
        # blob by blob against their ids: the manifests, exported above, are as they were
        assert check_snapshots(repo, sources, tmp_path, export=False) == left
        check_collected(repo)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)
def test_repair_packs_killed_at_any_step_costs_no_intact_blob(
        store_url: str, store_endpoint: str | None, env: dict[str, str], make_store: MakeStore,
        tmp_path: Path) -> None:
    """``repair packs`` rewrites the pack of a damaged blob (one only vm-2 uses) with the
    pack's intact blobs. Killed right before any of its changes (``kill_points``), it costs no
    intact blob: every other snapshot verifies and exports after each kill, ``repair packs``
    run again ends, and a new snapshot of vm-2's source mends vm-2 (its blob stored again)."""
    repo = Repository.init(make_store(store_url), pack_size=PACK_SIZE)
    sources = build(repo, tmp_path)
    index = repo.load_index()
    others = {b for name in sources if name != "vm-2"
              for b in repo.block_map(index, repo.resolve(name))}
    only_vm2 = [b for b in repo.block_map(index, repo.resolve("vm-2"))[96:112] if b not in others]
    assert only_vm2
    victim = index.locate(only_vm2[0])
    assert len(index.packs[victim.pack]) > 1  # intact blobs to keep beside it
    flip_byte(repo.store, pack_key(victim.pack), victim.offset + victim.length // 2)
    snapfs = Snapfs(store_url, store_endpoint, env)
    intact = sorted(set(sources) - {"vm-2"})

    def check_intact(url: str, where: str) -> None:
        repo = Repository.open(make_store(url))
        roots = [r for r in repo.list_snapshots().roots if r.name != "vm-2"]
        report = trio.run(verify_snapshots, repo, roots)
        assert report.ok and sorted(r.name for r in roots) == intact, (where, report.problems)
        for root in roots:
            out = tmp_path / f"{root.name}.img"
            trio.run(export_snapshot, repo, root, str(out))
            assert sha256_file(out) == sources[root.name], (where, root.name)
            out.unlink()

    changes_file = tmp_path / "changes"
    whole = location(store_url, tmp_path, "whole")
    copy_repository(make_store, store_url, whole)
    done = run_killed(snapfs, whole, ("repair", "packs", "--json"), record=changes_file)
    assert done.returncode == 4, done.stderr  # vm-2 lacks the blob until mended
    assert json.loads(done.stdout)["packs_rewritten"] == 1
    changes = changes_file.read_text().splitlines()
    phases = [c for i, c in enumerate(changes) if i == 0 or changes[i - 1] != c]
    assert [c for c in phases if not c.endswith("locks")] == [
        "open packs", "rename packs", "open index", "rename index", "remove index",
        "remove packs"], changes

    for n in [*kill_points(changes), len(changes) + 1]:
        url = location(store_url, tmp_path, f"kill-{n}")
        copy_repository(make_store, store_url, url)
        result = run_killed(snapfs, url, ("repair", "packs"), kill_at=n)
        where = changes[n - 1] if n <= len(changes) else "after its last change"
        assert result.returncode == (-signal.SIGKILL if n <= len(changes) else 4), \
            (n, where, result.stderr)
        check_intact(url, where)
        again = snapfs.with_repo(url)("repair", "packs")
        assert again.returncode == 4 and "vm-2 uses 1 blob" in again.stdout, (n, where, again)
        mend = snapfs.with_repo(url)("snapshot", "create", tmp_path / "vm.img", "--disk", "vm",
                                     "--name", "vm-3")
        assert mend.returncode == 0, (n, where, mend.stderr)
        repo = Repository.open(make_store(url))
        assert check_snapshots(repo, {**sources, "vm-3": sources["vm-2"]}, tmp_path) == \
            sorted([*sources, "vm-3"]), (n, where)
        pruned = snapfs.with_repo(url)("prune")
        assert (pruned.returncode, pruned.stderr) == (0, ""), (n, where, pruned.stderr)
        check_collected(repo)
