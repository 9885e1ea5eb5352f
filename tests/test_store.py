"""The object-store contract, run against every store (a local directory and SeaweedFS's S3),
then what only one kind of store can get wrong: unreachable endpoints and refused credentials
for S3, temporary files left behind by a failed write for the local directory.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from snapfs.errors import AccessDenied, ObjectNotFound, SnapfsError, StoreError, StoreUnavailable
from snapfs.store import ObjectStore
from snapfs.store.local import TMP_SUFFIX, LocalStore
from snapfs.store.s3 import S3Store
from snapfs.testing.seaweedfs import SeaweedServer

MakeStore = Callable[..., ObjectStore]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def store(store_url: str, make_store: MakeStore) -> ObjectStore:
    """A fresh, empty store of each kind, its container created."""
    s = make_store(store_url)
    s.ensure_container()
    return s


def missing_container_location(store_url: str, tmp_path: Path) -> str:
    """A location of the same kind as ``store_url`` whose container does not exist."""
    if store_url.startswith("s3://"):
        return f"s3://snapfs-missing-{uuid.uuid4().hex[:12]}/repo"
    return str(tmp_path / "absent" / "repo")


# -- the contract every store keeps ------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4096, 1024 * 1024 + 7])
def test_put_then_get_returns_the_same_bytes(store: ObjectStore, size: int) -> None:
    data = payload(size, seed=size)
    store.put("packs/ab/object", data)
    assert store.get("packs/ab/object") == data
    assert list(store.list("packs/ab/")) == [("packs/ab/object", size)]


def test_get_range_reads_only_the_range(store: ObjectStore) -> None:
    data = payload(100_000, seed=1)
    store.put("pack", data)
    assert store.get_range("pack", 0, 10) == data[:10]
    assert store.get_range("pack", 1000, 5000) == data[1000:6000]
    assert store.get_range("pack", 99_999, 1) == data[99_999:]


def test_get_range_past_the_end_returns_fewer_bytes(store: ObjectStore) -> None:
    data = payload(100_000, seed=2)
    store.put("pack", data)
    tail = store.get_range("pack", 99_000, 5000)
    assert len(tail) == 1000
    assert tail == data[99_000:]
    assert store.get_range("pack", 100_000, 10) == b""
    assert store.get_range("pack", 200_000, 10) == b""
    assert store.get_range("pack", 50, 0) == b""


def test_overwrite_replaces_the_whole_object(store: ObjectStore) -> None:
    store.put("config", payload(50_000, seed=3))
    small = b"version 2"
    store.put("config", small)
    assert store.get("config") == small
    assert store.get_range("config", 0, 50_000) == small
    assert list(store.list("config")) == [("config", len(small))]


def test_readers_see_an_overwritten_object_whole_never_mixed(store: ObjectStore) -> None:
    versions = [b"a" * 300_000, b"b" * 200_000]
    store.put("root", versions[0])
    seen: list[bytes] = []
    done = threading.Event()

    def read_until_done() -> None:
        while not done.is_set():
            seen.append(store.get("root"))

    with ThreadPoolExecutor(max_workers=2) as pool:
        readers = [pool.submit(read_until_done) for _ in range(2)]
        try:
            for i in range(30):
                store.put("root", versions[i % 2])
        finally:
            done.set()
        for r in readers:
            r.result()

    assert seen, "the readers read nothing"
    mixed = [len(d) for d in seen if d not in versions]
    assert mixed == [], f"{len(mixed)} of {len(seen)} reads saw a partial object"


def test_delete_removes_and_tolerates_missing(store: ObjectStore) -> None:
    store.put("snapshots/one", b"root")
    store.put("snapshots/two", b"kept")
    store.delete("snapshots/one")
    assert not store.exists("snapshots/one")
    with pytest.raises(ObjectNotFound):
        store.get("snapshots/one")
    assert store.get("snapshots/two") == b"kept"
    store.delete("snapshots/one")  # again
    store.delete("never/was/there")
    assert sorted(store.list("")) == [("snapshots/two", 4)]


def test_list_by_prefix(store: ObjectStore) -> None:
    objects = {
        "config": 3,
        "packs/aa/p1": 10,
        "packs/aa/p2": 20,
        "packs/bb/p3": 30,
        "packsX": 1,
        "index/i1": 5,
    }
    for i, (key, size) in enumerate(objects.items()):
        store.put(key, payload(size, seed=i))

    def listed(prefix: str) -> dict[str, int]:
        items = list(store.list(prefix))
        assert len(items) == len({k for k, _ in items}), "a key was listed twice"
        return dict(items)

    assert listed("") == objects
    assert listed("packs/") == {"packs/aa/p1": 10, "packs/aa/p2": 20, "packs/bb/p3": 30}
    assert listed("packs/a") == {"packs/aa/p1": 10, "packs/aa/p2": 20}
    assert listed("packs") == {k: v for k, v in objects.items() if k.startswith("packs")}
    assert listed("packs/aa/p2") == {"packs/aa/p2": 20}
    assert listed("nothing/") == {}


def test_s3_lists_many_pages(store_url: str, make_store: MakeStore) -> None:
    """A listing longer than one LIST response comes whole, each key once (pages of 2 here)."""
    if not store_url.startswith("s3://"):
        pytest.skip("S3 pages its listings")
    store = make_store(store_url)
    store.ensure_container()
    assert isinstance(store, S3Store)
    store.list_page_size = 2
    keys = {f"snapshots/{i:02d}": i for i in range(7)}
    for key, size in keys.items():
        store.put(key, payload(size))
    store.put("index/other", b"x")
    listed = list(store.list("snapshots/"))
    assert sorted(listed) == sorted(keys.items())
    assert sorted(store.list("")) == sorted([*keys.items(), ("index/other", 1)])


def test_list_stays_inside_the_store(store_url: str, make_store: MakeStore) -> None:
    # "repo-other" starts with "repo": a store must not list its neighbour's keys.
    here = make_store(store_url)
    neighbour = make_store(store_url + "-other")
    for s in (here, neighbour):
        s.ensure_container()
    here.put("packs/p1", b"mine")
    neighbour.put("packs/p2", b"theirs!")
    assert list(here.list("")) == [("packs/p1", 4)]
    assert list(neighbour.list("")) == [("packs/p2", 7)]
    assert not here.exists("packs/p2")


def test_exists(store: ObjectStore) -> None:
    store.put("manifests/root", b"x")
    assert store.exists("manifests/root")
    assert not store.exists("manifests/other")
    assert not store.exists("manifests")  # a prefix of a key is not an object


def test_missing_key_is_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get("packs/missing")
    with pytest.raises(ObjectNotFound):
        store.get_range("packs/missing", 0, 100)
    with pytest.raises(ObjectNotFound):
        store.get_range("packs/missing", 0, 0)


def test_missing_container(store_url: str, make_store: MakeStore, tmp_path: Path) -> None:
    s = make_store(missing_container_location(store_url, tmp_path))
    assert not s.container_exists()
    assert not s.exists("config")
    assert list(s.list("")) == []
    with pytest.raises(ObjectNotFound):
        s.get("config")
    s.ensure_container()
    s.ensure_container()  # again: already there is fine
    assert s.container_exists()
    s.put("config", b"v1")
    assert s.get("config") == b"v1"


def test_bad_keys_are_refused(store: ObjectStore) -> None:
    for key in ("/etc/passwd", "../outside", "packs/../../outside"):
        with pytest.raises(ValueError):
            store.put(key, b"x")
        with pytest.raises(ValueError):
            store.get(key)


def test_many_threads_share_one_store(store_url: str, make_store: MakeStore) -> None:
    s = make_store(store_url)  # no connection yet: the first calls race to create it
    s.ensure_container()
    fresh = make_store(store_url)

    def round_trip(i: int) -> bytes:
        data = payload(1000 + i, seed=i)
        fresh.put(f"blocks/{i:02d}", data)
        return fresh.get(f"blocks/{i:02d}")

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(round_trip, range(32)))
    assert results == [payload(1000 + i, seed=i) for i in range(32)]
    assert len(list(s.list("blocks/"))) == 32


def test_url_names_the_place_without_secrets(
    store: ObjectStore, store_url: str, store_endpoint: str | None
) -> None:
    if isinstance(store, S3Store):
        assert store.url == f"{store_url} at {store_endpoint}"
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in store.url
    else:
        assert store_endpoint is None
        assert store.url == store_url


# -- S3 only (the first two need no SeaweedFS, so they are not marked s3) ----------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def fake_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials for an endpoint that takes any (and no AWS config file of this host's)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "anything")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "anything-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))


class QuietHandler(BaseHTTPRequestHandler):
    """A fake S3 server's handler that logs nothing (the test's output is its own)."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def fake_s3(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 whose requests ``handler`` answers while the block runs:
    its URL."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            thread.join()


def test_s3_unreachable_endpoint_fails_fast(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_credentials(monkeypatch, tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"
    s = make_store("s3://snapfs-test/repo", endpoint_url=endpoint)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        s.get("config")
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"gave up only after {elapsed:.1f} s"
    assert endpoint in str(caught.value)
    assert "anything-secret" not in str(caught.value)
    # the bucket once ("for head bucket snapfs-test in bucket snapfs-test" named it twice)
    with pytest.raises(StoreUnavailable) as caught:
        s.container_exists()
    assert f"cannot reach {endpoint} for head bucket in bucket snapfs-test after 3 attempts" \
        in str(caught.value)


SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)


def slow_down_handler(seen: list[str]) -> type[BaseHTTPRequestHandler]:
    """A handler that answers every request as an overloaded S3 does, noting each in ``seen``."""

    class SlowDown(QuietHandler):
        def _refuse(self) -> None:
            seen.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOW_DOWN)

        do_GET = do_PUT = do_HEAD = do_DELETE = _refuse

    return SlowDown


def test_s3_persistent_slowdown_is_unavailable_after_bounded_retries(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_credentials(monkeypatch, tmp_path)
    seen: list[str] = []
    with fake_s3(slow_down_handler(seen)) as endpoint:
        s = make_store("s3://snapfs-test/repo", endpoint_url=endpoint)
        with pytest.raises(StoreUnavailable) as caught:
            s.get("config")
        s.close()
    assert endpoint in str(caught.value)
    assert "SlowDown" in str(caught.value)
    assert seen == ["GET /snapfs-test/repo/config"] * S3Store.attempts


def stalling_handler(seen: list[str], release: threading.Event) -> type[BaseHTTPRequestHandler]:
    """A handler for an S3 server that hangs on ``silent`` (it takes the request and never
    answers, until ``release``) and is slow but steady on ``trickle`` (its body comes in six
    pieces 0.2 s apart), noting each request in ``seen``."""

    class Stalling(QuietHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            seen.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if self.path.endswith("/silent"):
                release.wait(60)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(6 * len(TRICKLE)))
            self.end_headers()
            for _ in range(6):
                time.sleep(0.2)
                self.wfile.write(TRICKLE)
                self.wfile.flush()

        do_GET = do_PUT = _answer

    return Stalling


TRICKLE = b"x" * 1000


def test_s3_a_stalled_request_fails_and_a_slow_one_does_not(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """botocore's read timeout is a stall timeout: a request that has no byte for
    ``read_timeout`` (``put_timeout`` for a PUT) fails, tried ``attempts`` times; a
    transfer that takes longer but keeps moving is not cut short."""
    fake_credentials(monkeypatch, tmp_path)
    monkeypatch.setattr(S3Store, "read_timeout", 0.5)
    monkeypatch.setattr(S3Store, "put_timeout", 1.0)
    seen: list[str] = []
    release = threading.Event()
    with fake_s3(stalling_handler(seen, release)) as endpoint:
        try:
            s = make_store("s3://snapfs-test/repo", endpoint_url=endpoint)
            started = time.monotonic()
            assert s.get("trickle") == 6 * TRICKLE
            assert time.monotonic() - started > 2 * S3Store.read_timeout  # and not cut short
            with pytest.raises(StoreUnavailable, match="ReadTimeoutError"):
                s.get("silent")
            with pytest.raises(StoreUnavailable, match="ReadTimeoutError"):
                s.put("silent", b"x")
            assert isinstance(s, S3Store)  # the timeouts each kind of call waits for
            assert s._s3().meta.config.read_timeout == 0.5
            assert s._s3_puts().meta.config.read_timeout == 1.0
            s.close()
        finally:
            release.set()  # (the server's end waits for its handlers)
    assert seen == (["GET /snapfs-test/repo/trickle"] + ["GET /snapfs-test/repo/silent"] * S3Store.attempts
                    + ["PUT /snapfs-test/repo/silent"] * S3Store.attempts)


def cutting_handler(seen: list[str]) -> type[BaseHTTPRequestHandler]:
    """A handler for an S3 server that dies while it answers a GET: it promises 1000 bytes,
    sends 100, and closes the connection."""

    class Cutting(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_response(206 if self.headers.get("Range") else 200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"y" * 100)
            self.wfile.flush()
            self.close_connection = True

    return Cutting


def test_s3_a_body_cut_short_is_the_store_unavailable(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A connection cut in the middle of a GET's body (the server killed as it answers: seen
    in CI) is the store being unavailable, as a refused connection is. The body was read
    through ``with response["Body"] as body``, which hands out urllib3's own stream: its
    ``ProtocolError`` escaped every handler, and ``snapshot create`` ended in a traceback."""
    fake_credentials(monkeypatch, tmp_path)
    seen: list[str] = []
    with fake_s3(cutting_handler(seen)) as endpoint:
        s = make_store("s3://snapfs-test/repo", endpoint_url=endpoint)
        with pytest.raises(StoreUnavailable) as whole:
            s.get("packs/p1")
        with pytest.raises(StoreUnavailable) as part:
            s.get_range("packs/p1", 0, 1000)
        s.close()
    for caught in (whole, part):
        assert f"cannot reach {endpoint} for get packs/p1 in bucket snapfs-test" \
            in str(caught.value)
    assert seen == ["GET /snapfs-test/repo/packs/p1"] * 2


@pytest.mark.s3
@pytest.mark.parametrize("wrong", ["secret", "access-key"])
def test_s3_wrong_credentials_are_access_denied(
    seaweed: SeaweedServer,
    s3_bucket: str,
    make_store: MakeStore,
    monkeypatch: pytest.MonkeyPatch,
    wrong: str,
) -> None:
    location = f"s3://{s3_bucket}/denied-{uuid.uuid4().hex[:8]}"
    good = make_store(location)
    good.put("config", b"v1")
    secret_key = "wrong-secret-5f1e2d"
    access_key = seaweed.access_key if wrong == "secret" else "unknown-access-key"
    assert access_key is not None and seaweed.secret_key is not None
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    bad = make_store(location)

    calls = {
        "get": lambda: bad.get("config"),
        "get_range": lambda: bad.get_range("config", 0, 1),
        "put": lambda: bad.put("config", b"v2"),
        "exists": lambda: bad.exists("config"),
        "list": lambda: list(bad.list("")),
        "container_exists": bad.container_exists,
    }
    for name, call in calls.items():
        with pytest.raises(AccessDenied) as caught:
            call()
        message = str(caught.value)
        assert seaweed.endpoint_url in message, name
        assert s3_bucket in message, name
        assert secret_key not in message, name
        assert seaweed.secret_key not in message, name
    assert good.get("config") == b"v1"  # the refused put changed nothing


# -- the local directory only ------------------------------------------------------------------


def test_local_put_under_a_regular_file_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    s = LocalStore(blocker / "repo")
    with pytest.raises(SnapfsError) as caught:
        s.put("packs/p1", b"data")
    assert "packs/p1" in str(caught.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file"]
    assert blocker.read_bytes() == b"not a directory"


def test_local_failed_rename_leaves_no_temp_file(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "repo")
    s.ensure_container()
    # The temporary file is written, then renaming it over a non-empty directory fails.
    (tmp_path / "repo" / "key").mkdir()
    (tmp_path / "repo" / "key" / "inside").write_bytes(b"x")
    with pytest.raises(SnapfsError):
        s.put("key", payload(10_000))
    leftovers = [p for p in (tmp_path / "repo").rglob("*") if p.name.endswith(TMP_SUFFIX)]
    assert leftovers == []
    assert sorted(p.name for p in (tmp_path / "repo").rglob("*")) == ["inside", "key"]
    assert list(s.list("")) == [("key/inside", 1)]


def resident_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (``fincore``, util-linux)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return int(out)


def test_local_put_leaves_what_it_stored_out_of_the_page_cache(tmp_path: Path) -> None:
    """A stored object is not read back soon: its pages go, as a remote store's bytes leave
    the host, and leave the memory to what the host is using (a served disk's writes)."""
    fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                             text=True, check=True).stdout.strip()
    if fs_type == "tmpfs":
        pytest.skip("tmpfs keeps every page of its files in memory")
    data = payload(4 << 20)
    control = tmp_path / "written-and-fsynced"
    with open(control, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    assert resident_bytes(control) == len(data)  # what a file written this way keeps
    s = LocalStore(tmp_path / "repo")
    s.ensure_container()
    s.put("packs/ab/pack", data)
    assert resident_bytes(tmp_path / "repo" / "packs" / "ab" / "pack") == 0
    assert s.get("packs/ab/pack") == data


def test_local_directory_is_no_object_and_cannot_be_replaced_by_one(tmp_path: Path) -> None:
    """A key that names a directory holds no object (``list`` shows none there, and S3 has
    none under a "directory" prefix); a put of that key fails, leaving the directory."""
    s = LocalStore(tmp_path / "repo")
    s.put("snapshots/inside/x", b"1")
    with pytest.raises(ObjectNotFound):
        s.get("snapshots/inside")
    with pytest.raises(StoreError) as caught:
        s.put("snapshots/inside", b"root")
    assert str(caught.value) == f"{tmp_path / 'repo'}: snapshots/inside: Is a directory"
    assert s.get("snapshots/inside/x") == b"1"
    assert sorted(p.name for p in (tmp_path / "repo" / "snapshots").iterdir()) == ["inside"]


def test_local_read_that_fails_after_open_is_a_store_error(tmp_path: Path) -> None:
    s = LocalStore(tmp_path / "repo")
    s.put("packs/p1", payload(1000))
    (tmp_path / "repo" / "packs" / "p1").unlink()
    (tmp_path / "repo" / "packs" / "p1").mkdir()  # it opens; the read fails (EIO on a bad disk)
    with pytest.raises(StoreError) as caught:
        s.get_range("packs/p1", 0, 100)
    assert type(caught.value) is StoreError
    assert str(caught.value) == f"{tmp_path / 'repo'}: packs/p1: Is a directory"


def test_local_key_too_long_for_a_file_name_is_no_object_but_cannot_be_put(
        tmp_path: Path) -> None:
    """No object can be stored under a name longer than a file name, so asking for one finds
    none (it was the store's error "File name too long", exit 5); writing one is that error."""
    s = LocalStore(tmp_path / "repo")
    s.put("policies/disk/web", b"kept")  # (a missing directory would be found first)
    key = "policies/disk/" + "x" * 256
    with pytest.raises(ObjectNotFound):
        s.get(key)
    with pytest.raises(ObjectNotFound):
        s.get_range(key, 0, 10)
    assert s.exists(key) is False
    s.delete(key)
    with pytest.raises(StoreError) as caught:
        s.put(key, b"data")
    assert str(caught.value).endswith(f"{key}: File name too long")
    assert list(s.list("")) == [("policies/disk/web", 4)]
