"""restore_files: the copy engine of ``snapfs restore-files`` and its path patterns.

Pure pattern tests first. The restore tests run on plain directories standing in for a mounted
snapshot: real files, symlinks, xattrs, owners (root) and special files, compared entry by entry
with what the test built. Two tests use real mounts: an ext4 image with a broken block map on a
loop device (a real EIO on read), and a small tmpfs that fills up.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from diskimages import have_root

import snapfs.restore
from snapfs.errors import NoSpace, UsageError
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
        ("a/**", "a", True, True),
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
    ],
)
def test_pattern_matches(pattern: str, path: str, is_dir: bool, expected: bool) -> None:
    assert PathPattern(pattern).matches(path, is_dir) is expected


@pytest.mark.parametrize("pattern", ["", "/", "./", "../etc", "etc/../../x"])
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
        os.link(r / "etc/passwd", r / "etc/passwd-")  # a hard link: restored as its own file
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
        os.mkfifo(r / "dev/initctl", 0o600)
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


SPECIAL = ["dev/initctl: fifo", "dev/null: character device"]


def files_in(described: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    return {p: d for p, d in described.items() if d[0] in (stat.S_IFREG, stat.S_IFLNK)}


def size_of(root: Path, paths: set[str]) -> int:
    return sum(os.lstat(root / p).st_size for p in paths if (root / p).is_file()
               and not (root / p).is_symlink())


class RecordingProgress:
    def __init__(self) -> None:
        self.starts: list[tuple[str, int]] = []
        self.advanced = 0

    def start(self, label: str, total: int) -> None:
        self.starts.append((label, total))

    def advance(self, amount: int) -> None:
        assert amount >= 0
        self.advanced += amount


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
    for special in ("dev/null", "dev/initctl"):
        del expected[special]
    target = tmp_path / "out" / "restored"  # created, parents too
    progress = RecordingProgress()

    report = restore_files(str(snap.root), str(target), RestoreOptions(), progress)

    assert Tree(target).describe() == expected
    restored = files_in(expected)
    nbytes = size_of(snap.root, set(restored))
    assert report.as_dict() == {
        "restored": len(restored), "skipped": 2, "failed": 0, "bytes": nbytes,
        "failures": [], "special": SPECIAL,
    }
    assert progress.starts == [("restore", nbytes)]
    assert progress.advanced == nbytes
    # the details the comparison covers only implicitly
    assert os.readlink(target / "home/alice/abs-link") == "/etc/shadow"
    assert os.stat(target / "etc/passwd").st_nlink == 1  # hard links come back as copies
    assert os.stat(target / "usr/bin/tool").st_mode & stat.S_ISUID
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
    assert report.bytes == size_of(snap.root, files)


@needs_root
def test_excludes_leave_out_paths_and_subtrees(snap: Tree, tmp_path: Path) -> None:
    source = snap.describe(skip_root_lost_found=True)
    target = tmp_path / "out"
    report = restore(snap, target, excludes=("home/**/*.conf", "var", "dev/*", "etc/ssh/"))
    left_out = {"home/alice/app.conf", "home/alice/.config/deep/tool.conf", "home/bob/bob.conf",
                "var", "var/log", "var/log/big.log", "var/empty", "dev/null", "dev/initctl",
                "etc/ssh", "etc/ssh/sshd_config", "etc/ssh/host_key"}
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
    assert report.bytes == size_of(snap.root, set(restored))


# -- conflicts -----------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("on_conflict", ["skip", "overwrite"])
def test_conflicts(snap: Tree, tmp_path: Path, on_conflict: str) -> None:
    target = tmp_path / "out"
    (target / "etc").mkdir(parents=True)
    (target / "etc/passwd").write_bytes(b"mine\n")
    os.symlink("elsewhere", target / "etc/motd")
    (target / "etc/unrelated").write_bytes(b"stays\n")
    files = set(files_in(snap.describe(skip_root_lost_found=True)))

    report = restore(snap, target, on_conflict=on_conflict)

    assert report.failed == 0
    assert (target / "etc/unrelated").read_bytes() == b"stays\n"
    if on_conflict == "skip":
        assert (target / "etc/passwd").read_bytes() == b"mine\n"
        assert os.readlink(target / "etc/motd") == "elsewhere"
        assert (report.restored, report.skipped) == (len(files) - 2, 2 + 2)  # and the specials
        assert report.bytes == size_of(snap.root, files - {"etc/passwd"})
    else:
        assert (target / "etc/passwd").read_bytes() == (snap.root / "etc/passwd").read_bytes()
        assert os.readlink(target / "etc/motd") == "issue.net"
        assert (report.restored, report.skipped) == (len(files), 2)
        assert report.bytes == size_of(snap.root, files)
    # the directory was there already: merged into, its metadata restored only by overwrite
    assert (os.stat(target / "etc").st_mtime_ns == os.stat(snap.root / "etc").st_mtime_ns) is (
        on_conflict == "overwrite")


@needs_root
def test_overwrite_fails_where_a_directory_stands_for_a_file(snap: Tree, tmp_path: Path) -> None:
    target = tmp_path / "out"
    (target / "etc/passwd").mkdir(parents=True)
    (target / "etc/passwd/keep").write_bytes(b"x")
    report = restore(snap, target, includes=("etc/passwd",), on_conflict="overwrite")
    assert (report.restored, report.failed) == (0, 1)
    assert report.failures == ["etc/passwd: the target has a directory in its place"]
    assert (target / "etc/passwd/keep").read_bytes() == b"x"


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
def loop_mounted(image: Path, mountpoint: Path) -> Iterator[None]:
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop,ro,errors=continue", str(image), str(mountpoint)],
                   check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)  # frees the loop device too


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

    with loop_mounted(image, mountpoint):
        assert (mountpoint / "bad").stat().st_size == 16 * 1024  # listed fine, unreadable
        progress = RecordingProgress()
        report = restore_files(str(mountpoint), str(target), RestoreOptions(), progress)

    assert report.failures == ["bad: reading it from the snapshot failed: Input/output error"]
    assert (report.restored, report.skipped, report.failed) == (3, 0, 1)
    assert report.bytes == 5 + 10_000 + 1024
    total = 5 + 16 * 1024 + 10_000 + 1024
    assert progress.starts == [("restore", total)]
    assert progress.advanced == total
    assert sorted(os.listdir(target)) == ["a-good", "dir", "filler"]  # no half file, no lost+found
    assert (target / "dir/z-good").read_bytes() == b"also good\n" * 1000
    Tree(target).describe()  # no temporary file left anywhere


@needs_root
def test_a_full_target_stops_the_restore_cleanly(tmp_path: Path) -> None:
    source, target = tmp_path / "source", tmp_path / "small"
    source.mkdir()
    (source / "a").write_bytes(b"a")
    (source / "b-big").write_bytes(os.urandom(2 * MiB))
    (source / "c").write_bytes(b"c")
    target.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        with pytest.raises(NoSpace) as caught:
            restore_files(str(source), str(target), RestoreOptions())
        assert str(caught.value) == (
            f"cannot write b-big in the target: {os.strerror(errno.ENOSPC)}; restore stopped")
        assert sorted(os.listdir(target)) == ["a"]  # the temporary file was removed
    finally:
        subprocess.run(["umount", str(target)], check=True)
