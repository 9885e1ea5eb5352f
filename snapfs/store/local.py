"""A directory on the local filesystem as an object store (the embedded default).

Writes go to a temporary file in the same directory, are fsynced, then renamed over the key and
the directory is fsynced, so a reader (or a crash) never sees half an object.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from snapfs.dirsync import make_dirs, replace_durably
from snapfs.errors import AccessDenied, NoSpace, ObjectNotFound, SnapfsError, StoreError
from snapfs.store.base import ObjectStore

TMP_SUFFIX = ".tmp-snapfs"


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
        except (FileNotFoundError, NotADirectoryError):  # (a file where a directory should be)
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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data):x}{TMP_SUFFIX}")
        try:
            make_dirs(path.parent)  # a new directory's name is durable too
            replace_durably(path, data, tmp)
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

    def remove_partial_writes(self, prefixes: tuple[str, ...]) -> tuple[int, int]:
        """The temporary files of ``put``s that never reached their rename (``list`` never
        shows them, so nothing else would ever delete them: a killed snapshot leaves a pack's
        worth)."""
        count = size = 0
        for prefix in prefixes:
            top = self.root / prefix.rpartition("/")[0]
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    if not name.endswith(TMP_SUFFIX):
                        continue
                    path = os.path.join(dirpath, name)
                    try:
                        length = os.stat(path).st_size
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        key = os.path.relpath(path, self.root).replace(os.sep, "/")
                        raise self._fail(e, key) from None
                    count += 1
                    size += length
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
