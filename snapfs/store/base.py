"""The object-store interface every backend implements.

Keys are ``/``-separated relative paths (``packs/ab/abcd…``). Every call blocks and is safe to
make from many threads at once; async callers go through ``trio.to_thread.run_sync`` with a
``CapacityLimiter`` of at most ``concurrency``. ``put`` is atomic: a reader sees the whole
object or none of it. Errors are ``ObjectNotFound`` for a missing key, ``StoreUnavailable`` or
``AccessDenied`` after bounded retries, never a backend's own exception type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator


class ObjectStore(ABC):
    #: how many calls may usefully run at once (sizes the callers' limiters and pools)
    concurrency: int = 8
    #: tries each call makes before it raises (1: it does not retry; a caller that retries on
    #: its own counts these, so that retries do not multiply: ``Hydrator``)
    attempts: int = 1
    #: seconds after which the store itself fails a try that moves no bytes (a server that
    #: accepts but never answers), or None if nothing bounds a call (a directory on a hung NFS
    #: server blocks it forever): a caller that must not hang then needs a timeout of its own
    stall_timeout: float | None = None

    #: where the store is, for messages: never contains credentials
    url: str

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; fewer only if the object ends first."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object whose key starts with ``prefix``, in no set order."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def ensure_container(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Create whatever must exist before the first ``put`` (a bucket, a directory)."""

    def container_exists(self) -> bool:
        """Whether the place the repository would live in exists at all."""
        return True

    def remove_partial_writes(self, prefixes: tuple[str, ...], older_than: float | None = None,
                              ) -> tuple[int, int]:
        """Remove what writers that died (kill -9, a power cut) left of objects they were
        writing under ``prefixes``: (how many, bytes). Without ``older_than``, only while no
        writer of those prefixes can be running (under the exclusive repository lock); with
        it, only what was last written to at least that many seconds ago (for prefixes whose
        writers take no lock: by then their writer is taken for dead). A store whose ``put``
        leaves nothing half made (S3) has nothing to remove."""
        return 0, 0

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        pass
