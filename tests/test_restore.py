"""restore_files: the copy engine of ``snapfs restore-files`` and its path patterns.

Pure pattern tests first. The restore tests run on plain directories standing in for a mounted
snapshot: real files, hard links, symlinks, xattrs, ACLs, owners (root) and special files,
compared entry by entry with what the test built. Some use real mounts: an ext4 image with a
broken block map on a loop device (a real EIO on read), an ext4 image read through fuse2fs (no
SEEK_DATA), and small tmpfs targets that fill up.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from diskimages import have_root, make_socket

import snapfs.restore
from snapfs.errors import NoSpace, StoreUnavailable, UsageError
from snapfs.restore import (
    PathPattern,
    PathSelector,
    RestoreOptions,
    RestoreReport,
    restore_files,
)

needs_root = pytest.mark.skipif(not have_root(), reason="needs root (chown, mknod, mounts)")

MiB = 1 << 20
TEMP_PREFIX = ".snapfs-restore-"


# -- patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "is_dir", "expected"),
    [
        ("etc/*", "etc/passwd", False, True),
        ("etc/*", "etc/ssh", True, True),
        ("etc/*", "etc/ssh/sshd_config", False, False),  # * does not cross /
        ("etc/*", "etc", True, False),
        ("etc/*", "usr/etc/passwd", False, False),  # anchored at the root
        ("/etc/*", "etc/passwd", False, True),  # a leading / changes nothing
        ("*", ".hidden", False, True),
        ("*.conf", "a.conf", False, True),
        ("*.conf", "etc/a.conf", False, False),
        ("home/**/*.conf", "home/a.conf", False, True),  # ** matches no directory too
        ("home/**/*.conf", "home/u/a.conf", False, True),
        ("home/**/*.conf", "home/u/.config/deep/a.conf", False, True),
        ("home/**/*.conf", "home/u/a.conf.bak", False, False),
        ("home/**/*.conf", "homes/u/a.conf", False, False),
        ("**/core", "core", False, True),
        ("**/core", "a/b/core", False, True),
        ("**/core", "a/b/core.1", False, False),
        ("**", "anything/at/all", False, True),
        ("a/**", "a", True, False),  # a final ** takes at least one component (gitignore)
        ("a/**", "a/b", True, True),
        ("a/**", "a/b/c", False, True),
        ("a/**/", "a/b", False, False),
        ("a/**/", "a/b/c", True, True),
        ("**", "x", False, True),
        ("var/log/", "var/log", True, True),  # a trailing / only matches directories
        ("var/log/", "var/log", False, False),
        ("file[0-9]", "file7", False, True),
        ("file[!0-9]", "file7", False, False),
        ("file?", "file/", False, False),
        ("lit[*]", "lit*", False, True),
        ("lit[*]", "litx", False, False),
        ("a**b", "axxb", False, True),  # ** inside a component is a plain *
        ("a**b", "ax/xb", False, False),
        ("Etc/*", "etc/passwd", False, False),  # case-sensitive
        # a backslash makes the next character literal (restic, rsync)
        (r"etc/a\*b", "etc/a*b", False, True),
        (r"etc/a\*b", "etc/axb", False, False),
        (r"a\?b", "a?b", False, True),
        (r"a\?b", "axb", False, False),
        (r"a\[1]b", "a[1]b", False, True),
        (r"a\[1]b", "a1b", False, False),
        (r"a\\b", "a\\b", False, True),
        (r"a\\b", "ab", False, False),
        (r"a\b", "ab", False, True),  # an ordinary character stays itself
        (r"\*\*/x", "**/x", False, True),  # the name "**", not any directories
        (r"\*\*/x", "d/x", False, False),
        (r"a\**", "a*.txt", False, True),  # escaped and not, side by side
        (r"a\**", "ab", False, False),
        (r"[\]", "\\", False, True),  # inside [...] a backslash is itself
        ("a[", "a[", False, True),  # a [ that nothing closes is itself (fnmatch)
    ],
)
def test_pattern_matches(pattern: str, path: str, is_dir: bool, expected: bool) -> None:
    assert PathPattern(pattern).matches(path, is_dir) is expected


@pytest.mark.parametrize("pattern", ["", "/", "./", "../etc", "etc/../../x", "a\\", "a\\/b"])
def test_useless_patterns_are_usage_errors(pattern: str) -> None:
    with pytest.raises(UsageError):
        PathPattern(pattern)


def test_selector_takes_whole_subtrees_and_walks_towards_includes() -> None:
    sel = PathSelector(includes=("etc/*", "home/**/*.conf"), excludes=("etc/ssh/*_key",))
    assert sel.selects("etc/ssh/sshd_config")  # below a matching directory
    assert not sel.selects("etc/ssh/host_key")  # excluded
    assert not sel.selects("etc", is_dir=True)  # on the way only
    assert not sel.selects("home/u/notes")
    assert sel.selects("home/u/x.conf")
    root = sel.root()
    home = sel.child(root, "home", is_dir=True)
    assert home is not None and not home.selected  # walked, not taken
    assert sel.child(root, "usr", is_dir=True) is None  # nothing below can match: not walked


def test_an_escaped_lost_found_names_it_and_a_wildcard_does_not() -> None:
    assert PathSelector(includes=(r"lost\+found/x",)).names_lost_found
    assert not PathSelector(includes=("lost+foun?",)).names_lost_found
    assert not PathSelector(includes=(r"lost+foun\?",)).names_lost_found


def test_excluded_directory_excludes_its_subtree() -> None:
    sel = PathSelector(excludes=("var/cache",))
    assert not sel.selects("var/cache/apt/x")
    assert sel.selects("var/cache2/x")
    assert sel.selects("var/log/x")


def test_options_are_checked_when_made() -> None:
    with pytest.raises(UsageError):
        RestoreOptions(on_conflict="replace")
    with pytest.raises(UsageError):
        RestoreOptions(excludes=("ok/*", "../bad"))


# -- a snapshot tree ---------------------------------------------------------------------------

# mtimes in the past with a nanosecond part; atimes an hour in the future, so that relatime
# never updates them while the test (or the restore) reads the trees
MTIME = 1_600_000_000_123_456_789
ATIME = time.time_ns() + 3600 * 10**9 + 987


class Tree:
    """Builds a source tree and describes any tree, entry by entry, for comparison."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def build(self) -> None:
        r = self.root
        for d in ("etc/ssh", "home/alice/.config/deep", "home/bob/lost+found", "var/log",
                  "var/empty", "usr/bin", "dev", "lost+found"):
            (r / d).mkdir(parents=True)
        self.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
        self.file("etc/shadow", b"root:*:19000::::::\n", 0o640, owner=(0, 42))
        self.file("etc/ssh/sshd_config", b"PermitRootLogin no\n", 0o600)
        self.file("etc/ssh/host_key", b"KEY", 0o600)
        os.link(r / "etc/passwd", r / "etc/passwd-")  # a hard link: restored as one
        os.symlink("issue.net", r / "etc/motd")  # relative, dangling
        os.symlink("usr/bin", r / "bin")  # a symlink to a directory
        os.symlink("/etc/shadow", r / "home/alice/abs-link")  # absolute: text kept verbatim
        self.file("home/alice/.bashrc", b"alias ll='ls -l'\n", 0o644, owner=(1000, 1000))
        self.file("home/alice/app.conf", b"key = value\n", 0o600, owner=(1000, 1000),
                  xattrs={"user.tag": b"blue", "trusted.origin": b"\x00\x01"})
        self.file("home/alice/.config/deep/tool.conf", b"[tool]\n", 0o644, owner=(1000, 1000))
        self.file("home/alice/notes.txt", os.urandom(3 * MiB + 17), 0o644, owner=(1000, 1000))
        self.file("home/bob/bob.conf", b"bob\n", 0o644, owner=(1001, 1001))
        self.file("usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o4755)  # setuid
        self.file("lost+found/#1234", b"orphan", 0o644)
        with open(r / "var/log/big.log", "wb") as f:  # sparse: data, a 6 MiB hole, data
            f.write(b"start" * 1000)
            f.seek(6 * MiB)
            f.write(b"end" * 1000)
        os.chmod(r / "var/log/big.log", 0o640)
        os.mknod(r / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.chmod(r / "dev/null", 0o666)  # past the umask
        os.mkfifo(r / "dev/initctl", 0o600)
        make_socket(r / "dev/log")  # never restored
        os.chmod(r / "var/empty", 0o711)
        os.chown(r / "home/alice", 1000, 1000)
        os.chmod(r / "home/alice", 0o750)
        os.setxattr(r / "home/alice", "user.dir", b"d")
        # times last, deepest first: creating entries changes their directory's mtime
        for n, (dirpath, dirnames, filenames) in enumerate(os.walk(r, topdown=False)):
            for k, name in enumerate(filenames + dirnames):
                os.utime(os.path.join(dirpath, name), ns=(ATIME + k, MTIME + 1000 * n + k),
                         follow_symlinks=False)
        os.utime(r, ns=(ATIME, MTIME))

    def file(self, rel: str, data: bytes, mode: int, owner: tuple[int, int] = (0, 0),
             xattrs: dict[str, bytes] | None = None) -> None:
        path = self.root / rel
        path.write_bytes(data)
        os.chown(path, *owner)
        os.chmod(path, mode)
        for name, value in (xattrs or {}).items():
            os.setxattr(path, name, value)

    def describe(self, skip_root_lost_found: bool = False) -> dict[str, tuple[Any, ...]]:
        """path -> (kind, mode, uid, gid, atime, mtime, content or link text, xattrs)."""
        out: dict[str, tuple[Any, ...]] = {}

        def walk(directory: Path, rel: str) -> None:
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                path = f"{rel}/{entry.name}" if rel else entry.name
                assert not entry.name.startswith(TEMP_PREFIX), f"temporary file left: {path}"
                if skip_root_lost_found and path == "lost+found":
                    continue
                st = entry.stat(follow_symlinks=False)
                kind = stat.S_IFMT(st.st_mode)
                payload: Any = None
                if stat.S_ISREG(st.st_mode):
                    payload = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    payload = os.readlink(entry.path)
                elif not stat.S_ISDIR(st.st_mode):
                    payload = st.st_rdev
                attrs = {} if stat.S_ISLNK(st.st_mode) else {
                    a: os.getxattr(entry.path, a) for a in os.listxattr(entry.path)
                    if a.startswith(("user.", "trusted."))
                }
                out[path] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                             st.st_atime_ns, st.st_mtime_ns, payload, attrs)
                if stat.S_ISDIR(st.st_mode):
                    walk(Path(entry.path), path)

        walk(self.root, "")
        return out


#: the special files of the tree a restore leaves out (the fifo and the device are restored)
SPECIAL = ["dev/log: socket"]


def files_in(described: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """The non-directories: what ``restored`` counts."""
    return {p: d for p, d in described.items() if d[0] != stat.S_IFDIR}


def size_of(root: Path, paths: set[str]) -> int:
    """Bytes of the regular files among ``paths``, each name counted (the progress total)."""
    sizes = [os.lstat(root / p) for p in paths]
    return sum(st.st_size for st in sizes if stat.S_ISREG(st.st_mode))


def copied_size(root: Path, paths: set[str]) -> int:
    """Bytes of the regular files among ``paths``, each inode counted once (``bytes``, when the
    first of its names among ``paths`` is restored and the others linked to it)."""
    sizes = {}
    for p in paths:
        st = os.lstat(root / p)
        if stat.S_ISREG(st.st_mode):
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


def link_groups(root: Path) -> list[set[str]]:
    """The names of each file below ``root`` with more than one, as relative paths."""
    groups: dict[tuple[int, int], set[str]] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                groups.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    return sorted(groups.values(), key=sorted)


class RecordingProgress:
    """A progress sink that records, and calls ``during`` at each advance: a test's way to look
    at (or change) the target while a file's data is being written."""

    def __init__(self, during: Callable[[], None] | None = None) -> None:
        self.starts: list[tuple[str, int]] = []
        self.advanced = 0
        self.during = during

    def start(self, label: str, total: int) -> None:
        self.starts.append((label, total))

    def advance(self, amount: int) -> None:
        assert amount >= 0
        self.advanced += amount
        if self.during is not None:
            self.during()


@pytest.fixture
def snap(tmp_path: Path) -> Tree:
    if not have_root():
        pytest.skip("the snapshot tree has other owners and device nodes: needs root")
    probe = tmp_path / "xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as e:
        pytest.skip(f"{tmp_path} has no user xattrs ({e.strerror}); the tree needs them")
    probe.unlink()
    tree = Tree(tmp_path / "snap")
    tree.build()
    return tree


def restore(snap: Tree, target: Path, **options: Any) -> RestoreReport:
    return restore_files(str(snap.root), str(target), RestoreOptions(**options))


# -- restoring everything ----------------------------------------------------------------------


@needs_root
def test_everything_is_restored_identically(snap: Tree, tmp_path: Path) -> None:
    expected = snap.describe(skip_root_lost_found=True)
    del expected["dev/log"]  # a socket
    target = tmp_path / "out" / "restored"  # created, parents too
    progress = RecordingProgress()

    report = restore_files(str(snap.root), str(target), RestoreOptions(), progress)

    assert Tree(target).describe() == expected
    restored = files_in(expected)
    every_name = size_of(snap.root, set(restored))
    passwd = len(b"root:x:0:0::/root:/bin/sh\n")
    assert report.as_dict() == {
        "restored": len(restored), "links": 1, "skipped": 1, "failed": 0,
        "bytes": every_name - passwd,  # etc/passwd- is a link: its data is not copied again
        "failures": [], "special": SPECIAL, "unmatched_includes": [],
    }
    assert progress.starts == [("restore", every_name)]
    assert progress.advanced == every_name
    # the details the comparison covers only implicitly
    assert os.readlink(target / "home/alice/abs-link") == "/etc/shadow"
    assert link_groups(target) == [{"etc/passwd", "etc/passwd-"}]
    assert os.stat(target / "usr/bin/tool").st_mode & stat.S_ISUID
    assert stat.S_ISFIFO(os.lstat(target / "dev/initctl").st_mode)
    null = os.lstat(target / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    big = os.stat(target / "var/log/big.log")
    assert big.st_blocks * 512 < 1 * MiB, "the hole was written out"


@needs_root
def test_restore_into_an_existing_empty_directory_leaves_its_metadata(
    snap: Tree, tmp_path: Path
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    os.chmod(target, 0o750)
    os.chown(target, 1234, 1234)
    report = restore(snap, target)
    assert report.failed == 0
    st = os.stat(target)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 1234, 1234)


# -- selecting -----------------------------------------------------------------------------------

ETC = {"etc", "etc/passwd", "etc/passwd-", "etc/shadow", "etc/motd", "etc/ssh",
       "etc/ssh/sshd_config", "etc/ssh/host_key"}


@needs_root
@pytest.mark.parametrize(
    ("includes", "expected"),
    [
        (("etc/*",), ETC),
        (("home/**/*.conf",), {
            "home", "home/alice", "home/alice/app.conf", "home/alice/.config",
            "home/alice/.config/deep", "home/alice/.config/deep/tool.conf",
            "home/bob", "home/bob/bob.conf",
        }),
        (("var/log",), {"var", "var/log", "var/log/big.log"}),  # a directory: its subtree
        (("var/empty/",), {"var", "var/empty"}),  # an empty directory is restored too
        (("bin",), {"bin"}),  # a symlink to a directory is a symlink, nothing more
        (("**/*.conf", "usr/bin/tool"), {
            "home", "home/alice", "home/alice/app.conf", "home/alice/.config",
            "home/alice/.config/deep", "home/alice/.config/deep/tool.conf",
            "home/bob", "home/bob/bob.conf", "usr", "usr/bin", "usr/bin/tool",
        }),
        (("nothing/matches",), set()),
        # the root's lost+found only when named: after an fsck it holds the files it recovered
        (("lost+found",), {"lost+found", "lost+found/#1234"}),
        (("lost+found/#*",), {"lost+found", "lost+found/#1234"}),
        (("*/#1234",), set()),
    ],
)
def test_includes_select_exactly(
    snap: Tree, tmp_path: Path, includes: tuple[str, ...], expected: set[str]
) -> None:
    source = snap.describe()
    target = tmp_path / "out"
    report = restore(snap, target, includes=includes)
    restored = Tree(target).describe()
    assert set(restored) == expected
    # directories on the way to an included path keep their metadata too
    assert restored == {p: source[p] for p in expected}
    files = set(files_in(restored))
    assert (report.restored, report.skipped, report.failed) == (len(files), 0, 0)
    assert report.bytes == copied_size(snap.root, files)
    assert report.links == len(files) - len({os.lstat(snap.root / p).st_ino for p in files})
    assert report.unmatched == ([] if expected else list(includes))


def test_an_include_that_matches_nothing_is_reported(snap: Tree, tmp_path: Path) -> None:
    report = restore(snap, tmp_path / "out", includes=("etc/*", "ect/*", "var/log"),
                     excludes=("var/log",))
    assert report.unmatched == ["ect/*", "var/log"]  # a typo, and one only excluded paths matched
    assert report.as_dict()["unmatched_includes"] == ["ect/*", "var/log"]


def test_an_include_inside_a_directory_another_include_takes_is_not_reported(
    snap: Tree, tmp_path: Path
) -> None:
    # the directory's include takes the path first: the inner one matched it all the same
    report = restore(snap, tmp_path / "out",
                     includes=("etc", "etc/passwd", "etc/ssh/*", "etc/nosuch", "var/**/big.log",
                               "var"))
    assert report.unmatched == ["etc/nosuch"]


@needs_root
def test_excludes_leave_out_paths_and_subtrees(snap: Tree, tmp_path: Path) -> None:
    source = snap.describe(skip_root_lost_found=True)
    target = tmp_path / "out"
    # var/** leaves var itself, empty (as gitignore and rsync read it)
    report = restore(snap, target, excludes=("home/**/*.conf", "var/**", "dev/*", "etc/ssh/"))
    left_out = {"home/alice/app.conf", "home/alice/.config/deep/tool.conf", "home/bob/bob.conf",
                "var/log", "var/log/big.log", "var/empty", "dev/null", "dev/initctl",
                "dev/log", "etc/ssh", "etc/ssh/sshd_config", "etc/ssh/host_key"}
    expected = {p: d for p, d in source.items() if p not in left_out}
    assert Tree(target).describe() == expected
    assert (report.restored, report.skipped, report.failed) == (len(files_in(expected)), 0, 0)
    assert report.special == []


@needs_root
def test_includes_and_excludes_together(snap: Tree, tmp_path: Path) -> None:
    target = tmp_path / "out"
    report = restore(snap, target, includes=("home", "etc/*"),
                     excludes=("home/bob", "**/.config", "etc/ssh/*_key"))
    assert set(Tree(target).describe()) == (ETC - {"etc/ssh/host_key"}) | {
        "home", "home/alice", "home/alice/.bashrc", "home/alice/app.conf",
        "home/alice/notes.txt", "home/alice/abs-link",
    }
    restored = files_in(Tree(target).describe())
    assert (report.restored, report.skipped, report.failed) == (len(restored), 0, 0)
    assert report.bytes == copied_size(snap.root, set(restored))


# -- conflicts -----------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("on_conflict", ["skip", "overwrite"])
def test_conflicts(snap: Tree, tmp_path: Path, on_conflict: str) -> None:
    target = tmp_path / "out"
    (target / "etc").mkdir(parents=True)
    (target / "etc/passwd").write_bytes(b"mine\n")
    os.symlink("elsewhere", target / "etc/motd")
    (target / "etc/unrelated").write_bytes(b"stays\n")
    files = set(files_in(snap.describe(skip_root_lost_found=True))) - {"dev/log"}  # a socket

    report = restore(snap, target, on_conflict=on_conflict)

    assert report.failed == 0
    assert (target / "etc/unrelated").read_bytes() == b"stays\n"
    if on_conflict == "skip":
        assert (target / "etc/passwd").read_bytes() == b"mine\n"
        assert os.readlink(target / "etc/motd") == "elsewhere"
        assert (report.restored, report.skipped) == (len(files) - 2, 2 + 1)  # and the socket
        # etc/passwd- is copied: the name it would link to was not restored
        assert (report.links, report.bytes) == (0, copied_size(snap.root, files - {"etc/passwd"}))
        assert os.stat(target / "etc/passwd-").st_nlink == 1
    else:
        assert (target / "etc/passwd").read_bytes() == (snap.root / "etc/passwd").read_bytes()
        assert os.readlink(target / "etc/motd") == "issue.net"
        assert (report.restored, report.skipped) == (len(files), 1)
        assert (report.links, report.bytes) == (1, copied_size(snap.root, files))
        assert link_groups(target / "etc") == [{"passwd", "passwd-"}]
    # the directory was there already: merged into, its metadata restored only by overwrite
    assert (os.stat(target / "etc").st_mtime_ns == os.stat(snap.root / "etc").st_mtime_ns) is (
        on_conflict == "overwrite")


@needs_root
@pytest.mark.parametrize("on_conflict", ["skip", "overwrite"])
def test_overwrite_gives_an_existing_directory_exactly_the_snapshots_attributes(
    snap: Tree, tmp_path: Path, on_conflict: str
) -> None:
    """Overwrite restores the metadata of a directory it merges into: its extended attributes
    become the snapshot's, none of the target's own left beside them; skip leaves them."""
    alice = tmp_path / "out" / "home/alice"
    alice.mkdir(parents=True)
    mine = {"user.dir": b"mine", "user.stale": b"x", "trusted.stale": b"y"}
    for name, value in mine.items():
        os.setxattr(alice, name, value)

    report = restore(snap, tmp_path / "out", includes=("home/alice",), on_conflict=on_conflict)

    assert report.failed == 0
    attrs = {a: os.getxattr(alice, a) for a in os.listxattr(alice)
             if a.startswith(("user.", "trusted."))}
    assert attrs == (mine if on_conflict == "skip" else {"user.dir": b"d"})


@needs_root
@pytest.mark.parametrize("on_conflict", ["skip", "overwrite"])
def test_a_directory_where_a_file_goes_is_skipped_or_fails(
    snap: Tree, tmp_path: Path, on_conflict: str
) -> None:
    target = tmp_path / "out"
    (target / "etc/passwd").mkdir(parents=True)
    (target / "etc/passwd/keep").write_bytes(b"x")
    report = restore(snap, target, includes=("etc/passwd",), on_conflict=on_conflict)
    if on_conflict == "skip":  # a name taken by anything
        assert (report.restored, report.skipped, report.failed) == (0, 1, 0)
    else:
        assert (report.restored, report.skipped, report.failed) == (0, 0, 1)
        assert report.failures == ["etc/passwd: the target has a directory in its place"]
    assert (target / "etc/passwd/keep").read_bytes() == b"x"


@needs_root
@pytest.mark.parametrize("on_conflict", ["skip", "overwrite"])
def test_a_file_where_a_directory_goes_fails_with_its_subtree(
    snap: Tree, tmp_path: Path, on_conflict: str
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "etc").write_bytes(b"mine\n")
    report = restore(snap, target, includes=("etc", "usr"), on_conflict=on_conflict)
    assert report.failures == [
        "etc: the target has a non-directory where a directory goes; nothing under it was "
        "restored"]
    assert (report.restored, report.skipped, report.failed) == (1, 0, 1)  # usr/bin/tool
    assert (target / "etc").read_bytes() == b"mine\n"


# -- ACLs --------------------------------------------------------------------------------------

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
NO_ID = 0xFFFFFFFF
ACLS = ("system.posix_acl_access", "system.posix_acl_default")


def acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as the kernel takes it in an xattr: version 2, then (tag, perm, id)s."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


#: user 1500 may do anything in what is made below the directory that has it
DEFAULT_1500 = acl((ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 7, 1500), (ACL_GROUP_OBJ, 5, NO_ID),
                   (ACL_MASK, 7, NO_ID), (ACL_OTHER, 0, NO_ID))
#: user 1600 may read; the owning group nothing, though the mask (the mode's group bits) says r
READ_1600 = acl((ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, 1600), (ACL_GROUP_OBJ, 0, NO_ID),
                (ACL_MASK, 4, NO_ID), (ACL_OTHER, 0, NO_ID))


def acls_below(root: Path) -> dict[str, tuple[int, dict[str, bytes]]]:
    """Relative path -> (mode, its ACL xattrs) of every entry below ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = (
                stat.S_IMODE(os.lstat(path).st_mode),
                {a: os.getxattr(path, a) for a in os.listxattr(path) if a in ACLS})
    return out


def readable_by(uid: int, dir_fd: int, rel: str) -> bool:
    """Whether ``uid`` (no groups) can open ``rel`` below ``dir_fd`` for reading; asked in a
    child that gives up root (relative to the fd: the test's own parents are root's alone)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.close(os.open(rel, os.O_RDONLY, dir_fd=dir_fd))
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) in (0, 1), "the child failed"
    return os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def acl_tree(tmp_path: Path) -> Path:
    """``shared/`` with a default ACL for user 1500, set after ``private`` and ``sub/`` were
    made (they have no ACL) and before ``inherited`` and ``later/`` (which inherited one);
    ``shared/own`` has an ACL of its own."""
    if not have_root():
        pytest.skip("needs root (owners, setuid children)")
    root = tmp_path / "acl-source"
    (root / "shared/sub").mkdir(parents=True)
    try:
        os.setxattr(root / "shared", "system.posix_acl_default", DEFAULT_1500)
        os.removexattr(root / "shared", "system.posix_acl_default")
    except OSError as e:
        pytest.skip(f"{tmp_path} takes no POSIX ACLs ({e.strerror})")
    (root / "top").write_bytes(b"top\n")
    os.chmod(root / "top", 0o640)
    (root / "shared/private").write_bytes(b"secret\n" * 1000)
    os.chmod(root / "shared/private", 0o640)
    (root / "shared/sub/inner").write_bytes(b"inner\n" * 1000)
    os.chmod(root / "shared/sub", 0o750)
    (root / "shared/own").write_bytes(b"own\n" * 1000)
    os.setxattr(root / "shared/own", "system.posix_acl_access", READ_1600)
    os.setxattr(root / "shared", "system.posix_acl_default", DEFAULT_1500)
    (root / "shared/inherited").write_bytes(b"inherited\n" * 1000)
    (root / "shared/later").mkdir()
    (root / "shared/later/deeper").write_bytes(b"deeper\n" * 1000)
    assert os.listxattr(root / "shared/private") == []
    assert "system.posix_acl_access" in os.listxattr(root / "shared/inherited")
    return root


def no_wider_acls_meanwhile(source: Path, target: Path) -> Callable[[], None]:
    """A check for each advance of the progress, while a file's data is written: the temporary
    file has no ACL, and the directory being filled has the snapshot's ACLs or none, and is
    private unless the snapshot's access ACL says otherwise."""
    source_acls = acls_below(source)

    def check() -> None:
        now = acls_below(target)
        for rel, (_, acls) in now.items():
            if not os.path.basename(rel).startswith(TEMP_PREFIX):
                continue
            assert acls == {}, f"{rel} has the ACL {acls} while its data is written"
            parent = os.path.dirname(rel)
            if parent:
                mode, parent_acls = now[parent]
                assert parent_acls in (source_acls[parent][1], {}), (
                    f"{parent} has the ACLs {parent_acls} while it is filled")
                assert "system.posix_acl_access" in parent_acls or mode & 0o077 == 0, (
                    f"{parent} is {oct(mode)} while it is filled")

    return check


@needs_root
def test_restored_acls_are_the_snapshots_and_never_wider_meanwhile(
    acl_tree: Path, tmp_path: Path
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    os.setxattr(target, "system.posix_acl_default", DEFAULT_1500)  # the target's own, too
    progress = RecordingProgress(no_wider_acls_meanwhile(acl_tree, target))

    report = restore_files(str(acl_tree), str(target), RestoreOptions(), progress)

    assert (report.restored, report.failed) == (6, 0)
    assert progress.advanced == progress.starts[0][1] > 0  # the check ran
    assert acls_below(target) == acls_below(acl_tree)
    assert acls_below(target)["shared/private"] == (0o640, {})
    assert os.getxattr(target, "system.posix_acl_default") == DEFAULT_1500  # left alone
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert not readable_by(1500, fd, "shared/private")
        assert not readable_by(1500, fd, "top")
        assert readable_by(1500, fd, "shared/inherited")  # as in the snapshot
        assert readable_by(1600, fd, "shared/own")
    finally:
        os.close(fd)


@needs_root
def test_overwrite_gives_an_existing_directory_the_snapshots_acls(
    acl_tree: Path, tmp_path: Path
) -> None:
    target = tmp_path / "out"
    (target / "shared/sub").mkdir(parents=True)
    os.chmod(target / "shared", 0o700)  # private, as the check wants what is being filled
    # the owning group nothing, user 1500 everything: the mode shows the mask, rwx
    os.setxattr(target / "shared/sub", "system.posix_acl_access", acl(
        (ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 7, 1500), (ACL_GROUP_OBJ, 0, NO_ID),
        (ACL_MASK, 7, NO_ID), (ACL_OTHER, 0, NO_ID)))
    assert stat.S_IMODE(os.stat(target / "shared/sub").st_mode) == 0o770
    progress = RecordingProgress(no_wider_acls_meanwhile(acl_tree, target))

    report = restore_files(str(acl_tree), str(target), RestoreOptions(on_conflict="overwrite"),
                           progress)

    assert (report.restored, report.failed) == (6, 0)
    assert acls_below(target) == acls_below(acl_tree)
    assert acls_below(target)["shared/sub"] == (0o750, {})


# -- hard links ----------------------------------------------------------------------------------


def hard_linked_tree(root: Path, data: bytes) -> None:
    """``a/victim``, ``b/second`` and ``c/third``: one file; ``a2-between`` another, restored
    between the first name and the others."""
    for d in ("a", "b", "c"):
        (root / d).mkdir(parents=True)
    (root / "a/victim").write_bytes(data)
    os.chmod(root / "a/victim", 0o640)
    os.utime(root / "a/victim", ns=(ATIME, MTIME))
    os.link(root / "a/victim", root / "b/second")
    os.link(root / "a/victim", root / "c/third")
    (root / "a2-between").write_bytes(b"between\n" * 1000)


def test_hard_links_are_kept_across_directories(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "out"
    data = os.urandom(MiB + 5)
    hard_linked_tree(source, data)
    progress = RecordingProgress()

    report = restore_files(str(source), str(target), RestoreOptions(), progress)

    assert (report.restored, report.links, report.skipped, report.failed) == (4, 2, 0, 0)
    assert report.bytes == len(data) + 8000  # the linked names copy nothing
    assert progress.starts == [("restore", 3 * len(data) + 8000)]  # each name may be a copy
    assert progress.advanced == 3 * len(data) + 8000
    assert link_groups(target) == [{"a/victim", "b/second", "c/third"}]
    st = os.stat(target / "c/third")
    assert (st.st_nlink, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (3, 0o640, MTIME)
    assert (target / "c/third").read_bytes() == data


def test_hard_links_in_skip_mode_skip_names_that_are_taken(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "out"
    hard_linked_tree(source, b"data\n")
    (target / "b").mkdir(parents=True)
    (target / "b/second").write_bytes(b"mine\n")

    report = restore_files(str(source), str(target), RestoreOptions())

    assert (report.restored, report.links, report.skipped, report.failed) == (3, 1, 1, 0)
    assert (target / "b/second").read_bytes() == b"mine\n"
    assert link_groups(target) == [{"a/victim", "c/third"}]


@pytest.mark.parametrize("replaced", ["the copy", "its directory"])
def test_a_link_whose_copy_was_replaced_is_a_copy_and_nothing_outside_is_linked(
    tmp_path: Path, outside: Path, replaced: str
) -> None:
    """Once ``a/victim`` is restored, something replaces it (or ``a``) by a symlink to a file
    ``victim`` outside the target: the later names must not become that file."""
    source, target = tmp_path / "source", tmp_path / "out"
    data = os.urandom(100_000)
    hard_linked_tree(source, data)
    done: list[str] = []

    def replace() -> None:
        if done or not (target / "a/victim").is_file():
            return
        if replaced == "the copy":
            os.rename(target / "a/victim", target / "a/moved")
            os.symlink(outside / "victim", target / "a/victim")
        else:
            os.rename(target / "a", target / "a-moved")
            os.symlink(outside, target / "a")
        done.append(replaced)

    report = restore_files(str(source), str(target), RestoreOptions(), RecordingProgress(replace))

    assert done == [replaced]
    assert_untouched(outside)
    assert os.stat(outside / "victim").st_nlink == 1
    # b/second became a copy of its own, and c/third a link to that
    assert (report.restored, report.links, report.failed) == (4, 1, 0)
    assert report.bytes == 2 * len(data) + 8000
    second = os.lstat(target / "b/second")
    assert stat.S_ISREG(second.st_mode) and second.st_nlink == 2
    assert os.lstat(target / "c/third").st_ino == second.st_ino
    assert (target / "c/third").read_bytes() == data
    Tree(target).describe()  # no temporary name left anywhere


# -- special files -------------------------------------------------------------------------------


def as_user(uid: int, work: Callable[[], Any]) -> Any:
    """``work()`` run in a child that gave up root for ``uid`` (no groups); its JSON result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = json.dumps(work()).encode()
            code = 0
        except BaseException as e:
            out = repr(e).encode()
        finally:
            os.write(write, out)
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode()
    return json.loads(out)


NOBODY = 65534


@needs_root
def test_without_root_fifos_are_made_and_devices_left_out() -> None:
    # in a directory 'nobody' can reach: pytest's tmp_path is below a directory of root's alone
    base = Path(tempfile.mkdtemp(prefix="snapfs-test-restore-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        source, target = base / "source", base / "out"
        source.mkdir()
        (source / "file").write_bytes(b"file\n")
        os.mkfifo(source / "fifo")
        os.chmod(source / "fifo", 0o640)
        os.utime(source / "fifo", ns=(ATIME, MTIME))
        os.mknod(source / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        make_socket(source / "sock")
        target.mkdir()
        os.chown(target, NOBODY, NOBODY)

        report = as_user(NOBODY, lambda: restore_files(
            str(source), str(target), RestoreOptions()).as_dict())

        assert report == {
            "restored": 2, "links": 0, "skipped": 2, "failed": 0, "bytes": 5, "failures": [],
            "special": ["null: character device", "sock: socket"], "unmatched_includes": [],
        }
        assert sorted(os.listdir(target)) == ["fifo", "file"]
        fifo = os.lstat(target / "fifo")
        assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640
        assert (fifo.st_uid, fifo.st_gid, fifo.st_mtime_ns) == (NOBODY, NOBODY, MTIME)
    finally:
        shutil.rmtree(base)


@needs_root
@pytest.mark.parametrize("on_conflict", ["skip", "overwrite"])
def test_special_files_and_conflicts(snap: Tree, tmp_path: Path, on_conflict: str) -> None:
    target = tmp_path / "out"
    (target / "dev").mkdir(parents=True)
    (target / "dev/null").write_bytes(b"a file\n")
    (target / "dev/initctl").mkdir()

    report = restore(snap, target, includes=("dev",), on_conflict=on_conflict)

    assert report.special == ["dev/log: socket"]
    if on_conflict == "skip":
        assert (report.restored, report.skipped, report.failed) == (0, 3, 0)
        assert (target / "dev/null").read_bytes() == b"a file\n"
    else:
        assert (report.restored, report.skipped, report.failed) == (1, 1, 1)
        assert report.failures == ["dev/initctl: the target has a directory in its place"]
        assert os.lstat(target / "dev/null").st_rdev == os.makedev(1, 3)
    assert (target / "dev/initctl").is_dir()


# -- safety ----------------------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory no restore may write into; ``victim`` is a file in it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_bytes(b"precious")
    return path


def assert_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"


@needs_root
@pytest.mark.parametrize("on_conflict", ["skip", "overwrite"])
def test_a_symlink_in_the_target_at_a_directorys_place_is_not_followed(
    snap: Tree, tmp_path: Path, outside: Path, on_conflict: str
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    os.symlink(outside, target / "etc")  # an absolute link: etc -> OUTSIDE
    os.symlink("../outside", target / "home")  # a relative one

    report = restore(snap, target, on_conflict=on_conflict)

    assert_untouched(outside)
    assert report.failed == 2
    assert report.failures == [
        "etc: the target has a symlink where a directory goes (not followed); "
        "nothing under it was restored",
        "home: the target has a symlink where a directory goes (not followed); "
        "nothing under it was restored",
    ]
    assert os.readlink(target / "etc") == str(outside)
    assert (target / "usr/bin/tool").read_bytes() == (snap.root / "usr/bin/tool").read_bytes()


@needs_root
def test_a_symlink_restored_earlier_is_not_followed_by_a_later_restore(
    tmp_path: Path, outside: Path
) -> None:
    """The first snapshot has ``evil -> OUTSIDE``, the second a directory ``evil/victim``."""
    first, second, target = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    first.mkdir()
    os.symlink(outside, first / "evil")
    (second / "evil").mkdir(parents=True)
    (second / "evil/victim").write_bytes(b"overwritten")
    (second / "fine").write_bytes(b"fine")

    assert restore_files(str(first), str(target), RestoreOptions()).restored == 1
    for on_conflict in ("skip", "overwrite"):
        report = restore_files(str(second), str(target), RestoreOptions(on_conflict=on_conflict))
        assert_untouched(outside)
        assert report.failed == 1
        assert report.failures[0].startswith("evil: the target has a symlink where a directory")
    assert (target / "fine").read_bytes() == b"fine"


@needs_root
def test_a_symlink_at_a_files_place_is_replaced_not_written_through(
    snap: Tree, tmp_path: Path, outside: Path
) -> None:
    target = tmp_path / "out"
    (target / "etc").mkdir(parents=True)
    os.symlink(outside / "victim", target / "etc/passwd")

    skipped = restore(snap, target, includes=("etc/passwd",))
    assert (skipped.restored, skipped.skipped) == (0, 1)
    assert os.readlink(target / "etc/passwd") == str(outside / "victim")

    report = restore(snap, target, includes=("etc/passwd",), on_conflict="overwrite")
    assert (report.restored, report.skipped, report.failed) == (1, 0, 0)
    assert not (target / "etc/passwd").is_symlink()
    assert (target / "etc/passwd").read_bytes() == (snap.root / "etc/passwd").read_bytes()
    assert_untouched(outside)


@needs_root
def test_names_a_crafted_filesystem_could_hold_fail(
    snap: Tree, tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dirent named ``../x`` or ``a/b`` cannot be made on a real filesystem here, though a
    crafted image can hold one; the listing is patched to return such names (and only that)."""
    os.symlink(outside, snap.root / "evil")  # so that "evil/victim" exists in the source
    (tmp_path / "escape").write_bytes(b"escape")  # so that "../escape" exists in the source
    real_list = snapfs.restore._list_names

    def list_names(fd: int) -> list[str]:
        names = real_list(fd)
        if "evil" in names:  # the root
            names += ["../escape", "evil/victim", ".."]
        return names

    monkeypatch.setattr(snapfs.restore, "_list_names", list_names)
    target = tmp_path / "deep" / "out"
    report = restore(snap, target, includes=("*",))

    assert sorted(report.failures) == sorted(
        f"{name}: not a valid file name (a damaged or crafted filesystem)"
        for name in ("..", "../escape", "evil/victim")
    )
    assert report.failed == 3
    assert sorted(os.listdir(tmp_path / "deep")) == ["out"]
    assert_untouched(outside)
    assert os.readlink(target / "evil") == str(outside)


@needs_root
def test_target_inside_the_snapshot_is_refused(snap: Tree) -> None:
    with pytest.raises(UsageError):
        restore(snap, snap.root / "home" / "restored")
    with pytest.raises(UsageError):
        restore(snap, snap.root)
    assert not (snap.root / "home" / "restored").exists()


# -- failures on real mounts -------------------------------------------------------------------


@contextmanager
def loop_mounted(image: Path, mountpoint: Path, mode: str = "ro") -> Iterator[None]:
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", f"loop,{mode},errors=continue", str(image), str(mountpoint)],
                   check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)  # frees the loop device too
    mountpoint.rmdir()


@needs_root
@pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("debugfs")),
                    reason="needs e2fsprogs")
def test_a_file_the_mount_cannot_read_fails_and_the_rest_is_restored(tmp_path: Path) -> None:
    content = tmp_path / "content"
    (content / "dir").mkdir(parents=True)
    (content / "a-good").write_bytes(b"good\n")
    (content / "bad").write_bytes(os.urandom(16 * 1024))
    (content / "dir/z-good").write_bytes(b"also good\n" * 1000)
    (content / "filler").write_bytes(b"\xff" * 1024)
    image = tmp_path / "fs.img"
    # Block maps instead of extents, 1 KiB blocks: "bad" needs an indirect block for its last
    # 4 KiB. debugfs points that at "filler", whose 0xff bytes are block numbers far beyond the
    # end of the filesystem, so the kernel lists and stats "bad" fine but reading it is an EIO,
    # as from a bad disk.
    subprocess.run(["mkfs.ext4", "-q", "-O", "^extent,^64bit,^has_journal", "-b", "1024",
                    "-d", str(content), str(image), "4M"], check=True, capture_output=True)
    filler = subprocess.run(["debugfs", "-R", "bmap /filler 0", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()
    subprocess.run(["debugfs", "-w", "-R", f"sif /bad block[IND] {int(filler)}", str(image)],
                   check=True, capture_output=True)
    mountpoint, target = tmp_path / "mnt", tmp_path / "out"

    asked: list[str] = []
    with loop_mounted(image, mountpoint):
        assert (mountpoint / "bad").stat().st_size == 16 * 1024  # listed fine, unreadable
        progress = RecordingProgress()
        report = restore_files(str(mountpoint), str(target), RestoreOptions(), progress,
                               source_failing=lambda: asked.append("fine") or None)

        # the same, where the source says every read will fail for now (restore-files asks
        # the daemon whether its store answers; a stand-in for that answer here): the run
        # stops at the first file it could not read, rather than wait out every other file
        stopped = RestoreReport()
        with pytest.raises(StoreUnavailable) as e:
            restore_files(str(mountpoint), str(tmp_path / "out2"), RestoreOptions(),
                          report=stopped, source_failing=lambda: "the test's store is down")
        assert str(e.value) == (
            "reading bad from the snapshot failed: its store is not answering (the test's store "
            "is down); restore stopped (run it again once the store is back: what is restored "
            "is skipped)")
        assert (stopped.restored, stopped.failed) == (1, 1)  # a-good; then bad, and no more
        assert sorted(os.listdir(tmp_path / "out2")) == ["a-good"]

    assert asked == ["fine"]  # asked once: after the one file it could not read

    assert report.failures == ["bad: reading it from the snapshot failed: Input/output error"]
    assert (report.restored, report.skipped, report.failed) == (3, 0, 1)
    assert report.bytes == 5 + 10_000 + 1024
    total = 5 + 16 * 1024 + 10_000 + 1024
    assert progress.starts == [("restore", total)]
    assert progress.advanced == total
    assert sorted(os.listdir(target)) == ["a-good", "dir", "filler"]  # no half file, no lost+found
    assert (target / "dir/z-good").read_bytes() == b"also good\n" * 1000
    Tree(target).describe()  # no temporary file left anywhere


# -- a target that fills up ---------------------------------------------------------------------


@contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


NO_SPACE = os.strerror(errno.ENOSPC)


def files(root: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    """Files of random bytes of the given sizes at the root of ``root``; their contents."""
    root.mkdir()
    contents = {name: os.urandom(size) for name, size in sizes.items()}
    for name, data in contents.items():
        (root / name).write_bytes(data)
    return contents


@needs_root
def test_a_file_that_does_not_fit_fails_and_the_rest_is_restored(tmp_path: Path) -> None:
    source = tmp_path / "source"
    data = files(source, {"a": 1, "b-big": 6 * MiB, "c": 10, "d-mid": 2 * MiB})
    progress = RecordingProgress()
    with tmpfs(tmp_path / "small", "size=4m") as target:
        report = restore_files(str(source), str(target), RestoreOptions(), progress)
        assert report.as_dict() == {
            "restored": 3, "links": 0, "skipped": 0, "failed": 1, "bytes": 1 + 10 + 2 * MiB,
            "failures": [f"b-big: no space for it in the target: {NO_SPACE}"], "special": [],
            "unmatched_includes": [],
        }
        assert sorted(os.listdir(target)) == ["a", "c", "d-mid"]  # no temporary file left
        for name in ("a", "c", "d-mid"):
            assert (target / name).read_bytes() == data[name]
        total = sum(map(len, data.values()))
        assert progress.starts == [("restore", total)] and progress.advanced == total


@needs_root
def test_a_full_target_stops_the_restore_cleanly(tmp_path: Path) -> None:
    source = tmp_path / "source"
    # b leaves 0.5 MiB of the 4: c does not fit, and nothing of 1 MiB or more would any more
    data = files(source, {"a": 1, "b": 3 * MiB + MiB // 2, "c-big": 2 * MiB, "d": 1})
    report = RestoreReport()
    with tmpfs(tmp_path / "small", "size=4m") as target:
        with pytest.raises(NoSpace) as caught:
            restore_files(str(source), str(target), RestoreOptions(), report=report)
        assert re.fullmatch(rf"cannot write c-big in the target: {NO_SPACE}; restore stopped "
                            r"\(\d+ KiB free\)", str(caught.value)), str(caught.value)
        free_kib = int(re.findall(r"\d+", str(caught.value))[-1])
        assert free_kib < 1024
        assert sorted(os.listdir(target)) == ["a", "b"]  # the temporary file was removed
        assert (target / "b").read_bytes() == data["b"]
    # the report passed in holds what was done up to the stop
    assert report.as_dict() == {
        "restored": 2, "links": 0, "skipped": 0, "failed": 1, "bytes": 1 + 3 * MiB + MiB // 2,
        "failures": [f"c-big: no space for it in the target: {NO_SPACE}"], "special": [],
        "unmatched_includes": [],
    }


@needs_root
def test_a_target_where_no_entry_can_be_made_stops_the_restore(tmp_path: Path) -> None:
    source = tmp_path / "source"
    files(source, {f"f{n}": 10 for n in range(6)})
    report = RestoreReport()
    # four inodes: the root and three files, plenty of space
    with tmpfs(tmp_path / "small", "size=4m,nr_inodes=4") as target:
        with pytest.raises(NoSpace) as caught:
            restore_files(str(source), str(target), RestoreOptions(), report=report)
        assert str(caught.value) == f"cannot write f3 in the target: {NO_SPACE}; restore stopped"
        assert sorted(os.listdir(target)) == ["f0", "f1", "f2"]
    assert (report.restored, report.failed, report.failures) == (3, 1, [f"f3: {NO_SPACE}"])


# -- holes where the source shows none ------------------------------------------------------------


@needs_root
@pytest.mark.skipif(not (shutil.which("mkfs.ext4") and shutil.which("fuse2fs")),
                    reason="needs e2fsprogs and fuse2fs")
def test_holes_are_kept_through_fuse2fs(tmp_path: Path) -> None:
    content = tmp_path / "content"
    content.mkdir()
    with open(content / "sparse", "wb") as f:  # 4 KiB, a hole, 4 KiB, a hole to 20 MiB
        f.write(b"A" * 4096)
        f.seek(5 * MiB)
        f.write(b"B" * 4096)
        f.truncate(20 * MiB)
    (content / "zeros").write_bytes(bytes(MiB))  # written: no hole
    image, mountpoint = tmp_path / "fs.img", tmp_path / "mnt"
    subprocess.run(["mkfs.ext4", "-q", str(image), "64M"], check=True, capture_output=True)
    with loop_mounted(image, mountpoint, "rw"):  # mkfs -d would make holes of the zeros too
        shutil.copy(content / "zeros", mountpoint)
        subprocess.run(["cp", "--sparse=always", str(content / "sparse"), str(mountpoint)],
                       check=True)
    mountpoint.mkdir()
    subprocess.run(["fuse2fs", "-o", "ro,fakeroot", str(image), str(mountpoint)], check=True,
                   capture_output=True)
    try:
        with open(mountpoint / "sparse", "rb") as f:  # FUSE: the whole file is data
            assert os.lseek(f.fileno(), 4096, os.SEEK_DATA) == 4096
        with tmpfs(tmp_path / "target", "size=64m") as target:  # allocates exactly, in pages
            report = restore_files(str(mountpoint), str(target), RestoreOptions())
            assert (report.restored, report.failed, report.bytes) == (2, 0, 21 * MiB)
            sparse, zeros = os.stat(target / "sparse"), os.stat(target / "zeros")
            assert (sparse.st_size, sparse.st_blocks * 512) == (20 * MiB, 2 * 4096)
            assert (zeros.st_size, zeros.st_blocks * 512) == (MiB, MiB)
            assert (target / "sparse").read_bytes() == (content / "sparse").read_bytes()
            assert (target / "zeros").read_bytes() == bytes(MiB)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
