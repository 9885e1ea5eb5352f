"""Shared fixtures: a real SeaweedFS for the whole session, and repository locations on each store.

``store_url`` is parametrized over the local directory store and S3 (marked ``s3``); only the s3
parameter starts SeaweedFS, so a run of local-only tests never does. ``make_store`` opens a store
for a location (S3 locations default to the session's SeaweedFS) and closes it after the test.
``runtime_dir`` is a module's directory for daemons' pid files and control sockets.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from testkit import SEAWEED_STOP_TIMEOUT

from snapfs.store import ObjectStore, open_store
from snapfs.testing.seaweedfs import SeaweedServer


def pytest_configure(config: pytest.Config) -> None:
    """A suite started under ``nohup`` (or by anything else that ignores SIGHUP) passes the
    ignored SIGHUP to every ``snapfs`` it starts, and snapfs rightly leaves an ignored stop
    signal ignored: the tests of what SIGHUP does would fail. The process that runs the tests
    takes SIGHUP's default back for its children; under xdist that is each worker, and the
    controller, which a terminal's hangup reaches, keeps what it was given."""
    controller = getattr(config.option, "numprocesses", None) and \
        not os.environ.get("PYTEST_XDIST_WORKER")
    if not controller and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


#: the identity the session's SeaweedFS requires (signed clients such as restic need one)
S3_ACCESS_KEY = "snapfs-test-access"
S3_SECRET_KEY = "snapfs-test-secret-0123456789"
S3_REGION = "us-east-1"
S3_BUCKET = "snapfs-test"

MakeStore = Callable[..., ObjectStore]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS on loopback for the session, requiring ``S3_ACCESS_KEY``/``S3_SECRET_KEY``.

    The AWS_* environment points boto3 at those credentials while the session runs; config files
    in ``~/.aws`` and any session token of the developer's are kept out of it.
    """
    data = tmp_path_factory.mktemp("seaweed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", S3_REGION)
        mp.setenv("AWS_CONFIG_FILE", str(data / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(data / "no-aws-credentials"))
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        with SeaweedServer(data, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY,
                           stop_timeout=SEAWEED_STOP_TIMEOUT) as server:
            yield server


@pytest.fixture(scope="session")
def s3_bucket(seaweed: SeaweedServer) -> str:
    """The bucket every s3 test location lives in, created once."""
    client = boto3.session.Session().client("s3", endpoint_url=seaweed.endpoint_url)
    try:
        client.create_bucket(Bucket=S3_BUCKET)
    finally:
        client.close()
    return S3_BUCKET


@pytest.fixture(
    params=[
        pytest.param("local", id="local"),
        pytest.param("s3", id="s3", marks=pytest.mark.s3),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh repository location that does not exist yet: a directory, or an S3 prefix."""
    if request.param == "local":
        return str(tmp_path / "repo")
    bucket: str = request.getfixturevalue("s3_bucket")
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:40].strip("-")
    return f"s3://{bucket}/{name}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store_endpoint(request: pytest.FixtureRequest, store_url: str) -> str | None:
    """The S3 endpoint ``store_url`` needs, or None for a local location."""
    if store_url.startswith("s3://"):
        server: SeaweedServer = request.getfixturevalue("seaweed")
        return server.endpoint_url
    return None


@pytest.fixture
def make_store(request: pytest.FixtureRequest) -> Iterator[MakeStore]:
    """``make_store(location, endpoint_url=None)``: an open ``ObjectStore``, closed after the test.

    An ``s3://`` location without an endpoint uses the session's SeaweedFS.
    """
    opened: list[ObjectStore] = []

    def make(location: str, endpoint_url: str | None = None) -> ObjectStore:
        if endpoint_url is None and location.startswith("s3://"):
            server: SeaweedServer = request.getfixturevalue("seaweed")
            endpoint_url = server.endpoint_url
        store = open_store(location, endpoint_url=endpoint_url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture(scope="module")
def runtime_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A directory of this module's own for daemons' run files (``SNAPFS_RUNTIME_DIR``), short
    because a Unix socket's path must fit in 108 bytes."""
    module = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    path = Path(f"/tmp/snapfs-run-{os.getpid()}-{module}")
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)
