"""``snapfs browse`` / ``unbrowse`` / ``restore-files`` for real: a daemonized mount, loop devices
and kernel ext4 mounts of snapshots made by the ``snapfs`` command from real ext4 images.

The measure is independent of snapfs: the source images loop-mounted read-only, compared file by
file with what browse shows and what restore-files writes. Every test runs with its own runtime
directory and cache, and the ``env`` fixture fails a test that leaves a browse, a mount, a loop
device or a daemon behind (after cleaning it up: unbrowse, umount -l, losetup -d, snapfs umount).
"""

from __future__ import annotations

import filecmp
import fnmatch
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from diskimages import (
    change_image,
    copy_image,
    make_image,
    make_socket,
    partitioned_image,
    random_image,
    shared_image,
)
from mountutil import (
    MOUNTS,
    Env,
    attached,
    browse_env,
    end_stopped,
    loops_under,
    mounted,
    mounts_under,
    pid_running,
    stopped_at,
    wait_for,
)
from testkit import (
    EXIT_GENERAL,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    Snapfs,
    one_error,
    reap,
    store_env,
)

from snapfs.browse import _first_line
from snapfs.cli.output import run_async
from snapfs.interrupt import stop_signals_interrupt

pytestmark = MOUNTS
MiB = 1 << 20


def _raise(e: OSError) -> None:
    raise e


def tree(root: Path) -> dict[str, str]:
    """Relative path -> kind ("dir", "file", "link") of everything below ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            out[str(path.relative_to(root))] = kind
    return out


def files_of(root: Path) -> list[str]:
    return sorted(p for p, kind in tree(root).items() if kind == "file")


def assert_same_files(expected_root: Path, root: Path, paths: list[str]) -> None:
    match, mismatch, errors = filecmp.cmpfiles(expected_root, root, paths, shallow=False)
    assert (mismatch, errors) == ([], []) and len(match) == len(paths)


@contextmanager
def loop_mounted(image: Path, where: Path) -> Iterator[Path]:
    """``image`` loop-mounted read-only at ``where``, detached afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    with attached(image, read_only=True) as loop:
        subprocess.run(["mount", "-o", "ro,noload", loop, str(where)], check=True)
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=True)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared 64 MiB ext4 image (~24 MiB of files), the same with ~1% of its files changed
    through the filesystem, and small disks holding no filesystem snapfs can open."""
    base_temp = tmp_path_factory.getbasetemp()
    shared = base_temp / "shared-images"
    base = shared_image(shared, "base.img", lambda p: make_image(p, seed=1))
    changed = shared_image(shared, "changed.img",
                           lambda p: change_image(copy_image(base, p), percent=1, seed=2))
    odd = tmp_path_factory.mktemp("browse-images")
    zeros = odd / "zeros.img"
    with open(zeros, "wb") as f:
        f.truncate(4 * MiB)
    swap = odd / "swap.img"
    with open(swap, "wb") as f:
        f.truncate(4 * MiB)
    swap.chmod(0o600)
    subprocess.run(["mkswap", str(swap)], check=True, capture_output=True)
    # ext4 that blkid knows but the kernel cannot mount: blocks larger than a page (so far: a
    # kernel that learns to mount them needs another way to make the mount fail here)
    files = odd / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello\n")
    big_blocks = odd / "big-blocks.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "65536", "-d", str(files), str(big_blocks),
                    "32M"], check=True, capture_output=True)
    # partitioned disks as VMs have them: an MBR with /boot, / and swap; a GPT with one
    # filesystem and an empty partition
    for name, files_in in (("boot", {"vmlinuz": b"kernel\n" * 1000, "grub/grub.cfg": b"menu\n"}),
                           ("root", {"etc/hostname": b"vm\n", "home/u/notes.txt": b"x" * 70000,
                                     "var/empty": b""})):
        for rel, data in files_in.items():
            (odd / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (odd / name / rel).write_bytes(data)
    (odd / "root" / "etc" / "motd").symlink_to("hostname")
    mbr, gpt = odd / "mbr.img", odd / "gpt.img"
    partitioned_image(mbr, "dos", [(4 * MiB, odd / "boot"), (8 * MiB, odd / "root"),
                                   (2 * MiB, "swap")])
    partitioned_image(gpt, "gpt", [(1 * MiB, None), (8 * MiB, odd / "root")])
    return {"vm-1": base, "vm-2": changed, "zeros": zeros, "swap": swap,
            "random": random_image(odd / "random.img", 4 * MiB, seed=5),
            "big-blocks": big_blocks, "mbr": mbr, "gpt": gpt,
            "boot-files": odd / "boot", "root-files": odd / "root"}


@pytest.fixture(scope="module")
def source(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[str, Path]]:
    """The files of vm-1 and vm-2 as the kernel shows them from the source images."""
    where = tmp_path_factory.mktemp("browse-source")
    with loop_mounted(images["vm-1"], where / "vm-1") as one, \
            loop_mounted(images["vm-2"], where / "vm-2") as two:
        yield {"vm-1": one, "vm-2": two}


@pytest.fixture(scope="module")
def module_repo(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]) -> Path:
    """A local repository with a snapshot of each image, named as in ``images`` (vm-2 is an
    incremental snapshot of vm-1)."""
    repo = tmp_path_factory.mktemp("browse-repo") / "repo"
    snapfs = Snapfs(str(repo), None, {k: v for k, v in os.environ.items()
                                      if not k.startswith("SNAPFS_")})
    snapfs.ok("init")
    for name in ("vm-1", "vm-2", "zeros", "random", "swap", "big-blocks", "mbr", "gpt"):
        snapfs.ok("snapshot", "create", images[name], "--name", name, "--disk",
                  "vm" if name.startswith("vm-") else name)
    return repo


@pytest.fixture
def env(module_repo: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    repo = tmp_path / "repo"
    shutil.copytree(module_repo, repo)
    with browse_env(Snapfs(str(repo), None, store_env(request, s3=False)),
                    tmp_path) as environment:
        yield environment


# -- browse --------------------------------------------------------------------------------------


def test_browse_shows_each_snapshots_files_and_unbrowse_undoes_everything(
    env: Env, source: dict[str, Path]
) -> None:
    one, two = env.empty_dir("one"), env.empty_dir("two")
    first = env.browse("vm-1", one)
    assert first["snapshot_name"] == "vm-1" and first["filesystem"] == "ext4"
    assert first["method"] == "loop" and first["daemon_started"] and first["daemon_private"]
    assert Path(first["daemon_mountpoint"]).parent == env.cache / "browse-mnt"
    pid = first["daemon_pid"]
    assert pid_running(pid)
    assert (first["daemon_mountpoint"], "fuse.snapfs") in mounts_under(env.tmp)
    assert (str(one), "ext4") in mounts_under(env.tmp)
    assert loops_under(env.tmp) == {first["loop_device"]: first["image"]}
    assert Path(first["image"]).parent == Path(first["daemon_mountpoint"]) / "snapshots"

    # the very files of the source image, and nothing else
    assert tree(one) == tree(source["vm-1"])
    assert_same_files(source["vm-1"], one, files_of(source["vm-1"]))
    with pytest.raises(OSError):
        (one / "new-file").write_bytes(b"x")

    # the newer snapshot beside it, from the same daemon; the older one keeps the old content
    second = env.browse("vm-2", two)
    assert not second["daemon_started"] and second["daemon_pid"] == pid
    assert second["loop_device"] != first["loop_device"]
    assert tree(two) == tree(source["vm-2"])
    assert_same_files(source["vm-2"], two, files_of(source["vm-2"]))
    changed = [p for p in files_of(source["vm-1"]) if (source["vm-2"] / p).is_file()
               and not filecmp.cmp(source["vm-1"] / p, source["vm-2"] / p, shallow=False)]
    assert changed
    assert_same_files(source["vm-1"], one, changed)

    # unbrowsing one leaves the daemon to the other
    out = env.unbrowse(one)
    assert "serves other browses" in out
    assert not os.path.ismount(one) and os.listdir(one) == []
    assert loops_under(env.tmp) == {second["loop_device"]: second["image"]}
    assert pid_running(pid) and len(env.browse_states()) == 1

    # the last one stops it
    out = env.unbrowse(two)
    assert "stopped its snapfs daemon" in out
    assert not pid_running(pid)
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert first["image"] not in losetup and second["image"] not in losetup
    assert env.browse_states() == [] and env.daemon_pid_files() == []
    assert not Path(first["daemon_mountpoint"]).exists()

    assert "is not browsed" in one_error(env.snapfs("unbrowse", one), EXIT_NOT_FOUND)


def test_browse_reuses_a_running_daemon_and_leaves_it_running(
    env: Env, source: dict[str, Path], tmp_path: Path
) -> None:
    # with latency simulated, it is still the same repository's daemon
    with mounted(env.snapfs, tmp_path / "mnt", tmp_path / "user-cache",
                 "--simulate-latency", "1ms") as daemon:
        stats = env.snapfs.json("stats", daemon.mountpoint)
        assert stats["simulated"] == "1 ms a request"
        assert "simulated: 1 ms a request" in env.snapfs.ok("stats", daemon.mountpoint)
        where = env.empty_dir("where")
        state = env.browse("vm-1", where)
        assert state["daemon_mountpoint"] == str(daemon.mountpoint)
        assert state["daemon_pid"] == daemon.pid
        assert not state["daemon_started"] and not state["daemon_private"]
        assert state["image"] == str(daemon.images / "vm-1.img")
        biggest = max(files_of(source["vm-1"]), key=lambda p: (source["vm-1"] / p).stat().st_size)
        assert_same_files(source["vm-1"], where, [biggest])
        # the browse's loop device holds the image (fuser -m does not show it): umount says so
        assert one_error(env.snapfs("umount", daemon.mountpoint), EXIT_GENERAL) == (
            f"snapfs: {daemon.mountpoint} is busy: browsed at {where}; undo it first with: "
            f"snapfs unbrowse {where}")
        assert pid_running(daemon.pid)

        out = env.unbrowse(where)
        assert out.strip() == f"unbrowsed {where}"
        assert pid_running(daemon.pid) and "vm-1.img" in os.listdir(daemon.images)
        assert [m for m in mounts_under(env.tmp) if m[1] != "fuse.snapfs"] == []
        assert loops_under(tmp_path) == {}
        # nothing holds the image any more: the user's umount goes through
        wait_for(lambda: env.snapfs("umount", daemon.mountpoint).returncode == 0, 10,
                 "the user's umount")
        assert not pid_running(daemon.pid)


def test_a_browsed_snapshot_is_neither_deleted_nor_forgotten(
    env: Env, source: dict[str, Path]
) -> None:
    """Deleting a snapshot under its browse would turn the browse's reads into I/O errors:
    ``snapshot delete`` refuses it and ``forget`` keeps it, naming the open image."""
    where = env.empty_dir("where")
    state = env.browse("vm-1", where)
    line = one_error(env.snapfs("snapshot", "delete", "vm-1"), EXIT_USAGE)
    assert f"open at {state['image']}" in line and "unbrowse" in line
    plan = env.snapfs.json("snapshot", "forget", "--keep-last", "1")
    reasons = {s["name"]: s["reasons"] for s in plan["snapshots"]}
    assert reasons["vm-1"] == [f"open at {state['image']}"] and reasons["vm-2"] == ["last"]
    assert plan["forgotten"] == []
    assert "vm-1" in {s["name"] for s in env.snapfs.json("snapshot", "list")}
    assert_same_files(source["vm-1"], where, files_of(source["vm-1"]))
    env.unbrowse(where)
    # nothing holds it now
    done = env.snapfs.json("snapshot", "forget", "--keep-last", "1")
    assert [s["name"] for s in done["snapshots"] if not s["keep"]] == ["vm-1"]
    assert "vm-1" not in {s["name"] for s in env.snapfs.json("snapshot", "list")}


def test_a_new_snapshot_and_an_ext2_filesystem_made_by_mkfs(env: Env) -> None:
    files = env.empty_dir("files")
    (files / "sub").mkdir()
    (files / "sub" / "hello.txt").write_text("hello from ext2\n")
    (files / "big.bin").write_bytes(os.urandom(3 * MiB))
    image = env.tmp / "small.img"
    subprocess.run(["mkfs.ext2", "-q", "-d", str(files), str(image), "16M"], check=True,
                   capture_output=True)
    where = env.empty_dir("where")
    old = env.browse("vm-1", env.empty_dir("old"))  # the daemon is up before the snapshot exists
    env.snapfs.ok("snapshot", "create", image, "--name", "fresh")
    state = env.browse("fresh", where)  # appears in the daemon's catalog within a refresh
    assert state["filesystem"] == "ext2" and state["daemon_pid"] == old["daemon_pid"]
    assert (where / "sub" / "hello.txt").read_text() == "hello from ext2\n"
    assert (where / "big.bin").read_bytes() == (files / "big.bin").read_bytes()
    env.unbrowse(where)
    env.unbrowse(Path(old["directory"]))
    assert not pid_running(old["daemon_pid"])


def test_browse_with_fuse2fs(env: Env, source: dict[str, Path]) -> None:
    where = env.empty_dir("where")
    state = env.browse("vm-1", where, "--fuse2fs")
    assert state["method"] == "fuse2fs" and state["loop_device"] is None
    assert (str(where), "fuse.ext4") in mounts_under(env.tmp) and loops_under(env.tmp) == {}
    assert tree(where) == tree(source["vm-1"])
    files = files_of(source["vm-1"])
    biggest = max(files, key=lambda p: (source["vm-1"] / p).stat().st_size)
    assert_same_files(source["vm-1"], where, [biggest, *files[::10]])  # fuse2fs is slow
    with pytest.raises(OSError):
        (where / "new-file").write_bytes(b"x")
    assert "stopped its snapfs daemon" in env.unbrowse(where)
    assert not pid_running(state["daemon_pid"]) and mounts_under(env.tmp) == []


def test_a_snapshot_of_a_mounted_filesystem_is_browsed_and_restored_with_fuse2fs(
    env: Env
) -> None:
    # a snapshot of a disk in use has a journal that "needs recovery": never replayed on a
    # snapshot (the kernel mounts it with noload), and fuse2fs refused it ("exit status 3")
    files = env.empty_dir("files")
    (files / "hello.txt").write_text("hello from a live disk\n")
    image = env.tmp / "live.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(files), str(image), "16M"], check=True,
                   capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", str(image)], check=True,
                   capture_output=True)
    env.snapfs.ok("snapshot", "create", image, "--name", "live")
    where = env.empty_dir("where")
    env.browse("live", where, "--fuse2fs")
    assert (where / "hello.txt").read_text() == "hello from a live disk\n"
    env.unbrowse(where)
    target = env.tmp / "target"
    report = env.snapfs.json("restore-files", "live", "--to", target, "--fuse2fs")
    assert (report["restored"], report["failed"]) == (1, 0)
    assert (target / "hello.txt").read_text() == "hello from a live disk\n"


def test_a_system_tools_complaint_on_stdout_is_the_reason_given() -> None:
    # fuse2fs says why it fails on stdout, not stderr
    said = subprocess.CompletedProcess(["fuse2fs"], 3, "Mounting read-only.\nJournal needs "
                                       "recovery; running `e2fsck -E journal_only' is required.\n",
                                       "")
    assert _first_line(said) == "Journal needs recovery; running `e2fsck -E journal_only' is required."
    assert _first_line(subprocess.CompletedProcess(["x"], 1, "", "")) == "exit status 1"
    assert _first_line(subprocess.CompletedProcess(["x"], 1, "out\n", "err\n")) == "err"


def test_browse_after_its_daemon_died_detaches_the_dead_mount_and_starts_another(
    env: Env, source: dict[str, Path]
) -> None:
    where = env.empty_dir("where")
    dead = env.browse("vm-1", where)
    os.kill(dead["daemon_pid"], signal.SIGKILL)
    wait_for(lambda: not pid_running(dead["daemon_pid"]), 10, "the daemon to die")
    # its private mount point is browse's own: not one to send the user to snapfs umount for
    again = env.empty_dir("again")
    state = env.browse("vm-2", again)
    assert state["daemon_started"] and state["daemon_pid"] != dead["daemon_pid"]
    assert state["daemon_mountpoint"] == dead["daemon_mountpoint"]
    some = files_of(source["vm-2"])[:20]
    assert_same_files(source["vm-2"], again, some)
    assert "serves other browses" in env.unbrowse(again)  # the first browse names it too
    assert "stopped its snapfs daemon" in env.unbrowse(where)
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}


@pytest.mark.parametrize("tool", ["losetup", "mount"])
def test_a_browse_killed_once_its_loop_device_or_mount_is_made_is_undone_by_unbrowse(
    env: Env, tmp_path: Path, tool: str
) -> None:
    """kill -9 of ``browse`` the moment ``losetup`` attached the image, or ``mount`` mounted
    its filesystem on DIR: what it made (a loop device, an ext4 mount on DIR, its own daemon)
    must be known to ``unbrowse DIR``, not left for ever with DIR 'not browsed' and 'already
    a mount point' to a new browse. The instant is chosen by a wrapper of the real tool on
    PATH that runs it, then kills its parent, the browse (it stands in for nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = shutil.which(tool)
    wrapper = bin_dir / tool
    wrapper.write_text(f"#!/bin/sh\n{real} \"$@\"; status=$?\n"
                       f"case \"$*\" in *snapshots/*|*ext4*) kill -9 $PPID;; esac\nexit $status\n")
    wrapper.chmod(0o755)
    where = env.empty_dir("where")
    killed = env.snapfs("browse", "vm-1", where,
                        env={**env.snapfs.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert loops_under(env.tmp)  # what the kill left
    assert "unbrowsed" in env.unbrowse(where)
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}
    assert env.browse_states() == [] and env.daemon_pid_files() == []
    state = env.browse("vm-1", where)  # and DIR serves again
    assert state["loop_device"] in loops_under(env.tmp)
    env.unbrowse(where)


def test_unbrowse_after_the_daemon_died_or_someone_undid_part_of_it(env: Env, tmp_path: Path
                                                                     ) -> None:
    # the daemon killed: the files read as EIO; unbrowse still undoes everything
    where = env.empty_dir("where")
    state = env.browse("vm-1", where)
    os.kill(state["daemon_pid"], signal.SIGKILL)
    wait_for(lambda: not pid_running(state["daemon_pid"]), 10, "the daemon to die")
    with pytest.raises(OSError):  # nothing had been read: the listing or a file is EIO
        for path in files_of(where):
            (where / path).read_bytes()
    assert "its daemon had died" in env.unbrowse(where)
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}
    assert env.browse_states() == [] and env.daemon_pid_files() == []

    # DIR unmounted and the loop device detached by hand, its number since given to another
    # file, and the daemon stopped by hand: unbrowse forgets the browse and touches none of it
    state = env.browse("vm-1", where)
    subprocess.run(["umount", str(where)], check=True)
    subprocess.run(["losetup", "-d", state["loop_device"]], check=True)
    other = random_image(tmp_path / "other.img", MiB)
    wait_for(lambda: subprocess.run(["losetup", "-r", state["loop_device"], str(other)],
                                    capture_output=True).returncode == 0,
             10, f"{state['loop_device']} to take another file")
    try:
        wait_for(lambda: env.snapfs("umount", state["daemon_mountpoint"]).returncode == 0, 10,
                 "the daemon's umount")
        assert "was not mounted any more" in env.unbrowse(where)
        assert loops_under(tmp_path) == {state["loop_device"]: str(other)}
        assert env.browse_states() == []
    finally:
        subprocess.run(["losetup", "-d", state["loop_device"]], check=True)


# -- bad input -----------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_leaves_nothing_behind(env: Env) -> None:
    where = env.empty_dir("where")
    a_file = env.tmp / "file"
    a_file.write_text("x")
    full = env.empty_dir("full")
    (full / "something").write_text("x")

    def error(*args: Any, code: int = EXIT_GENERAL) -> str:
        return one_error(env.snapfs(*args), code)

    assert "no snapshot 'nope'" in error("browse", "nope", where, code=EXIT_NOT_FOUND)
    assert "does not exist" in error("browse", "vm-1", env.tmp / "missing", code=EXIT_NOT_FOUND)
    assert "not a directory" in error("browse", "vm-1", a_file)
    assert "not empty" in error("browse", "vm-1", full)
    assert "-r REPO" in one_error(env.snapfs.with_repo(None)("browse", "vm-1", where), EXIT_USAGE)
    # inside the repository: its listings would walk into the snapshot's files
    assert env.snapfs.repo is not None and "://" not in env.snapfs.repo
    inside = Path(env.snapfs.repo) / "packs" / "files"
    inside.mkdir()
    assert "inside the repository" in error("browse", "vm-1", inside, code=EXIT_USAGE)
    assert "inside the repository" in error("restore-files", "vm-1", "--to", inside / "to",
                                            code=EXIT_USAGE)
    assert not (inside / "to").exists()
    assert mounts_under(env.tmp) == [] and env.browse_states() == []
    inside.rmdir()
    for snap, found in (("zeros", "nothing recognisable"), ("random", "nothing recognisable"),
                        ("swap", "swap")):
        message = error("browse", snap, where)
        assert f"snapshot {snap} holds no filesystem snapfs can open (found: {found}" in message
        # the daemon it started for this is gone again, and nothing was attached
        assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}
        assert env.daemon_pid_files() == [] and env.browse_states() == []
    # the kernel refuses it after the loop device was attached: that is undone too
    assert "cannot mount the ext4 filesystem of big-blocks.img" in error(
        "browse", "big-blocks", where)
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}
    assert env.daemon_pid_files() == [] and env.browse_states() == []
    assert "not browsed" in error("unbrowse", where, code=EXIT_NOT_FOUND)

    # a browsed directory cannot be browsed again, nor can a mount point
    state = env.browse("vm-1", where)
    assert "browsed already" in error("browse", "vm-2", where)
    assert "already a mount point" in error("browse", "vm-2", state["daemon_mountpoint"])
    env.unbrowse(where)


def test_a_partitioned_disk_is_browsed_and_restored_at_one_partition(
    env: Env, images: dict[str, Path]
) -> None:
    boot, root = images["boot-files"], images["root-files"]
    where = env.empty_dir("where")

    def error(*args: Any, code: int) -> str:
        return one_error(env.snapfs(*args), code)

    # two filesystems on the MBR: the user chooses, and is told the choices
    message = error("browse", "mbr", where, code=EXIT_USAGE)
    assert "snapshot mbr holds 2 filesystems on its dos partition table: choose one with " \
           "--partition N (partitions: 1 (ext4 'boot', 4.0 MiB); 2 (ext4 'root', 8.0 MiB); " \
           "3 (swap, 2.0 MiB))" in message
    assert "found: swap" in error("browse", "mbr", where, "--partition", "3", code=EXIT_GENERAL)
    assert "has no partition 4 (its dos partition table has: 1 (" in error(
        "browse", "mbr", where, "--partition", "4", code=EXIT_USAGE)
    assert "snapshot vm-1 has no partition table (found: ext4): leave out --partition" in error(
        "browse", "vm-1", where, "--partition", "1", code=EXIT_USAGE)
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}
    assert env.daemon_pid_files() == [] and env.browse_states() == []

    state = env.browse("mbr", where, "--partition", "2")
    assert (state["partition"], state["filesystem"]) == (2, "ext4")
    assert tree(where) == {**tree(root), "lost+found": "dir"}
    assert_same_files(root, where, files_of(root))
    assert os.readlink(where / "etc" / "motd") == "hostname"
    assert "partition 1, ext4 on /dev/loop" in env.snapfs.ok("browse", "mbr",
                                                             env.empty_dir("boot"),
                                                             "--partition", "1")
    assert_same_files(boot, env.tmp / "boot", files_of(boot))
    env.unbrowse(env.tmp / "boot")
    env.unbrowse(where)

    # the GPT's one filesystem is found by itself, through a loop device and through fuse2fs
    for method in ((), ("--fuse2fs",)):
        state = env.browse("gpt", where, *method)
        assert state["partition"] == 2 and state["method"] == ("fuse2fs" if method else "loop")
        assert_same_files(root, where, files_of(root))
        env.unbrowse(where)

    target = env.tmp / "target"
    report = env.snapfs.json("restore-files", "mbr", "--partition", "1", "--to", target)
    assert (report["restored"], report["failed"]) == (len(files_of(boot)), 0)
    assert tree(target) == tree(boot)
    assert_same_files(boot, target, files_of(boot))
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}


# -- restore-files -------------------------------------------------------------------------------


def test_restore_files_all_then_again_with_each_conflict_policy(
    env: Env, source: dict[str, Path]
) -> None:
    src = source["vm-1"]
    files = files_of(src)
    target = env.tmp / "target"  # created by restore-files
    total = sum((src / p).stat().st_size for p in files)

    report = env.snapfs.json("restore-files", "vm-1", "--to", target)
    assert (report["restored"], report["skipped"], report["failed"]) == (len(files), 0, 0)
    assert report["bytes"] == total and report["failures"] == []
    expected = {p: k for p, k in tree(src).items() if not p.startswith("lost+found")}
    assert tree(target) == expected
    assert_same_files(src, target, files)
    assert list((env.cache / "browse-mnt").iterdir()) == []  # its temporary mount is gone

    victim = target / files[len(files) // 2]
    victim.write_bytes(b"changed in the target")
    report = env.snapfs.json("restore-files", "vm-1", "--to", target)
    assert (report["restored"], report["skipped"], report["failed"]) == (0, len(files), 0)
    assert victim.read_bytes() == b"changed in the target"

    report = env.snapfs.json("restore-files", "vm-1", "--to", target, "--on-conflict",
                             "overwrite")
    assert (report["restored"], report["skipped"], report["failed"]) == (len(files), 0, 0)
    assert report["bytes"] == total
    assert_same_files(src, target, files)

    # a directory where a file goes: that file fails (listed on stderr), exit status 1
    victim.unlink()
    victim.mkdir()
    rel = str(victim.relative_to(target))
    result = env.snapfs("restore-files", "vm-1", "--to", target, "--on-conflict", "overwrite",
                        "--include", rel, "--include", files[0])
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"snapfs: failed: {rel}: the target has a directory in its place"]
    assert result.stdout.startswith("restored 1 file (") and "0 skipped, 1 failed" in result.stdout


def test_restore_files_with_include_and_exclude(env: Env, source: dict[str, Path]) -> None:
    src = source["vm-1"]
    target = env.tmp / "target"
    everything = files_of(src)
    wanted = [p for p in everything
              if (p.startswith("usr/share/") or (p.startswith("usr/lib/")
                                                 and os.path.basename(p) == "__init__.py"))
              and not fnmatch.fnmatchcase(os.path.basename(p), "*.rst")]
    assert 10 < len(wanted) < len(everything) / 2
    assert any(p.endswith(".rst") for p in everything if p.startswith("usr/share/"))
    report = env.snapfs.json("restore-files", "vm-1", "--to", target,
                             "--include", "usr/share", "--include", "usr/lib/**/__init__.py",
                             "--exclude", "**/*.rst")
    assert (report["restored"], report["skipped"], report["failed"]) == (len(wanted), 0, 0)
    assert report["bytes"] == sum((src / p).stat().st_size for p in wanted)
    assert files_of(target) == wanted
    assert_same_files(src, target, wanted)


def test_restore_files_patterns_escape_wildcards_with_a_backslash(env: Env) -> None:
    """A name with a literal '*', '?' or '[' could not be chosen alone: every pattern that
    matched it matched its look-alikes too. A backslash makes the next character literal, as
    in restic and rsync."""
    content = env.tmp / "content"
    names = ["a*b", "axb", "a?b", "a[1]b", "a1b", "a\\b", "ab"]
    (content / "etc").mkdir(parents=True)
    for n, name in enumerate(names):
        (content / "etc" / name).write_bytes(name.encode() * (n + 1))
    image = env.tmp / "stars.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(image), "8M"], check=True,
                   capture_output=True)
    env.snapfs.ok("snapshot", "create", image, "--name", "stars", "--disk", "stars")
    alone = env.tmp / "alone"
    report = env.snapfs.json("restore-files", "stars", "--to", alone, "--include", r"etc/a\*b")
    assert (report["restored"], report["failed"], report["unmatched_includes"]) == (1, 0, [])
    assert files_of(alone) == ["etc/a*b"]
    assert (alone / "etc/a*b").read_bytes() == b"a*b"
    rest = env.tmp / "rest"
    report = env.snapfs.json("restore-files", "stars", "--to", rest, "--include", "etc",
                             "--exclude", r"etc/a\?b", "--exclude", r"etc/a\[1]b",
                             "--exclude", r"etc/a\\b")
    assert sorted(files_of(rest)) == ["etc/a*b", "etc/a1b", "etc/ab", "etc/axb"]
    assert report["restored"] == 4
    assert_same_files(content, rest, files_of(rest))


def test_a_restore_whose_browse_fails_leaves_nothing_behind(env: Env) -> None:
    target = env.tmp / "target"
    assert "found: swap" in one_error(env.snapfs("restore-files", "swap", "--to", target),
                                      EXIT_GENERAL)
    assert "no snapshot" in one_error(env.snapfs("restore-files", "nope", "--to", target),
                                      EXIT_NOT_FOUND)
    assert "empty path pattern" in one_error(
        env.snapfs("restore-files", "vm-1", "--to", target, "--include", "/"), EXIT_USAGE)
    assert not target.exists()
    assert list((env.cache / "browse-mnt").iterdir()) == []
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}


def test_a_cache_directory_that_cannot_be_used_is_one_line(env: Env) -> None:
    # browse and restore-files start a daemon with its cache, and keep their temporary mounts
    # there: a cache directory that cannot be made or written is one line, as for mount
    where = env.empty_dir("where")
    a_file = env.tmp / "a-file"
    a_file.write_text("x")
    target = env.tmp / "target"
    for cache, reason in ((a_file, "not a directory"),
                          (a_file / "below", "not writable: Not a directory")):
        environ = {**env.snapfs.env, "SNAPFS_CACHE_DIR": str(cache)}
        for args in (("browse", "vm-1", where), ("restore-files", "vm-1", "--to", target)):
            message = one_error(env.snapfs(*args, env=environ), EXIT_GENERAL)
            assert f"cache directory {cache} is {reason}" in message
    assert not target.exists()
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ext4 image with what images made from /usr lack: a big file (64 MiB, random), a file
    with three names in two directories, a fifo, a device node and a socket."""
    where = tmp_path_factory.mktemp("odd-image")
    content = where / "content"
    (content / "links/a").mkdir(parents=True)
    with open(content / "big", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
    (content / "links/orig").write_bytes(b"linked\n" * 10_000)
    os.link(content / "links/orig", content / "links/a/second")
    os.link(content / "links/orig", content / "links/third")
    os.mkfifo(content / "fifo")
    os.chmod(content / "fifo", 0o620)  # past the umask
    os.mknod(content / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    make_socket(content / "sock")
    image = where / "odd.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(image), "128M"], check=True,
                   capture_output=True)
    return image


def test_restore_files_says_each_entry_on_one_line_whatever_its_name(env: Env) -> None:
    """A name may hold a newline or an escape character: what restore-files says of it on
    stderr stays one line, its control characters escaped as labels' are."""
    content = env.tmp / "content"
    content.mkdir()
    (content / "plain").write_bytes(b"x")
    make_socket(content / "two\nlines")
    make_socket(content / "esc\x1b[2Jape")
    image = env.tmp / "names.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(image), "8M"], check=True,
                   capture_output=True)
    env.snapfs.ok("snapshot", "create", image, "--name", "names", "--disk", "names")
    result = env.snapfs("restore-files", "names", "--to", env.tmp / "target", "--include",
                        "*", "--include", "no\tsuch")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stderr.splitlines()) == [
        "snapfs: left out: esc\\x1b[2Jape: socket",
        "snapfs: left out: two\\nlines: socket",
        "snapfs: warning: --include no\\tsuch matched nothing"]
    assert os.listdir(env.tmp / "target") == ["plain"]


def temporary_files(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if n.startswith(".snapfs-restore-")]


def test_restore_files_keeps_hard_links_and_makes_fifos_and_devices(
    env: Env, odd_image: Path
) -> None:
    env.snapfs.ok("snapshot", "create", odd_image, "--name", "odd", "--disk", "odd")
    target = env.tmp / "target"
    result = env.snapfs("restore-files", "odd", "--to", target, "--exclude", "big")
    assert result.returncode == 0, result.stderr
    # the socket is left out, and said so
    assert result.stderr.splitlines() == ["snapfs: left out: sock: socket"]
    assert result.stdout == (f"restored 5 files (68.4 KiB, 2 of them hard links) from odd into "
                             f"{target}: 1 skipped, 0 failed\n")
    names = [target / "links/a/second", target / "links/orig", target / "links/third"]
    assert {os.stat(p).st_ino for p in names} == {os.stat(names[0]).st_ino}
    assert os.stat(names[0]).st_nlink == 3
    assert names[0].read_bytes() == b"linked\n" * 10_000
    fifo, null = os.lstat(target / "fifo"), os.lstat(target / "null")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o620
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(target)) == ["fifo", "links", "null"]


def test_stop_signals_interrupt_once_and_only_inside_the_block() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    with stop_signals_interrupt():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(10)  # the handler runs at once
        os.kill(os.getpid(), signal.SIGTERM)  # while unwinding: ignored
        time.sleep(0.01)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_command_is_interrupted_at_a_checkpoint_never_between_two_bytecodes(
        signum: signal.Signals) -> None:
    """A signal that lands in the middle of ``nursery.start_soon`` used to leave a task created
    and never run: CI once printed "coroutine ... was never awaited" after "interrupted". A
    stretch without a checkpoint stands for that moment here: it must run to its end."""
    import trio

    # as a terminal gives them: pytest run as a script's background job inherits SIGINT
    # ignored (and under nohup, SIGHUP), and an ignored signal stays ignored by design
    before = signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                           else signal.SIG_DFL)
    reached = []

    async def command(progress: object) -> None:
        os.kill(os.getpid(), signum)
        for _ in range(200_000):  # the handler runs between two of these bytecodes
            pass
        reached.append("the end of the stretch")
        await trio.lowlevel.checkpoint()
        reached.append("past the checkpoint")

    try:
        with stop_signals_interrupt(), pytest.raises(KeyboardInterrupt):
            run_async(command)
    finally:
        signal.signal(signum, before)
    assert reached == ["the end of the stretch"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_restore_files_stopped_by_a_signal_undoes_everything(
    env: Env, odd_image: Path, signum: signal.Signals
) -> None:
    """kill, timeout(1), systemd or a closed terminal in the middle of a file: the temporary
    browse (mount, loop device, state, private daemon) is undone, the partial file removed."""
    env.snapfs.ok("snapshot", "create", odd_image, "--name", "odd", "--disk", "odd")
    target = env.tmp / "target"
    trace = env.tmp / "strace.out"
    # Stopped (strace, SIGSTOP) at its second write of big's data, under a random name: a
    # test that looked for that name and then stopped it found the restore done on a loaded
    # machine. Only the command's own thread is traced (no -f): it copies the files, and its
    # private daemon, forked, writes the cache with the same call.
    proc, pid = stopped_at(env.snapfs, ("restore-files", "odd", "--to", target, "--include", "big"),
                           "pwrite64", trace, when=2, follow=False)
    try:
        partial = temporary_files(target)
        assert len(partial) == 1 and os.path.getsize(partial[0]) > 0, partial
        assert env.browse_states() and loops_under(env.tmp)
        os.kill(pid, signum)
        os.kill(pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        end_stopped(proc, pid)
    assert (proc.returncode, stdout, stderr) == (130, "", "snapfs: interrupted\n")
    assert os.listdir(target) == []  # no partial file
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}
    assert env.browse_states() == [] and env.daemon_pid_files() == []
    assert list((env.cache / "browse-mnt").iterdir()) == []


def test_a_restore_killed_outright_is_undone_by_the_next(env: Env, odd_image: Path) -> None:
    """kill -9 (the OOM killer) gives restore-files no chance to unbrowse: its temporary browse
    (mount, loop device, state, private daemon) stays until the next restore-files undoes it."""
    env.snapfs.ok("snapshot", "create", odd_image, "--name", "odd", "--disk", "odd")
    proc = env.snapfs.popen("restore-files", "odd", "--to", env.tmp / "target")
    try:
        deadline = time.monotonic() + 60
        # its state is written before the loop device is bound: wait for both
        while not (env.browse_states() and loops_under(env.tmp)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the restore never browsed"
        proc.kill()
        proc.communicate()
    finally:
        reap(proc)
    assert env.browse_states() and loops_under(env.tmp)  # what kill -9 leaves

    report = env.snapfs.json("restore-files", "odd", "--to", env.tmp / "again", "--include",
                             "links/orig")
    assert (report["restored"], report["failed"]) == (1, 0)
    assert mounts_under(env.tmp) == [] and loops_under(env.tmp) == {}
    assert env.browse_states() == [] and env.daemon_pid_files() == []
    assert list((env.cache / "browse-mnt").iterdir()) == []


@contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_restore_files_into_a_target_that_fills_up(env: Env, source: dict[str, Path]) -> None:
    """The report so far comes out (as JSON too), then the one line, exit status 1; what was
    restored is whole, no temporary file is left, the browse is undone."""
    src = source["vm-1"]
    with small_tmpfs(env.tmp / "small", "4m") as small:
        result = env.snapfs("restore-files", "vm-1", "--to", small / "json", "--json")
        line = one_error(result, EXIT_GENERAL)
        report = json.loads(result.stdout)
        assert line == f"snapfs: {report['error']}"
        stopped_at = re.fullmatch(r"cannot write (.+) in the target: No space left on device; "
                                  r"restore stopped \(\d+ KiB free\)", report["error"])
        assert stopped_at, report["error"]
        assert report["failures"][-1] == (f"{stopped_at[1]}: no space for it in the target: "
                                          "No space left on device")
        restored = files_of(small / "json")
        assert report["restored"] == len(restored) > 10
        assert report["failed"] == len(report["failures"]) >= 1
        assert report["bytes"] == sum((src / p).stat().st_size for p in restored)
        assert_same_files(src, small / "json", restored)
        assert temporary_files(small) == []

        shutil.rmtree(small / "json")
        result = env.snapfs("restore-files", "vm-1", "--to", small / "human")
        assert (result.returncode, result.stdout) == (EXIT_GENERAL, "")
        *failed, last = result.stderr.splitlines()
        assert failed == [f"snapfs: failed: {f}" for f in report["failures"]]
        assert last == line
    assert list((env.cache / "browse-mnt").iterdir()) == []
