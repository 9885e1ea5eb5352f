"""Copying files out of a mounted snapshot into a directory (``snapfs restore-files``).

This module owns the copy engine and the ``--include``/``--exclude`` patterns. It does not know
how the snapshot's filesystem got mounted (loop device, fuse2fs): ``restore_files`` takes a
directory tree, reads it without following a symlink, and recreates the selected part of it
under the target directory. It is blocking file I/O from start to end; async callers run it in a
worker thread.

What is kept: file data (holes stay holes where the source reports them via SEEK_DATA), mode,
owner (when running as root; otherwise files belong to the caller, as with tar), atime/mtime to
the nanosecond, symlinks (their target text verbatim; never followed) and extended attributes.
``user.*`` and ``trusted.*`` attributes must be kept or the entry fails; ``system.*`` (ACLs)
and ``security.*`` (SELinux labels, capabilities) are copied where the target accepts them and
silently dropped where it does not. Hard links are copied as separate files. Special files
(devices, fifos, sockets) are not recreated: each counts as skipped and is listed in
``RestoreReport.special``. ``lost+found`` at the root is left out silently. The target directory
itself is taken as given (created if missing, its own metadata untouched); ``restored`` and
``skipped`` count non-directory entries, directories are created as needed and counted only
when they fail.

The safety invariant: nothing in the snapshot, and nothing already in the target, can make a
write land outside the target directory. It holds because

- every name is a single path component (a name with ``/``, or ``.``/``..``, from a crafted
  image fails), and every call takes it relative to a directory fd, never as a path string;
- directories in the target are opened with ``O_DIRECTORY|O_NOFOLLOW`` one level at a time from
  the target root's fd, so a symlink at a directory's place (already there, or restored earlier
  in this run) fails that directory and its subtree instead of being followed;
- files are written under a fresh temporary name opened ``O_CREAT|O_EXCL|O_NOFOLLOW`` in their
  final directory and renamed over the final name when complete. ``rename`` replaces whatever
  entry is there (a symlink is replaced, not written through), and an interrupted restore never
  leaves a partial file under a real name;
- metadata calls on symlinks use ``follow_symlinks=False``; xattrs of a symlink are reached via
  ``/proc/self/fd/<dir fd>/<name>``, which pins the directory and does not follow the link.

Conflicts (an entry already at a file's name) are skipped, or replaced with
``on_conflict="overwrite"``. A directory already in the target is merged into (its metadata is
restored only with overwrite); a directory never replaces a file and a file never replaces a
directory, in either mode (that entry fails). The skip check happens before the copy; a
concurrent writer creating the same name meanwhile can lose its entry to ours, which concerns
correctness only, never the invariant above. Files are not fsynced.

Errors on one entry (an EIO reading the snapshot, a symlink in the way) are counted in
``failed`` with a reason and the run goes on; a full disk or a read-only target ends the run
(``NoSpace``/``SnapfsError``), as every further entry would fail the same way.
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

from snapfs.errors import NoSpace, SnapfsError, UsageError
from snapfs.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Deeper directories fail: each level holds two fds open (source and target) and one frame.
MAX_DEPTH = 256
LOST_FOUND = "lost+found"
ON_CONFLICT = ("skip", "overwrite")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a name turn into a fifo between listing and opening, open must not hang
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPTIONAL_XATTRS = ("system.", "security.")
_FATAL_TARGET_ERRORS = {errno.ENOSPC: NoSpace, errno.EDQUOT: NoSpace, errno.EROFS: SnapfsError}
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
    matches a leading dot too, ``[*]`` is a literal star) and never match ``/``. A component that
    is exactly ``**`` matches any number of directories, including none: ``home/**/*.conf`` matches
    ``home/a.conf`` and ``home/u/.config/x.conf``, ``**/core`` a ``core`` anywhere. A trailing
    ``/`` restricts a pattern to directories. A pattern that matches a directory selects its whole
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
        # None stands for a ** component
        self._parts: list[re.Pattern[str] | None] = [
            None if p == "**" else re.compile(fnmatch.translate(p)) for p in parts
        ]

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
        if parent.selected:  # the include states no longer matter below a taken directory
            return Selection(True, (), excludes)
        includes = _step(self.includes, parent.includes, name)
        if any(p.accepts(s, is_dir) for p, s in zip(self.includes, includes, strict=True)):
            return Selection(True, (), excludes)
        if is_dir and any(p.alive(s) for p, s in zip(self.includes, includes, strict=True)):
            return Selection(False, includes, excludes)
        return None

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
    #: non-directory entries written (files, symlinks)
    restored: int = 0
    #: entries left alone: already in the target (skip mode) or special files
    skipped: int = 0
    #: entries (directories included) that could not be restored, or only in part
    failed: int = 0
    #: data bytes of the restored files (their sizes; holes count)
    bytes: int = 0
    #: "path: reason" for each failed entry, paths relative to the snapshot's root
    failures: list[str] = field(default_factory=list)
    #: "path: kind" for each special file skipped
    special: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "restored": self.restored, "skipped": self.skipped, "failed": self.failed,
            "bytes": self.bytes, "failures": list(self.failures), "special": list(self.special),
        }


def restore_files(
    source_root: str,
    target: str,
    options: RestoreOptions,
    progress: Progress = NO_PROGRESS,
) -> RestoreReport:
    """Copy the selected entries of the tree at ``source_root`` into ``target``.

    ``target`` is created if missing and must not lie inside ``source_root``. Progress is
    reported in bytes of file data, against a total counted by a first walk of the selection.
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
            restorer = _Restorer(selector, options, progress)
            progress.start("restore", restorer.scan(source_fd, "", selector.root(), 0))
            root = _Dir(None, "", "", None, source_fd, target_fd)
            restorer.restore_dir(root, selector.root(), 0)
            return restorer.report
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


# -- the copy engine ------------------------------------------------------------------------


class _EntryFailed(Exception):
    """One entry cannot be restored; the message is the reason shown to the user."""


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


class _Restorer:
    def __init__(self, selector: PathSelector, options: RestoreOptions, progress: Progress):
        self.selector = selector
        self.overwrite = options.on_conflict == "overwrite"
        self.progress = progress
        self.report = RestoreReport()
        self.keep_owner = os.geteuid() == 0
        # symlink xattrs are reached through /proc/self/fd (no l*xattr call takes a dir fd)
        self.have_proc_fd = os.path.isdir("/proc/self/fd")

    def fail(self, rel: str, reason: str) -> None:
        log.debug("not restored: %s: %s", rel, reason)
        self.report.failed += 1
        self.report.failures.append(f"{rel}: {reason}")

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
            if not rel and name == LOST_FOUND:
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
        """Bytes of the files a restore will take (the progress total)."""
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
                    kind = _SPECIAL_KINDS.get(stat.S_IFMT(mode), "special file")
                    self.report.skipped += 1
                    self.report.special.append(f"{path}: {kind}")
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
                self.set_owner(here.target_fd, here.st)
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
            try:
                source = os.open(name, _READ_FLAGS, dir_fd=parent.source_fd)
            except OSError as e:
                raise _EntryFailed(f"cannot open it in the snapshot: {e.strerror}") from None
            try:
                sst = os.fstat(source)
                if not stat.S_ISREG(sst.st_mode):
                    raise _EntryFailed("changed while being restored")
                self.write_file(source, sst, parent_fd, name, advance)
            finally:
                os.close(source)
            self.report.restored += 1
            self.report.bytes += sst.st_size
        except (OSError, _EntryFailed) as e:
            self.fatal_if_target_unusable(e, path)
            self.fail(path, _reason(e))
        finally:
            if st.st_size > copied:
                self.progress.advance(st.st_size - copied)

    def write_file(self, source: int, sst: os.stat_result, parent_fd: int, name: str,
                   advance: Callable[[int], None]) -> None:
        temp = _temp_name()
        fd = os.open(temp, _CREATE_FLAGS, 0o600, dir_fd=parent_fd)
        try:
            try:
                _copy_data(source, fd, sst.st_size, advance)
                self.set_owner(fd, sst)
                os.fchmod(fd, stat.S_IMODE(sst.st_mode))  # after chown, which clears set-id bits
                self.copy_xattrs(source, fd, follow=True)  # after chown, which drops capabilities
                os.utime(fd, ns=(sst.st_atime_ns, sst.st_mtime_ns))
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        except BaseException:
            _unlink_quietly(parent_fd, temp)
            raise

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

    # -- metadata

    def set_owner(self, fd: int, st: os.stat_result) -> None:
        if self.keep_owner:  # only root may give files away
            os.fchown(fd, st.st_uid, st.st_gid)

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

    @staticmethod
    def fatal_if_target_unusable(e: BaseException, path: str) -> None:
        """A full disk or read-only target would fail every entry after this one: stop."""
        if isinstance(e, OSError) and e.errno in _FATAL_TARGET_ERRORS:
            raise _FATAL_TARGET_ERRORS[e.errno](
                f"cannot write {path} in the target: {e.strerror}; restore stopped") from e


def _copy_data(source: int, target: int, size: int, advance: Callable[[int], None]) -> None:
    """Copy ``size`` bytes in chunks, leaving the source's holes as holes in the target."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(source, offset, os.SEEK_DATA)
            end = min(os.lseek(source, start, os.SEEK_HOLE), size)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                break
            if e.errno != errno.EINVAL:
                raise _EntryFailed(f"reading it from the snapshot failed: {e.strerror}") from None
            start, end = offset, size  # no SEEK_DATA here: all of it is data
        if start >= size:
            break
        advance(start - offset)
        while start < end:
            try:
                data = os.pread(source, min(CHUNK, end - start), start)
            except OSError as e:
                raise _EntryFailed(f"reading it from the snapshot failed: {e.strerror}") from None
            if not data:
                raise _EntryFailed("it became shorter while being restored")
            view = memoryview(data)
            while view:
                written = os.pwrite(target, view, start)
                view = view[written:]
                start += written
            advance(len(data))
        offset = end
    os.ftruncate(target, size)  # a trailing hole
    advance(size - offset if offset < size else 0)


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
