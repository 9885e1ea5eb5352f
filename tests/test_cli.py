"""The ``snapfs`` command, run as a real process against both stores (a local directory and
SeaweedFS's S3): the whole life of a snapshot, and every kind of bad input an operator can give.

Every failure must be one line on stderr that starts with ``snapfs: ``, a non-zero exit code
(``snapfs.errors`` documents them), no traceback, no secret, and no lost or half-written data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from diskimages import (
    MiB,
    block_hashes,
    changed_blocks,
    distinct_nonzero,
    have_root,
    random_image,
    release_fifo_reader,
    same_bytes,
    sha256_file,
    standard_images,
    write_at,
)
from mountutil import end_stopped, stopped_at, traced_child, wait_for
from testkit import (
    EXIT_GENERAL,
    EXIT_INTEGRITY,
    EXIT_LOCKED,
    EXIT_NOT_FOUND,
    EXIT_STORE,
    EXIT_USAGE,
    SNAPFS,
    Snapfs,
    flip_byte,
    one_error,
    reap,
    store_env,
    tmpfs,
)

from snapfs.format.block import HEADER_SIZE, ZERO_ID
from snapfs.format.index import IndexFile
from snapfs.format.manifest import SnapshotRoot
from snapfs.format.pack import KIND_DATA
from snapfs.repo.export import partial_path
from snapfs.repo.repository import Repository, pack_key
from snapfs.store import ObjectStore

MakeStore = Callable[..., ObjectStore]

CREATE_KEYS = {"id", "name", "disk", "parent", "size", "block_size", "blocks_total",
               "blocks_uploaded", "bytes_uploaded", "seconds"}

needs_root = pytest.mark.skipif(not have_root(), reason="needs root (loop mount, tmpfs, mknod)")


# -- running snapfs ----------------------------------------------------------------------------


@pytest.fixture
def env(store_url: str, request: pytest.FixtureRequest) -> dict[str, str]:
    return store_env(request, store_url.startswith("s3://"))


@pytest.fixture
def snapfs(store_url: str, store_endpoint: str | None, env: dict[str, str]) -> Snapfs:
    return Snapfs(store_url, store_endpoint, env)


@pytest.fixture
def store(store_url: str, make_store: MakeStore) -> ObjectStore:
    """The same location as ``snapfs`` uses, for looking at (and damaging) objects directly."""
    return make_store(store_url)


@dataclasses.dataclass(frozen=True)
class Images:
    base: Path
    changed: Path
    other: Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    if not have_root():
        pytest.skip("changing an ext4 image needs root (loop mount)")
    return Images(*standard_images(tmp_path_factory.getbasetemp()))


def objects(store: ObjectStore, prefix: str = "") -> dict[str, bytes]:
    """Every object and its bytes: to show that a failed command changed nothing."""
    return {key: store.get(key) for key, _ in store.list(prefix)}


def pack_names(store: ObjectStore) -> set[str]:
    return {key.rpartition("/")[2] for key, _ in store.list("packs/")}


def indexed_packs(store: ObjectStore) -> set[str]:
    packs: set[str] = set()
    for key, _ in store.list("index/"):
        packs |= set(IndexFile.decode(store.get(key)).packs)
    return packs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the life of a snapshot --------------------------------------------------------------------


@needs_root
def test_snapshot_lifecycle(snapfs: Snapfs, images: Images, tmp_path: Path, store_url: str) -> None:
    bs = 16384
    init = snapfs.json("init")
    assert init["block_size"] == bs and init["repository"].startswith(store_url)

    first = snapfs.json("snapshot", "create", images.base, "--disk", "vm", "--name", "vm-1",
                        "--tag", "nightly")
    assert CREATE_KEYS <= first.keys()
    distinct_base = distinct_nonzero(images.base, bs)
    assert (first["name"], first["disk"], first["parent"]) == ("vm-1", "vm", None)
    assert first["size"] == os.path.getsize(images.base) and first["block_size"] == bs
    assert first["blocks_total"] == os.path.getsize(images.base) // bs
    assert first["blocks_uploaded"] == len(distinct_base)
    assert first["tags"] == ["nightly"]
    assert first["bytes_uploaded"] > 0 and isinstance(first["seconds"], float | int)

    second = snapfs.json("snapshot", "create", images.changed, "--disk", "vm", "--name", "vm-2")
    new = set(distinct_nonzero(images.changed, bs)) - set(distinct_base)
    changed_at = changed_blocks(block_hashes(images.base, bs), block_hashes(images.changed, bs))
    assert second["parent"] == first["id"]
    assert second["blocks_uploaded"] == len(new)
    assert second["blocks_changed"] == len(changed_at)
    assert second["bytes_uploaded"] < first["bytes_uploaded"] / 10

    # read-only commands, side by side
    out1, out2 = tmp_path / "vm-1.img", tmp_path / "vm-2.img"
    results = dict(snapfs.each(
        ("snapshot", "list", "--json"), ("snapshot", "list", "--disk", "other", "--json"),
        ("snapshot", "list"), ("snapshot", "show", second["id"][:6], "--json"),
        ("export", "vm-1", out1), ("export", second["id"], out2, "--json"),
        ("verify", "--json"), ("verify", "vm-1")))
    for args, result in results.items():
        assert result.returncode == 0 and result.stderr == "", (args, result.stderr)
    stdout = {" ".join(str(a) for a in args): r.stdout for args, r in results.items()}
    listed = json.loads(stdout["snapshot list --json"])
    assert [(s["id"], s["name"]) for s in listed] == [(first["id"], "vm-1"), (second["id"], "vm-2")]
    assert json.loads(stdout["snapshot list --disk other --json"]) == []
    assert "vm-2" in stdout["snapshot list"] and first["id"] in stdout["snapshot list"]
    shown = json.loads(stdout[f"snapshot show {second['id'][:6]} --json"])
    assert (shown["id"], shown["parent"], shown["blocks_total"]) == (
        second["id"], first["id"], second["blocks_total"])
    assert "vm-1" in stdout[f"export vm-1 {out1}"]
    assert json.loads(stdout[f"export {second['id']} {out2} --json"])["size"] == second["size"]
    assert sha256_file(out1) == sha256_file(images.base)
    assert sha256_file(out2) == sha256_file(images.changed)
    report = json.loads(stdout["verify --json"])
    assert report["ok"] is True and report["snapshots"] == 2 and report["problems"] == []
    assert "no problems" in stdout["verify vm-1"]

    deleted = snapfs.json("snapshot", "delete", "vm-1")
    assert deleted["deleted"] == [first["id"]]
    assert deleted["bytes_freed"] > 0
    assert [s["id"] for s in snapfs.json("snapshot", "list")] == [second["id"]]
    report = snapfs.json("verify")
    assert report["ok"] is True and report["snapshots"] == 1
    pruned = snapfs.json("prune")
    assert pruned["packs_deleted"] == 0 and pruned["bytes_freed"] == 0

    # what show reported later is what create reported then
    for key in ("blocks_uploaded", "blocks_changed", "bytes_read", "bytes_uploaded"):
        assert shown[key] == second[key], (key, shown[key], second[key])


# -- no repository, a foreign or future one, init over one -------------------------------------


def test_no_repository(snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    for _args, result in snapfs.each(
            ("snapshot", "list"), ("verify",), ("export", "x", tmp_path / "x.img"),
            ("snapshot", "create", tmp_path / "missing.img"), ("prune",)):
        line = one_error(result, EXIT_NOT_FOUND)
        assert "no repository at" in line or "is not a snapfs repository" in line
        assert snapfs.repo in line
    assert not (tmp_path / "x.img").exists()

    # a location that holds something else
    store.ensure_container()
    store.put("photos/cat.jpg", b"\xff\xd8\xff not a repository")
    line = one_error(snapfs("snapshot", "list"), EXIT_NOT_FOUND)
    assert line == f"snapfs: {store.url} is not a snapfs repository (no config)"
    assert objects(store) == {"photos/cat.jpg": b"\xff\xd8\xff not a repository"}

    no_repo = Snapfs("", None, snapfs.env)
    result = subprocess.run([SNAPFS, "snapshot", "list"], capture_output=True, text=True,
                            env=no_repo.env, timeout=60)
    assert "-r REPO" in one_error(result, EXIT_USAGE)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # a path, not a bucket
def test_a_repository_path_that_is_a_file_or_cannot_be_made(snapfs: Snapfs,
                                                            tmp_path: Path) -> None:
    # these said "PATH: : File exists" and "PATH: config: Not a directory" (exit 5)
    afile = tmp_path / "notes.txt"
    afile.write_text("not a repository")
    in_file = snapfs.with_repo(str(afile))
    assert one_error(in_file("init"), EXIT_GENERAL) == (
        f"snapfs: {afile} exists and is not a directory")
    for _args, result in in_file.each(("snapshot", "list"), ("verify",), ("prune",),
                                      ("snapshot", "create", afile)):
        assert one_error(result, EXIT_NOT_FOUND) == f"snapfs: no repository at {afile}"
    below = snapfs.with_repo(str(afile / "repo"))
    assert one_error(below("init"), EXIT_GENERAL) == (
        f"snapfs: cannot create {afile}/repo: a file is in the way")
    assert one_error(below("snapshot", "list"), EXIT_NOT_FOUND) == (
        f"snapfs: no repository at {afile}/repo")
    assert afile.read_text() == "not a repository"
    if have_root():  # root without the capabilities that let it write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        result = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override", "--inh-caps=-dac_override",
             *snapfs.with_repo(str(locked / "repo")).command(("init",))],
            capture_output=True, text=True, env=snapfs.env, timeout=60)
        assert one_error(result, EXIT_STORE) == (
            f"snapfs: cannot create {locked}/repo: permission denied")
        assert list(locked.iterdir()) == []
        # a parent that cannot be searched: was a traceback (PermissionError from is_dir)
        hidden = tmp_path / "hidden"
        hidden.mkdir(mode=0o000)
        for args, key in ((("init",), ""), (("snapshot", "list"), " config:")):
            result = subprocess.run(
                ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                 "--inh-caps=-dac_override,-dac_read_search",
                 *snapfs.with_repo(str(hidden / "repo")).command(args)],
                capture_output=True, text=True, env=snapfs.env, timeout=60)
            assert one_error(result, EXIT_STORE) == (
                f"snapfs: {hidden}/repo:{key} permission denied"), args
    # a name longer than a file name can be: was a traceback (OSError from is_dir)
    long = tmp_path / ("x" * 300)
    assert one_error(snapfs.with_repo(str(long))("init"), EXIT_STORE) == (
        f"snapfs: {long}: File name too long")
    # (no object can be there: the repository's own path is what is said)
    assert one_error(snapfs.with_repo(str(long))("snapshot", "list"), EXIT_STORE) == (
        f"snapfs: {long}: File name too long")


@needs_root
@pytest.mark.parametrize("store_url", ["local"], indirect=True)
def test_a_repository_on_a_read_only_file_system_says_so(snapfs: Snapfs, tmp_path: Path) -> None:
    """A repository directory on a file system mounted read-only (a backup disk remounted ro
    after an error): the commands that write said 'permission denied', which sends the
    operator to the modes and owners; reads go on."""
    with tmpfs(tmp_path / "ro", "8M") as fs:
        repo = snapfs.with_repo(str(fs / "repo"))
        repo.ok("init")
        source = random_image(tmp_path / "a.img", MiB, seed=3)
        repo.ok("snapshot", "create", source, "--name", "a")
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        for _args, result in repo.each(("snapshot", "create", source), ("prune",),
                                       ("snapshot", "delete", "a")):
            error = one_error(result, EXIT_STORE)
            assert "read-only file system" in error and "permission" not in error, error
        assert repo.json("verify")["ok"] is True


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # both: test_repository.py
def test_unknown_format_version_is_refused(snapfs: Snapfs, store: ObjectStore,
                                           tmp_path: Path) -> None:
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=1)
    snapfs.ok("snapshot", "create", source, "--name", "one")
    config = json.loads(store.get("config"))
    config["version"] = 99
    store.put("config", json.dumps(config).encode())
    before = objects(store)
    for _args, result in snapfs.each(
            ("snapshot", "list"), ("snapshot", "create", source), ("verify",),
            ("export", "one", tmp_path / "out.img"), ("snapshot", "delete", "one"), ("prune",)):
        line = one_error(result, EXIT_GENERAL)
        assert "version 99" in line and "not supported" in line, line
    assert one_error(snapfs("init"), EXIT_GENERAL).endswith("already a snapfs repository; not touching it")
    assert objects(store) == before
    assert not (tmp_path / "out.img").exists()


def damaged_root_warning(store: ObjectStore, snap_id: str, why: str, consequence: str) -> str:
    return (f"snapfs: WARNING: snapshots/{snap_id} in {store.url} is damaged ({why}): "
            f"{consequence}; delete it (snapfs snapshot delete {snap_id}) or put it back from a copy")


def damaged_root_refusal(store: ObjectStore, snap_id: str, why: str, refusal: str) -> str:
    return (f"snapfs: snapshots/{snap_id} in {store.url} is damaged ({why}): {refusal}; delete it "
            f"(snapfs snapshot delete {snap_id}) or put it back from a copy")


#: what prune, delete and forget say while a root cannot be read, after its description
PRUNE_REFUSAL = ("not collecting garbage, since which blocks that snapshot needs cannot be "
                 "known", "then run prune")
DELETE_REFUSAL = ("not deleting anything: garbage collection cannot know which blocks that "
                  "snapshot needs", "then try again")
FORGET_REFUSAL = ("forget cannot tell which disk and consistency group that snapshot belongs "
                  "to, nor collect garbage", "then run forget again")


def test_a_damaged_snapshot_root_leaves_the_other_snapshots_usable(
        snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    # one truncated root (a foreign tool's upload cut short) used to stop every command that
    # lists snapshots, its own delete included: 30 nightly snapshots and one bad root, and
    # nothing could be done
    snapfs.ok("init")
    first = random_image(tmp_path / "d.img", MiB, seed=15)
    other = random_image(tmp_path / "e.img", MiB, seed=16)
    one = snapfs.json("snapshot", "create", first, "--name", "one", "--disk", "d")["id"]
    bad = snapfs.json("snapshot", "create", other, "--name", "two", "--disk", "d")["id"]
    write_at(first, 0, b"changed")
    three = snapfs.json("snapshot", "create", first, "--name", "three", "--disk", "d")["id"]
    packs_of_all = pack_names(store)
    root = store.get(f"snapshots/{bad}")
    store.put(f"snapshots/{bad}", root[: len(root) // 2])
    why = "snapshot root is not valid JSON"
    before = objects(store)

    def warned(result: subprocess.CompletedProcess[str], consequence: str) -> str:
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert result.stderr.splitlines() == [damaged_root_warning(store, bad, why, consequence)]
        return result.stdout

    # the commands that change nothing, side by side
    out, refused_out = tmp_path / "three.img", tmp_path / "two.img"
    (listed, listed_json, shown, exported, checked, show_bad, show_prefix, export_bad, verified,
     verified_json) = [result for _args, result in snapfs.each(
        ("snapshot", "list"), ("snapshot", "list", "--json"), ("snapshot", "show", "one"),
        ("export", "three", out), ("verify", three), ("snapshot", "show", bad),
        ("snapshot", "show", bad[:6]), ("export", bad[:6], refused_out), ("verify",),
        ("verify", "--json"))]
    assert [line.split()[:2] for line in warned(listed, "not listed").splitlines()[1:]] == [
        [one, "one"], [three, "three"]]
    assert [d["id"] for d in json.loads(warned(listed_json, "not listed"))] == [one, three]
    assert "name:              one" in warned(shown, "left out")
    assert warned(exported, "left out").startswith("exported three")
    assert sha256_file(out) == sha256_file(first)
    out.unlink()
    assert warned(checked, "not verified").endswith(": no problems\n")

    # the damaged one itself: named as it is, by its id or a prefix of it
    for result in (show_bad, show_prefix):
        line = one_error(result, EXIT_INTEGRITY)
        assert line == damaged_root_refusal(store, bad, why, "that snapshot cannot be read")
    line = one_error(export_bad, EXIT_INTEGRITY)
    assert line == damaged_root_refusal(store, bad, why, "that snapshot cannot be read")
    assert not refused_out.exists()
    assert verified.returncode == EXIT_INTEGRITY and verified.stderr == ""
    problem, summary = verified.stdout.splitlines()
    assert problem == (f"problem: snapshots/{bad} is damaged ({why}): its snapshot cannot be "
                       f"read; delete it (snapfs snapshot delete {bad}) or put it back from a copy")
    assert summary.startswith("checked 2 snapshots, ") and summary.endswith(": 1 problem")
    report = json.loads(verified_json.stdout)
    assert report["ok"] is False and report["snapshots"] == 2
    assert report["unreadable_roots"] == [f"snapshots/{bad}"] and len(report["problems"]) == 1

    # nothing that collects garbage runs while it is there: which blocks it needs is unknown
    for args, (refusal, then) in ((("prune",), PRUNE_REFUSAL),
                                  (("snapshot", "delete", "one"), DELETE_REFUSAL),
                                  (("snapshot", "delete", "one", "three"), DELETE_REFUSAL),
                                  (("snapshot", "forget", "--keep-last", "1"), FORGET_REFUSAL),
                                  (("snapshot", "forget", "--keep-last", "1", "--dry-run"),
                                   FORGET_REFUSAL)):
        line = one_error(snapfs(*args), EXIT_INTEGRITY)
        assert line == damaged_root_refusal(store, bad, why, refusal) + f", {then}", args
    assert objects(store) == before

    # deleting it by its id's prefix collects what only it used, and all is well again
    result = snapfs("snapshot", "delete", bad[:6])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("deleted 1 snapshot; freed ")
    assert not store.exists(f"snapshots/{bad}")
    assert pack_names(store) < packs_of_all
    assert snapfs.json("verify")["ok"] is True
    assert [d["id"] for d in snapfs.json("snapshot", "list")] == [one, three]
    snapfs.ok("prune")
    snapfs.ok("export", "one", out)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # a root's bytes, as on S3
@pytest.mark.parametrize("damage", ["bit rot", "truncated", "wrong type", "bad pages",
                                    "not a root", "another's root", "newer format", "not ours"])
def test_every_kind_of_unreadable_root_is_named_and_can_be_deleted(
        snapfs: Snapfs, store: ObjectStore, tmp_path: Path, damage: str) -> None:
    snapfs.ok("init")
    image = random_image(tmp_path / "d.img", MiB, seed=17)
    good = snapfs.json("snapshot", "create", image, "--name", "good")["id"]
    bad = snapfs.json("snapshot", "create", random_image(tmp_path / "e.img", MiB, seed=18),
                      "--name", "bad")["id"]
    key = f"snapshots/{bad}"
    doc = json.loads(store.get(key))
    healthy = [good]  # what stays listed
    problem = "is damaged (snapshot root is not valid JSON)"
    if damage == "bit rot":
        flip_byte(store, key, 0)  # '{' becomes ';'
    elif damage == "truncated":
        store.put(key, store.get(key)[:-1])
    elif damage == "wrong type":
        store.put(key, json.dumps({**doc, "size": "1 MiB"}).encode())
        problem = f"is damaged (snapshot root {bad} has fields of the wrong type)"
    elif damage == "bad pages":
        store.put(key, json.dumps({**doc, "pages": ["00" * 31]}).encode())
        problem = f"is damaged (snapshot root {bad} has a malformed page list)"
    elif damage == "not a root":
        store.put(key, b"[]")
        problem = "is damaged (object is not a snapfs snapshot root)"
    elif damage == "another's root":  # copied over it: deleting "it" must not delete the other
        store.put(key, store.get(f"snapshots/{good}"))
        problem = f"is damaged (it names itself snapshot {good!r})"
    elif damage == "newer format":
        store.put(key, json.dumps({**doc, "version": 2}).encode())
        problem = "cannot be read by this snapfs (unknown snapshot format version 2)"
    else:  # an object no snapfs wrote, under a key no snapfs would choose, beside the others
        healthy.append(bad)
        bad = "x/not-a-root"
        key = f"snapshots/{bad}"
        store.put(key, b"\x00\x01")
    hint = f"delete it (snapfs snapshot delete {bad}) or put it back from a copy"
    result = snapfs("snapshot", "list", "--json")
    assert result.returncode == 0 and [d["id"] for d in json.loads(result.stdout)] == healthy
    assert result.stderr.splitlines() == [
        f"snapfs: WARNING: {key} in {store.url} {problem}: not listed; {hint}"]
    assert one_error(snapfs("prune"), EXIT_INTEGRITY) == (
        f"snapfs: {key} in {store.url} {problem}: {PRUNE_REFUSAL[0]}; {hint}, {PRUNE_REFUSAL[1]}")
    before = objects(store)
    result = snapfs("snapshot", "delete", bad)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert set(before) - set(objects(store)) >= {key}
    assert [d["id"] for d in snapfs.json("snapshot", "list")] == healthy
    assert snapfs.json("verify")["ok"] is True
    snapfs.ok("export", "good", tmp_path / "out.img")
    assert sha256_file(tmp_path / "out.img") == sha256_file(image)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the same on both stores
def test_a_damaged_index_object_is_named(snapfs: Snapfs, store: ObjectStore,
                                         tmp_path: Path) -> None:
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=15)
    snapfs.ok("snapshot", "create", source, "--name", "two")
    (index_key, _), = store.list("index/")
    store.put(index_key, b"garbage")
    for _args, result in snapfs.each(("verify",), ("export", "two", tmp_path / "out.img"),
                                     ("snapshot", "create", source)):
        assert f"{index_key} in {store.url} is damaged" in one_error(result, EXIT_INTEGRITY)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # both: test_repository.py
def test_init_never_overwrites(snapfs: Snapfs, store: ObjectStore, tmp_path: Path,
                               make_store: MakeStore) -> None:
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", random_image(tmp_path / "d.img", MiB, seed=2))
    before = objects(store)
    line = one_error(snapfs("init"), EXIT_GENERAL)
    assert "already a snapfs repository" in line
    line = one_error(snapfs("init", "--block-size", "64K"), EXIT_GENERAL)
    assert objects(store) == before

    elsewhere = dataclasses.replace(snapfs, repo=snapfs.repo + "-data")
    other = make_store(elsewhere.repo)
    other.ensure_container()
    other.put("important/data.bin", b"do not lose")
    line = one_error(elsewhere("init"), EXIT_GENERAL)
    assert "not empty" in line and "important/data.bin" in line
    assert objects(other) == {"important/data.bin": b"do not lose"}


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # both: test_repository.py
def test_bad_block_size_is_a_usage_error(snapfs: Snapfs, store: ObjectStore) -> None:
    for size in ("3K", "12K", "8M", "lots", "9" * 400):  # the last was a traceback
        one_error(snapfs("init", "--block-size", size), EXIT_USAGE)
    assert not store.container_exists() or objects(store) == {}


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # it fails before the store
def test_a_mistake_on_the_command_line_is_one_line_too(snapfs: Snapfs, store: ObjectStore,
                                                       tmp_path: Path) -> None:
    # click's own report was four lines (usage, a hint, a blank line, the error)
    snapfs.ok("init")
    before = objects(store)
    for args, expect in [
            (("snapshot", "create", tmp_path / "d.img", "--rate", "fast"), "'--rate'"),
            (("init", "--compression-level", "high"), "'--compression-level'"),
            (("snapshot", "delete"), "missing argument 'SNAP...'"),
            (("snapshot", "forget", "--keep-last", "0"), "'--keep-last'"),
            # (a policy is stored: 10**30 was, as given)
            (("policy", "set", "--keep-daily", str(10**30)), "1<=x<=2147483647"),
            (("restore-files", "x"), "missing option '--to'"),
            (("restore-files", "x", "--to", tmp_path, "--on-conflict", "merge"), "'merge'"),
            (("snapshot", "list", "--colour"), "no such option '--colour'"),
            (("snapshots",), "no such command 'snapshots'")]:
        result = snapfs(*args)
        line = one_error(result, EXIT_USAGE)
        assert expect in line and "--help" in line, line
        assert result.stdout == ""
    assert objects(store) == before
    # what asks for help still gets it, on stdout
    result = snapfs("snapshot", "--help")
    assert result.returncode == 0 and "forget" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # it fails before the store
def test_a_rate_or_time_that_is_not_a_number_is_a_usage_error(snapfs: Snapfs, store: ObjectStore,
                                                              tmp_path: Path) -> None:
    # "nan" passed the "<= 0" checks: a snapshot was taken at a rate of nan MB/s
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=7)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    before = objects(store)
    for args, option in [(("snapshot", "create", source, "--rate", "nan"), "--rate"),
                         (("snapshot", "create", source, "--rate", "-1"), "--rate"),
                         (("snapshot", "create", "--disk", "d", "--freeze-timeout", "nan"),
                          "--freeze-timeout"),
                         (("mount", mountpoint, "--hydrate-rate", "nan"), "--hydrate-rate"),
                         (("mount", mountpoint, "--lock-patience", "nan"), "--lock-patience"),
                         (("mount", mountpoint, "--lock-patience", "0"), "--lock-patience"),
                         (("mount", mountpoint, "--refresh-interval", "nan"),
                          "--refresh-interval"),
                         (("mount", mountpoint, "--reserve-interval", "0"),
                          "--reserve-interval")]:
        assert option in one_error(snapfs(*args), EXIT_USAGE)
    assert objects(store) == before and not os.path.ismount(mountpoint)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # it fails before the store
def test_options_of_served_disks_are_refused_with_a_source(snapfs: Snapfs, store: ObjectStore,
                                                           tmp_path: Path) -> None:
    # --freeze and --no-wait were refused with SOURCE, but --freeze-timeout was taken and
    # ignored: a snapshot was stored as if the option meant something for an image file
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=8)
    before = objects(store)
    for option in (["--freeze-timeout", "3"], ["--freeze", str(tmp_path)], ["--no-wait"]):
        line = one_error(snapfs("snapshot", "create", source, *option), EXIT_USAGE)
        assert line == "snapfs: --freeze, --freeze-timeout and --no-wait are for disks the " \
                       "mount serves (no SOURCE)", line
    assert objects(store) == before


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # it fails before the store
def test_a_cache_size_too_small_to_work_is_a_usage_error(snapfs: Snapfs, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    for size in ("0", "4M", "16383K"):
        line = one_error(snapfs("mount", mountpoint, "--cache-size", size), EXIT_USAGE)
        assert line == f"snapfs: --cache-size must be at least 16M (got {size})"
    assert not os.path.ismount(mountpoint)


# -- snapshots: unknown, ambiguous, duplicate --------------------------------------------------


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # both: test_repository.py
def test_unknown_and_ambiguous_snapshots(snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    snapfs.ok("init")
    created = snapfs.json("snapshot", "create", random_image(tmp_path / "d.img", MiB, seed=3),
                          "--name", "monday")
    out = tmp_path / "out.img"
    for _args, result in snapfs.each(
            ("snapshot", "show", "tuesday"), ("export", "tuesday", out), ("verify", "tuesday"),
            ("snapshot", "delete", "monday", "tuesday")):
        line = one_error(result, EXIT_NOT_FOUND)
        assert "no snapshot 'tuesday'" in line
    assert snapfs.json("snapshot", "show", "monday")["id"] == created["id"]
    # two roots whose ids share a prefix (written as another snapfs would have)
    root = SnapshotRoot.decode(store.get(f"snapshots/{created['id']}"))
    for n in (1, 2):
        twin = dataclasses.replace(root, id=f"abcdef{n:010d}", name=f"twin-{n}")
        store.put(f"snapshots/{twin.id}", twin.encode())
    before = objects(store)
    for _args, result in snapfs.each(
            ("snapshot", "show", "abcdef"), ("export", "abcdef", out), ("snapshot", "delete", "abcdef")):
        line = one_error(result, EXIT_GENERAL)
        assert "ambiguous" in line and "abcdef0000000001" in line and "abcdef0000000002" in line
    assert objects(store) == before
    assert not out.exists()
    assert snapfs.json("snapshot", "show", "abcdef0000000002")["name"] == "twin-2"
    # a prefix too short to be one says so
    assert one_error(snapfs("snapshot", "show", "abc"), EXIT_NOT_FOUND).endswith(
        "(a prefix of an id needs at least 4 characters)")


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the store plays no part
def test_show_lists_tags_as_words(snapfs: Snapfs, tmp_path: Path) -> None:
    snapfs.ok("init")
    image = random_image(tmp_path / "d.img", MiB, seed=6)
    snapfs.ok("snapshot", "create", image, "--name", "tagged", "--tag", "before-upgrade",
              "--tag", "keep")
    snapfs.ok("snapshot", "create", image, "--name", "plain")
    lines = snapfs.ok("snapshot", "show", "tagged").splitlines()
    assert "tags:              before-upgrade, keep" in lines  # was "['before-upgrade', 'keep']"
    assert "tags:              -" in snapfs.ok("snapshot", "show", "plain").splitlines()
    assert snapfs.json("snapshot", "show", "tagged")["tags"] == ["before-upgrade", "keep"]


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # both: test_repository.py
def test_duplicate_name_is_refused(snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", random_image(tmp_path / "a.img", MiB, seed=4), "--name", "daily")
    before = objects(store)
    line = one_error(snapfs("snapshot", "create", random_image(tmp_path / "b.img", MiB, seed=5),
                            "--name", "daily"), EXIT_GENERAL)
    assert "'daily' already exists" in line
    assert objects(store) == before


def test_forget_by_retention_policy(snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    """Five snapshots of one disk over four days (moved there by rewriting their roots'
    creation times, as if taken then) and one of another disk; ``--keep-daily 2`` keeps each
    disk's last of its two newest days, a tag keeps one more, the rest go with their blocks."""
    snapfs.ok("init")
    image = random_image(tmp_path / "vm.img", MiB, seed=11)
    days = ["2026-01-01T11:00:00.000Z", "2026-01-01T13:00:00.000Z", "2026-01-02T12:00:00.000Z",
            "2026-01-04T12:00:00.000Z", "2026-01-05T12:00:00.000Z"]
    ids, copies = [], []
    for n, created in enumerate(days):
        write_at(image, 0, bytes([n + 1]) * 16384)  # block 0 differs in every snapshot
        tags = ["--tag", "pinned"] if n == 1 else []
        snap = snapfs.json("snapshot", "create", image, "--name", f"vm-{n}", *tags)
        root = SnapshotRoot.decode(store.get(f"snapshots/{snap['id']}"))
        root.created = created
        store.put(f"snapshots/{root.id}", root.encode())
        ids.append(snap["id"])
        copies.append(sha256_file(image))
    other = snapfs.json("snapshot", "create", random_image(tmp_path / "db.img", MiB, seed=12),
                        "--name", "db-0")["id"]

    before = objects(store)
    plan = snapfs.json("snapshot", "forget", "--keep-daily", "2", "--keep-tag", "pinned",
                       "--dry-run")
    assert objects(store) == before  # a dry run deletes nothing
    reasons = {s["name"]: s["reasons"] for s in plan["snapshots"]}
    assert reasons == {"vm-0": [], "vm-1": ["tag pinned"], "vm-2": [], "vm-3": ["daily"],
                       "vm-4": ["daily"], "db-0": ["daily"]}
    assert plan["dry_run"] is True and plan["forgotten"] == []
    # the tables show local time, as the days are counted (and default names made): UTC was
    # shown, so that a snapshot kept as one day's seemed to be of the day before
    tokyo = {**snapfs.env, "TZ": "Asia/Tokyo"}  # UTC+9 all year
    rows = snapfs("snapshot", "list", env=tokyo).stdout.splitlines()
    assert "  2026-01-01 22:00:00  " in rows[2] and "vm-1" in rows[2]
    rows = snapfs("snapshot", "forget", "--keep-daily", "2", "--dry-run", env=tokyo
                  ).stdout.splitlines()
    assert "  2026-01-05 21:00:00  daily" in rows[5] and "vm-4" in rows[5]

    done = snapfs.json("snapshot", "forget", "--keep-daily", "2", "--keep-tag", "pinned")
    assert sorted(done["forgotten"]) == sorted([ids[0], ids[2]])
    assert done["bytes_freed"] > 0  # vm-2's block 0 and page were its own
    left = {s["id"] for s in snapfs.json("snapshot", "list")}
    assert left == {ids[1], ids[3], ids[4], other}
    assert "no problems" in snapfs.ok("verify")
    for n in (1, 4):
        out = tmp_path / f"vm-{n}.out"
        snapfs.ok("export", f"vm-{n}", out)
        assert sha256_file(out) == copies[n]

    # the same policy again forgets nothing; --disk judges one disk only
    again = snapfs.ok("snapshot", "forget", "--keep-daily", "2", "--keep-tag", "pinned")
    assert "nothing to forget" in again
    only_db = snapfs.json("snapshot", "forget", "--disk", "db.img", "--keep-last", "1",
                          "--dry-run")
    assert [s["name"] for s in only_db["snapshots"]] == ["db-0"]

    # bad policies: one line, a usage error, nothing deleted
    before = objects(store)
    assert "stored retention policy" in one_error(snapfs("snapshot", "forget"), EXIT_USAGE)
    # a tag that no snapshot of a disk carries (a typo) would forget that disk whole
    for dry_run in ([], ["--dry-run"]):
        assert one_error(snapfs("snapshot", "forget", "--keep-tag", "pined", *dry_run),
                         EXIT_USAGE) == (
            "snapfs: the retention policy keeps no snapshot of disk db.img: refusing to forget "
            "its only snapshot; delete by name with snapshot delete")
    assert "all 3 of its snapshots" in one_error(
        snapfs("snapshot", "forget", "--keep-tag", "pined", "--disk", "vm.img"), EXIT_USAGE)
    assert "cannot read duration" in one_error(
        snapfs("snapshot", "forget", "--keep-within", "3x"), EXIT_USAGE)
    assert "no snapshots of disk 'nosuch'" in one_error(
        snapfs("snapshot", "forget", "--disk", "nosuch", "--keep-last", "1"), EXIT_NOT_FOUND)
    assert objects(store) == before


def test_retention_policies_stored_in_the_repository(snapfs: Snapfs, store: ObjectStore,
                                                     tmp_path: Path) -> None:
    """``policy set`` stores a default and per-disk policies; ``snapshot forget`` without rules
    applies them, each disk its own; a disk with no policy at all keeps everything."""
    snapfs.ok("init")
    assert "no retention policy" in snapfs.ok("policy", "show")
    assert "stored retention policy" in one_error(snapfs("snapshot", "forget"), EXIT_USAGE)
    for disk in ("web", "db.v2", "a/b c"):
        image = random_image(tmp_path / "disk.img", MiB, seed=len(disk))
        for n in range(3):
            write_at(image, 0, bytes([n + 1]) * 16384)
            snapfs.ok("snapshot", "create", image, "--disk", disk, "--name",
                      f"{disk.replace('/', '_')}-{n}")

    out = snapfs.ok("policy", "set", "--disk", "web", "--keep-last", "1")
    assert out.strip() == "retention policy of disk web: keep last 1"
    assert snapfs.json("policy", "set", "--disk", "a/b c", "--keep-last", "2",
                       "--keep-within", "1y6m") == {"disk": "a/b c",
                                                   "keep": {"last": 2, "within": "1y6m"}}
    assert snapfs.json("policy", "show") == {
        "default": None, "disks": {"a/b c": {"last": 2, "within": "1y6m"},
                                   "web": {"last": 1}}}
    plan = snapfs.json("snapshot", "forget", "--dry-run")
    reasons = {s["name"]: s["reasons"] for s in plan["snapshots"]}
    assert reasons["web-0"] == [] and reasons["web-1"] == [] and reasons["web-2"] == ["last"]
    assert all(reasons[f"db.v2-{n}"] == ["no policy"] for n in range(3))
    assert reasons["a_b c-2"] == ["last", "within 1y6m"]
    assert reasons["a_b c-0"] == ["within 1y6m"]

    # a default for every other disk; rules on the command line replace every stored policy
    snapfs.ok("policy", "set", "--keep-last", "2")
    assert "(default)" in snapfs.ok("policy", "show")
    forgotten = snapfs.json("snapshot", "forget")["forgotten"]
    names = {s["id"]: s["name"] for s in plan["snapshots"]}
    assert sorted(names[i] for i in forgotten) == ["db.v2-0", "web-0", "web-1"]
    assert "no problems" in snapfs.ok("verify")
    override = snapfs.json("snapshot", "forget", "--keep-last", "1", "--dry-run")
    assert sorted(s["name"] for s in override["snapshots"] if not s["keep"]) == [
        "a_b c-0", "a_b c-1", "db.v2-1"]

    assert snapfs.ok("policy", "delete", "--disk", "web").strip() == (
        "deleted the retention policy of disk web")
    assert "no retention policy stored for disk web" in one_error(
        snapfs("policy", "delete", "--disk", "web"), EXIT_NOT_FOUND)
    assert "at least one --keep" in one_error(snapfs("policy", "set", "--disk", "x"), EXIT_USAGE)
    assert "must not be empty" in one_error(
        snapfs("policy", "set", "--disk", "", "--keep-last", "1"), EXIT_USAGE)
    snapfs.ok("policy", "delete")
    assert set(snapfs.json("policy", "show")["disks"]) == {"a/b c"}
    # a damaged policy is one clear line, not a guess: which object, and the way on
    key = next(k for k, _ in store.list("policies/"))
    store.put(key, b"{not json")
    line = one_error(snapfs("snapshot", "forget"), EXIT_INTEGRITY)
    assert f"{key} in " in line and "retention policy is not valid JSON" in line
    assert line.endswith("or delete it (snapfs policy delete --disk 'a/b c')"), line
    snapfs.ok("policy", "delete", "--disk", "a/b c")
    # a label with control characters: still one line, a command a shell reads back
    snapfs.ok("policy", "set", "--disk", "tab\there\nit's", "--keep-last", "1")
    key = next(k for k, _ in store.list("policies/disk/"))
    store.put(key, b"{not json")
    line = one_error(snapfs("snapshot", "forget"), EXIT_INTEGRITY)
    word = "$'tab\\x09here\\x0ait\\'s'"
    assert line.endswith(f"or delete it (snapfs policy delete --disk {word})"), line
    typed = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True)
    assert typed.stdout == "tab\there\nit's"
    snapfs.ok("policy", "delete", "--disk", "tab\there\nit's")
    # so is a damaged hold, which stops deletes: what it keeps cannot be known
    store.put("holds/0123456789abcdef", b'{"version": 1}')
    line = one_error(snapfs("snapshot", "delete", "db.v2-1"), EXIT_INTEGRITY)
    assert "holds/0123456789abcdef in " in line and "damaged" in line
    assert "writes it again when it starts" in line
    store.delete("holds/0123456789abcdef")
    snapfs.ok("snapshot", "delete", "db.v2-1")


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the runtime directory is local
def test_a_runtime_directory_that_cannot_be_used_costs_no_snapshot(snapfs: Snapfs,
                                                                   tmp_path: Path) -> None:
    """A command that made a snapshot then tells the mounts here: a runtime directory it
    cannot use (a file stands there) means there are none to tell, not a failed command whose
    snapshot is stored all the same. (A delete asks the daemons here what they need first,
    and refuses when it cannot.)"""
    snapfs.ok("init")
    image = tmp_path / "a.img"
    image.write_bytes(os.urandom(64 << 10))
    blocked = tmp_path / "not-a-directory"
    blocked.write_bytes(b"")
    env = {**snapfs.env, "SNAPFS_RUNTIME_DIR": str(blocked)}
    made = snapfs("snapshot", "create", image, "--name", "a", env=env)
    assert made.returncode == 0 and made.stderr == "", made.stderr
    assert "is not a directory owned by this user" in one_error(
        snapfs("snapshot", "delete", "a", env=env), EXIT_GENERAL)
    assert [s["name"] for s in snapfs.json("snapshot", "list")] == ["a"]


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # a lock is a lock on both
def test_snapshot_create_waits_for_a_short_collection(snapfs: Snapfs, store: ObjectStore,
                                                      tmp_path: Path) -> None:
    """A forget or prune holds the exclusive lock for seconds: a snapshot started meanwhile
    (cron runs both at night) waits for it instead of failing."""
    from snapfs.repo.lock import RepositoryLock

    snapfs.ok("init")
    image = random_image(tmp_path / "d.img", MiB, seed=9)
    lock = RepositoryLock(store, "exclusive", "test: a collection").acquire()
    try:
        proc = snapfs.popen("snapshot", "create", image, "--name", "waited", "--json")

        def opened() -> bool:  # it opens its source right before it tries the lock
            fds = Path(f"/proc/{proc.pid}/fd")
            try:
                return any(os.readlink(fd) == os.path.realpath(image) for fd in fds.iterdir())
            except FileNotFoundError:  # it ended, or an fd closed as it was listed
                return proc.poll() is not None

        # (3 s from its start were less than a loaded machine's CLI start-up takes)
        wait_for(opened, 60, "the snapshot to open its source")
        time.sleep(3.0)
        assert proc.poll() is None  # waiting, not failed
    finally:
        lock.release()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["name"] == "waited"


#: the phases of a garbage collection as its bar shows them (see snapfs.repo.gc)
GC_PHASES = ("reading index", "reading snapshots", "reading manifests", "deleting index",
             "deleting packs")


def bar_phases(drawn: str) -> dict[str, tuple[int, int, str]]:
    """Each counted phase a bar drew (``on_terminal``), as its last frame showed it: done,
    total and unit."""
    found = re.findall(r"([a-z]+ [a-z]+) +\S+ +(\d+)/(\d+) ([a-z]+)", drawn)
    return {label: (int(done), int(total), unit) for label, done, total, unit in found}


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # what is drawn, not the store
def test_delete_forget_and_prune_show_their_phases_on_a_terminal_only(
        snapfs: Snapfs, tmp_path: Path) -> None:
    snapfs.ok("init")
    image = random_image(tmp_path / "d.img", 2 * MiB, seed=19)
    for seed, name in enumerate(("one", "two", "three")):
        write_at(image, 0, random_image(tmp_path / "part", MiB, seed=seed).read_bytes())
        snapfs.ok("snapshot", "create", image, "--name", name)

    code, drawn = snapfs.on_terminal("snapshot", "delete", "one")
    assert code == 0, drawn
    phases = bar_phases(drawn)
    assert phases["deleting snapshots"] == (1, 1, "snapshot")
    assert phases["reading index"] == (3, 3, "objects")  # one for each snapshot
    assert phases["reading snapshots"] == (2, 2, "snapshots")
    assert all(done == total > 0 for done, total, _ in phases.values()), phases
    assert set(GC_PHASES) <= set(phases)
    assert drawn.splitlines()[-1].startswith("deleted 1 snapshot; freed ")

    code, drawn = snapfs.on_terminal("snapshot", "forget", "--keep-last", "1")
    assert code == 0, drawn
    phases = bar_phases(drawn)
    assert phases["deleting snapshots"] == (1, 1, "snapshot")
    assert phases["reading snapshots"] == (1, 1, "snapshot") and set(GC_PHASES) <= set(phases)
    assert drawn.splitlines()[-1].startswith("forgot 1 of 2 snapshots; freed ")

    # the bar is drawn on stderr: stdout, sent elsewhere, has the result alone
    code, drawn, out = snapfs.stderr_on_terminal("prune")
    assert code == 0, drawn
    assert set(bar_phases(drawn)) == set(GC_PHASES) - {"deleting packs"}  # none to delete
    assert "freed" not in drawn
    assert out == "freed 0 B: 0 packs deleted, 0 repacked\n"
    # nothing drawn into JSON, nor when stderr is not a terminal
    code, drawn = snapfs.on_terminal("prune", "--json")
    assert code == 0 and json.loads(drawn)["packs_deleted"] == 0 and not bar_phases(drawn)
    result = snapfs("prune")
    assert (result.stdout, result.stderr) == ("freed 0 B: 0 packs deleted, 0 repacked\n", "")


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # a lock is a lock on both
def test_unlock_removes_stale_locks_and_with_all_those_of_a_dead_host(
        snapfs: Snapfs, store: ObjectStore) -> None:
    from snapfs.host import hostname
    from snapfs.repo.lock import RepositoryLock

    snapfs.ok("init")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    now = time.time()

    def lock(name: str, host: str, pid: int, kind: str, age: float) -> None:
        store.put(f"locks/{name}", json.dumps({"host": host, "pid": pid, "kind": kind,
                                               "purpose": name, "time": now - age}).encode())

    mine = RepositoryLock(store, "shared", "test: live here").acquire()
    lock("dead-here", hostname(), int(gone.stdout), "exclusive", 5)
    lock("old-elsewhere", "far-away", 4242, "shared", 31 * 60)
    lock("crashed-elsewhere", "far-away", 4243, "exclusive", 60)  # its host died a minute ago
    try:
        report = snapfs.json("unlock")
        assert sorted(i["id"] for i in report["removed"]) == ["dead-here", "old-elsewhere"]
        kept = {i["id"]: i for i in report["kept"]}
        assert set(kept) == {"crashed-elsewhere", mine.key.removeprefix("locks/")}
        assert kept["crashed-elsewhere"]["stale"] is False
        assert kept["crashed-elsewhere"]["host"] == "far-away"

        # what the crashed host left blocks a collection, and the error says what to do
        line = one_error(snapfs("prune"), EXIT_LOCKED)
        assert "crashed-elsewhere (pid 4243 on far-away" in line
        assert "`snapfs unlock --all` removes its lock" in line

        out = snapfs.ok("unlock", "--all")
        assert "removed lock crashed-elsewhere: crashed-elsewhere (pid 4243 on far-away" in out
        assert "in use on this host" in out  # ours: a live process here is never unlocked
        assert [k for k, _ in store.list("locks/")] == [mine.key]
    finally:
        mine.release()
    assert snapfs.ok("unlock") == "no locks\n"
    snapfs.ok("prune")


def test_unlock_never_removes_the_lock_of_a_live_process_here_however_old(
        snapfs: Snapfs, store: ObjectStore) -> None:
    """A lock of a live process on this host is in use, even one written more than 30 minutes
    ago (a collection of a large repository): neither `unlock` nor a locker may take it as
    stale. A pid that a process started since has taken over is not its holder, though; and a
    lock object that cannot be read, which every locker ignores, is removed and named."""
    from snapfs.host import hostname

    snapfs.ok("init")
    with open("/proc/stat") as f:
        booted = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    if time.time() - booted < 31 * 60:
        pytest.skip("needs a process started more than 30 minutes ago (pid 1: up 31 minutes)")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        def lock(name: str, pid: int, when: float) -> None:
            store.put(f"locks/{name}", json.dumps({"host": hostname(), "pid": pid,
                                                   "kind": "exclusive", "purpose": name,
                                                   "time": when}).encode())

        lock("long-collection", 1, booted + 60)  # pid 1 has held it since
        lock("reused-pid", sleeper.pid, time.time() - 60)  # its holder died, sleep took the pid
        store.put("locks/torn", b'{"host": ')
        report = snapfs.json("unlock")
        assert [i["id"] for i in report["removed"]] == ["reused-pid"]
        assert [i["id"] for i in report["kept"]] == ["long-collection"]
        assert report["unreadable_removed"] == ["torn"]
        line = one_error(snapfs("prune"), EXIT_LOCKED)  # the collection is still under way
        assert "long-collection (pid 1 on" in line and "unlock --all" not in line
        out = snapfs.ok("unlock", "--all")
        assert "kept lock long-collection" in out and "in use on this host" in out
        assert [k for k, _ in store.list("locks/")] == ["locks/long-collection"]
    finally:
        sleeper.kill()
        sleeper.wait()
        store.delete("locks/long-collection")


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # a lock is a lock on both
def test_a_locked_error_says_since_when_the_holder_holds_the_lock(
        snapfs: Snapfs, store: ObjectStore) -> None:
    """A holder writes its lock again every 5 minutes (so that other hosts see it is alive):
    the "locked" error said "since" that last write, and a collection that had run for an hour
    seemed to have begun minutes ago. A refresh keeps the time the lock was taken."""
    from snapfs.repo.lock import RepositoryLock

    snapfs.ok("init")
    lock = RepositoryLock(store, "exclusive", "test: a long collection").acquire()
    try:
        taken = json.loads(store.get(lock.key))
        wait_for(lambda: int(time.time()) > int(taken["time"]), 5, "the next second")
        lock.refresh()
        refreshed = json.loads(store.get(lock.key))
        assert refreshed["since"] == taken["since"] == taken["time"] < refreshed["time"]
        line = one_error(snapfs("prune"), EXIT_LOCKED)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(taken["time"]))
        assert f"test: a long collection (pid {os.getpid()} on " in line, line
        assert f", since {since});" in line, line
        [kept] = snapfs.json("unlock")["kept"]
        assert kept["since"] == time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                              time.localtime(taken["time"]))
    finally:
        lock.release()


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # a lock is a lock on both
def test_the_lock_of_a_killed_command_not_reaped_yet_is_stale(
        snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    """A command killed (kill -9) while it holds its lock is a zombie until its parent reaps
    it, which a PID 1 that reaps nothing (as in many containers) never does: its pid still
    answered a signal, so its lock was taken as in use, and every prune, delete and forget
    said the repository was locked by it, and ``unlock --all`` kept it."""
    snapfs.ok("init")
    source = random_image(tmp_path / "vm.img", 8 * MiB, seed=95)
    proc = snapfs.popen("snapshot", "create", source, "--rate", "1")
    try:
        wait_for(lambda: any(store.list("locks/")) or proc.poll() is not None, 60, "its lock")
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0]
                 == "Z", 10, "the command to be a zombie")
        snapfs.json("prune")  # not reaped: this test is its parent
        assert [k for k, _ in store.list("locks/")] == []  # (an exclusive locker removes it)
    finally:
        reap(proc)
        proc.communicate()


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the store plays no part
def test_snapshot_names_fit_a_file_name_in_every_mount(snapfs: Snapfs, store: ObjectStore,
                                                       tmp_path: Path) -> None:
    """A snapshot is ``snapshots/NAME.img`` in every mount: a name with a '/' (or a control
    character, or hidden) is refused, and a default name made from an odd disk label is
    made to fit."""
    snapfs.ok("init")
    image = random_image(tmp_path / "d.img", MiB, seed=8)
    before = objects(store)
    for bad in ("a/b", "../../etc", "", ".hidden", "line\nbreak", "x" * 201):
        line = one_error(snapfs("snapshot", "create", image, "--name", bad), EXIT_USAGE)
        assert "bad snapshot name" in line
    assert objects(store) == before
    made = snapfs.json("snapshot", "create", image, "--disk", "../web/a\tb")
    assert made["disk"] == "../web/a\tb"  # the label is kept as given
    assert made["name"].startswith("_web_a_b-") and "/" not in made["name"]
    assert snapfs.json("snapshot", "create", image, "--name", "ünïcode ok")["name"] == "ünïcode ok"
    # a label or a tag with a newline is kept as given, and printed escaped: it broke its row
    lined = snapfs.json("snapshot", "create", image, "--disk", "two\nlines", "--tag", "x\ny")
    assert (lined["disk"], lined["tags"]) == ("two\nlines", ["x\ny"])
    rows = snapfs.ok("snapshot", "list").splitlines()
    assert len(rows) == 1 + 3 and "two\\nlines" in rows[3]
    rows = snapfs.ok("snapshot", "forget", "--keep-last", "1", "--dry-run").splitlines()
    assert len(rows) == 1 + 3 + 1 and "two\\nlines" in rows[3]
    assert "tags:              x\\ny" in snapfs.ok("snapshot", "show", lined["id"]).splitlines()
    # an empty one is refused (it was stored as a tag, or taken for no --disk at all)
    before = objects(store)
    for args in (("snapshot", "create", image, "--tag", ""),
                 ("snapshot", "create", image, "--disk", ""),
                 ("snapshot", "forget", "--keep-tag", "", "--dry-run"),
                 ("policy", "set", "--keep-tag", "")):
        assert "must not be empty" in one_error(snapfs(*args), EXIT_USAGE)
    assert objects(store) == before


def test_a_policys_disk_name_must_fit_an_object_name(snapfs: Snapfs, store: ObjectStore) -> None:
    """A policy of disk NAME is the object ``policies/disk/NAME`` (percent-encoded): one too
    long for a file name made ``policy set`` fail on a local store with the store's "File name
    too long" (exit 5). The rule is the same on every store (a repository may be copied from
    one to the other): a usage error, and nothing stored."""
    snapfs.ok("init")
    before = objects(store)
    for long, encoded in (("x" * 201, 201), ("x" * 300, 300), ("é" * 34, 204),
                          ("a.b" * 41, 205)):
        line = one_error(snapfs("policy", "set", "--disk", long, "--keep-last", "1"), EXIT_USAGE)
        assert "is too long for a retention policy: at most 200 bytes percent-encoded" in line
        assert line.endswith(f"it has {encoded})")
        # nothing to delete, whatever the store (a local one cannot hold such a name)
        assert f"no retention policy stored for disk {long}" in one_error(
            snapfs("policy", "delete", "--disk", long), EXIT_NOT_FOUND)
    assert objects(store) == before
    # the longest there can be, of each kind of byte
    for longest in ("x" * 200, "é" * 33, "a.b" * 40):
        snapfs.ok("policy", "set", "--disk", longest, "--keep-last", "1")
    assert sorted(snapfs.json("policy", "show")["disks"]) == sorted(
        ["x" * 200, "é" * 33, "a.b" * 40])
    snapfs.ok("policy", "delete", "--disk", "é" * 33)
    assert sorted(snapfs.json("policy", "show")["disks"]) == ["a.b" * 40, "x" * 200]


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # no store is asked
def test_a_bad_name_is_refused_before_the_repository_or_daemon_is_asked(
        snapfs: Snapfs, tmp_path: Path) -> None:
    """Every name that becomes part of a file or object name is checked by its rule before
    anything else: a bad one is exit 2 whether or not there is a repository (or a mount that
    serves its disks), rather than "no repository" or "no mount" first."""
    nowhere = snapfs.with_repo(str(tmp_path / "nowhere"))
    image = random_image(tmp_path / "d.img", MiB, seed=3)
    cases = [
        (("policy", "set", "--disk", "x" * 201, "--keep-last", "1"), "too long for a retention"),
        (("policy", "set", "--disk", "", "--keep-last", "1"), "--disk must not be empty"),
        (("policy", "delete", "--disk", ""), "--disk must not be empty"),
        (("snapshot", "create", image, "--name", ".hidden"), "bad snapshot name '.hidden'"),
        (("snapshot", "create", image, "--disk", ""), "--disk must not be empty"),
        # (an unset variable: list showed an empty table, forget said "no snapshots of disk")
        (("snapshot", "list", "--disk", ""), "--disk must not be empty"),
        (("snapshot", "forget", "--disk", "", "--keep-last", "1"), "--disk must not be empty"),
        # a served disk's snapshot, and a consistency group's NAME-DISK (199 + 2 bytes)
        (("snapshot", "create", "--disk", "d1", "--name", "a/b"), "bad snapshot name 'a/b'"),
        (("snapshot", "create", "--disk", "d1", "--disk", "d2", "--name", "n" * 199),
         f"bad snapshot name '{'n' * 199}-d1'"),
        (("disk", "create", "web/1", "--size", "1M"), "bad disk name 'web/1'"),
        (("disk", "create", "x" * 101, "--size", "1M"), "bad disk name"),
    ]
    for args, said in cases:
        assert said in one_error(nowhere(*args), EXIT_USAGE), args
    assert not (tmp_path / "nowhere").exists()


# -- bad sources -------------------------------------------------------------------------------


SOURCE_KINDS = ["missing", "odd-size", "empty", "directory", "fifo", "no-device",
                "permission-denied"]


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the store plays no part
@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_bad_source(kind: str, snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    if kind in ("no-device", "permission-denied") and not have_root():
        pytest.skip("needs root")
    snapfs.ok("init")
    before = objects(store)
    source = tmp_path / "source.img"
    command = snapfs.command(("snapshot", "create", source))
    expect = str(source)
    if kind == "odd-size":
        source.write_bytes(os.urandom(1000))
        expect = "not a multiple of 512"
    elif kind == "empty":
        source.write_bytes(b"")
        expect = "is empty"
    elif kind == "directory":
        source.mkdir()
    elif kind == "fifo":
        os.mkfifo(source)
    elif kind == "no-device":
        os.mknod(source, 0o600 | 0o060000, os.makedev(240, 0))  # a block device with no driver
        expect = "No such device"
    elif kind == "permission-denied":
        source.write_bytes(os.urandom(MiB))
        source.chmod(0o000)
        # root without the capabilities that let it read any file
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
        expect = "Permission denied"

    # A FIFO with no writer blocks a plain open(). If snapfs is still holding it open after
    # 5 s, this releases it, and the test fails instead of hanging.
    rescued: list[bool] = []
    rescue = threading.Timer(5, lambda: rescued.append(release_fifo_reader(source)))
    if kind == "fifo":
        rescue.start()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                env=snapfs.env)
    finally:
        rescue.cancel()
        if rescue.ident is not None:  # started
            rescue.join()
    assert rescued != [True], "snapshot create blocked opening a FIFO"
    line = one_error(result, EXIT_NOT_FOUND if kind == "missing" else EXIT_GENERAL)
    assert str(source) in line and expect in line, line
    assert objects(store) == before


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the store plays no part
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("change", ["write", "unlink"])
def test_source_changed_or_vanished_during_snapshot(
    change: str, snapfs: Snapfs, store: ObjectStore, tmp_path: Path
) -> None:
    """The snapshot stops itself (strace sends it SIGSTOP) at its fadvise of the source, which
    comes after the stat that its end compares with, and goes on once the source is changed.
    (The change was made while --rate held the last pack back after the first was stored:
    about 2 s, which a test process that a loaded machine leaves waiting that long misses;
    the snapshot then rightly succeeded.)"""
    snapfs.ok("init")
    kept = snapfs.json("snapshot", "create", random_image(tmp_path / "a.img", MiB, seed=6))
    packs_before = pack_names(store)
    source = random_image(tmp_path / "b.img", 20 * MiB, seed=7)
    proc, pid = stopped_at(snapfs, ("snapshot", "create", source), "fadvise64",
                           tmp_path / "strace.out", path=source)
    try:
        if change == "write":
            write_at(source, 5 * MiB, b"a write during the snapshot")
        else:
            source.unlink()
        os.kill(pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        end_stopped(proc, pid)
    line = one_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                     EXIT_GENERAL)
    assert str(source) in line
    assert ("changed during the snapshot" if change == "write" else "vanished") in line
    assert [s["id"] for s in snapfs.json("snapshot", "list")] == [kept["id"]]
    assert snapfs.json("verify")["ok"] is True
    assert pack_names(store) > packs_before, "the snapshot stored packs before it was refused"
    snapfs.ok("prune")
    assert pack_names(store) == packs_before


# -- crashes -----------------------------------------------------------------------------------


def test_kill_9_during_snapshot(snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    snapfs.ok("init")
    kept = snapfs.json("snapshot", "create", random_image(tmp_path / "a.img", MiB, seed=8),
                       "--name", "kept")
    packs_before = pack_names(store)
    source = random_image(tmp_path / "big.img", 40 * MiB, seed=9)
    # The first 16 MiB pack is stored at once; --rate holds the other 24 MiB back for about
    # 25 s, which the kill cuts short. (At 4 MB/s it was 6 s: a test process left waiting
    # that long by a loaded machine would find the snapshot done.)
    proc = snapfs.popen("snapshot", "create", source, "--rate", "1")
    try:
        wait_for(lambda: len(pack_names(store)) > len(packs_before) or proc.poll() is not None,
                 60, "the first pack")
        assert proc.poll() is None, "the snapshot ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    orphans = pack_names(store) - packs_before
    assert orphans
    assert len(list(store.list("locks/"))) == 1, "the dead process's lock is left behind"

    assert [s["id"] for s in snapfs.json("snapshot", "list")] == [kept["id"]]
    report = snapfs.json("verify")
    assert report["ok"] is True and report["snapshots"] == 1

    # the dead process's lock blocks neither a create nor a collection
    redo = snapfs.json("snapshot", "create", source, "--name", "redo")
    assert redo["blocks_uploaded"] == redo["blocks_total"]
    out = tmp_path / "redo.img"
    snapfs.ok("export", "redo", out)
    assert sha256_file(out) == sha256_file(source)
    pruned = snapfs.json("prune")
    assert pruned["packs_deleted"] == len(orphans - indexed_packs(store))
    assert pack_names(store) == indexed_packs(store), "no orphan pack is left"
    assert list(store.list("locks/")) == []
    assert snapfs.json("verify")["snapshots"] == 2


def killed_while_writing(command: list[str], env: dict[str, str],
                         written: Callable[[], list[Path]]) -> list[Path]:
    """Run ``command`` with every fsync held for a second (strace), kill -9 it as soon as
    ``written`` finds the temporary files of its ``put``, and return them: what a command
    killed before its rename leaves in a local repository."""
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
         "-e", "inject=fsync:delay_enter=1000000", *command],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: written() or proc.poll() is not None, 60, "an object being written")
        assert proc.poll() is None, proc.communicate()
        os.kill(traced_child(proc), signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    left = written()
    assert left
    return left


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # an S3 PUT leaves nothing
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_kill_9_while_a_pack_is_written_leaves_nothing_that_prune_keeps(
        snapfs: Snapfs, store_url: str, tmp_path: Path) -> None:
    """A local repository's objects are written to a temporary file, then renamed: a snapshot
    killed before the rename left its temporary pack (16 MiB) for ever, since no listing shows
    it, and prune said it freed 0 B. Every fsync waits a second here (strace) so that a pack's
    temporary file is there when the snapshot is killed."""
    snapfs.ok("init")
    source = random_image(tmp_path / "big.img", 20 * MiB, seed=10)

    def partial() -> list[Path]:
        return list(Path(store_url).glob("packs/*/.*.tmp-snapfs"))

    left = killed_while_writing(snapfs.command(("snapshot", "create", source)), snapfs.env,
                                partial)
    size = sum(p.stat().st_size for p in left)
    pruned = snapfs.json("prune")
    assert partial() == []
    assert pruned["partial_objects_deleted"] == len(left) and pruned["bytes_freed"] >= size
    assert [p for p in Path(store_url).rglob("*.tmp-snapfs") if p.parent.name != "locks"] == []
    assert snapfs.json("verify")["ok"] is True


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # an S3 PUT leaves nothing
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_temporary_files_of_writers_that_take_no_lock_go_once_they_are_stale(
        snapfs: Snapfs, store_url: str, tmp_path: Path) -> None:
    """Locks, holds, access profiles, policies and the config are written without the
    repository lock, so a temporary file of theirs may be a running writer's: prune left
    every one for ever. It now deletes those that nothing wrote to for 30 minutes (as long as
    a lock that is not refreshed counts as live), and no younger one. Each is left by a real
    process killed at its fsync; a hold and a profile by the store's own ``put`` in a process
    of its own (a daemon writes them when it chooses). Being 30 minutes old is made with
    utime: a test cannot wait for it."""
    repo = Path(store_url)

    def temporary(pattern: str) -> Callable[[], list[Path]]:
        return lambda: list(repo.glob(pattern))

    left = killed_while_writing(snapfs.command(("init",)), snapfs.env,
                                temporary(".config.*.tmp-snapfs"))
    snapfs.ok("init")  # the leftover is no object: init finds the directory empty
    source = random_image(tmp_path / "d.img", MiB, seed=4)
    for args, pattern in ((("snapshot", "create", source), "locks/.*.tmp-snapfs"),
                          (("policy", "set", "--disk", "web", "--keep-last", "1"),
                           "policies/disk/.web.*.tmp-snapfs"),
                          (("policy", "set", "--keep-last", "2"),
                           "policies/.default.*.tmp-snapfs")):
        left += killed_while_writing(snapfs.command(args), snapfs.env, temporary(pattern))
    for key in ("holds/0123456789abcdef", "profiles/0123456789abcdef"):
        put = (f"from snapfs.store.local import LocalStore\n"
               f"LocalStore({str(repo)!r}).put({key!r}, b'x' * 1000)")
        dirname, name = key.split("/")
        left += killed_while_writing([sys.executable, "-c", put], snapfs.env,
                                     temporary(f"{dirname}/.{name}.*.tmp-snapfs"))
    assert len(left) == 6
    sizes = {p: p.stat().st_size for p in left}

    def temporary_files() -> set[Path]:
        return set(repo.rglob("*.tmp-snapfs"))

    assert temporary_files() == set(left)
    # young: their writers may be alive (a put held up by a hung file system)
    assert snapfs.json("prune")["partial_objects_deleted"] == 0
    assert temporary_files() == set(left)
    now = time.time()
    young = left[-1]
    os.utime(young, (now - 29 * 60, now - 29 * 60))
    for path in left[:-1]:
        os.utime(path, (now - 31 * 60, now - 31 * 60))
    pruned = snapfs.json("prune")
    assert temporary_files() == {young}
    assert pruned["partial_objects_deleted"] == 5
    assert pruned["bytes_freed"] >= sum(size for p, size in sizes.items() if p != young)
    # nothing that is an object went with them
    assert snapfs.json("policy", "show") == {"default": None, "disks": {}}
    assert len(snapfs.json("snapshot", "list")) == 0
    assert snapfs.json("verify")["ok"] is True


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the same on both stores
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_command_stopped_by_sigterm_or_sighup_undoes_what_it_began(
        signum: int, snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    # as ^C does; they ended the process where it stood: a lock left, a partial export left
    snapfs.ok("init")
    source = random_image(tmp_path / "big.img", 40 * MiB, seed=14)
    proc = snapfs.popen("snapshot", "create", source, "--rate", "1")  # (kill_9_during_snapshot)
    try:
        wait_for(lambda: pack_names(store) or proc.poll() is not None, 60, "the first pack")
        assert proc.poll() is None, "the snapshot ended before it could be stopped"
        os.kill(proc.pid, signum)
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr) == (130, "snapfs: interrupted\n")
    assert list(store.list("locks/")) == [] and list(store.list("snapshots/")) == []

    snapfs.ok("snapshot", "create", source, "--name", "whole")
    out = tmp_path / "out.img"
    partial = tmp_path / "out.img.snapfs-partial"
    # An export of 40 MiB from a local repository ends about 0.2 s after its partial file
    # appears: it is stopped (strace) as it sizes the file, and the signal comes then.
    proc, pid = stopped_at(snapfs, ("export", "whole", out), "ftruncate",
                           tmp_path / "strace.out", path=partial)
    try:
        assert partial.exists()
        os.kill(pid, signum)
        os.kill(pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        end_stopped(proc, pid)
    assert (proc.returncode, stderr) == (130, "snapfs: interrupted\n")
    assert not partial.exists() and not out.exists()


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the store plays no part
def test_sigterm_stops_a_command_cleanly_where_sigint_is_ignored(
        snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    """A script's background job (``snapfs … &``) starts with SIGINT ignored. SIGTERM then
    raised KeyboardInterrupt wherever the process stood, inside trio's own code too: trio
    abandoned the run ("Trio guest run got abandoned" on stderr), the lock stayed, and with
    --debug the process hung. SIGINT itself stays ignored."""
    snapfs.ok("init")
    source = random_image(tmp_path / "big.img", 40 * MiB, seed=16)

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            snapfs.command(("snapshot", "create", source, "--rate", "1")), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=snapfs.env,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    proc = start()
    try:
        wait_for(lambda: pack_names(store) or proc.poll() is not None, 60, "the first pack")
        assert proc.poll() is None, "the snapshot ended before it could be stopped"
        os.kill(proc.pid, signal.SIGINT)  # ignored, as the shell asked
        os.kill(proc.pid, signal.SIGTERM)
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr) == (130, "snapfs: interrupted\n")
    assert list(store.list("locks/")) == [] and list(store.list("snapshots/")) == []

    proc = start()
    try:
        wait_for(lambda: list(store.list("locks/")) or proc.poll() is not None, 60, "the lock")
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "SIGINT was not ignored"
    finally:
        proc.kill()
        proc.communicate(timeout=60)


# -- stores that cannot be reached or refuse us (S3) -------------------------------------------


@pytest.mark.s3
def test_unreachable_store(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    secret = "unreachable-secret-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="some-access-key", AWS_SECRET_ACCESS_KEY=secret,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    bad = Snapfs("s3://snapfs-test/nowhere", endpoint, env)
    source = random_image(tmp_path / "d.img", MiB, seed=10)
    for args in (("snapshot", "list"), ("init",), ("snapshot", "create", source)):
        started = time.monotonic()
        result = bad(*args, timeout=60)
        elapsed = time.monotonic() - started
        line = one_error(result, EXIT_STORE)
        assert elapsed < 20, f"{args}: gave up after {elapsed:.1f} s"
        assert endpoint in line
        assert secret not in result.stderr + result.stdout


def test_a_malformed_s3_location_or_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    # these ended in a ValueError's traceback (ours for the bucket, botocore's for the URL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="some-access-key", AWS_SECRET_ACCESS_KEY="some-secret",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    for repo, endpoint, expect in [
            ("s3://", None, "needs a bucket"),
            ("s3:///prefix", "http://127.0.0.1:1", "needs a bucket"),
            ("s3://bucket", "notaurl", "not an S3 endpoint URL: 'notaurl'"),
            ("s3://bucket", "127.0.0.1:9000", "not an S3 endpoint URL: '127.0.0.1:9000'"),
            ("s3://bucket", "http://key:hunter2@host:port", "not an S3 endpoint URL")]:
        for args in (("snapshot", "list"), ("init",)):
            result = Snapfs(repo, endpoint, env)(*args, timeout=60)
            assert expect in one_error(result, EXIT_USAGE)
            assert "hunter2" not in result.stderr
    result = Snapfs("s3://bucket", None, {**env, "AWS_ENDPOINT_URL": "bad"})("snapshot", "list")
    assert "not an S3 endpoint URL: 'bad'" in one_error(result, EXIT_USAGE)


@pytest.fixture
def s3_snapfs(seaweed: Any, s3_bucket: str) -> Snapfs:
    """``snapfs`` on a fresh S3 location, for what only S3 can do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return Snapfs(f"s3://{s3_bucket}/cli-{uuid.uuid4().hex[:12]}", seaweed.endpoint_url, env)


@pytest.mark.s3
@pytest.mark.parametrize("wrong", ["secret", "access-key"])
def test_refused_credentials(wrong: str, s3_snapfs: Snapfs, make_store: MakeStore,
                             tmp_path: Path) -> None:
    snapfs = s3_snapfs
    assert snapfs.endpoint is not None
    store = make_store(snapfs.repo)
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=11)
    snapfs.ok("snapshot", "create", source, "--name", "one")
    before = objects(store)
    secret = "wrong-secret-" + uuid.uuid4().hex
    env = {**snapfs.env, "AWS_SECRET_ACCESS_KEY": secret}
    if wrong == "access-key":
        env["AWS_ACCESS_KEY_ID"] = "no-such-access-key"
    bad = dataclasses.replace(snapfs, env=env)
    for _args, result in bad.each(
            ("snapshot", "list"), ("snapshot", "create", source), ("verify",),
            ("snapshot", "delete", "one"), ("init",)):
        line = one_error(result, EXIT_STORE)
        assert snapfs.endpoint in line
        assert "refused access" in line and "credentials" in line, line
        assert secret not in result.stderr + result.stdout
        assert snapfs.env["AWS_SECRET_ACCESS_KEY"] not in result.stderr + result.stdout
    assert objects(store) == before


# -- damaged repositories ----------------------------------------------------------------------





def test_verify_finds_a_block_shorter_than_its_place(snapfs: Snapfs, store: ObjectStore,
                                                     tmp_path: Path) -> None:
    """A short block anywhere but at the end of its disk is damage although the blob itself is
    intact: the image would read short from there. Made by hand here (the bug that made such
    snapshots is fixed): a root whose size says the disk's last block is whole, over the pages
    of a snapshot whose last block is 8 KiB."""
    snapfs.ok("init")
    image = random_image(tmp_path / "vm.img", 3 * 16384 + 8192, seed=31)
    short_id = snapfs.json("snapshot", "create", image, "--name", "short")["id"]
    repo = Repository.open(store)
    short = repo.resolve(short_id)
    wrong = dataclasses.replace(short, id=uuid.uuid4().hex[:16], name="wrong", size=4 * 16384)
    repo.write_root(wrong)

    result = snapfs("verify")
    assert result.returncode == EXIT_INTEGRITY, result.stdout
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert problems == [f"problem: snapshot wrong ({wrong.id}): a block of the wrong length (its "
                        f"image reads wrong from there): offset {3 * 16384} holds 8192 bytes, "
                        "not 16384"]
    assert snapfs.json("verify", "short")["ok"] is True  # where it is last, it is right


@needs_root
def test_corrupt_block(snapfs: Snapfs, store: ObjectStore, images: Images, tmp_path: Path) -> None:
    snapfs.ok("init")
    root_id = snapfs.json("snapshot", "create", images.base, "--name", "vm-1")["id"]
    repo = Repository.open(store)
    index = repo.load_index()
    block_map = repo.block_map(index, repo.resolve(root_id))
    uses: dict[bytes, list[int]] = {}
    for n, bid in enumerate(block_map):
        if bid != ZERO_ID:
            uses.setdefault(bid, []).append(n)
    once = sorted((ns[0], b) for b, ns in uses.items() if len(ns) == 1)
    n, bid = once[len(once) // 3]
    loc = index.locate(bid)
    flip_byte(store, pack_key(loc.pack), loc.offset + HEADER_SIZE + loc.length // 2)

    result = snapfs("verify")
    assert result.returncode == EXIT_INTEGRITY
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1
    assert problems[0].startswith(f"problem: snapshot vm-1 ({root_id}): block at offset {n * 16384}: ")
    assert result.stdout.startswith("problem: ") and result.stdout.endswith(": 1 problem\n")
    report = json.loads(snapfs("verify", "--json").stdout)
    assert report["ok"] is False and len(report["problems"]) == 1

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = one_error(snapfs("export", "vm-1", out_dir / "vm.img"), EXIT_INTEGRITY)
    assert bid.hex()[:16] in line
    assert list(out_dir.iterdir()) == []


@needs_root
def test_missing_block(snapfs: Snapfs, store: ObjectStore, images: Images, tmp_path: Path) -> None:
    snapfs.ok("init")
    root_id = snapfs.json("snapshot", "create", images.base, "--name", "vm-1")["id"]
    snapfs.ok("snapshot", "create", images.other, "--name", "other-1")
    repo = Repository.open(store)
    index = repo.load_index()
    used = {bid for bid in repo.block_map(index, repo.resolve(root_id)) if bid != ZERO_ID}
    victim = index.locate(next(iter(used))).pack
    assert index.packs[victim][0].kind == KIND_DATA
    store.delete(pack_key(victim))

    result = snapfs("verify", "vm-1")
    assert result.returncode == EXIT_INTEGRITY
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert problems and all(f"snapshot vm-1 ({root_id}): block at offset" in p for p in problems)
    assert all("missing" in p for p in problems)

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = one_error(snapfs("export", "vm-1", out_dir / "vm.img"), EXIT_INTEGRITY)
    assert victim[:12] in line and "missing" in line
    assert list(out_dir.iterdir()) == []

    before = objects(store)
    line = one_error(snapfs("prune"), EXIT_INTEGRITY)  # refuses to collect around a hole
    assert "verify" in line
    assert objects(store) == before


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_delete_stopped_while_it_collects_says_what_it_deleted(tmp_path: Path) -> None:
    """SIGTERM (as ^C) once the root is deleted, while garbage collection writes the new index
    (strace holds that rename for 3 s): the command says what it deleted, not a bare
    "interrupted" that reads as if nothing had been; prune then collects what it left."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFS_")}
    snapfs = Snapfs(str(tmp_path / "repo"), None, env)
    snapfs.ok("init")
    for n in range(3):
        snapfs.ok("snapshot", "create", random_image(tmp_path / f"v{n}.img", MiB, seed=40 + n),
                  "--name", f"s{n}")
    root = tmp_path / "repo" / "snapshots" / snapfs.json("snapshot", "show", "s1")["id"]
    # the 1st rename takes the lock, the 2nd stores the collection's new index
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename",
         "-e", "inject=rename:delay_enter=3000000:when=2", *snapfs.command(("snapshot", "delete", "s1"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: not root.exists(), 30, "the root to be deleted")
        os.kill(traced_child(proc), signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 130, (out, err)
    assert err == ("snapfs: interrupted after deleting 1 snapshot (s1): what only they used "
                   "stays stored until snapfs prune succeeds\n")
    assert [d["name"] for d in snapfs.json("snapshot", "list")] == ["s0", "s2"]
    assert snapfs.json("prune")["bytes_freed"] > 0
    assert snapfs.json("verify")["ok"] is True


def test_a_delete_whose_collection_fails_says_what_it_deleted(snapfs: Snapfs, store: ObjectStore,
                                                              tmp_path: Path) -> None:
    """``delete`` and ``forget`` delete the roots first, then collect garbage: when collecting
    fails (here a damaged manifest page of a snapshot they keep), the error says which
    snapshots are gone already and that prune collects what they used, rather than read as if
    nothing had been deleted (the same command again then found no such snapshot)."""
    snapfs.ok("init")
    image = random_image(tmp_path / "vm.img", MiB, seed=21)
    for n in range(3):
        write_at(image, 0, bytes([n + 1]) * 16384)
        snapfs.ok("snapshot", "create", image, "--name", f"vm-{n}")
    kept = snapfs.json("snapshot", "create", random_image(tmp_path / "db.img", MiB, seed=22),
                       "--name", "db-0")["id"]
    repo = Repository.open(store)
    loc = repo.load_index().locate(bytes.fromhex(repo.resolve(kept).pages[0]))
    flip_byte(store, pack_key(loc.pack), loc.offset + HEADER_SIZE + loc.length // 2)

    line = one_error(snapfs("snapshot", "delete", "vm-0"), EXIT_INTEGRITY)
    assert line.startswith("snapfs: deleted 1 snapshot (vm-0) but collected no garbage: "), line
    assert line.endswith("what only they used stays stored until snapfs prune succeeds"), line
    line = one_error(snapfs("snapshot", "forget", "--keep-last", "1"), EXIT_INTEGRITY)
    assert line.startswith("snapfs: deleted 1 snapshot (vm-1) but collected no garbage: "), line
    assert {s["name"] for s in snapfs.json("snapshot", "list")} == {"vm-2", "db-0"}


# -- repairing the index ------------------------------------------------------------------------


def index_names(store: ObjectStore) -> list[str]:
    return sorted(key.rpartition("/")[2] for key, _ in store.list("index/"))


def test_repair_index_rebuilds_lost_and_damaged_index_objects_from_the_packs(
    snapfs: Snapfs, store: ObjectStore, images: Images, tmp_path: Path
) -> None:
    """The index only says where blobs are; the packs name their own. One index object lost
    and the other damaged: reads and garbage collection fail, saying what to run; ``repair
    index`` rebuilds the index from the packs' trailers, and every snapshot reads back whole."""
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", images.base, "--name", "vm-1")
    snapfs.ok("snapshot", "create", images.other, "--name", "other-1")
    healthy = objects(store)
    lost, damaged = index_names(store)
    out = snapfs.ok("repair", "index")
    assert "the index is complete" in out and "nothing to repair" in out
    assert objects(store) == healthy  # nothing rewritten

    store.delete(f"index/{lost}")
    store.put(f"index/{damaged}", b"SNIX\x01 not what an index holds")
    line = one_error(snapfs("export", "vm-1", tmp_path / "vm.img"), EXIT_INTEGRITY)
    assert f"index/{damaged}" in line and "snapfs repair index" in line
    one_error(snapfs("prune"), EXIT_INTEGRITY)

    report = snapfs.json("repair", "index", "--json")
    assert report["rewritten"] is True and report["damaged_index"] == [damaged]
    packs = pack_names(store)
    assert report["packs"] == report["packs_added"] == report["packs_read"] == len(packs)
    assert report["packs_unreadable"] == {} and report["incomplete"] == {}
    (rebuilt,) = index_names(store)  # one object, replacing both
    assert rebuilt not in (lost, damaged)
    assert {k: v for k, v in objects(store).items() if not k.startswith(("index/", "locks/"))} \
        == {k: v for k, v in healthy.items() if not k.startswith(("index/", "locks/"))}
    snapfs.ok("verify")
    for name, image in (("vm-1", images.base), ("other-1", images.other)):
        snapfs.ok("export", name, tmp_path / f"{name}.img", "--force")
        assert same_bytes(tmp_path / f"{name}.img", image)
    snapfs.ok("prune")
    assert pack_names(store) == packs  # every pack is used


def test_repair_index_says_what_no_stored_pack_holds(
    snapfs: Snapfs, store: ObjectStore, images: Images, tmp_path: Path
) -> None:
    """A pack gone, and a pack whose trailer is damaged while the index object naming it is
    lost: ``repair index`` drops the one, reports the other, and names each snapshot that
    still lacks blobs (exit 4). With the pack put back whole, a second repair finds it."""
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", images.base, "--name", "vm-1")
    first = set(pack_names(store))
    (first_index,) = index_names(store)
    other = random_image(tmp_path / "random.img", 4 * MiB, seed=5)  # no blob in common
    snapfs.ok("snapshot", "create", other, "--name", "other-1")
    (second_index,) = set(index_names(store)) - {first_index}
    index = Repository.open(store).load_index()
    gone = next(p for p in sorted(first) if index.packs[p][0].kind == KIND_DATA)
    victim = next(p for p in sorted(pack_names(store) - first)  # a pack other-1 wrote
                  if index.packs[p][0].kind == KIND_DATA)
    whole = store.get(pack_key(victim))
    store.delete(pack_key(gone))
    store.put(pack_key(victim), whole[:-9] + b"XNPK" + whole[-5:])  # the footer's magic
    store.delete(f"index/{second_index}")

    result = snapfs("repair", "index")
    assert result.returncode == EXIT_INTEGRITY, result.stderr
    lines = result.stdout.splitlines()
    assert f"pack {victim[:12]}: its trailer cannot be read (pack footer has a bad magic); " \
           "its blobs are not indexed" in lines
    incomplete = [line for line in lines if line.startswith("snapshot ")]
    assert [line.split()[1] for line in incomplete] == ["other-1", "vm-1"], lines
    assert all("that no stored pack holds" in line for line in incomplete)
    assert "dropped 1 pack no longer stored" in lines[-1], lines

    store.put(pack_key(victim), whole)
    result = snapfs("repair", "index", "--json")
    assert result.returncode == EXIT_INTEGRITY, result.stderr
    report = json.loads(result.stdout)
    assert report["packs_added"] == 1 and report["packs_unreadable"] == {}
    assert list(report["incomplete"]) == ["vm-1"]  # its pack is gone for good
    snapfs.ok("verify", "other-1")
    snapfs.ok("export", "other-1", tmp_path / "other.img")
    assert same_bytes(tmp_path / "other.img", other)
    assert snapfs("verify", "vm-1").returncode == EXIT_INTEGRITY


def test_repair_index_does_not_say_an_indexed_pack_with_a_damaged_trailer_is_unindexed(
        snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    """``--read-all-packs`` reads the trailer of a pack that a readable index object names
    too; when that trailer is damaged, what the index says of the pack is kept, and the line
    said "its blobs are not indexed" all the same."""
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=15)
    snapfs.ok("snapshot", "create", source, "--name", "one")
    index = Repository.open(store).load_index()
    victim = next(p for p in sorted(pack_names(store)) if index.packs[p][0].kind == KIND_DATA)
    whole = store.get(pack_key(victim))
    store.put(pack_key(victim), whole[:-9] + b"XNPK" + whole[-5:])  # the footer's magic

    result = snapfs("repair", "index", "--read-all-packs")
    assert result.returncode == 0, result.stderr
    assert f"pack {victim[:12]}: its trailer cannot be read (pack footer has a bad magic); " \
           "the index keeps what it says of its blobs" in result.stdout.splitlines()
    report = snapfs.json("repair", "index", "--read-all-packs")
    assert report["packs_unreadable_indexed"] == [victim]
    snapfs.ok("verify", "one")  # its blobs are read where the index says
    snapfs.ok("export", "one", tmp_path / "out.img")
    assert same_bytes(tmp_path / "out.img", source)


def test_repair_index_read_all_packs_rewrites_the_index_only_where_it_is_wrong(
        snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    """``--read-all-packs`` replaced the whole index on every run, even when every trailer
    agreed with it ("rebuilt the index"), although the README says a repair without a problem
    changes nothing. It now writes an index object only when a trailer says something else of
    a pack than the index does, and then puts that right."""
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=16)
    snapfs.ok("snapshot", "create", source, "--name", "one")
    healthy = objects(store)
    report = snapfs.json("repair", "index", "--read-all-packs")
    assert report["packs_read"] == len(pack_names(store)) > 0
    assert report["rewritten"] is False and report["packs_corrected"] == 0
    assert objects(store) == healthy
    assert "nothing to repair" in snapfs.ok("repair", "index", "--read-all-packs")

    # an index object that reads but is wrong: two data blobs of one pack swapped
    (old,) = index_names(store)
    index = IndexFile.decode(store.get(f"index/{old}"))
    pack = next(p for p, entries in sorted(index.packs.items()) if entries[0].kind == KIND_DATA)
    first, second = index.packs[pack][:2]
    index.packs[pack][:2] = [first._replace(blob_id=second.blob_id),
                             second._replace(blob_id=first.blob_id)]
    Repository.open(store).write_index(index)
    store.delete(f"index/{old}")
    one_error(snapfs("export", "one", tmp_path / "bad.img"), EXIT_INTEGRITY)
    assert "nothing to repair" in snapfs.ok("repair", "index")  # it trusts what reads

    report = snapfs.json("repair", "index", "--read-all-packs")
    assert report["rewritten"] is True and report["packs_corrected"] == 1
    assert report["packs_added"] == report["packs_gone"] == 0
    snapfs.ok("verify", "one")
    snapfs.ok("export", "one", tmp_path / "out.img")
    assert same_bytes(tmp_path / "out.img", source)


def test_repair_packs_takes_out_a_damaged_blob_and_the_next_snapshot_mends_every_one_using_it(
        snapfs: Snapfs, store: ObjectStore, tmp_path: Path) -> None:
    """A blob damaged where it is stored (bit rot): while the index names it, a new snapshot of
    the same bytes refers to the damaged copy (nothing uploaded), so nothing mended it.
    ``repair packs`` rewrites its pack without it (the pack's other blobs kept) and names the
    snapshots that lack it (exit 4); ``repair index`` does not bring it back; the next snapshot
    of the source stores the block again, and every snapshot reads whole again."""
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", 2 * MiB, seed=21)
    first = snapfs.json("snapshot", "create", source, "--name", "one")["id"]
    healthy = objects(store, "packs/")
    assert "no damaged blob; nothing to repair" in snapfs.ok("repair", "packs")
    assert objects(store, "packs/") == healthy

    repo = Repository.open(store)
    index = repo.load_index()
    bid = next(b for b in repo.block_map(index, repo.resolve(first)) if b != ZERO_ID)
    loc = index.locate(bid)
    flip_byte(store, pack_key(loc.pack), loc.offset + HEADER_SIZE + loc.length // 2)
    assert bid.hex()[:16] in one_error(snapfs("export", "one", tmp_path / "bad.img"),
                                       EXIT_INTEGRITY)
    assert snapfs.json("snapshot", "create", source, "--name", "two")["blocks_uploaded"] == 0

    result = snapfs("repair", "packs", "--json")
    assert result.returncode == EXIT_INTEGRITY, result.stderr
    report = json.loads(result.stdout)
    assert report["damaged"] == {loc.pack: [f"{bid.hex()}: does not match its checksum or ID"]}
    assert report["packs_rewritten"] == 1 and report["packs_unreadable"] == {}
    assert report["blobs_kept"] == len(index.packs[loc.pack]) - 1
    assert report["incomplete"] == {"one": 1, "two": 1}
    assert loc.pack not in pack_names(store)
    again = snapfs("repair", "index", "--read-all-packs", "--json")
    assert again.returncode == EXIT_INTEGRITY, again.stderr
    again_report = json.loads(again.stdout)
    assert (again_report["rewritten"], again_report["packs_corrected"],
            again_report["incomplete"]) == (False, 0, {"one": 1, "two": 1})
    problems = snapfs("verify")
    assert problems.returncode == EXIT_INTEGRITY and "2 problems" in problems.stdout

    assert snapfs.json("snapshot", "create", source, "--name", "three")["blocks_uploaded"] == 1
    snapfs.ok("verify")
    for name in ("one", "two", "three"):
        snapfs.ok("export", name, tmp_path / f"{name}.img")
        assert same_bytes(tmp_path / f"{name}.img", source)
    snapfs.ok("prune")
    assert "no damaged blob; nothing to repair" in snapfs.ok("repair", "packs")


# -- the local disk fills up -------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


@needs_root
def test_export_to_a_full_disk(snapfs: Snapfs, images: Images, small_tmpfs: Path) -> None:
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", images.base, "--name", "vm-1")
    result = snapfs("export", "vm-1", small_tmpfs / "vm.img")
    line = one_error(result, EXIT_GENERAL)
    assert "no space left" in line and str(small_tmpfs / "vm.img") in line
    assert list(small_tmpfs.iterdir()) == []
    assert shutil.disk_usage(small_tmpfs).used == 0


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # both: test_repository.py
def test_export_does_not_replace_a_file(snapfs: Snapfs, tmp_path: Path) -> None:
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=12)
    snapfs.ok("snapshot", "create", source, "--name", "one")
    out = tmp_path / "out.img"
    out.write_bytes(b"precious")
    assert "--force" in one_error(snapfs("export", "one", out), EXIT_GENERAL)
    assert out.read_bytes() == b"precious"
    snapfs.ok("export", "one", out, "--force")
    assert sha256_file(out) == sha256_file(source)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the store plays no part
def test_export_to_a_path_that_names_no_file_is_refused_at_once(snapfs: Snapfs,
                                                                 tmp_path: Path) -> None:
    """``export SNAP ""`` wrote the whole image to ./.snapfs-partial, then ended in a
    traceback (renaming it to ""); ``DIR/`` wrote to DIR/.snapfs-partial."""
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", random_image(tmp_path / "d.img", MiB, seed=14), "--name", "one")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    for out in ("", "sub/", "missing/"):
        line = one_error(snapfs("export", "one", out, cwd=work), EXIT_USAGE)
        assert line == (f"snapfs: {out!r} is not a file name: export writes an image file (or "
                        "onto a block device)")
    # "-" is standard output for restic dump and borg export-tar: it wrote a file named "-"
    line = one_error(snapfs("export", "one", "-", cwd=work), EXIT_USAGE)
    assert line == ("snapfs: export cannot write to standard output ('-'): it writes an image "
                    "file (or onto a block device); for a file named '-', give ./-")
    assert [p.name for p in work.rglob("*")] == ["sub"]
    assert snapfs("export", "one", "./-", cwd=work).returncode == 0
    assert sorted(p.name for p in work.rglob("*")) == ["-", "sub"]


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # a local repository's own
def test_export_into_the_repository_is_refused(snapfs: Snapfs, tmp_path: Path) -> None:
    """An export into a local repository's directory was written there: prune then counted an
    image under packs/ as a pack it deleted ("freed 3.0 MiB: 1 pack deleted", the file still
    there), and repair index called it an unreadable pack. It is refused as mount and
    restore-files refuse such a target, whichever way the path reaches the repository."""
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", random_image(tmp_path / "d.img", MiB, seed=16), "--name", "one")
    assert snapfs.repo is not None and "://" not in snapfs.repo
    repo = Path(snapfs.repo)
    before = sorted(repo.rglob("*"))
    (tmp_path / "link").symlink_to(repo / "packs")
    work = tmp_path / "work"
    work.mkdir()
    for out, cwd, named in ((repo / "packs" / "out.img", None, repo / "packs" / "out.img"),
                            (repo / "out.img", None, repo / "out.img"),
                            (work / ".." / "link" / "out.img", None, repo / "packs" / "out.img"),
                            ("out.img", repo / "snapshots", repo / "snapshots" / "out.img")):
        line = one_error(snapfs("export", "one", out, cwd=cwd), EXIT_USAGE)
        assert line == (f"snapfs: export target {os.path.realpath(named)} is inside the "
                        f"repository {snapfs.repo}")
    assert sorted(repo.rglob("*")) == before
    # beside it is fine, and so is a link there to a file in it: the link is replaced, as
    # a file would be (--force), and the repository is not written
    (work / "in-repo").symlink_to(repo / "config")
    config = (repo / "config").read_bytes()
    snapfs.ok("export", "one", work / "in-repo", "--force")
    assert not (work / "in-repo").is_symlink()
    assert (work / "in-repo").read_bytes() == (tmp_path / "d.img").read_bytes()
    assert (repo / "config").read_bytes() == config and sorted(repo.rglob("*")) == before
    snapfs.ok("export", "one", tmp_path / "beside.img")
    assert "no problems" in snapfs.ok("verify")


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the store plays no part
def test_export_to_the_longest_file_name_there_can_be(snapfs: Snapfs, tmp_path: Path) -> None:
    """An image goes to OUT.snapfs-partial first: to an OUT of 241 to 255 bytes, a good file
    name, export failed ("cannot write OUT.snapfs-partial: File name too long", exit 1). The
    partial file is then OUT cut short, with a hash of OUT so that two such exports that
    begin alike do not write one file."""
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=15)
    snapfs.ok("snapshot", "create", source, "--name", "one")
    work = tmp_path / "work"
    work.mkdir()
    for name in ("o" * 255, "é" * 127, "o" * 240):
        snapfs.ok("export", "one", work / name)
        assert (work / name).read_bytes() == source.read_bytes()
        (work / name).unlink()
    assert list(work.iterdir()) == []
    partials = {partial_path(str(work / ("o" * 250 + end))) for end in "ab"}
    assert len(partials) == 2
    assert all(len(os.fsencode(os.path.basename(p))) == 255 for p in partials)
    assert partial_path(str(work / ("o" * 240))) == str(work / ("o" * 240)) + ".snapfs-partial"


@needs_root
@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the store plays no part
def test_export_overwrites_a_block_device_only_when_forced_and_never_one_in_use(
        snapfs: Snapfs, tmp_path: Path) -> None:
    # a device was overwritten without --force, even while mounted (a typo away from /dev/sda)
    snapfs.ok("init")
    source = random_image(tmp_path / "d.img", MiB, seed=13)
    snapfs.ok("snapshot", "create", source, "--name", "one")
    backing = tmp_path / "device.img"
    backing.write_bytes(b"precious" * (MiB // 8))
    loop = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        assert one_error(snapfs("export", "one", loop), EXIT_GENERAL) == (
            f"snapfs: {loop} is a block device; use --force to overwrite it")
        holder = os.open(loop, os.O_RDONLY | os.O_EXCL)  # as a mount holds it
        try:
            assert "in use" in one_error(snapfs("export", "one", loop, "--force"), EXIT_GENERAL)
        finally:
            os.close(holder)
        with open(loop, "rb") as f:
            assert f.read() == b"precious" * (MiB // 8)
        snapfs.ok("export", "one", loop, "--force")
        with open(loop, "rb") as f:
            assert f.read() == source.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
