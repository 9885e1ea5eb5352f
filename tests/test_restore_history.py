"""``restore-files`` and ``browse`` against a model: random file trees in real ext4 images,
snapshots of them as they change, and random restores of random parts of them into targets that
hold things of their own.

The model is a ``Tree``: paths, each naming an inode (hard links share one), and for each inode
its kind, mode, owner, times, extended attributes, data (with holes), symlink text or device
number. A seeded generator draws the first tree and then changes it between snapshots (data
rewritten, entries added and removed, files turned into directories and back, modes, owners
and attributes changed); each version is written through a loop mount of one ext4 image, read
back from it and compared with the model before it is snapshotted, so that what snapfs serves can
be judged against the model alone.

The tree has the hard cases in it: names with spaces, newlines, leading dashes, bytes that are no
UTF-8, glob characters and backslashes, 255 bytes long; a wide directory and a chain of
directories deeper than restore-files goes (256 levels); empty files and directories, sparse
files of several MiB; hard links across directories (and of fifos and symlinks, which are not
kept as links); fifos, device nodes and sockets; ``user.*`` and ``trusted.*`` attributes;
set-id and odd modes, owners other than root, times before 1970 and after 2038; symlinks that are
absolute, relative, dangling, looping, or point out of the tree at a sentinel directory.

Each restore draws a snapshot, ``--include``/``--exclude`` patterns made from the snapshot's
own paths (``*``, ``**``, ``?``, classes, escaped glob characters, a trailing ``/``), a conflict
policy, loop device or fuse2fs, and a target: a fresh one, or one a restore filled before, with
entries planted where the snapshot has others (files where directories go and the reverse,
symlinks to the sentinel at a directory's or a file's place). A ``Restore`` of the model says
what the target must hold afterwards (kind, mode, owner, times, bytes, symlink text, attributes,
which names are one inode, no more blocks than the data needs) and what the report must say
(counts, failures, left-out sockets, includes that matched nothing); nothing outside the target
may change. ``browse`` of a snapshot must show its version of the model. Bad input must be one
line and the exit code README.md gives, leaving nothing behind. What the model does not know it
does not check: the mtime of a directory of the target's own that a restore added to (now), and
ACLs, progress, stops and full targets (``test_restore.py`` and ``test_browse.py`` have those).

The suite runs two seeds on a local repository (each catches a fault the other misses) and a
shorter history on S3; ``SNAPFS_RESTORE_SEEDS=1-40`` (or ``3,17``) runs other local seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from diskimages import make_socket
from mountutil import MOUNTS, Env, attached, browse_env, ext4_mounted, loops_under, mounts_under
from testkit import EXIT_GENERAL, EXIT_NOT_FOUND, EXIT_USAGE, Snapfs, one_error, store_env

from snapfs.cli.output import printable

pytestmark = MOUNTS
MiB = 1 << 20
BLOCK = 4096
#: README.md: directories nested more than this many levels deep fail
MAX_DEPTH = 256
#: every atime is later than this (and than its entry's mtime): relatime then never changes
#: one while the test reads a tree, here or in a target
LATER = time.time_ns() + 3600 * 10**9
SECOND = 10**9
VERSIONS = 3
RESTORES = 7

# -- the model ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Node:
    """One inode: what a tree says of it, and what a restore must give it."""

    kind: str  # dir, file, symlink, fifo, chr, blk, socket
    mode: int = 0o644  # permission bits, set-id and sticky bits included
    uid: int = 0
    gid: int = 0
    atime: int = LATER
    mtime: int | None = 0  # None: not known (a target's own directory that a restore changed)
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    size: int = 0
    #: a file's data: (offset, bytes) written, holes everywhere else
    chunks: tuple[tuple[int, bytes], ...] = ()
    target: str = ""  # a symlink's text
    rdev: int = 0

    def content(self) -> bytes:
        data = bytearray(self.size)
        for offset, chunk in self.chunks:
            data[offset : offset + len(chunk)] = chunk
        return bytes(data)

    def most_allocated(self) -> int:
        """Bytes a copy may allocate: the 4 KiB blocks its chunks touch, a block of an extent
        tree and one of extended attributes (ext4 counts both in ``st_blocks``)."""
        touched = set()
        for offset, chunk in self.chunks:
            touched.update(range(offset // BLOCK, -(-(offset + len(chunk)) // BLOCK)))
        return (len(touched) + 2) * BLOCK


Description = tuple[Any, ...]


class Tree:
    """Paths (relative, ``/``-separated, names as ``os.fsdecode`` gives them), each naming an
    inode; the root is ``""``."""

    def __init__(self) -> None:
        self.entries: dict[str, int] = {}
        self.inodes: dict[int, Node] = {}
        self._numbers = itertools.count(1)

    def copy(self) -> Tree:
        other = Tree()
        other.entries = dict(self.entries)
        other.inodes = {n: dataclasses.replace(node, xattrs=dict(node.xattrs))
                        for n, node in self.inodes.items()}
        other._numbers = itertools.count(max(self.inodes, default=0) + 1)
        return other

    def add(self, path: str, node: Node) -> int:
        number = next(self._numbers)
        self.inodes[number] = node
        self.entries[path] = number
        return number

    def link(self, path: str, number: int) -> None:
        self.entries[path] = number

    def node(self, path: str) -> Node:
        return self.inodes[self.entries[path]]

    def kind(self, path: str) -> str | None:
        return self.node(path).kind if path in self.entries else None

    def nlink(self, path: str) -> int:
        number = self.entries[path]
        return sum(1 for n in self.entries.values() if n == number)

    def remove(self, path: str) -> None:
        """``path`` and, for a directory, everything below it."""
        for p in [p for p in self.entries if p == path or p.startswith(f"{path}/")]:
            del self.entries[p]
        used = set(self.entries.values())
        self.inodes = {n: node for n, node in self.inodes.items() if n in used}

    def children(self) -> dict[str, list[str]]:
        """Directory -> the names in it, sorted as restore-files walks them."""
        out: dict[str, list[str]] = {p: [] for p in self.entries if self.kind(p) == "dir"}
        for p in self.entries:
            if p:
                out[parent_of(p)].append(p.rpartition("/")[2])
        return {d: sorted(names) for d, names in out.items()}

    def depth_first(self) -> list[str]:
        """Every path below the root, parents before their children."""
        return sorted((p for p in self.entries if p), key=lambda p: p.count("/"))

    def describe(self, whole_seconds: bool = False) -> dict[str, Description]:
        return {p: describe_node(self.node(p), whole_seconds)
                for p in self.entries if p}

    def link_groups(self) -> set[frozenset[str]]:
        """The names of each regular file that has more than one."""
        groups: dict[int, set[str]] = {}
        for p, number in self.entries.items():
            if self.inodes[number].kind == "file":
                groups.setdefault(number, set()).add(p)
        return {frozenset(g) for g in groups.values() if len(g) > 1}


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def whole(ns: int, whole_seconds: bool) -> int:
    """A time as a source shows it: through fuse2fs, whole seconds."""
    return ns // SECOND * SECOND if whole_seconds else ns


def known(ns: int | None) -> int:
    assert ns is not None, "a snapshot's time is always known"
    return ns


def describe_node(node: Node, whole_seconds: bool) -> Description:
    payload: Any = None
    if node.kind == "file":
        payload = (node.size, hashlib.sha256(node.content()).hexdigest())
    elif node.kind == "symlink":
        payload = node.target
    elif node.kind in ("chr", "blk"):
        payload = node.rdev
    return (node.kind, 0 if node.kind == "symlink" else node.mode, node.uid, node.gid,
            whole(node.atime, whole_seconds),
            None if node.mtime is None else whole(node.mtime, whole_seconds), payload,
            tuple(sorted(node.xattrs.items())))


_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk",
          stat.S_IFSOCK: "socket"}


@dataclasses.dataclass
class Observed:
    """A real directory tree, read without snapfs, described as ``Tree.describe`` does."""

    described: dict[str, Description]
    link_groups: set[frozenset[str]]
    allocated: dict[str, int]  # regular file -> bytes allocated


def observe(root: Path) -> Observed:
    described: dict[str, Description] = {}
    inodes: dict[int, set[str]] = {}
    allocated: dict[str, int] = {}

    def walk(directory: str, rel: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            kind = _KINDS[stat.S_IFMT(st.st_mode)]
            payload: Any = None
            if kind == "file":
                with open(entry.path, "rb") as f:
                    payload = (st.st_size, hashlib.sha256(f.read()).hexdigest())
                inodes.setdefault(st.st_ino, set()).add(path)
                allocated[path] = st.st_blocks * 512
            elif kind == "symlink":
                payload = os.readlink(entry.path)
            elif kind in ("chr", "blk"):
                payload = st.st_rdev
            attrs = {a: os.getxattr(entry.path, a, follow_symlinks=False)
                     for a in os.listxattr(entry.path, follow_symlinks=False)
                     if a.startswith(("user.", "trusted."))}
            described[path] = (kind, 0 if kind == "symlink" else stat.S_IMODE(st.st_mode),
                               st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns, payload,
                               tuple(sorted(attrs.items())))
            if kind == "dir":
                walk(entry.path, path)

    walk(str(root), "")
    return Observed(described, {frozenset(g) for g in inodes.values() if len(g) > 1}, allocated)


FIELDS = ("kind", "mode", "uid", "gid", "atime", "mtime", "content", "xattrs")


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else f"{text[:200]}..."


def assert_tree(observed: Observed, model: Tree, whole_seconds: bool, what: str) -> None:
    """``observed`` is ``model``: every entry (times the model does not know left out), which
    names are one file, and no more blocks than each file's data needs."""
    expected = model.describe(whole_seconds)
    got = dict(observed.described)
    for path, description in expected.items():
        if description[5] is None and path in got:  # an mtime the model does not know
            got[path] = (*got[path][:5], None, *got[path][6:])
    if got != expected:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        differ = [(p, {FIELDS[i]: (short(a), short(b)) for i, (a, b)
                       in enumerate(zip(expected[p], got[p], strict=True)) if a != b})
                  for p in sorted(set(got) & set(expected)) if got[p] != expected[p]][:5]
        raise AssertionError(f"{what}: missing {missing}, unexpected {extra}, "
                             f"different (path, field: (expected, got)) {differ}")
    assert observed.link_groups == model.link_groups(), what
    for path, allocated in observed.allocated.items():
        assert allocated <= model.node(path).most_allocated(), (what, path, allocated)


# -- patterns, as README.md describes them ----------------------------------------------------

#: one component's pieces: ("lit", c), ("any", ""), ("one", ""), ("class", chars),
#: ("not", chars)
Piece = tuple[str, str]
GLOB_CHARS = "*?[\\"


@dataclasses.dataclass
class Pattern:
    """An ``--include``/``--exclude`` pattern as the model reads it: components (None for a
    ``**`` one), whether it is for directories only, and its text on the command line."""

    parts: list[list[Piece] | None]
    dir_only: bool
    text: str

    def _piece_regex(self, piece: Piece) -> str:
        kind, chars = piece
        return {"lit": re.escape(chars), "any": ".*", "one": ".",
                "class": f"[{re.escape(chars)}]", "not": f"[^{re.escape(chars)}]"}[kind]

    def component_matches(self, part: list[Piece], name: str) -> bool:
        return re.fullmatch("".join(map(self._piece_regex, part)), name, re.DOTALL) is not None

    # The matcher is a set of positions in ``parts``; position len(parts) is "all matched". A
    # ** that is not last may take no component (its position is also the next one); a last **
    # takes at least one, and then any number.

    def start(self) -> frozenset[int]:
        return self._closure({0})

    def _closure(self, positions: set[int]) -> frozenset[int]:
        for i in sorted(positions):
            j = i
            while j < len(self.parts) - 1 and self.parts[j] is None:
                j += 1
                positions.add(j)
        return frozenset(positions)

    def step(self, positions: frozenset[int], name: str) -> frozenset[int]:
        n = len(self.parts)
        after = set()
        for i in positions:
            if i == n:
                if self.parts[-1] is None:  # a last ** takes any more
                    after.add(n)
                continue
            part = self.parts[i]
            if part is None:
                after.add(n if i == n - 1 else i)
            elif self.component_matches(part, name):
                after.add(i + 1)
        return self._closure(after)

    def accepts(self, positions: frozenset[int], is_dir: bool) -> bool:
        return len(self.parts) in positions and (is_dir or not self.dir_only)

    def alive(self, positions: frozenset[int]) -> bool:
        n = len(self.parts)
        return any(i < n for i in positions) or (n in positions and self.parts[-1] is None)

    def names_lost_found(self) -> bool:
        first = self.parts[0]
        return first is not None and "".join(c for k, c in first if k == "lit") == "lost+found" \
            and all(k == "lit" for k, _ in first)


def render(part: list[Piece], rng: random.Random) -> str:
    """A component's text: glob characters meant literally escaped with a backslash (sometimes
    an ordinary character too, which stays itself)."""
    out = []
    for kind, chars in part:
        if kind == "lit":
            if chars in GLOB_CHARS or (chars.isalnum() and rng.random() < 0.05):
                out.append("\\" + chars)
            else:
                out.append(chars)
        elif kind == "any":
            out.append("*")
        elif kind == "one":
            out.append("?")
        else:
            out.append(("[!" if kind == "not" else "[") + chars + "]")
    return "".join(out)


def pattern_for(path: str, is_dir: bool, rng: random.Random) -> Pattern:
    """A pattern made from one of the snapshot's paths: some names kept, some loosened with
    wildcards, some directories replaced by ``**``."""
    names = path.split("/")
    parts: list[list[Piece] | None] = []
    for i, name in enumerate(names):
        last = i == len(names) - 1
        roll = rng.random()
        if not last and roll < 0.12 and (not parts or parts[-1] is not None):
            parts.append(None)  # ** for this directory (and perhaps more)
            continue
        pieces: list[Piece] = [("lit", c) for c in name]
        if roll < 0.3 and len(name) > 1:  # a tail of the name as *
            keep = rng.randrange(0, len(name))
            pieces = pieces[:keep] + [("any", "")]
        elif roll < 0.45:  # a character as ?
            k = rng.randrange(len(name))
            pieces[k] = ("one", "")
        elif roll < 0.55:  # a character as a class that holds it, or not another one
            k = rng.randrange(len(name))
            c = name[k]
            if c.isascii() and c.isalnum():
                other = rng.choice([x for x in "abcxyz019" if x != c])
                pieces[k] = ("class", "".join(sorted({c, other}))) if rng.random() < 0.6 \
                    else ("not", "q" if c != "q" else "r")
        elif roll < 0.58:
            pieces = [("any", "")]
        parts.append(pieces)
    if rng.random() < 0.1:  # a final ** instead of the last name: what is inside, not itself
        parts[-1] = None
    dir_only = rng.random() < (0.3 if is_dir else 0.05)  # a file is no directory
    text = "/".join("**" if p is None else render(p, rng) for p in parts)
    if rng.random() < 0.1:
        text = "/" + text  # a leading / changes nothing
    return Pattern(parts, dir_only, text + ("/" if dir_only else ""))


def inside(path: str, rng: random.Random) -> Pattern:
    """``PATH/**``: what is inside the directory, not the directory itself."""
    parts: list[list[Piece] | None] = [[("lit", c) for c in name] for name in path.split("/")]
    text = "/".join(render(part, rng) for part in parts if part is not None)
    return Pattern([*parts, None], False, f"{text}/**")


def literal(text: str) -> Pattern:
    """A pattern with no wildcard: ``text`` itself."""
    parts: list[list[Piece] | None] = [[("lit", c) for c in name] for name in text.split("/")]
    return Pattern(parts, False, text)


# -- what a restore does, by the model -----------------------------------------------------------


class _Abandoned(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


@dataclasses.dataclass
class Where:
    selected: bool
    includes: tuple[frozenset[int], ...]
    excludes: tuple[frozenset[int], ...]


class Restore:
    """README.md's restore-files, run on the model: ``target`` (the target's tree, changed in
    place) after restoring ``source`` into it, and the report."""

    def __init__(self, source: Tree, target: Tree, includes: list[Pattern],
                 excludes: list[Pattern], overwrite: bool, whole_seconds: bool) -> None:
        self.source, self.target = source, target
        self.includes, self.excludes = includes, excludes
        self.overwrite, self.whole_seconds = overwrite, whole_seconds
        self.children = source.children()
        self.lost_found = any(p.names_lost_found() for p in includes)
        self.report: dict[str, Any] = {"restored": 0, "links": 0, "skipped": 0, "failed": 0,
                                       "bytes": 0, "failures": [], "special": []}
        self.opened: dict[str, bool] = {"": False}  # target directory -> metadata restored
        self.copies: dict[int, int] = {}  # source inode -> its first copy's
        self.matched: set[int] = set()

    def run(self) -> dict[str, Any]:
        root = Where(not self.includes, tuple(p.start() for p in self.includes),
                     tuple(p.start() for p in self.excludes))
        self.scan("", 0, root)
        self.restore_dir("", 0, root)
        self.report["unmatched_includes"] = [p.text for i, p in enumerate(self.includes)
                                             if i not in self.matched]
        return self.report

    def names(self, directory: str) -> list[str]:
        names = self.children[directory]
        if directory == "" and not self.lost_found:
            names = [n for n in names if n != "lost+found"]
        return names

    def child(self, where: Where, name: str, is_dir: bool) -> Where | None:
        excludes = tuple(p.step(s, name) for p, s in zip(self.excludes, where.excludes,
                                                         strict=True))
        if any(p.accepts(s, is_dir) for p, s in zip(self.excludes, excludes, strict=True)):
            return None
        includes = tuple(p.step(s, name) for p, s in zip(self.includes, where.includes,
                                                         strict=True))
        taking = {i for i, (p, s) in enumerate(zip(self.includes, includes, strict=True))
                  if p.accepts(s, is_dir)}
        self.matched |= taking
        if where.selected or taking:
            return Where(True, includes, excludes)
        if is_dir and any(p.alive(s) for p, s in zip(self.includes, includes, strict=True)):
            return Where(False, includes, excludes)
        return None

    def fail(self, path: str, reason: str) -> None:
        self.report["failed"] += 1
        self.report["failures"].append(f"{path}: {reason}")

    def restore_dir(self, directory: str, depth: int, where: Where) -> None:
        try:
            if where.selected:
                self.target_dir(directory)  # a taken directory is there even when empty
            for name in self.names(directory):
                path = f"{directory}/{name}" if directory else name
                node = self.source.node(path)
                below = self.child(where, name, node.kind == "dir")
                if below is None:
                    continue
                if node.kind == "dir":
                    if depth + 1 > MAX_DEPTH:
                        self.fail(path, f"nested more than {MAX_DEPTH} directories deep")
                    else:
                        self.restore_dir(path, depth + 1, below)
                elif node.kind == "socket":
                    self.report["skipped"] += 1
                    self.report["special"].append(f"{path}: socket")
                else:
                    self.restore_entry(path, node)
        except _Abandoned as e:
            if e.path != directory:
                raise
            return
        if directory and self.opened.get(directory):  # made here, or overwrite: its metadata
            made, source = self.target.node(directory), self.source.node(directory)
            made.mode = source.mode
            made.atime = whole(source.atime, self.whole_seconds)
            made.mtime = whole(known(source.mtime), self.whole_seconds)

    def scan(self, directory: str, depth: int, where: Where) -> None:
        """The first walk, which reads the snapshot alone (restore-files counts the bytes it
        will copy): an include that takes a path anywhere it reaches is not "matched nothing",
        whatever becomes of the path in the target."""
        for name in self.names(directory):
            path = f"{directory}/{name}" if directory else name
            is_dir = self.source.kind(path) == "dir"
            below = self.child(where, name, is_dir)
            if below is not None and is_dir and depth < MAX_DEPTH:
                self.scan(path, depth + 1, below)

    def target_dir(self, directory: str) -> None:
        """``directory`` in the target, made if it is not there (with its parents)."""
        if directory in self.opened:
            return
        self.target_dir(parent_of(directory))
        source = self.source.node(directory)
        there = self.target.kind(directory)
        if there is None:
            self.target.add(directory, Node("dir", 0o700, source.uid, source.gid,
                                             xattrs=dict(source.xattrs)))
            self.changed(parent_of(directory))
        elif there == "symlink":
            self.fail(directory, "the target has a symlink where a directory goes (not "
                                 "followed); nothing under it was restored")
            raise _Abandoned(directory)
        elif there != "dir":
            self.fail(directory, "the target has a non-directory where a directory goes; "
                                 "nothing under it was restored")
            raise _Abandoned(directory)
        elif self.overwrite:
            mine = self.target.node(directory)
            mine.uid, mine.gid, mine.xattrs = source.uid, source.gid, dict(source.xattrs)
        self.opened[directory] = there is None or self.overwrite

    def changed(self, directory: str) -> None:
        """A name was made in ``directory``: a directory of the target's own whose metadata is
        not restored has an mtime of now."""
        if directory and not self.opened.get(directory):
            self.target.node(directory).mtime = None

    def restore_entry(self, path: str, node: Node) -> None:
        directory = parent_of(path)
        self.target_dir(directory)
        there = self.target.kind(path)
        if there is not None:
            if not self.overwrite:
                self.report["skipped"] += 1
                return
            if there == "dir":
                self.fail(path, "the target has a directory in its place")
                return
        number = self.source.entries[path]
        linked = node.kind == "file" and self.source.nlink(path) > 1
        self.changed(directory)
        self.report["restored"] += 1
        if linked and number in self.copies:
            self.target.link(path, self.copies[number])
            self.report["links"] += 1
            return
        copy = dataclasses.replace(node, xattrs=dict(node.xattrs),
                                   atime=whole(node.atime, self.whole_seconds),
                                   mtime=whole(known(node.mtime), self.whole_seconds))
        made = self.target.add(path, copy)
        if node.kind == "file":
            self.report["bytes"] += node.size
            if linked:
                self.copies[number] = made


# -- writing a model into a real directory -------------------------------------------------------


def write_entries(root: Path, tree: Tree, paths: list[str], written: dict[int, str]) -> None:
    """Make ``paths`` (parents first) below ``root`` as ``tree`` says, times aside; a path
    whose inode is in ``written`` (inode -> a path made earlier) is a hard link to it."""
    for path in paths:
        full = root / path
        number = tree.entries[path]
        node = tree.inodes[number]
        if number in written:
            os.link(root / written[number], full, follow_symlinks=False)
            continue
        written[number] = path
        if node.kind == "dir":
            os.mkdir(full)
        elif node.kind == "file":
            write_data(full, node)
        elif node.kind == "symlink":
            os.symlink(node.target, full)
        elif node.kind == "fifo":
            os.mkfifo(full)
        elif node.kind in ("chr", "blk"):
            kind = stat.S_IFCHR if node.kind == "chr" else stat.S_IFBLK
            os.mknod(full, kind | 0o600, node.rdev)
        else:
            make_socket(full)
        set_metadata(full, node)


def write_data(full: Path, node: Node) -> None:
    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset, chunk in node.chunks:
            os.pwrite(fd, chunk, offset)
        os.ftruncate(fd, node.size)
    finally:
        os.close(fd)


def set_metadata(full: Path, node: Node) -> None:
    """Owner, then mode (chown clears set-id bits), then extended attributes: all but times."""
    os.chown(full, node.uid, node.gid, follow_symlinks=False)
    if node.kind != "symlink":
        os.chmod(full, node.mode)
    present = set(os.listxattr(full, follow_symlinks=False))
    for attr in present - set(node.xattrs):
        os.removexattr(full, attr, follow_symlinks=False)
    for attr, value in node.xattrs.items():
        os.setxattr(full, attr, value, follow_symlinks=False)


def set_times(root: Path, tree: Tree) -> None:
    """Every entry's times, deepest first (making an entry changes its directory's mtime)."""
    for path in reversed(tree.depth_first()):
        node = tree.node(path)
        assert node.mtime is not None
        os.utime(root / path, ns=(node.atime, node.mtime), follow_symlinks=False)


# -- drawing trees -------------------------------------------------------------------------------

#: names that are hard for a shell, a glob or an encoding: each is used at most once a directory
ODD_NAMES = [
    "a b", " lead", "trail ", "new\nline", "tab\there", "-rf", "--include", "-", "*", "a*b",
    "q?", "?", "[1]", "x[ab]", "[", "]", "back\\slash", "\\", "**", "...", ".hidden",
    "caf\u00e9", "\u65e5\u672c", os.fsdecode(b"bad\xff\xfeutf8"), os.fsdecode(b"\x80"),
    "L" * 255, "lost+found", "#12", "{a,b}", "$HOME", "'quote'", '"dq"',
]
PLAIN = ["etc", "home", "var", "log", "data", "notes.txt", "app.conf", "core", "bin", "x.bak",
         "readme", "a", "b", "c", "usr", "share", "tmp", "src", "lib"]
OWNERS = [0, 0, 0, 1000, 1001, 65534, 4242, 3_000_000_000]
FILE_MODES = [0o644, 0o644, 0o600, 0o755, 0o4755, 0o2711, 0o6755, 0o1644, 0o000, 0o007, 0o777,
              0o444]
DIR_MODES = [0o755, 0o755, 0o700, 0o1777, 0o2775, 0o750, 0o555, 0o711, 0o000]
RDEVS = [os.makedev(1, 3), os.makedev(1, 5), os.makedev(7, 0), os.makedev(8, 1),
         os.makedev(259, 70000)]


class Generator:
    """Random trees and changes to them, from one seeded generator."""

    def __init__(self, rng: random.Random, sentinel: Path) -> None:
        self.rng = rng
        self.sentinel = sentinel
        self.data_budget = 24 * MiB  # of data in the image at any time

    def times(self) -> tuple[int, int]:
        rng = self.rng
        mtime = rng.choice([
            rng.randrange(0, LATER - 3600 * SECOND),  # 1970 to now, any nanosecond
            rng.randrange(-2_000_000_000, 0) * SECOND + rng.randrange(SECOND),  # before 1970
            rng.randrange(2_200_000_000, 4_000_000_000) * SECOND + rng.randrange(SECOND),  # 2038+
            rng.randrange(0, 2_000_000_000) * SECOND,  # whole seconds
        ])
        return max(mtime, LATER) + rng.randrange(1, 10**12), mtime

    def name(self, taken: set[str]) -> str:
        rng = self.rng
        for _ in range(50):
            if rng.random() < 0.35:
                name = rng.choice(ODD_NAMES)
            else:
                name = rng.choice(PLAIN) + ("" if rng.random() < 0.5 else str(rng.randrange(30)))
            if name not in taken:
                taken.add(name)
                return name
        name = f"n{len(taken)}"
        taken.add(name)
        return name

    def xattrs(self, kind: str) -> dict[str, bytes]:
        rng = self.rng
        if kind in ("file", "dir"):
            out = {}
            for attr in rng.sample(["user.tag", "user.empty", "user.with space", "user.big",
                                    "trusted.origin"], rng.choice([0, 0, 1, 2, 3])):
                out[attr] = (b"" if attr == "user.empty" else
                             rng.randbytes(1500) if attr == "user.big" else
                             rng.randbytes(rng.randrange(1, 40)))
            return out
        if kind != "socket" and rng.random() < 0.15:  # user.* is for files and directories
            return {"trusted.t": rng.randbytes(8)}
        return {}

    def file_data(self) -> tuple[int, tuple[tuple[int, bytes], ...]]:
        rng = self.rng
        shape = rng.choice(["empty", "small", "small", "small", "medium", "sparse", "dense",
                            "zeros"])
        if shape == "empty":
            return 0, ()
        if shape == "small":
            data = rng.randbytes(rng.randrange(1, 5000))
            return len(data), ((0, data),)
        if shape == "zeros":  # written zeros: data, not a hole
            return 8192, ((0, bytes(8192)),)
        if shape == "dense" and self.data_budget > 4 * MiB:
            data = rng.randbytes(rng.randrange(MiB, 2 * MiB))
            self.data_budget -= len(data)
            return len(data), ((0, data),)
        if shape == "sparse":  # a few chunks (one of zeros within) far apart, a trailing hole
            size = rng.randrange(2 * MiB, 12 * MiB)
            starts = sorted(rng.sample(range(0, size - 80_000, BLOCK), rng.choice([1, 2, 3])))
            chunks = []
            for start in starts:
                at = start + rng.choice([0, 0, 123])
                data = rng.randbytes(rng.randrange(1, 60_000))
                if rng.random() < 0.3:
                    data = data[:10] + bytes(3 * BLOCK) + data[10:]
                chunks.append((at, data))
            return size, tuple(chunks)
        data = rng.randbytes(rng.randrange(5000, 200_000))
        return len(data), ((0, data),)

    def symlink_target(self, tree: Tree, path: str) -> str:
        rng = self.rng
        depth = path.count("/")
        name = path.rpartition("/")[2]
        others = [p for p in tree.entries if p and p != path]
        choice = rng.choice(["absolute", "outward", "sentinel", "sentinel-relative", "dangling",
                             "self", "into", "long", "odd"])
        if choice == "absolute":
            return rng.choice(["/etc/passwd", "/", "/dev/null", "/nonexistent/x"])
        if choice == "outward":
            return "../" * (depth + rng.randrange(1, 4)) + "etc"
        if choice == "sentinel":
            return str(self.sentinel)
        if choice == "sentinel-relative":  # from a target two levels below the sentinel's parent
            return "../" * (depth + 2) + self.sentinel.name
        if choice == "dangling":
            return "no/such/" + name
        if choice == "self":
            return name
        if choice == "into" and others:  # another entry of the tree, relative to this one
            return "../" * depth + rng.choice(others)
        if choice == "long":
            return "x/" * rng.randrange(200, 1500) + "end"
        return os.fsdecode(b"odd\nlink \xff") + name

    def new_node(self, tree: Tree, path: str, kind: str) -> Node:
        rng = self.rng
        atime, mtime = self.times()
        node = Node(kind, rng.choice(DIR_MODES if kind == "dir" else FILE_MODES),
                    rng.choice(OWNERS), rng.choice(OWNERS), atime, mtime, self.xattrs(kind))
        if kind == "file":
            node.size, node.chunks = self.file_data()
        elif kind == "symlink":
            node.target = self.symlink_target(tree, path)
        elif kind in ("fifo", "chr", "blk", "socket"):
            node.mode = rng.choice([0o600, 0o620, 0o666, 0o640])
            node.rdev = rng.choice(RDEVS) if kind in ("chr", "blk") else 0
        return node

    def populate(self, tree: Tree, directory: str, count: int, depth: int) -> list[str]:
        """``count`` new entries in ``directory`` (and below its new directories): their
        paths, parents first."""
        rng = self.rng
        taken = set(tree.children().get(directory, []))
        made = []
        for _ in range(count):
            path = f"{directory}/{self.name(taken)}" if directory else self.name(taken)
            kind = rng.choices(["file", "dir", "symlink", "fifo", "chr", "blk", "socket",
                                "link"], [40, 18, 15, 4, 3, 2, 3, 8])[0]
            if kind == "socket" and len(path.rpartition("/")[2].encode(
                    errors="surrogateescape")) > 80:
                kind = "file"  # a socket is bound through /proc/self/fd/N/NAME: 108 bytes
            files = [p for p in tree.entries if tree.kind(p) in ("file", "fifo", "symlink")]
            if kind == "link" and files:
                tree.link(path, tree.entries[rng.choice(files)])
                made.append(path)
                continue
            if kind == "link":
                kind = "file"
            tree.add(path, self.new_node(tree, path, kind))
            made.append(path)
            if kind == "dir" and depth < 5:
                made += self.populate(tree, path, rng.choice([0, 1, 2, 4, 6, 8]), depth + 1)
        return made

    def first_tree(self) -> Tree:
        rng = self.rng
        tree = Tree()
        atime, mtime = self.times()
        tree.add("", Node("dir", 0o755, atime=atime, mtime=mtime))
        atime, mtime = self.times()
        tree.add("lost+found", Node("dir", 0o700, atime=atime, mtime=mtime))
        self.populate(tree, "", 24, 0)
        # a wide directory
        wide = "wide dir"
        tree.add(wide, self.new_node(tree, wide, "dir"))
        tree.node(wide).mode = 0o755
        for n in range(rng.randrange(150, 400)):
            node = self.new_node(tree, f"{wide}/f{n:04}", "file")
            node.size, node.chunks = (0, ()) if n % 3 else (3, ((0, b"%03d" % (n % 1000)),))
            tree.add(f"{wide}/f{n:04}", node)
        # a chain deeper than a restore goes, with files on the way
        if rng.random() < 0.7:
            path = "deep"
            for level in range(1, MAX_DEPTH + 4):
                tree.add(path, self.new_node(tree, path, "dir"))
                tree.node(path).mode = 0o755
                if level in (1, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 3):
                    leaf = f"{path}/leaf{level}"
                    tree.add(leaf, self.new_node(tree, leaf, "file"))
                path = f"{path}/d"
        return tree

    def change(self, tree: Tree, root: Path) -> list[str]:
        """One random change, made in the model and below ``root``; what it did."""
        rng = self.rng
        paths = [p for p in tree.entries if p and p != "lost+found"
                 and not p.startswith(("deep/", "wide dir/"))]
        if not paths:
            return []
        path = rng.choice(paths)
        node = tree.node(path)
        full = root / path
        what = rng.choice(["data", "remove", "add", "metadata", "xattrs", "retype", "data",
                           "add"])
        if what == "data" and node.kind == "file":
            node.size, node.chunks = self.file_data()
            write_data(full, node)  # the same inode: every name of it changes
            set_metadata(full, node)
        elif what == "remove":
            if node.kind == "dir":
                subprocess.run(["rm", "-rf", "--", str(full)], check=True)
            else:
                os.unlink(full)
            tree.remove(path)
        elif what == "add":
            directory = path if node.kind == "dir" else parent_of(path)
            made = self.populate(tree, directory, rng.randrange(1, 4), directory.count("/") + 1)
            write_entries(root, tree, made, written_before(tree, made))
        elif what == "metadata":
            node.uid, node.gid = rng.choice(OWNERS), rng.choice(OWNERS)
            if node.kind != "symlink":
                node.mode = rng.choice(DIR_MODES if node.kind == "dir" else FILE_MODES)
            set_metadata(full, node)
        elif what == "xattrs" and node.kind in ("file", "dir"):
            node.xattrs = self.xattrs(node.kind)
            set_metadata(full, node)
        elif what == "retype":  # a file where a directory was, or the reverse
            if node.kind == "dir":
                subprocess.run(["rm", "-rf", "--", str(full)], check=True)
            else:
                os.unlink(full)
            tree.remove(path)
            kind = "file" if node.kind == "dir" else rng.choice(["dir", "symlink"])
            tree.add(path, self.new_node(tree, path, kind))
            made = [path]
            if kind == "dir":
                made += self.populate(tree, path, rng.randrange(1, 4), path.count("/") + 1)
            write_entries(root, tree, made, written_before(tree, made))
        else:
            return []
        for p in tree.entries:  # new times everywhere a change may have touched
            if p == path or parent_of(path) == p or p.startswith(f"{path}/"):
                tree.node(p).atime, tree.node(p).mtime = self.times()
        return [f"{what} {path!r}"]


# -- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    path: Path
    tree: Tree  # what it holds, by the model


class History:
    """Versions of a tree in one image, their snapshots, and restores and browses of them."""

    def __init__(self, env: Env, rng: random.Random, tmp: Path) -> None:
        self.env = env
        self.rng = rng
        self.tmp = tmp
        self.sentinel = tmp / "sentinel"
        self.image = tmp / "tree.img"
        self.targets_dir = tmp / "targets"
        self.targets: list[Target] = []
        self.gen = Generator(rng, self.sentinel)
        self.versions: dict[str, Tree] = {}  # snapshot name -> its tree
        self.ids: dict[str, str] = {}  # snapshot name -> its id
        self.log: list[str] = []
        (self.sentinel / "sub").mkdir(parents=True)
        (self.sentinel / "victim").write_bytes(b"precious")
        (self.sentinel / "sub" / "inner").write_bytes(b"also precious")
        os.symlink("victim", self.sentinel / "link")
        for path in ("sub/inner", "sub", "victim", "link"):  # reading it changes no atime
            os.utime(self.sentinel / path, ns=(LATER, 1_000_000_000 * SECOND),
                     follow_symlinks=False)
        self.outside = observe(self.sentinel)
        self.outside_mtime = os.stat(self.sentinel).st_mtime_ns
        self.targets_dir.mkdir()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-N", "4096",
                        str(self.image), "96M"], check=True, capture_output=True)

    def note(self, what: str) -> None:
        self.log.append(what)

    def history(self) -> str:
        return "history:\n  " + "\n  ".join(self.log[-40:])

    def assert_outside_untouched(self, what: str) -> None:
        assert observe(self.sentinel) == self.outside, f"{what} changed the sentinel"
        assert os.stat(self.sentinel).st_mtime_ns == self.outside_mtime, what
        assert set(os.listdir(self.tmp)) <= {"sentinel", "tree.img", "targets", "cache", "repo",
                                             "mnt", "browsed", "a-file"}, what
        assert sorted(os.listdir(self.targets_dir)) == sorted(
            t.path.name for t in self.targets), what

    def assert_nothing_left(self, what: str) -> None:
        assert mounts_under(self.tmp) == [], what
        # only those of images here: one of a snapfs mount gone (``/snapshots/…``) may be
        # another test's, a moment before it detaches it (browse_env looks for those at the end)
        assert [backing for backing in loops_under(self.tmp).values()
                if backing.startswith(f"{self.tmp}/")] == [], what
        assert self.env.browse_states() == [], what
        browse_mnt = self.env.cache / "browse-mnt"
        assert not browse_mnt.exists() or list(browse_mnt.iterdir()) == [], what

    # -- versions

    def version(self, tree: Tree | None) -> Tree:
        """The next version of the tree, written into the image, read back, snapshotted."""
        name = f"v{len(self.versions) + 1}"
        with attached(self.image) as device, ext4_mounted(device, self.tmp / "mnt") as root:
            if tree is None:
                tree = self.gen.first_tree()
                set_metadata(root, tree.node(""))
                lost_found = tree.node("lost+found")
                set_metadata(root / "lost+found", lost_found)
                write_entries(root, tree, [p for p in tree.depth_first() if p != "lost+found"],
                              {})
                self.note(f"{name}: {len(tree.entries)} entries")
            else:
                tree = tree.copy()
                changes = [c for _ in range(self.rng.randrange(6, 16))
                           for c in self.gen.change(tree, root)]
                self.note(f"{name}: {'; '.join(changes)}")
            set_times(root, tree)
            root_node = tree.node("")
            assert root_node.mtime is not None
            os.utime(root, ns=(root_node.atime, root_node.mtime))
            # what ext4 keeps is what the model says, read without snapfs
            assert_tree(observe(root), tree, False, f"the image of {name}")
        made = self.env.snapfs.json("snapshot", "create", self.image, "--name", name,
                                    "--disk", "tree")
        assert made["name"] == name
        self.versions[name] = tree
        self.ids[name] = made["id"]
        return tree

    # -- restores

    def plant(self, target: Target, source: Tree) -> list[str]:
        """Entries of the target's own where the snapshot has others; what was planted."""
        rng = self.rng
        # mostly near the root, where restores pass by most often
        paths = [p for p in source.entries if p and not p.startswith(("deep/", "wide dir/"))
                 and (p.count("/") < 2 or rng.random() < 0.3)]
        planted = []
        for path in rng.sample(paths, min(len(paths), rng.randrange(1, 7))):
            if any(target.tree.kind(a) not in (None, "dir") for a in ancestors(path)):
                continue
            if target.tree.kind(path) is not None:
                continue
            for a in ancestors(path):
                if target.tree.kind(a) is None:
                    atime, mtime = self.gen.times()
                    target.tree.add(a, Node("dir", 0o755, atime=atime, mtime=mtime))
                    write_entries(target.path, target.tree, [a], {})
            atime, mtime = self.gen.times()
            # where the snapshot has a directory, mostly one to merge into
            choice = rng.choice(["file", "dir", "symlink-sentinel", "symlink-relative",
                                 "symlink-victim", "fifo", "dangling"]
                                + ["dir"] * (4 if source.kind(path) == "dir" else 0))
            node = Node("file", 0o640, 1000, 1000, atime, mtime)
            if choice == "file":
                node.size, node.chunks = 5, ((0, b"mine\n"),)
            elif choice == "dir":  # merged into where the snapshot has a directory too
                node = Node("dir", 0o750, 1000, 1000, atime, mtime,
                            {"user.mine": b"planted"} if rng.random() < 0.7 else {})
            elif choice == "symlink-sentinel":
                node = Node("symlink", 0, 0, 0, atime, mtime, target=str(self.sentinel))
            elif choice == "symlink-relative":  # the sentinel, from where it is in the target
                node = Node("symlink", 0, 0, 0, atime, mtime,
                            target="../" * (path.count("/") + 2) + self.sentinel.name)
            elif choice == "symlink-victim":
                node = Node("symlink", 0, 0, 0, atime, mtime, target=str(self.sentinel / "victim"))
            elif choice == "fifo":
                node = Node("fifo", 0o600, 0, 0, atime, mtime)
            else:
                node = Node("symlink", 0, 0, 0, atime, mtime, target="nowhere")
            target.tree.add(path, node)
            write_entries(target.path, target.tree, [path], {})
            planted.append(f"{choice} at {path!r}")
        for node in target.tree.inodes.values():
            if node.mtime is None:  # changed by a restore: known from now on
                node.atime, node.mtime = self.gen.times()
        set_times(target.path, target.tree)
        return planted

    def patterns(self, tree: Tree) -> tuple[list[Pattern], list[Pattern]]:
        rng = self.rng
        # mostly of the paths drawn at random: the wide and the deep directory are many
        paths = [p for p in tree.entries if p and not p.startswith("lost+found")
                 and (not p.startswith(("deep/", "wide dir/")) or rng.random() < 0.03)]
        includes, excludes = [], []
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            roll = rng.random()
            if roll < 0.08:  # a typo
                includes.append(literal(rng.choice(["no such", "no such/x", "etc/no such"])))
            elif roll < 0.13:
                includes.append(literal(rng.choice(["lost+found", "lost+found/x"])))
            elif roll < 0.18:
                path = rng.choice(paths)
                p = pattern_for(path.rpartition("/")[2], tree.kind(path) == "dir", rng)
                includes.append(Pattern([None, *p.parts], p.dir_only, "**/" + p.text.lstrip("/")))
            else:
                path = rng.choice(paths)
                includes.append(pattern_for(path, tree.kind(path) == "dir", rng))
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            path = rng.choice(paths)
            excludes.append(pattern_for(path, tree.kind(path) == "dir", rng))
        directories = [p for p in paths if tree.kind(p) == "dir"]
        if directories and rng.random() < 0.25:  # README's --exclude 'var/**': an empty var
            (excludes if rng.random() < 0.7 else includes).append(
                inside(rng.choice(directories), rng))
        return includes, excludes

    def restore(self) -> None:
        rng = self.rng
        name = rng.choice(sorted(self.versions))
        source = self.versions[name]
        if self.targets and rng.random() < 0.5:
            target = rng.choice(self.targets)
        else:
            path = self.targets_dir / f"t{len(self.targets)}"
            target = Target(path, Tree())
            self.targets.append(target)
            if rng.random() < 0.5:  # else restore-files makes it
                path.mkdir()
        planted = []
        if target.path.exists() and rng.random() < 0.7:
            planted = self.plant(target, source)
        includes, excludes = self.patterns(source)
        overwrite = rng.random() < 0.5
        fuse2fs = rng.random() < 0.2
        as_json = rng.random() < 0.7
        args: list[Any] = ["restore-files", name, "--to", target.path]
        for p in includes:
            args += ["--include", p.text]
        for p in excludes:
            args += ["--exclude", p.text]
        args += (["--on-conflict", "overwrite"] if overwrite
                 else rng.choice([[], ["--on-conflict", "skip"]]))
        args += ["--fuse2fs"] if fuse2fs else []
        args += ["--json"] if as_json else []
        what = f"restore {' '.join(map(str, args[1:]))!r}" + (f", planted {planted}"
                                                              if planted else "")
        self.note(what)
        expected = Restore(source, target.tree, includes, excludes, overwrite, fuse2fs).run()

        result = self.env.snapfs(*args)

        where = f"{what}; {self.history()}"
        assert result.returncode == (1 if expected["failed"] else 0), (result.stderr, where)
        if as_json:
            assert result.stderr == "", where
            report = json.loads(result.stdout)
            snapshot = report.pop("snapshot")
            assert report.pop("target") == str(target.path)
            assert snapshot == self.ids[name]
            assert report == expected, (report, where)
        else:
            self.check_said(result, expected, name, target.path, where)
        assert_tree(observe(target.path), target.tree, False, where)
        self.assert_outside_untouched(where)
        self.assert_nothing_left(where)

    def check_said(self, result: subprocess.CompletedProcess[str], expected: dict[str, Any],
                   name: str, target: Path, where: str) -> None:
        """What restore-files prints without ``--json``: the entries on stderr, a summary."""
        said = ([f"snapfs: failed: {f}" for f in expected["failures"]]
                + [f"snapfs: left out: {s}" for s in expected["special"]]
                + [f"snapfs: warning: --include {p} matched nothing"
                   for p in expected["unmatched_includes"]])
        # one line each: control characters escaped (``printable``, as for labels), and a name
        # that is no UTF-8 reaches stderr with its bytes as escapes
        assert result.stderr == "".join(
            f"{printable(line)}\n".encode(errors="backslashreplace").decode() for line in said), \
            where
        links = expected["links"]
        links_said = ("" if not links else ", 1 of them a hard link" if links == 1
                      else f", {links} of them hard links")
        restored = expected["restored"]
        summary = (rf"restored {restored} files? \([0-9.]+ (B|KiB|MiB)"
                   rf"{re.escape(links_said)}\) from {name} into {re.escape(str(target))}: "
                   rf"{expected['skipped']} skipped, {expected['failed']} failed\n")
        assert re.fullmatch(summary, result.stdout), (result.stdout, where)

    def browse(self) -> None:
        name = self.rng.choice(sorted(self.versions))
        fuse2fs = self.rng.random() < 0.3
        where = self.tmp / "browsed"
        where.mkdir()
        state = self.env.browse(name, where, *(["--fuse2fs"] if fuse2fs else []))
        try:
            assert state["snapshot_name"] == name and state["filesystem"] == "ext4"
            assert_tree(observe(where), self.versions[name], fuse2fs,
                        f"browse of {name}{' with fuse2fs' if fuse2fs else ''}; {self.history()}")
        finally:
            self.env.unbrowse(where)
        where.rmdir()
        self.note(f"browse {name}{' --fuse2fs' if fuse2fs else ''}")
        self.assert_nothing_left("unbrowse")

    def refused(self) -> None:
        """Bad input: one line, the exit code README.md gives, and nothing made or changed."""
        rng = self.rng
        name = rng.choice(sorted(self.versions))
        a_file = self.tmp / "a-file"
        a_file.write_bytes(b"x")
        fresh = self.targets_dir / "never"
        cases: list[tuple[list[Any], int, str]] = [
            (["restore-files", "nosuch", "--to", fresh], EXIT_NOT_FOUND, "no snapshot"),
            (["restore-files", name, "--to", fresh, "--include", ""], EXIT_USAGE,
             "empty path pattern"),
            (["restore-files", name, "--to", fresh, "--exclude", "etc/../x"], EXIT_USAGE, ".."),
            (["restore-files", name, "--to", fresh, "--include", "etc\\"], EXIT_USAGE,
             "nothing after it"),
            (["restore-files", name, "--to", fresh, "--on-conflict", "replace"], EXIT_USAGE,
             "replace"),
            (["restore-files", name], EXIT_USAGE, "--to"),
            (["restore-files", name, "--to", a_file], EXIT_USAGE, "file"),
            (["restore-files", name, "--to", a_file / "below"], EXIT_GENERAL, "Not a directory"),
            (["restore-files", name, "--to", fresh, "--partition", "1"], EXIT_USAGE,
             "no partition table"),
            (["browse", "nosuch", self.tmp / "browsed"], EXIT_NOT_FOUND, "no snapshot"),
            (["browse", name, self.tmp / "nowhere"], EXIT_NOT_FOUND, "does not exist"),
            (["browse", name, self.sentinel], EXIT_GENERAL, "not empty"),
        ]
        if self.env.snapfs.repo and "://" not in self.env.snapfs.repo:
            cases.append((["restore-files", name, "--to", Path(self.env.snapfs.repo) / "x"],
                          EXIT_USAGE, "inside the repository"))
        args, code, said = rng.choice(cases)
        browsed = self.tmp / "browsed"
        browsed.mkdir()
        try:
            line = one_error(self.env.snapfs(*args), code)
        finally:
            browsed.rmdir()
        assert said in line, (args, line)
        assert not fresh.exists()
        a_file.unlink()
        self.note(f"refused {args[0]} ({said})")
        self.assert_outside_untouched(f"refused {args}")
        self.assert_nothing_left(f"refused {args}")


def written_before(tree: Tree, made: list[str]) -> dict[int, str]:
    """Inode -> a name of it that is not among ``made`` (``write_entries`` links to it)."""
    return {n: p for p, n in tree.entries.items() if p not in made}


def ancestors(path: str) -> list[str]:
    """The directories leading to ``path``, outermost first (not the root)."""
    names = path.split("/")[:-1]
    return ["/".join(names[: i + 1]) for i in range(len(names))]


def run_history(snapfs: Snapfs, seed: int, tmp: Path, versions: int = VERSIONS,
                restores: int = RESTORES) -> None:
    """``versions`` snapshots of a tree drawn from ``seed``, and ``restores`` restores, a browse
    and a refused command among them, in the order the seed says."""
    rng = random.Random(seed)
    snapfs.ok("init")
    with browse_env(snapfs, tmp) as env:
        history = History(env, rng, tmp)
        tree = history.version(None)
        steps = ["restore"] * restores + ["version"] * (versions - 1) + ["browse", "refused"]
        rng.shuffle(steps)
        for step in steps:
            if step == "version":
                tree = history.version(tree)
            else:
                getattr(history, step)()


def seeds(default: list[int]) -> list[int]:
    """The seeds to run: ``default``, or those of ``SNAPFS_RESTORE_SEEDS`` (``1-40``,
    ``3,17``)."""
    given = os.environ.get("SNAPFS_RESTORE_SEEDS")
    if not given:
        return default
    out: list[int] = []
    for part in given.split(","):
        first, _, last = part.partition("-")
        out += list(range(int(first), int(last or first) + 1))
    return out


@pytest.mark.parametrize("seed", seeds([2, 3]))
def test_restores_and_browses_of_random_trees_match_the_model(
        seed: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    run_history(Snapfs(str(tmp_path / "repo"), None, store_env(request, s3=False)), seed,
                tmp_path)


@pytest.mark.s3
def test_restores_from_s3_match_the_model(tmp_path: Path, request: pytest.FixtureRequest,
                                          s3_bucket: str) -> None:
    """A shorter history from a repository on S3: browse's own daemon reads it there."""
    seaweed = request.getfixturevalue("seaweed")
    repo = f"s3://{s3_bucket}/restore-history-{uuid.uuid4().hex[:12]}"
    run_history(Snapfs(repo, seaweed.endpoint_url, store_env(request, s3=True)), 3, tmp_path,
                versions=2, restores=3)


def test_the_model_reads_patterns_as_the_readme_says() -> None:
    """The model's own matcher, on README.md's examples (the measure must be right first)."""
    cases = [
        ("etc/*", "etc/passwd", False, True), ("etc/*", "etc/ssh/x", False, False),
        ("home/**/*.conf", "home/a.conf", False, True),
        ("home/**/*.conf", "home/u/.config/x.conf", False, True),
        ("**/core", "a/b/core", False, True), ("**/core", "core", False, True),
        ("var/**", "var", True, False), ("var/**", "var/x", False, True),
        ("var/**", "var/x/y", False, True), ("var/log/", "var/log", False, False),
        ("var/log/", "var/log", True, True),
    ]
    for text, path, is_dir, expected in cases:
        parts: list[list[Piece] | None] = []
        for name in text.rstrip("/").split("/"):
            parts.append(None if name == "**" else [
                ("any", "") if c == "*" else ("lit", c) for c in name])
        pattern = Pattern(parts, text.endswith("/"), text)
        positions = pattern.start()
        names = path.split("/")
        for n, name in enumerate(names):
            positions = pattern.step(positions, name)
            if n < len(names) - 1:
                assert pattern.alive(positions) or not expected, (text, path)
        assert pattern.accepts(positions, is_dir) is expected, (text, path)

