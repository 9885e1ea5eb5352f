"""Copying files out of a mounted snapshot into a directory (``snapfs restore-files``).

This module owns the copy engine and the ``--include``/``--exclude`` patterns. It does not know
how the snapshot's filesystem got mounted (loop device, fuse2fs): ``restore_files`` takes a
directory tree, reads it without following a symlink, and recreates the selected part of it
under the target directory. It is blocking file I/O from start to end; async callers run it in a
worker thread.

What is kept: file data, mode, owner (when running as root; otherwise files belong to the
caller, as with tar), atime/mtime to the nanosecond, symlinks (their target text verbatim; never
followed), extended attributes, hard links, fifos and (as root) device nodes. Holes stay holes
where the source reports them via SEEK_DATA; where it cannot (FUSE, so fuse2fs) but has fewer
blocks than bytes (``st_blocks * 512 < st_size``), its 4 KiB blocks of zeros are left unwritten,
so a sparse file stays sparse (a file without holes is written as it is, zeros included).
fuse2fs shows times in whole seconds: restored through it, the nanoseconds are zero.

``user.*`` and ``trusted.*`` attributes must be kept or the entry fails; ``system.*`` (ACLs)
and ``security.*`` (SELinux labels, capabilities) are copied where the target accepts them and
silently dropped where it does not. An entry's ACLs are the snapshot's, never more: a default
ACL in the target (of the target directory, an existing directory, or one restored with its
own default ACL) gives each entry created under it an ACL of its own, so every entry is
stripped of ``system.posix_acl_access``/``system.posix_acl_default`` as soon as it is created
(a file before its data goes in, a directory before anything goes into it; the group bits are
cleared first, as without the ACL they would grant what the mask did), and then gets the
source's. Overwrite does the same to an existing directory whose metadata it restores, and
removes its other attributes the snapshot's directory lacks (all but ``security.*``), so that
they are the snapshot's rather than a mix.

Hard links are kept: the first name of a source inode with ``st_nlink > 1`` is copied, and each
later name becomes a link to that copy. The copy is found again by its path in the target,
re-opened one directory at a time from the target root (``O_DIRECTORY|O_NOFOLLOW``), linked under
a temporary name and renamed into place; the link is checked to be the copy's inode before it
is used. Should any of that fail (the copy moved or replaced, ``EMLINK``, a link not allowed
there), the name is copied instead and later names link to that copy. Links between symlinks or
special files are not kept (each name is recreated).

Fifos are recreated, block and character devices too when running as root (``mknod`` needs it);
sockets, and devices when not root, are left out: each counts as skipped and is listed in
``RestoreReport.special``. ``lost+found`` at the root is left out silently, unless an include
names it (not a wildcard: ``lost+found`` or ``lost+found/#12``), as after an fsck that put the
files it recovered there. The target directory
itself is taken as given (created if missing, its own metadata untouched); ``restored`` and
``skipped`` count non-directory entries, directories are created as needed and counted only
when they fail.

The safety invariant: nothing in the snapshot, and nothing already in the target, can make a
write land outside the target directory. It holds because

- every name is a single path component (a name with ``/``, or ``.``/``..``, from a crafted
  image fails), and every call takes it relative to a directory fd, never as a path string;
- directories in the target are opened with ``O_DIRECTORY|O_NOFOLLOW`` one level at a time from
  the target root's fd, so a symlink at a directory's place (already there, or restored earlier
  in this run) fails that directory and its subtree instead of being followed; the directory of
  a hard link's first copy is re-opened the same way;
- files are written under a fresh temporary name opened ``O_CREAT|O_EXCL|O_NOFOLLOW`` in their
  final directory and renamed over the final name when complete. ``rename`` replaces whatever
  entry is there (a symlink is replaced, not written through), and an interrupted restore never
  leaves a partial file under a real name. Links, symlinks, fifos and devices are made under a
  temporary name too;
- metadata calls on symlinks use ``follow_symlinks=False``; xattrs of a symlink are reached via
  ``/proc/self/fd/<dir fd>/<name>``, which pins the directory and does not follow the link. A
  fifo or device is opened ``O_PATH|O_NOFOLLOW`` right after ``mknod`` and its type checked;
  its owner, mode, xattrs and times are then set through ``/proc/self/fd/<fd>``, the inode the
  fd holds, never through a path a planted symlink could redirect.

Conflicts (an entry already at a name): in skip mode (the default) a file, symlink or special
file whose name is taken by anything (a directory too) is skipped and counted; in overwrite
mode it replaces a non-directory and fails where a directory stands (overwrite replaces entries,
it never removes trees). A directory already in the target is merged into (its metadata is
restored only with overwrite); a directory whose name is taken by a non-directory or a symlink
fails with its whole subtree, in either mode. The conflict check happens before the copy; a
concurrent writer creating the same name meanwhile can lose its entry to ours, which concerns
correctness only, never the invariant above. Files are not fsynced.

Errors on one entry (an EIO reading the snapshot, a symlink in the way) are counted in
``failed`` with a reason and the run goes on. The target filling up is an entry's failure too
when it happens while a file's data is written: its temporary file is removed, which gives the
space back, and the run goes on with the next entry, which may well fit. The run stops
(``NoSpace``, that entry counted as failed) when the target can take nothing more:

- creating an entry (a directory, a temporary name, a link, a rename) fails with ``ENOSPC`` or
  ``EDQUOT``;
- after a file did not fit and was removed, the target's filesystem has less than ``MIN_FREE``
  (1 MiB) free (``statvfs``; for root, the reserved blocks count as free);
- the file that did not fit was itself smaller than ``MIN_FREE``: the only sign of a full quota,
  which ``statvfs`` does not show.

A read-only target stops the run at once (``SnapfsError``). A ``report`` passed in to
``restore_files`` holds what was done up to the stop; directories left unfinished by it keep
the private mode (0700) they were made with.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from snapfs.errors import NoSpace, SnapfsError, StoreUnavailable, UsageError
from snapfs.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: the unit of the holes left where the source cannot show its own (blocks of zeros)
HOLE_BLOCK = 4096
#: Deeper directories fail: each level holds two fds open (source and target) and one frame.
MAX_DEPTH = 256
#: a target with less free space than this after a file did not fit, or where a file smaller
#: than this did not fit, takes nothing more: the restore stops (see the module docstring)
MIN_FREE = 1 << 20
LOST_FOUND = "lost+found"
ON_CONFLICT = ("skip", "overwrite")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a name turn into a fifo between listing and opening, open must not hang
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_OPTIONAL_XATTRS = ("system.", "security.")
_ACL_ACCESS = "system.posix_acl_access"
_ACLS = (_ACL_ACCESS, "system.posix_acl_default")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_FATAL_TARGET_ERRORS = {errno.ENOSPC: NoSpace, errno.EDQUOT: NoSpace, errno.EROFS: SnapfsError}
#: the special files made again (devices only by root); sockets never are
_MADE_BY_MKNOD = (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK)
_SPECIAL_KINDS = {
    stat.S_IFBLK: "block device", stat.S_IFCHR: "character device",
    stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


# -- patterns -------------------------------------------------------------------------------

_States = frozenset[int]


class PathPattern:
    """One ``--include``/``--exclude`` pattern, matched one path component at a time.

    Patterns are anchored at the root of the snapshot's filesystem (a leading ``/`` changes
    nothing): ``etc/*`` matches the entries of ``/etc``, ``*.conf`` only files at the root.
    Within a component ``*``, ``?`` and ``[...]`` work as in fnmatch (case-sensitive, ``*``
    matches a leading dot too, ``[*]`` is a literal star) and never match ``/``. A backslash
    makes the character after it literal, as restic's and rsync's patterns do: ``a\\*b`` is the
    name ``a*b`` alone, ``\\[1]`` the name ``[1]``, ``a\\\\b`` a name with one backslash (inside
    ``[...]`` a backslash is itself, as every character there is literal). A component that
    is exactly ``**`` matches any number of directories, including none: ``home/**/*.conf`` matches
    ``home/a.conf`` and ``home/u/.config/x.conf``, ``**/core`` a ``core`` anywhere; at the end it
    takes at least one (as in gitignore and rsync): ``etc/**`` matches what is inside ``etc``, not
    ``etc`` itself, so ``--exclude 'etc/**'`` restores an empty ``etc``. A trailing ``/``
    restricts a pattern to directories. A pattern that matches a directory selects its whole
    subtree; that is the caller's rule (``PathSelector``), this class only matches.

    Matching is a small NFA over the components: a state is the index of the next pattern
    component to match, so a directory can be asked both "do you match?" and "could something
    below you match?" (whether it is worth descending into).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.dir_only = text.endswith("/")
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if not parts:
            raise UsageError(f"empty path pattern: {text!r}")
        if ".." in parts:
            raise UsageError(f"path pattern with '..': {text!r} (patterns are relative to the root)")
        globs = [_unescaped(p, text) for p in parts]
        #: the first component's name, if it is one name and not a wildcard
        self.first_name = globs[0][1]
        # None stands for a ** component (as written: \*\* is the name "**"); a final one
        # takes at least one component
        self._parts: list[re.Pattern[str] | None] = [
            None if p == "**" else re.compile(fnmatch.translate(glob))
            for p, (glob, _name) in zip(parts, globs, strict=True)
        ]
        if parts[-1] == "**":
            self._parts.insert(-1, re.compile(fnmatch.translate("*")))

    def __repr__(self) -> str:
        return f"PathPattern({self.text!r})"

    def start(self) -> _States:
        return self._closure({0})

    def step(self, states: _States, name: str) -> _States:
        """The states after matching one more path component, ``name``."""
        after = set()
        for i in states:
            if i == len(self._parts):
                continue
            part = self._parts[i]
            if part is None:
                after.add(i)  # ** takes this component and may take more
            elif part.match(name):
                after.add(i + 1)
        return self._closure(after)

    def accepts(self, states: _States, is_dir: bool) -> bool:
        return len(self._parts) in states and (is_dir or not self.dir_only)

    def alive(self, states: _States) -> bool:
        """Whether a path below the one that led to ``states`` could still match."""
        return any(i < len(self._parts) for i in states)

    def matches(self, path: str, is_dir: bool = False) -> bool:
        """Whether the pattern matches ``path`` itself (not counting the subtree rule)."""
        states = self.start()
        for name in _components(path):
            states = self.step(states, name)
        return self.accepts(states, is_dir)

    def _closure(self, states: set[int]) -> _States:
        # a ** may also match no component at all: being before it is being after it
        todo = list(states)
        while todo:
            i = todo.pop()
            if i < len(self._parts) and self._parts[i] is None and i + 1 not in states:
                states.add(i + 1)
                todo.append(i + 1)
        return frozenset(states)


@dataclass(frozen=True)
class Selection:
    """Where a walk stands for the patterns: one directory's view of them."""

    #: this path is selected (it or an ancestor matched an include, or there are no includes)
    selected: bool
    includes: tuple[_States, ...]
    excludes: tuple[_States, ...]


class PathSelector:
    """Which paths a restore takes: all, or the included ones, less the excluded ones.

    A path is taken when it (or a directory above it) matches an include, or when there are no
    includes, and neither it nor a directory above it matches an exclude. Directories on the way
    to an included path are walked (and created in the target when something goes into them),
    but not taken whole.
    """

    def __init__(self, includes: tuple[str, ...] = (), excludes: tuple[str, ...] = ()) -> None:
        self.includes = [PathPattern(p) for p in includes]
        self.excludes = [PathPattern(p) for p in excludes]
        #: an include names the root's lost+found (which is otherwise left out)
        self.names_lost_found = any(p.first_name == LOST_FOUND for p in self.includes)
        #: the includes that took a path so far (their indexes): one that takes nothing is
        #: most likely a typo, which the user should hear of
        self.included: set[int] = set()

    def root(self) -> Selection:
        return Selection(
            selected=not self.includes,
            includes=tuple(p.start() for p in self.includes),
            excludes=tuple(p.start() for p in self.excludes),
        )

    def child(self, parent: Selection, name: str, is_dir: bool) -> Selection | None:
        """The selection of ``name`` in ``parent``; None when it is not taken nor walked."""
        excludes = _step(self.excludes, parent.excludes, name)
        if any(p.accepts(s, is_dir) for p, s in zip(self.excludes, excludes, strict=True)):
            return None
        includes = _step(self.includes, parent.includes, name)
        taking = [i for i, (p, s) in enumerate(zip(self.includes, includes, strict=True))
                  if p.accepts(s, is_dir)]
        self.included.update(taking)
        if parent.selected or taking:
            # taken whatever the includes say below; they are still followed, but only those
            # that have taken nothing yet: an include inside a directory that another include
            # takes (``etc`` and ``etc/passwd``) matched its path all the same
            return Selection(True, self._unmatched(includes), excludes)
        if is_dir and any(p.alive(s) for p, s in zip(self.includes, includes, strict=True)):
            return Selection(False, includes, excludes)
        return None

    def _unmatched(self, includes: tuple[_States, ...]) -> tuple[_States, ...]:
        """The states of the includes that have taken no path yet; none for the others, which
        costs nothing to step."""
        return tuple(frozenset() if i in self.included else s for i, s in enumerate(includes))

    def selects(self, path: str, is_dir: bool = False) -> bool:
        """Whether ``path`` is taken; every component but the last is taken as a directory."""
        where: Selection | None = self.root()
        names = _components(path)
        for n, name in enumerate(names):
            assert where is not None
            where = self.child(where, name, is_dir or n < len(names) - 1)
            if where is None:
                return False
        return where is not None and where.selected


def _unescaped(part: str, text: str) -> tuple[str, str | None]:
    """One pattern component, its backslash escapes said in fnmatch's own terms (which has
    none: ``\\*`` becomes ``[*]``), and the one name it matches if it has no wildcard."""
    glob: list[str] = []
    name: list[str] | None = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        if c == "\\":
            if i + 1 == n:
                raise UsageError(f"path pattern {text!r} has a '\\' with nothing after it to "
                                 "make literal ('\\\\' is a backslash)")
            c = part[i + 1]
            glob.append(f"[{c}]" if c in "*?[" else c)
            if name is not None:
                name.append(c)
            i += 2
            continue
        if c == "[":  # a bracket as fnmatch finds it, written on as it is
            j = i + 1
            if j < n and part[j] == "!":
                j += 1
            if j < n and part[j] == "]":
                j += 1
            while j < n and part[j] != "]":
                j += 1
            if j < n:
                glob.append(part[i : j + 1])
                name = None
                i = j + 1
                continue
            c = "[[]"  # none closes it: fnmatch takes it for itself too
            if name is not None:
                name.append("[")
        elif c in "*?":
            name = None
        elif name is not None:
            name.append(c)
        glob.append(c)
        i += 1
    return "".join(glob), None if name is None else "".join(name)


def _step(patterns: list[PathPattern], states: tuple[_States, ...], name: str
          ) -> tuple[_States, ...]:
    return tuple(p.step(s, name) for p, s in zip(patterns, states, strict=True))


def _components(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


# -- the API --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreOptions:
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    on_conflict: str = "skip"

    def __post_init__(self) -> None:
        if self.on_conflict not in ON_CONFLICT:
            raise UsageError(f"on_conflict must be one of {', '.join(ON_CONFLICT)}, "
                             f"not {self.on_conflict!r}")
        PathSelector(self.includes, self.excludes)  # a bad pattern fails before anything mounts


@dataclass
class RestoreReport:
    #: non-directory entries written (files, hard links, symlinks, fifos, devices)
    restored: int = 0
    #: of ``restored``, the names made as a hard link to a file restored earlier in the run
    links: int = 0
    #: entries left alone: already in the target (skip mode), or special files left out
    skipped: int = 0
    #: entries (directories included) that could not be restored, or only in part
    failed: int = 0
    #: data bytes copied: the sizes of the files restored as copies (holes included); a name
    #: made as a hard link adds nothing
    bytes: int = 0
    #: "path: reason" for each failed entry, paths relative to the snapshot's root
    failures: list[str] = field(default_factory=list)
    #: "path: kind" for each special file left out (sockets; devices when not root)
    special: list[str] = field(default_factory=list)
    #: the --include patterns that matched nothing in the snapshot (or only excluded paths)
    unmatched: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "restored": self.restored, "links": self.links, "skipped": self.skipped,
            "failed": self.failed, "bytes": self.bytes, "failures": list(self.failures),
            "special": list(self.special), "unmatched_includes": list(self.unmatched),
        }


def restore_files(
    source_root: str,
    target: str,
    options: RestoreOptions,
    progress: Progress = NO_PROGRESS,
    report: RestoreReport | None = None,
    source_failing: Callable[[], str | None] | None = None,
) -> RestoreReport:
    """Copy the selected entries of the tree at ``source_root`` into ``target``.

    ``target`` is created if missing and must not lie inside ``source_root``. Progress is
    reported in bytes of file data, against a total counted by a first walk of the selection.
    The report (``report`` if given, which then holds what was done when the run stops with an
    error) is returned. ``source_failing``, asked after reading a file's data failed, says why
    every read of the source will fail for now (its store does not answer), or None: the run
    then stops (``StoreUnavailable``) rather than wait out each file's read.
    """
    selector = PathSelector(options.includes, options.excludes)
    source_real, target_real = os.path.realpath(source_root), os.path.realpath(target)
    if os.path.commonpath([source_real, target_real]) == source_real:
        raise UsageError(f"the target {target} is inside the snapshot tree {source_root}")
    try:
        source_fd = os.open(source_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SnapfsError(f"cannot read {source_root}: {e.strerror}") from None
    try:
        try:
            os.makedirs(target, exist_ok=True)
            target_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise SnapfsError(f"cannot use {target} as the target: {e.strerror}") from None
        try:
            restorer = _Restorer(selector, options, progress, report or RestoreReport(),
                                 target_fd, source_failing)
            progress.start("restore", restorer.scan(source_fd, "", selector.root(), 0))
            root = _Dir(None, "", "", None, source_fd, target_fd)
            restorer.restore_dir(root, selector.root(), 0)
            restorer.report.unmatched = [text for i, text in enumerate(options.includes)
                                         if i not in selector.included]
            return restorer.report
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


# -- the copy engine ------------------------------------------------------------------------


class _EntryFailed(Exception):
    """One entry cannot be restored; the message is the reason shown to the user."""


class _SourceReadFailed(_EntryFailed):
    """Reading a file's data from the snapshot failed (``restore_files``' ``source_failing``
    says whether the rest would fail too)."""


class _Abandoned(Exception):
    """A target directory could not be made; the walk leaves its subtree (reported once)."""

    def __init__(self, where: _Dir) -> None:
        self.where = where


class _Dir:
    """A directory of the source and its counterpart in the target.

    The target side is opened (created if needed) only when something goes into it, so the
    directories leading to an included path exist in the target only if that path does.
    """

    def __init__(self, parent: _Dir | None, name: str, rel: str, st: os.stat_result | None,
                 source_fd: int, target_fd: int | None = None) -> None:
        self.parent = parent
        self.name = name
        self.rel = rel
        self.st = st
        self.source_fd = source_fd
        self.target_fd = target_fd
        #: we created it, or overwrite asked for its metadata: set mode and times when done
        self.restore_metadata = False


@dataclass(frozen=True)
class _Copy:
    """Where the first name of a hard-linked source inode was restored."""

    #: the directory's path below the target root, one name a component
    directory: tuple[str, ...]
    name: str
    st_dev: int
    st_ino: int


class _NoRoom(Exception):
    """The target filled up while a file's data went in (its temporary file is removed)."""

    def __init__(self, e: OSError) -> None:
        super().__init__(e.strerror)
        self.error = e


class _Restorer:
    def __init__(self, selector: PathSelector, options: RestoreOptions, progress: Progress,
                 report: RestoreReport, target_root_fd: int,
                 source_failing: Callable[[], str | None] | None = None) -> None:
        self.selector = selector
        self.source_failing = source_failing
        self.overwrite = options.on_conflict == "overwrite"
        self.progress = progress
        self.report = report
        self.target_root_fd = target_root_fd
        self.keep_owner = os.geteuid() == 0
        # symlink xattrs, and all metadata of fifos and devices, are reached through
        # /proc/self/fd (no l*xattr call takes a dir fd, no f* call works on an O_PATH fd)
        self.have_proc_fd = os.path.isdir("/proc/self/fd")
        #: (st_dev, st_ino) of a hard-linked source file -> where its first name went
        self.copies: dict[tuple[int, int], _Copy] = {}

    def fail(self, rel: str, reason: str) -> None:
        log.debug("not restored: %s: %s", rel, reason)
        self.report.failed += 1
        self.report.failures.append(f"{rel}: {reason}")

    def left_out(self, path: str, kind: str) -> None:
        self.report.skipped += 1
        self.report.special.append(f"{path}: {kind}")

    # -- walking the source

    def entries(
        self, source_fd: int, rel: str, where: Selection, report: bool
    ) -> Iterator[tuple[str, str, os.stat_result, Selection]]:
        """(name, path, lstat, selection) of each taken or walked entry of a source directory.

        With ``report``, entries that cannot be listed or stat'ed count as failed; the first
        walk (counting bytes) passes False and leaves that to the second.
        """
        try:
            names = sorted(_list_names(source_fd))
        except OSError as e:
            if report:
                self.fail(rel or ".", f"cannot list the directory: {e.strerror}")
            return
        for name in names:
            if not rel and name == LOST_FOUND and not self.selector.names_lost_found:
                continue
            path = f"{rel}/{name}" if rel else name
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                if report:
                    self.fail(path, "not a valid file name (a damaged or crafted filesystem)")
                continue
            try:
                st = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
            except OSError as e:
                if report:
                    self.fail(path, f"cannot read its metadata: {e.strerror}")
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            child = self.selector.child(where, name, is_dir)
            if child is not None:
                yield name, path, st, child

    def scan(self, source_fd: int, rel: str, where: Selection, depth: int) -> int:
        """Bytes of the files a restore will take (the progress total; each name of a hard
        link counts, as each may turn out to be a copy)."""
        total = 0
        for name, path, st, child in self.entries(source_fd, rel, where, report=False):
            if stat.S_ISREG(st.st_mode) and child.selected:
                total += st.st_size
            elif stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=source_fd)
                except OSError:
                    continue
                try:
                    total += self.scan(fd, path, child, depth + 1)
                finally:
                    os.close(fd)
        return total

    def restore_dir(self, here: _Dir, where: Selection, depth: int) -> None:
        done = False
        try:
            if where.selected:
                self.target_dir(here)  # a taken directory exists even when empty
            for name, path, st, child in self.entries(here.source_fd, here.rel, where, True):
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    self.enter_dir(here, name, path, st, child, depth + 1)
                elif stat.S_ISREG(mode):
                    self.restore_file(here, name, path, st)
                elif stat.S_ISLNK(mode):
                    self.restore_symlink(here, name, path, st)
                else:
                    self.restore_special(here, name, path, st)
            done = True
        except _Abandoned as e:
            if e.where is not here:
                raise
        finally:
            if here.target_fd is not None and here.parent is not None:
                try:
                    if done and here.restore_metadata:
                        self.finish_dir(here)
                finally:
                    os.close(here.target_fd)
                    here.target_fd = None

    def enter_dir(self, parent: _Dir, name: str, path: str, st: os.stat_result,
                  where: Selection, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.fail(path, f"nested more than {MAX_DEPTH} directories deep")
            return
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent.source_fd)
        except OSError as e:
            self.fail(path, f"cannot open the directory: {e.strerror}")
            return
        try:
            self.restore_dir(_Dir(parent, name, path, st, fd), where, depth)
        finally:
            os.close(fd)

    # -- the target side

    def target_dir(self, here: _Dir) -> int:
        """The fd of ``here`` in the target, making it (and its parents) on first use."""
        if here.target_fd is not None:
            return here.target_fd
        assert here.parent is not None and here.st is not None
        parent_fd = self.target_dir(here.parent)
        try:
            try:
                os.mkdir(here.name, 0o700, dir_fd=parent_fd)  # private until finish_dir
                created = True
            except FileExistsError:
                created = False
            here.target_fd = os.open(here.name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as e:
            self.fatal_if_target_unusable(e, here.rel)
            reason = _in_the_way(parent_fd, here.name, "a directory") or e.strerror
            self.fail(here.rel, f"{reason}; nothing under it was restored")
            raise _Abandoned(here) from None
        here.restore_metadata = created or self.overwrite
        if here.restore_metadata:
            try:
                # before anything goes in: what goes in would inherit a default ACL
                self.drop_acls(here.target_fd)
            except OSError as e:
                self.fail(here.rel, f"cannot remove the ACLs the target gave it: {e.strerror}; "
                                    "nothing under it was restored")
                raise _Abandoned(here) from None
            try:
                self.set_owner(here.target_fd, here.st)
                if not created:  # overwrite: the snapshot's attributes, not a mix with the target's
                    self.drop_other_xattrs(here.source_fd, here.target_fd)
                self.copy_xattrs(here.source_fd, here.target_fd, follow=True)
            except (OSError, _EntryFailed) as e:
                self.fail(here.rel, _reason(e))  # the contents still go in
        return here.target_fd

    def finish_dir(self, here: _Dir) -> None:
        assert here.target_fd is not None and here.st is not None
        try:
            os.fchmod(here.target_fd, stat.S_IMODE(here.st.st_mode))
            os.utime(here.target_fd, ns=(here.st.st_atime_ns, here.st.st_mtime_ns))
        except OSError as e:
            self.fail(here.rel, f"cannot set mode or times: {e.strerror}")

    def conflict(self, parent_fd: int, name: str) -> bool:
        """Whether an entry at ``name`` keeps this one out (counted), or may be replaced."""
        try:
            there = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not self.overwrite:
            self.report.skipped += 1
            return True
        if stat.S_ISDIR(there.st_mode):  # overwrite replaces entries, it never removes trees
            raise _EntryFailed("the target has a directory in its place")
        return False

    def restore_file(self, parent: _Dir, name: str, path: str, st: os.stat_result) -> None:
        copied = 0

        def advance(n: int) -> None:
            nonlocal copied
            copied += n
            self.progress.advance(n)

        try:
            parent_fd = self.target_dir(parent)
            if self.conflict(parent_fd, name):
                return
            first = self.copies.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if first is not None and self.link(first, parent_fd, name, path):
                self.report.restored += 1
                self.report.links += 1
                return
            source = _open_in_snapshot(name, _READ_FLAGS, parent.source_fd)
            try:
                sst = os.fstat(source)
                if not stat.S_ISREG(sst.st_mode):
                    raise _EntryFailed("changed while being restored")
                copy = self.write_file(source, sst, parent_fd, name, advance)
            finally:
                os.close(source)
            self.report.restored += 1
            self.report.bytes += sst.st_size
            if sst.st_nlink > 1:  # later names link to this copy
                self.copies[(sst.st_dev, sst.st_ino)] = _Copy(
                    tuple(_components(parent.rel)), name, copy.st_dev, copy.st_ino)
        except _NoRoom as e:
            self.fail(path, f"no space for it in the target: {e}")
            self.stop_if_full(parent_fd, st.st_size, path, e.error)
        except (OSError, _EntryFailed) as e:
            self.fatal_if_target_unusable(e, path)
            self.fail(path, _reason(e))
            if isinstance(e, _SourceReadFailed):
                self.stop_if_source_fails(path)
        finally:
            if st.st_size > copied:
                self.progress.advance(st.st_size - copied)

    def write_file(self, source: int, sst: os.stat_result, parent_fd: int, name: str,
                   advance: Callable[[int], None]) -> os.stat_result:
        """Copy the open ``source`` to ``name``; the copy's stat."""
        temp = _temp_name()
        try:
            fd = os.open(temp, _CREATE_FLAGS, 0o600, dir_fd=parent_fd)
        except OSError:
            raise  # nothing made (with O_EXCL, a file of that name is someone else's)
        except BaseException:  # a stop signal handled the moment the file was made
            _unlink_quietly(parent_fd, temp)
            raise
        try:
            try:
                self.drop_acls(fd)  # before the data goes in
                try:
                    _copy_data(source, fd, sst.st_size,
                               skip_zeros=sst.st_blocks * 512 < sst.st_size, advance=advance)
                except OSError as e:
                    if e.errno in _NO_SPACE:
                        raise _NoRoom(e) from None
                    raise
                self.set_owner(fd, sst)
                # after chown, which drops capabilities; before chmod, while the file is still
                # ours to write (a non-root caller needs that to set user.* attributes)
                self.copy_xattrs(source, fd, follow=True)
                os.fchmod(fd, stat.S_IMODE(sst.st_mode))  # after chown, which clears set-id bits
                os.utime(fd, ns=(sst.st_atime_ns, sst.st_mtime_ns))
                copy = os.fstat(fd)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            _unlink_quietly(parent_fd, temp)
            raise
        return copy

    def link(self, first: _Copy, parent_fd: int, name: str, path: str) -> bool:
        """Make ``name`` a hard link to ``first``; False (and nothing made) when that cannot be
        done, for whatever reason: the caller copies the file instead."""
        temp = _temp_name()
        try:
            first_dir = self.open_target_dir(first.directory)
            try:
                os.link(first.name, temp, src_dir_fd=first_dir, dst_dir_fd=parent_fd,
                        follow_symlinks=False)
            finally:
                os.close(first_dir)
        except OSError as e:
            log.debug("%s: not linked to %s: %s", path, "/".join((*first.directory, first.name)),
                      e.strerror)
            return False
        try:
            # checked on the link itself, so that nothing put at the copy's name meanwhile
            # (a symlink, another file) is what ends up at ours
            made = os.stat(temp, dir_fd=parent_fd, follow_symlinks=False)
            if not (stat.S_ISREG(made.st_mode)
                    and (made.st_dev, made.st_ino) == (first.st_dev, first.st_ino)):
                log.debug("%s: the copy it would link to was replaced", path)
                _unlink_quietly(parent_fd, temp)
                return False
            os.rename(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            _unlink_quietly(parent_fd, temp)
            raise
        return True

    def open_target_dir(self, components: tuple[str, ...]) -> int:
        """A new fd of the target directory at ``components``, opened one level at a time from
        the target root, never following a symlink."""
        fd = os.open(".", _DIR_FLAGS, dir_fd=self.target_root_fd)
        try:
            for name in components:
                below = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = below
        except BaseException:
            os.close(fd)
            raise
        return fd

    def restore_symlink(self, parent: _Dir, name: str, path: str, st: os.stat_result) -> None:
        try:
            parent_fd = self.target_dir(parent)
            if self.conflict(parent_fd, name):
                return
            try:
                text = os.readlink(name, dir_fd=parent.source_fd)
            except OSError as e:
                raise _EntryFailed(f"cannot read the link in the snapshot: {e.strerror}") from None
            temp = _temp_name()
            os.symlink(text, temp, dir_fd=parent_fd)
            try:
                if self.keep_owner:
                    os.chown(temp, st.st_uid, st.st_gid, dir_fd=parent_fd, follow_symlinks=False)
                if self.have_proc_fd:
                    self.copy_xattrs(f"/proc/self/fd/{parent.source_fd}/{name}",
                                     f"/proc/self/fd/{parent_fd}/{temp}", follow=False)
                os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent_fd,
                         follow_symlinks=False)
                os.rename(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
            except BaseException:
                _unlink_quietly(parent_fd, temp)
                raise
            self.report.restored += 1
        except (OSError, _EntryFailed) as e:
            self.fatal_if_target_unusable(e, path)
            self.fail(path, _reason(e))

    def restore_special(self, parent: _Dir, name: str, path: str, st: os.stat_result) -> None:
        kind = stat.S_IFMT(st.st_mode)
        described = _SPECIAL_KINDS.get(kind, "special file")
        if (kind not in _MADE_BY_MKNOD or not self.have_proc_fd
                or (kind != stat.S_IFIFO and not self.keep_owner)):
            self.left_out(path, described)
            return
        try:
            parent_fd = self.target_dir(parent)
            if self.conflict(parent_fd, name):
                return
            source = _open_in_snapshot(name, _PATH_FLAGS, parent.source_fd)
            try:
                sst = os.fstat(source)
                if stat.S_IFMT(sst.st_mode) != kind or sst.st_rdev != st.st_rdev:
                    raise _EntryFailed("changed while being restored")
                self.make_special(f"/proc/self/fd/{source}", sst, parent_fd, name)
            finally:
                os.close(source)
            self.report.restored += 1
        except (OSError, _EntryFailed) as e:
            self.fatal_if_target_unusable(e, path)
            self.fail(path, _reason(e))

    def make_special(self, source: str, sst: os.stat_result, parent_fd: int, name: str) -> None:
        """A fifo or device node like ``sst`` (its xattrs read at ``source``) at ``name``."""
        kind = stat.S_IFMT(sst.st_mode)
        temp = _temp_name()
        if kind == stat.S_IFIFO:
            os.mkfifo(temp, 0o600, dir_fd=parent_fd)
        else:
            os.mknod(temp, kind | 0o600, sst.st_rdev, dir_fd=parent_fd)
        try:
            fd = os.open(temp, _PATH_FLAGS, dir_fd=parent_fd)
            try:
                made = os.fstat(fd)
                if stat.S_IFMT(made.st_mode) != kind or made.st_rdev != sst.st_rdev:
                    raise _EntryFailed("its temporary name was taken by something else")
                # the inode the fd holds: an O_PATH fd takes no f* call, and a path could lead
                # elsewhere should something replace the temporary name
                inode = f"/proc/self/fd/{fd}"
                self.drop_acls(inode)
                if self.keep_owner:
                    os.chown(inode, sst.st_uid, sst.st_gid)
                self.copy_xattrs(source, inode, follow=True)
                os.chmod(inode, stat.S_IMODE(sst.st_mode))
                os.utime(inode, ns=(sst.st_atime_ns, sst.st_mtime_ns))
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            _unlink_quietly(parent_fd, temp)
            raise

    # -- metadata

    def set_owner(self, fd: int, st: os.stat_result) -> None:
        if self.keep_owner:  # only root may give files away
            os.fchown(fd, st.st_uid, st.st_gid)

    @staticmethod
    def drop_acls(target: int | str) -> None:
        """Remove the POSIX ACLs of an entry just made (or whose metadata overwrite restores):
        those are the target's (inherited from a default ACL), the source's come with its other
        extended attributes."""
        try:
            present = [a for a in os.listxattr(target) if a in _ACLS]
        except OSError as e:
            if e.errno == errno.ENOTSUP:  # a target without xattrs has no ACLs either
                return
            raise
        if _ACL_ACCESS in present:
            # with an access ACL the group bits are the mask; without it they are what the
            # owning group gets, which may be more than its ACL entry said: clear them first
            mode = stat.S_IMODE(os.stat(target).st_mode)
            if mode & 0o070:
                os.chmod(target, mode & ~0o070)
        for attr in present:
            os.removexattr(target, attr)

    @staticmethod
    def drop_other_xattrs(source: int, target: int) -> None:
        """Remove the extended attributes of a directory already in the target, whose metadata
        overwrite restores, that the snapshot's directory does not have: ``copy_xattrs`` only
        sets, and the directory would end with the target's attributes beside the snapshot's.
        ``system.*`` (ACLs: ``drop_acls``) and ``security.*`` (the target system's labels) are
        left alone."""
        try:
            theirs = set(os.listxattr(source))
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise _EntryFailed(f"cannot list its extended attributes: {e.strerror}") from None
            theirs = set()  # a source filesystem without xattrs: the snapshot has none
        try:
            ours = os.listxattr(target)
        except OSError as e:
            if e.errno == errno.ENOTSUP:  # nor can the target have any
                return
            raise
        for attr in ours:
            if attr not in theirs and not attr.startswith(_OPTIONAL_XATTRS):
                os.removexattr(target, attr)

    def copy_xattrs(self, source: int | str, target: int | str, follow: bool) -> None:
        try:
            names = os.listxattr(source, follow_symlinks=follow)
        except OSError as e:
            if e.errno == errno.ENOTSUP:  # a source filesystem without xattrs
                return
            raise _EntryFailed(f"cannot list its extended attributes: {e.strerror}") from None
        for attr in names:
            try:
                value = os.getxattr(source, attr, follow_symlinks=follow)
                os.setxattr(target, attr, value, follow_symlinks=follow)
            except OSError as e:
                if attr.startswith(_OPTIONAL_XATTRS):
                    log.debug("extended attribute %s not kept: %s", attr, e.strerror)
                    continue
                raise _EntryFailed(
                    f"cannot keep the extended attribute {attr}: {e.strerror}") from None

    def fatal_if_target_unusable(self, e: BaseException, path: str) -> None:
        """A target that cannot take a new entry (full, read-only) fails every entry after this
        one: stop, this entry counted as failed."""
        if isinstance(e, OSError) and e.errno in _FATAL_TARGET_ERRORS:
            self.fail(path, _reason(e))
            raise _FATAL_TARGET_ERRORS[e.errno](
                f"cannot write {path} in the target: {e.strerror}; restore stopped") from e

    def stop_if_source_fails(self, path: str) -> None:
        """After reading ``path`` from the snapshot failed: stop if ``source_failing`` says
        why every read that needs the store will fail too (each would wait out its retries)."""
        reason = self.source_failing() if self.source_failing is not None else None
        if reason is not None:
            raise StoreUnavailable(f"reading {path} from the snapshot failed: its store is not "
                                   f"answering ({reason}); restore stopped (run it again once "
                                   "the store is back: what is restored is skipped)")

    def stop_if_full(self, dir_fd: int, size: int, path: str, e: OSError) -> None:
        """After a file of ``size`` bytes did not fit (and was removed): stop if the target
        can take nothing more (the rule is in the module docstring)."""
        try:
            fs = os.fstatvfs(dir_fd)
        except OSError:
            free = 0
        else:  # root may use the blocks a filesystem reserves
            free = (fs.f_bfree if self.keep_owner else fs.f_bavail) * fs.f_frsize
        if size < MIN_FREE or free < MIN_FREE:
            raise NoSpace(f"cannot write {path} in the target: {e.strerror}; restore stopped "
                          f"({free // 1024} KiB free)") from e


def _copy_data(source: int, target: int, size: int, skip_zeros: bool,
               advance: Callable[[int], None]) -> None:
    """Copy ``size`` bytes in chunks, leaving the source's holes as holes in the target, and
    with ``skip_zeros`` leaving unwritten the blocks of zeros of what the source calls data."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(source, offset, os.SEEK_DATA)
            end = min(os.lseek(source, start, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                break
            if e.errno != errno.EINVAL:
                raise _SourceReadFailed(f"reading it from the snapshot failed: {e.strerror}") from None
            start, end = offset, size  # no SEEK_DATA here: all of it is data
        if start >= size:
            break
        advance(start - offset)
        while start < end:
            try:
                data = os.pread(source, min(CHUNK, end - start), start)
            except OSError as e:
                raise _SourceReadFailed(f"reading it from the snapshot failed: {e.strerror}") from None
            if not data:
                raise _EntryFailed("it became shorter while being restored")
            for run_start, run_end in (_data_runs(data) if skip_zeros else [(0, len(data))]):
                view = memoryview(data)[run_start:run_end]
                at = start + run_start
                while view:
                    written = os.pwrite(target, view, at)
                    view = view[written:]
                    at += written
            start += len(data)
            advance(len(data))
        offset = end
    os.ftruncate(target, size)  # a trailing hole
    advance(size - offset if offset < size else 0)


def _data_runs(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of the parts of ``data`` that are not whole ``HOLE_BLOCK``s of zeros."""
    run: int | None = None
    for block in range(0, len(data), HOLE_BLOCK):
        end = min(block + HOLE_BLOCK, len(data))
        if data.count(0, block, end) == end - block:
            if run is not None:
                yield run, block
                run = None
        elif run is None:
            run = block
    if run is not None:
        yield run, len(data)


def _open_in_snapshot(name: str, flags: int, dir_fd: int) -> int:
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        raise _EntryFailed(f"cannot open it in the snapshot: {e.strerror}") from None


def _list_names(fd: int) -> list[str]:
    with os.scandir(fd) as it:
        return [entry.name for entry in it]


def _in_the_way(parent_fd: int, name: str, wanted: str) -> str | None:
    """Why ``name`` in the target cannot be used as ``wanted``, if something else is there."""
    try:
        there = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return None
    if stat.S_ISLNK(there.st_mode):
        return f"the target has a symlink where {wanted} goes (not followed)"
    if not stat.S_ISDIR(there.st_mode):
        return f"the target has a non-directory where {wanted} goes"
    return None


def _temp_name() -> str:
    return f".snapfs-restore-{secrets.token_hex(8)}"


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _reason(e: OSError | _EntryFailed) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)
