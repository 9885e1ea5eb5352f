"""Open, create and read a repository: its config, catalog of snapshots, index and manifests.

Object layout in the store::

    config                 the repository's format version, block size, codec, secret
    snapshots/ID           one immutable snapshot root per snapshot
    index/ID               index objects: which blobs live where in which pack
    packs/XX/NAME          packs of encoded blobs (blocks and manifest pages)
    locks/ID               locks held by running processes (see ``lock``)
    profiles/ID            access profiles of snapshot ID: which blocks mounts read first
    policies/default       the retention policy of every disk without one of its own
    policies/disk/NAME     disk NAME's retention policy (NAME percent-encoded, dots too)
    holds/ID               the snapshots one host's writable disks need (see ``format.hold``)

This module never writes blobs; ``create`` and ``gc`` do, through ``PackWriter``. Every blob it
returns has been decoded and checked twice: the codec's xxh3 checksum, and the keyed BLAKE3 of
the plain bytes against the ID the caller asked for (so a blob in the wrong place is caught too).

A snapshot root that is listed but cannot be read (bit rot, a truncated upload by a foreign tool,
fields of the wrong type, an id other than its key's, a format this snapfs does not know) is an
``UnreadableRoot`` in ``list_snapshots``: the other snapshots stay usable, and each caller says
what it does without it. What must know every snapshot (garbage collection, retention) refuses
while one is unreadable (``RootsUnreadable``); ``snapshots()`` raises it. A root deleted between
the LIST and its GET is not damage: it is simply not there.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import os
import secrets
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar
from urllib.parse import unquote

from snapfs.errors import (
    AmbiguousSnapshot,
    CorruptBlock,
    FormatError,
    IntegrityError,
    MissingBlock,
    ObjectNotFound,
    PackMissing,
    RepositoryExists,
    RepositoryNotFound,
    RootsUnreadable,
    SnapfsError,
    SnapshotNotFound,
)
from snapfs.format.block import ZERO_ID, BlockCodec, BlockKeyer
from snapfs.format.index import IndexFile
from snapfs.format.manifest import SnapshotRoot, decode_page, empty_page
from snapfs.format.names import policy_disk_part, shell_word
from snapfs.format.pack import KIND_PAGE, PackEntry
from snapfs.format.profile import decode_profile, encode_profile
from snapfs.format.repoconfig import (
    RepoConfig,
    check_block_size,
    check_compression_level,
)
from snapfs.progress import NO_PROGRESS, Progress
from snapfs.repo.defaults import DEFAULT_BLOCK_SIZE, DEFAULT_COMPRESSION_LEVEL, DEFAULT_PACK_SIZE
from snapfs.store.base import ObjectStore

if TYPE_CHECKING:
    from snapfs.format.hold import Hold
    from snapfs.repo.indexcache import IndexCache
    from snapfs.repo.retention import RetentionPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

#: at most this many GETs at once when reading many small objects (roots, index objects)
MAX_FETCH_THREADS = 8


def pack_key(name: str) -> str:
    return f"packs/{name[:2]}/{name}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id(nbytes: int = 8) -> str:
    return secrets.token_hex(nbytes)


#: how many times ``load_index`` lists the index again when objects it listed went meanwhile
INDEX_RELISTS = 5


class Location(NamedTuple):
    """Where one blob is: a byte range of a pack."""

    pack: str
    offset: int
    length: int
    raw_length: int
    kind: int


class PackedLocations(Protocol):
    """A read-only blob ID -> Location table that is not made of per-blob Python objects (the
    host's index cache, ``snapfs.repo.indexcache``): lookups decode on demand."""

    def get(self, blob_id: bytes) -> Location | None: ...

    def __len__(self) -> int: ...

    def unpack(self) -> dict[str, list[PackEntry]]:
        """Every pack's entries, as the index objects list them."""

    def neighbours(self, blob_id: bytes, start: int, end: int) -> list[tuple[bytes, Location]]:
        """See ``BlobIndex.neighbours``."""


class BlobIndex:
    """The union of the repository's index objects: blob ID -> Location, O(1) per lookup.

    Built either in dicts (``add_pack`` of every index object), or over a ``PackedLocations``
    base (read from the host's index cache) with the packs of newer index objects added on top.
    ``locate`` and ``in`` never unpack the base. ``blobs`` and ``packs`` are plain dicts: on a
    packed index their first use unpacks it once (O(blobs); for snapshot creation, gc and tests,
    which the mount never needs).
    """

    def __init__(self, base: PackedLocations | None = None) -> None:
        self._base = base
        self._blobs: dict[bytes, Location] = {}  # beyond the base (all of them without one)
        self._packs: dict[str, list[PackEntry]] = {}
        self._offsets: dict[str, list[int] | None] = {}  # pack -> its entries' offsets, if sorted
        self.index_names: list[str] = []

    def add_pack(self, pack: str, entries: Iterable[PackEntry]) -> None:
        entries = list(entries)
        self._packs[pack] = entries
        self._offsets.pop(pack, None)
        blobs = self._blobs
        base = self._base
        for bid, kind, offset, length, raw in entries:
            # a blob in two packs: either copy serves, the first one added is kept
            if bid not in blobs and (base is None or base.get(bid) is None):
                blobs[bid] = Location(pack, offset, length, raw, kind)

    @property
    def blobs(self) -> dict[bytes, Location]:
        self._unpack()
        return self._blobs

    @property
    def packs(self) -> dict[str, list[PackEntry]]:
        self._unpack()
        return self._packs

    def _unpack(self) -> None:
        base = self._base
        if base is None:
            return
        packs = base.unpack()
        blobs: dict[bytes, Location] = {}
        for pack, entries in packs.items():
            for bid, kind, offset, length, raw in entries:
                if bid not in blobs:
                    blobs[bid] = Location(pack, offset, length, raw, kind)
        for bid, loc in self._blobs.items():
            blobs.setdefault(bid, loc)
        packs.update(self._packs)
        self._blobs, self._packs, self._base = blobs, packs, None
        self._offsets.clear()

    def get(self, blob_id: bytes) -> Location | None:
        loc = self._blobs.get(blob_id)
        if loc is None and self._base is not None:
            loc = self._base.get(blob_id)
        return loc

    def __contains__(self, blob_id: object) -> bool:
        return isinstance(blob_id, bytes) and self.get(blob_id) is not None

    def __len__(self) -> int:
        return len(self._blobs) + (len(self._base) if self._base is not None else 0)

    def neighbours(self, blob_id: bytes, start: int, end: int) -> list[tuple[bytes, Location]]:
        """The blobs of ``blob_id``'s pack and kind (where ``get`` locates it) that lie wholly
        within bytes ``start`` .. ``end`` of the pack, in pack order, ``blob_id`` among them if
        it does: what a GET of that range would bring. O(log n + found); never unpacks."""
        loc = self._blobs.get(blob_id)
        if loc is None:
            return self._base.neighbours(blob_id, start, end) if self._base is not None else []
        entries = self._packs.get(loc.pack)
        if not entries:
            return []
        if loc.pack not in self._offsets:
            listed = [e.offset for e in entries]
            in_order = all(a < b for a, b in itertools.pairwise(listed))
            self._offsets[loc.pack] = listed if in_order else None
        offsets = self._offsets[loc.pack]
        if offsets is None:  # not in pack order (never written so): no neighbours
            return []
        lo, hi = bisect.bisect_left(offsets, start), bisect.bisect_left(offsets, end)
        return [(e.blob_id, Location(loc.pack, e.offset, e.length, e.raw_length, e.kind))
                for e in entries[lo:hi] if e.offset + e.length <= end and e.kind == loc.kind]

    def locate(self, blob_id: bytes) -> Location:
        loc = self.get(blob_id)
        if loc is None:
            raise MissingBlock(f"blob {blob_id.hex()[:16]} is not in the repository index "
                               "(snapfs repair index finds it if a pack still holds it)")
        return loc


class UnreadableRoot(NamedTuple):
    """A listed snapshot root that cannot be read. ``snapshot_id`` is what its key names (the
    only id it can be deleted by); ``problem`` says why, as "is damaged (…)"."""

    key: str
    snapshot_id: str
    problem: str

    def describe(self, url: str) -> str:
        return f"{self.key} in {url} {self.problem}"


@dataclass
class SnapshotListing:
    """The repository's snapshots, oldest first, and the roots that could not be read."""

    roots: list[SnapshotRoot] = field(default_factory=list)
    unreadable: list[UnreadableRoot] = field(default_factory=list)


def delete_hint(unreadable: list[UnreadableRoot]) -> str:
    """How to get rid of ``unreadable`` roots, for a message: the command that deletes them."""
    ids = " ".join(u.snapshot_id for u in unreadable)
    them = "it" if len(unreadable) == 1 else "them"
    return f"delete {them} (snapfs snapshot delete {ids}) or put {them} back from a copy"


def unreadable_subject(unreadable: list[UnreadableRoot], url: str) -> str:
    """The first of ``unreadable`` described, and how many more there are (one line)."""
    first = unreadable[0].describe(url)
    rest = unreadable[1:]
    if not rest:
        return first
    more = ", ".join(u.key for u in rest)
    return f"{first}, and {len(rest)} more root{'s' if len(rest) > 1 else ''} cannot be read ({more})"


def unreadable_warning(root: UnreadableRoot, url: str, consequence: str) -> str:
    """The line that reports one unreadable root to a user who is doing something else."""
    return f"{root.describe(url)}: {consequence}; {delete_hint([root])}"


def warn_unreadable(unreadable: list[UnreadableRoot], url: str, consequence: str) -> None:
    """Log one warning line per unreadable root: what the caller does without it
    (``consequence``: "left out") and how to get rid of it."""
    for root in unreadable:
        log.warning("%s", unreadable_warning(root, url, consequence))


def refuse_unreadable(unreadable: list[UnreadableRoot], url: str, why: str,
                      then: str) -> RootsUnreadable:
    """The error of a command that cannot run while ``unreadable`` roots exist: ``why`` (what it
    cannot know), then how to go on (``then``: "run prune again")."""
    return RootsUnreadable(f"{unreadable_subject(unreadable, url)}: {why}; "
                           f"{delete_hint(unreadable)}, then {then}")


class Repository:
    def __init__(self, store: ObjectStore, config: RepoConfig) -> None:
        self.store = store
        self.config = config
        self.keyer = BlockKeyer(config.secret_bytes)
        self.codec = BlockCodec(config.compression_level)

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        store: ObjectStore,
        block_size: int = DEFAULT_BLOCK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        pack_size: int = DEFAULT_PACK_SIZE,
    ) -> Repository:
        """Create a new repository; refuses to touch anything that already holds objects."""
        check_block_size(block_size)
        check_compression_level(compression_level)
        if store.container_exists():
            if store.exists("config"):
                raise RepositoryExists(f"{store.url} is already a snapfs repository; not touching it")
            for key, _size in store.list(""):
                raise RepositoryExists(f"{store.url} is not empty (has {key}); refusing to init there")
        store.ensure_container()
        config = RepoConfig(
            id=new_id(16),
            block_size=block_size,
            codec="zstd",
            compression_level=compression_level,
            pack_size=pack_size,
            secret=secrets.token_hex(32),
            created=now_iso(),
        )
        store.put("config", config.encode())
        return cls(store, config)

    @staticmethod
    def enclosing(location: str, endpoint_url: str | None = None) -> str | None:
        """The repository that ``location`` lies inside (an ancestor directory or prefix whose
        ``config`` is a snapfs repository's, of any version), or None. A repository made there
        would be taken for the outer one's objects: its prune deletes whatever under
        ``packs/`` no index names, ``repair index`` reads it as packs."""
        from snapfs.store import open_store

        for ancestor in _ancestors(location):
            store = open_store(ancestor, endpoint_url)
            try:
                if store.exists("config"):
                    RepoConfig.decode(store.get("config"), store.url)
                    return store.url
            except RepositoryNotFound:
                pass  # a file named config, of something else
            except (FormatError, IntegrityError):
                return store.url  # a snapfs repository all the same
            except SnapfsError:
                pass  # cannot be asked (a bucket that is not there): init will say so
            finally:
                store.close()
        return None

    @classmethod
    def open(cls, store: ObjectStore) -> Repository:
        try:
            data = store.get("config")
        except ObjectNotFound:
            if not store.container_exists():
                raise RepositoryNotFound(f"no repository at {store.url}") from None
            raise RepositoryNotFound(f"{store.url} is not a snapfs repository (no config)") from None
        return cls(store, RepoConfig.decode(data, store.url))

    @property
    def block_size(self) -> int:
        return self.config.block_size

    # -- catalog -----------------------------------------------------------------------

    def snapshots(self) -> list[SnapshotRoot]:
        """Every snapshot, oldest first; ``RootsUnreadable`` if a root cannot be read (for what
        must know them all: garbage collection)."""
        listing = self.list_snapshots()
        if listing.unreadable:
            raise refuse_unreadable(listing.unreadable, self.store.url,
                                    "what that snapshot holds cannot be known", "try again")
        return listing.roots

    def list_snapshots(self, progress: Progress = NO_PROGRESS) -> SnapshotListing:
        """Every snapshot that can be read, oldest first, and the roots that cannot."""
        keys = self._root_keys()
        progress.start("reading snapshots", len(keys), "snapshot")
        return self._fetch_roots(keys, lambda: progress.advance(1))

    def list_snapshots_again(self, previous: SnapshotListing) -> SnapshotListing:
        """``list_snapshots``, fetching only the roots that ``previous`` did not read: a root
        is written once, so one read before is still what it was (one damaged since goes
        unnoticed until a full listing). The roots it could not read are read again: one may
        have been put back. A mount lists again whenever a name it does not know is looked up,
        and fetching every root each time cost a GET per snapshot."""
        keys = self._root_keys()
        known = {f"snapshots/{r.id}": r for r in previous.roots}
        listing = self._fetch_roots([k for k in keys if k not in known])
        listing.roots += [known[k] for k in keys if k in known]
        listing.roots.sort(key=lambda r: (r.created, r.id))
        return listing

    def roots_since(self, listing: SnapshotListing) -> list[SnapshotRoot]:
        """The snapshots stored since ``listing`` was read: those it does not name."""
        known = {f"snapshots/{r.id}" for r in listing.roots} | {u.key for u in listing.unreadable}
        return self._fetch_roots([k for k in self._root_keys() if k not in known]).roots

    def snapshots_and_index(self, cache: IndexCache | None = None,
                            ) -> tuple[SnapshotListing, BlobIndex]:
        """Every snapshot (as ``list_snapshots``), and an index that covers them all, in about
        the time of the slower of the two: the roots are listed first, then fetched while the
        index loads. (Listed first: a root is stored only after its index objects, so an index
        listed after the roots has every block they name.)"""
        keys = self._root_keys()
        with ThreadPoolExecutor(1, thread_name_prefix="snapfs-index") as pool:
            index = pool.submit(self.load_index, cache)
            listing = self._fetch_roots(keys)
            return listing, index.result()

    def _root_keys(self) -> list[str]:
        return [key for key, _size in self.store.list("snapshots/")]

    def _fetch_roots(self, keys: list[str], done: Callable[[], None] | None = None,
                     ) -> SnapshotListing:
        listing = SnapshotListing()
        for key, data in self._get_many(keys, done).items():
            snapshot_id = key.removeprefix("snapshots/")
            try:
                root = SnapshotRoot.decode(data)
            except CorruptBlock as e:
                problem = f"is damaged ({e.message})"
            except FormatError as e:  # a newer snapfs's, perhaps: not ours to read either
                problem = f"cannot be read by this snapfs ({e.message})"
            else:
                if root.id == snapshot_id:
                    listing.roots.append(root)
                    continue
                # a copy under another key: deleting "it" by its id would delete the other
                problem = f"is damaged (it names itself snapshot {root.id[:40]!r})"
            listing.unreadable.append(UnreadableRoot(key, snapshot_id, problem))
        listing.roots.sort(key=lambda r: (r.created, r.id))
        listing.unreadable.sort(key=lambda u: u.key)
        return listing

    def _get_many(self, keys: list[str], done: Callable[[], None] | None = None,
                  ) -> dict[str, bytes]:
        """The objects at ``keys``, fetched up to the store's concurrency at once (a mount or a
        listing of many snapshots must not pay one round trip after another); keys deleted
        since they were listed are left out. ``done`` is called (on a worker thread) as each
        key has been asked for."""
        def get(key: str) -> bytes | None:
            try:
                return self.store.get(key)
            except ObjectNotFound:
                return None
            finally:
                if done is not None:
                    done()

        if len(keys) <= 1:
            found = [get(key) for key in keys]
        else:
            workers = min(len(keys), self.store.concurrency, MAX_FETCH_THREADS)
            with ThreadPoolExecutor(workers, thread_name_prefix="snapfs-get") as pool:
                found = list(pool.map(get, keys))
        return {key: data for key, data in zip(keys, found, strict=True) if data is not None}

    def resolve(self, ref: str, listing: SnapshotListing | list[SnapshotRoot] | None = None,
                ) -> SnapshotRoot:
        """A snapshot by exact id, exact name, or unique id prefix (at least 4 characters);
        ``RootsUnreadable`` if ``ref`` names a root that cannot be read."""
        found = self.find(ref, listing)
        if isinstance(found, UnreadableRoot):
            raise RootsUnreadable(f"{found.describe(self.store.url)}: that snapshot cannot be "
                                  f"read; {delete_hint([found])}")
        return found

    def find(self, ref: str, listing: SnapshotListing | list[SnapshotRoot] | None = None,
             ) -> SnapshotRoot | UnreadableRoot:
        """As ``resolve``, but a root that cannot be read is found too (by its key's id, or a
        unique prefix of it): for deleting it. Its id counts in every ambiguity."""
        if listing is None:
            listing = self.list_snapshots()
        elif isinstance(listing, list):
            listing = SnapshotListing(listing)
        roots, unreadable = listing.roots, listing.unreadable
        exact: list[SnapshotRoot | UnreadableRoot] = [r for r in roots if r.id == ref]
        exact += [u for u in unreadable if u.snapshot_id == ref]
        by_id: dict[str, SnapshotRoot | UnreadableRoot] = {r.id: r for r in roots}
        by_id.update((u.snapshot_id, u) for u in unreadable)
        ids = list(by_id)
        if not exact:
            named = [r for r in roots if r.name == ref]
            # a name that is also a prefix of another snapshot's id: which one the user means
            # cannot be told, and the id may well have been copied from `snapshot list`
            others = [i for i in ids if len(ref) >= 4 and i.startswith(ref)
                      and all(i != r.id for r in named)]
            if len(named) == 1 and others:
                raise AmbiguousSnapshot(
                    f"snapshot {ref!r} is ambiguous: the name of {named[0].id} and a prefix of "
                    f"{', '.join(others)}; use a full id")
            exact = list(named)
        if len(exact) == 1:
            return exact[0]
        if len(exact) > 1:
            raise AmbiguousSnapshot(f"snapshot name {ref!r} is ambiguous; use an id")
        prefixed = [i for i in ids if len(ref) >= 4 and i.startswith(ref)]
        if len(prefixed) == 1:
            return by_id[prefixed[0]]
        if len(prefixed) > 1:
            raise AmbiguousSnapshot(f"snapshot {ref!r} is ambiguous: {', '.join(prefixed)}")
        if ref and any(i.startswith(ref) for i in ids):  # too short a prefix
            raise SnapshotNotFound(f"no snapshot {ref!r} in {self.store.url} (a prefix of an id "
                                   "needs at least 4 characters)")
        raise SnapshotNotFound(f"no snapshot {ref!r} in {self.store.url}")

    def write_root(self, root: SnapshotRoot) -> None:
        self.store.put(f"snapshots/{root.id}", root.encode())

    def delete_root(self, snapshot_id: str) -> None:
        self.store.delete(f"snapshots/{snapshot_id}")
        self.store.delete(f"profiles/{snapshot_id}")

    # -- index -------------------------------------------------------------------------

    def load_index(self, cache: IndexCache | None = None, progress: Progress = NO_PROGRESS,
                   ) -> BlobIndex:
        """The union of every index object in the store. With ``cache`` (the host's index
        cache, see ``indexcache``), only index objects the cache has not seen are fetched."""
        if cache is not None:
            return cache.load(self)
        names = self.list_index_names()
        progress.start("reading index", len(names), "object")
        files = self.fetch_index_files(names, lambda: progress.advance(1))
        # An object deleted between the listing and its GET was superseded by a garbage
        # collection (a delete, forget or prune elsewhere: export and verify hold no lock),
        # whose own index object may have come after the listing: without it, every blob the
        # lost objects named was missing. List again, a few times while collections go on.
        for _ in range(INDEX_RELISTS):
            if set(files) >= names:
                break
            names = self.list_index_names()
            files.update(self.fetch_index_files(names - set(files)))
        return self.index_from_files(files)

    def list_index_names(self) -> set[str]:
        return {key.rpartition("/")[2] for key, _size in self.store.list("index/")}

    def fetch_index_files(self, names: Iterable[str], done: Callable[[], None] | None = None,
                          ) -> dict[str, IndexFile]:
        """The named index objects, decoded; names deleted since they were listed are left out.
        ``done``: as for ``_get_many``."""
        found = self._get_many([f"index/{name}" for name in names], done)
        files = self._decoded(found, IndexFile.decode, (CorruptBlock,),
                              lambda _key: "; snapfs repair index rebuilds the index from the "
                                           "packs")
        return {key.rpartition("/")[2]: f for key, f in files.items()}

    def _decoded(self, found: dict[str, bytes], decode: Callable[[bytes], T],
                 errors: tuple[type[SnapfsError], ...], way_on: Callable[[str], str],
                 ) -> dict[str, T]:
        """Each object of ``found`` (key: bytes) decoded. One that cannot be (``errors``)
        raises its error again, naming the object (as for a damaged root), then
        ``way_on(key)``: what the user can do about it."""
        out = {}
        for key, data in found.items():
            try:
                out[key] = decode(data)
            except errors as e:
                raise type(e)(f"{key} in {self.store.url} is damaged ({e.message})"
                              f"{way_on(key)}") from None
        return out

    @staticmethod
    def index_from_files(files: dict[str, IndexFile]) -> BlobIndex:
        superseded = {s for f in files.values() for s in f.supersedes}
        index = BlobIndex()
        for name, f in sorted(files.items()):
            if name in superseded:
                continue
            index.index_names.append(name)
            for pack, entries in f.packs.items():
                index.add_pack(pack, entries)
        # Names of superseded files are kept too, so the next rewrite deletes them.
        index.index_names.extend(sorted(superseded & files.keys()))
        return index

    def write_index(self, index_file: IndexFile) -> tuple[str, int]:
        name = new_id(16)
        data = index_file.encode()
        self.store.put(f"index/{name}", data)
        return name, len(data)

    # -- blobs -------------------------------------------------------------------------

    def decode_verified(self, blob_id: bytes, encoded: bytes | memoryview, what: str) -> bytes:
        plain = self.codec.decode(encoded, what)
        if self.keyer.block_id(plain) != blob_id:
            raise CorruptBlock(f"{what}: content does not match its ID")
        return plain

    def read_blob(self, index: BlobIndex, blob_id: bytes) -> bytes:
        loc = index.locate(blob_id)
        data = self._get_range(loc.pack, loc.offset, loc.length)
        return self.decode_verified(blob_id, data, f"blob {blob_id.hex()[:16]} in pack {loc.pack[:12]}")

    def fetch_run(self, pack: str, wanted: list[tuple[bytes, Location]]) -> memoryview:
        """One ranged GET covering ``wanted`` (sorted by offset), from the first blob's start to
        the last one's end; ``decode_pieces`` decodes them."""
        start = wanted[0][1].offset
        end = max(loc.offset + loc.length for _, loc in wanted)
        return memoryview(self._get_range(pack, start, end - start))

    def decode_pieces(self, run: memoryview, run_start: int, wanted: list[tuple[bytes, Location]],
                      copy: bool = True) -> list[bytes | memoryview | IntegrityError]:
        """``decode_verified`` of each of ``wanted`` in a fetched run: its plain bytes, or
        the error (the codec decodes them all in one call, see ``BlockCodec.decode_many``;
        ``copy=False``: views into the batch's buffer, for bytes used and let go)."""
        pieces = [run[loc.offset - run_start : loc.offset - run_start + loc.length] for _, loc in wanted]

        def what(i: int) -> str:
            bid, loc = wanted[i]
            return f"blob {bid.hex()[:16]} in pack {loc.pack[:12]}"

        out = self.codec.decode_many(pieces, what, copy)
        block_id = self.keyer.block_id
        for i, (bid, _) in enumerate(wanted):
            plain = out[i]
            if not isinstance(plain, IntegrityError) and block_id(plain) != bid:
                out[i] = CorruptBlock(f"{what(i)}: content does not match its ID")
        return out

    def _get_range(self, pack: str, offset: int, length: int) -> bytes:
        try:
            data = self.store.get_range(pack_key(pack), offset, length)
        except ObjectNotFound:
            raise PackMissing(f"pack {pack[:12]} is missing from {self.store.url}") from None
        if len(data) != length:
            raise CorruptBlock(f"pack {pack[:12]} is shorter than the index says")
        return data

    # -- access profiles ---------------------------------------------------------------

    def read_profile(self, snapshot_id: str) -> list[int]:
        """Block numbers earlier mounts read first; empty if none was stored (or it is bad)."""
        try:
            return decode_profile(self.store.get(f"profiles/{snapshot_id}"))
        except ObjectNotFound:
            return []
        except (CorruptBlock, FormatError) as e:
            log.warning("ignoring access profile of %s: %s", snapshot_id, e)
            return []

    def write_profile(self, snapshot_id: str, blocks: list[int]) -> None:
        self.store.put(f"profiles/{snapshot_id}", encode_profile(blocks))

    # -- holds ---------------------------------------------------------------------------

    def holds(self) -> dict[str, Hold]:
        """Every hold, by holder id. A hold that cannot be read raises: deleting snapshots
        while not knowing what disks need could cost a disk its blocks."""
        from snapfs.format.hold import Hold

        keys = [key for key, _size in self.store.list("holds/")]
        holds = self._decoded(self._get_many(keys), Hold.decode, (CorruptBlock, FormatError),
                              lambda _key: ", so which snapshots a host's disks need cannot be "
                                           "known; the daemon that wrote it writes it again "
                                           "when it starts, and if no host will, remove that "
                                           "object from the store")
        return {key.rpartition("/")[2]: hold for key, hold in holds.items()}

    def write_hold(self, holder: str, hold: Hold) -> None:
        self.store.put(f"holds/{holder}", hold.encode())

    def delete_hold(self, holder: str) -> None:
        self.store.delete(f"holds/{holder}")

    # -- retention policies ------------------------------------------------------------

    @staticmethod
    def _policy_key(disk: str | None, stored: bool = True) -> str:
        if disk is None:
            return "policies/default"
        return "policies/disk/" + policy_disk_part(disk, stored)

    def retention_policies(self) -> tuple[RetentionPolicy | None, dict[str, RetentionPolicy]]:
        """The stored retention policies: the default one (None if unset) and each disk's."""
        from snapfs.repo.retention import RetentionPolicy

        def way_on(key: str) -> str:
            disk = ("" if key == "policies/default"
                    else f" --disk {shell_word(unquote(key.removeprefix('policies/disk/')))}")
            return (f"; set that policy again (snapfs policy set{disk} …) or delete it (snapfs "
                    f"policy delete{disk})")

        keys = [key for key, _size in self.store.list("policies/")]
        found = self._decoded(self._get_many(keys), RetentionPolicy.decode,
                              (CorruptBlock, FormatError), way_on)
        default = found.pop("policies/default", None)
        prefix = "policies/disk/"
        return default, {unquote(key[len(prefix):]): p for key, p in found.items()
                         if key.startswith(prefix)}

    def write_policy(self, disk: str | None, policy: RetentionPolicy) -> None:
        """Store ``policy`` for ``disk`` (None: the default of every disk)."""
        self.store.put(self._policy_key(disk), policy.encode())

    def delete_policy(self, disk: str | None) -> bool:
        """Forget ``disk``'s stored policy (None: the default); False if there was none."""
        key = self._policy_key(disk, stored=False)
        if not self.store.exists(key):
            return False
        self.store.delete(key)
        return True

    # -- manifests ---------------------------------------------------------------------

    def read_page(self, index: BlobIndex, page_id: bytes, count: int) -> list[bytes]:
        if page_id == ZERO_ID:
            return empty_page(count)
        loc = index.locate(page_id)
        if loc.kind != KIND_PAGE:
            raise CorruptBlock(f"blob {page_id.hex()[:16]} is not a manifest page")
        return decode_page(self.read_blob(index, page_id), count,
                           f"manifest page {page_id.hex()[:16]}")

    def page_lengths(self, root: SnapshotRoot) -> list[int]:
        total = root.blocks_total
        per = root.entries_per_page
        return [min(per, total - i * per) for i in range(len(root.pages))]

    def block_map(self, index: BlobIndex, root: SnapshotRoot,
                  read_page: Callable[[bytes, int], list[bytes]] | None = None) -> list[bytes]:
        """The whole block map of a snapshot (one ID per block), its pages read with
        ``read_page`` (default: ``self.read_page`` in ``index``; export, which holds no lock,
        gives one that follows pages a garbage collection moved). For export and tests; the
        lazy mount reads pages one at a time instead."""
        if read_page is None:
            read_page = functools.partial(self.read_page, index)
        ids: list[bytes] = []
        cache: dict[str, list[bytes]] = {}
        for page_hex, count in zip(root.pages, self.page_lengths(root), strict=True):
            key = f"{page_hex}:{count}"
            if key not in cache:
                cache[key] = read_page(bytes.fromhex(page_hex), count)
            ids.extend(cache[key])
        return ids


def _ancestors(location: str) -> list[str]:
    """The locations that hold ``location``, nearest first: its parent directories (of its
    real path), or the shorter prefixes of an S3 location in the same bucket."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        parts = [p for p in prefix.split("/") if p]
        return [f"s3://{bucket}/{'/'.join(parts[:n])}".rstrip("/")
                for n in range(len(parts) - 1, -1, -1)]
    path = os.path.realpath(location)
    found = []
    while (parent := os.path.dirname(path)) != path:
        found.append(parent)
        path = parent
    return found
