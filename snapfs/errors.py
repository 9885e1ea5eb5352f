"""The one exception hierarchy of snapfs.

Every error a user can cause or meet is a ``SnapfsError`` carrying a one-line message and the
exit code the CLI returns. Library code raises these; the CLI prints the message alone (a
traceback only with ``--debug``); the FUSE layer maps them to errno values.

Exit codes: 1 general failure, 2 bad usage (click), 3 something named was not found,
4 data integrity (a missing or corrupt block), 5 the store could not be reached or refused us,
6 the repository is locked by another process.
"""

from __future__ import annotations


class SnapfsError(Exception):
    """Base of every error snapfs reports to a user."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(SnapfsError):
    """An argument that cannot be right (bad size, bad name)."""

    exit_code = 2


class NotFoundError(SnapfsError):
    exit_code = 3


class RepositoryNotFound(NotFoundError):
    """No repository at the given location."""


class SnapshotNotFound(NotFoundError):
    """A snapshot reference matched nothing."""


class AmbiguousSnapshot(SnapfsError):
    """A snapshot reference matched more than one snapshot."""


class RepositoryExists(SnapfsError):
    """``init`` over something that is already a repository (or not empty)."""


class FormatError(SnapfsError):
    """An object whose magic or version this snapfs does not know."""


class DuplicateName(SnapfsError):
    """A snapshot name that another snapshot already has."""


class SourceError(SnapfsError):
    """The disk being snapshotted cannot be read, or is not a disk we accept."""


class SourceChanged(SourceError):
    """The source's size or contents changed while the snapshot was taken."""


class IntegrityError(SnapfsError):
    """Stored data is missing or does not match its checksum."""

    exit_code = 4


class CorruptBlock(IntegrityError):
    pass


class MissingBlock(IntegrityError):
    pass


class RootsUnreadable(IntegrityError):
    """A snapshot root that is listed cannot be read (damaged, or of an unknown format): what
    needs that snapshot, or needs to know every snapshot, cannot go on."""


class PackMissing(MissingBlock):
    """A pack the index names is not in the store (deleted, or repacked by garbage collection
    since the index was read)."""


class StoreError(SnapfsError):
    """The object store failed in a way retries could not fix."""

    exit_code = 5


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused, timeouts, 5xx after retries)."""


class AccessDenied(StoreError):
    """The store refused our credentials or permissions."""


class ObjectNotFound(StoreError):
    """A key the caller expected is absent. Mostly caught and turned into a domain error."""

    exit_code = 3


class RepositoryLocked(SnapfsError):
    """Another process holds a lock that conflicts with this operation."""

    exit_code = 6


class KeptBlocksLost(IntegrityError):
    """A snapshot still uploading kept a block's contents at its closing aside, and a failed
    flush may have lost them: the block cannot be read as of that closing."""


class NoSpace(SnapfsError):
    """The local disk filled up while writing."""


class MountError(SnapfsError):
    """A mount point or mount daemon that cannot be used as asked (not empty, already mounted,
    busy, a daemon that does not answer)."""


class MountBusy(MountError):
    """A mount that cannot be undone now: a process (or a loop device) still uses it."""


class NotMounted(NotFoundError):
    """Nothing (or no snapfs daemon) is mounted where the user pointed."""


class NoDiskDaemon(NotMounted):
    """No snapfs mount of a repository runs on this host, so nothing serves its disks."""


class Interrupted(SnapfsError):
    """^C (or SIGTERM, SIGHUP) after a command had done part of its work that cannot be undone:
    the message says what was done."""

    exit_code = 130
