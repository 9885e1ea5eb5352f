"""A directory on the local filesystem as an object store (the embedded default).

Writes go to a temporary file in the same directory, are fsynced, then renamed over the key and
the directory is fsynced, so a reader (or a crash) never sees half an object. What is written
then leaves the page cache, as a remote store's bytes leave the host.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

from snapfs.dirsync import make_dirs, replace_durably
from snapfs.errors import AccessDenied, NoSpace, ObjectNotFound, SnapfsError, StoreError
from snapfs.store.base import ObjectStore

TMP_SUFFIX = ".tmp-snapfs"


def _tmp_name(name: str, data: bytes) -> str:
    """The temporary file ``put`` writes the object ``name`` (of its directory) to first."""
    return f".{name}.{os.getpid()}.{id(data):x}{TMP_SUFFIX}"


def _put_key(tmp_name: str) -> str:
    """The name of the object that a ``_tmp_name`` was to become."""
    return tmp_name.removeprefix(".").removesuffix(TMP_SUFFIX).rsplit(".", 2)[0]


class LocalStore(ObjectStore):
    concurrency = 4

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad key {key!r}")
        return self.root / key

    def _fail(self, e: OSError, key: str, where: str | None = None) -> SnapfsError:
        """The error of an operation on ``key``, said as ``where`` ("URL: KEY: ") and why."""
        where = where or f"{self.url}: {key}: "
        if e.errno == errno.EROFS:  # not the modes: the file system is mounted read-only
            return AccessDenied(where + "read-only file system")
        if e.errno in (errno.EACCES, errno.EPERM):
            return AccessDenied(where + "permission denied")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace(where + "no space left on the device")
        return StoreError(where + (e.strerror or str(e)))

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            # (a file where a directory should be; or a directory, which is no object: ``list``
            # shows none there, nor would S3)
            raise ObjectNotFound(f"{self.url}: no object {key}") from None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # no put could have made it
                raise ObjectNotFound(f"{self.url}: no object {key}") from None
            raise self._fail(e, key) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url}: no object {key}") from None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # (as get)
                raise ObjectNotFound(f"{self.url}: no object {key}") from None
            raise self._fail(e, key) from None
        try:
            # the read fails on its own too (EIO from a bad sector, EISDIR): a store error
            return os.pread(fd, length, offset)
        except OSError as e:
            raise self._fail(e, key) from None
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(_tmp_name(path.name, data))
        try:
            make_dirs(path.parent)  # a new directory's name is durable too
            # not kept in the page cache: as with a remote store, what is stored leaves the
            # host's memory to the disks and caches in use (an upload of a served disk's
            # changes would otherwise fill as much page cache as it stores, beside the
            # writes it must not slow)
            replace_durably(path, data, tmp, keep_cached=False)
        except OSError as e:
            raise self._fail(e, key) from None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:  # (as get)
                raise self._fail(e, key) from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        # Walk only the directory the prefix names, then filter by the rest of the prefix.
        base, _, _ = prefix.rpartition("/")
        top = self.root / base if base else self.root
        if not self._is_dir(top):
            return
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    try:
                        yield key, os.stat(full).st_size
                    except FileNotFoundError:
                        continue

    def remove_partial_writes(self, prefixes: tuple[str, ...], older_than: float | None = None,
                              ) -> tuple[int, int]:
        """The temporary files of ``put``s that never reached their rename (``list`` never
        shows them, so nothing else would ever delete them: a killed snapshot leaves a pack's
        worth) of keys under ``prefixes``; with ``older_than``, those not written to for that
        many seconds."""
        count = size = 0
        now = time.time()
        for prefix in prefixes:
            base = prefix.rpartition("/")[0]
            for dirpath, dirs, files in os.walk(self.root / base):
                rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
                rel = "" if rel == "." else rel + "/"
                # ("config" is at the top, beside packs/: only keys under the prefix count)
                dirs[:] = [d for d in dirs if (rel + d + "/").startswith(prefix)
                           or prefix.startswith(rel + d + "/")]
                for name in files:
                    if not (name.endswith(TMP_SUFFIX)
                            and (rel + _put_key(name)).startswith(prefix)):
                        continue
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                        if older_than is not None and now - st.st_mtime < older_than:
                            continue
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        raise self._fail(e, rel + name) from None
                    count += 1
                    size += st.st_size
        return count, size

    def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            return path.is_file()
        except OSError as e:  # (as _is_dir)
            if e.errno == errno.ENAMETOOLONG:  # (as get)
                return False
            raise self._fail(e, key) from None

    def ensure_container(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file (or a link to one) is in the way
            raise SnapfsError(f"{self.url} exists and is not a directory") from None
        except NotADirectoryError:
            raise SnapfsError(f"cannot create {self.url}: a file is in the way") from None
        except OSError as e:
            raise self._fail(e, "", f"cannot create {self.url}: ") from None

    def _is_dir(self, path: Path) -> bool:
        """``path.is_dir()``, but a path that cannot be looked up (a parent that cannot be
        searched, a name too long) is the store's error: pathlib raised it as it was."""
        try:
            return path.is_dir()
        except OSError as e:
            raise self._fail(e, "", f"{path}: ") from None

    def container_exists(self) -> bool:
        return self._is_dir(self.root)
