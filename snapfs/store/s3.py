"""An S3 bucket (AWS, SeaweedFS, Ceph, MinIO) as an object store, through boto3's botocore.

Owns a store's S3 clients (two: see Timeouts), each created lazily on first use (after a daemon
forks) and shared by every thread, and the translation of botocore's errors into ``snapfs.errors``: a missing key or
bucket is ``ObjectNotFound``, refused credentials are ``AccessDenied``, an endpoint that cannot be
reached, times out, or keeps failing with 5xx or throttling after bounded retries is
``StoreUnavailable``. It must not let a botocore exception escape, and must never put
credentials into a message or into ``url``.

Timeouts: a store that accepts connections but never answers (a hung server, a stalled
connection) must fail a call in seconds. botocore's ``read_timeout`` bounds each wait for the
socket to yield bytes (the first byte of a response, then every read of its body), not the
whole call: a slow but progressing transfer is never cut off by it, a silent one is. So it is a
stall timeout, and a short one, ``read_timeout``, suits every request but a PUT (GET, ranged
GET, HEAD, LIST, DELETE: small answers, cheap to repeat, and a read through a mount waits on
them). A PUT's answer comes once the server has stored the whole body, and repeating a PUT
sends its pack again, so it gets a longer one, ``put_timeout``. botocore fixes timeouts per
client, hence two clients on one session (the one for PUTs made on the first PUT: a read-only
command or a mount that only reads never makes it). Each call makes ``attempts`` tries in all
(botocore's standard retry mode, with its jittered backoff and throttling detection; its
retry quota, spent after some 35 retries that did not succeed, leaves one try a call until
calls succeed again, so a long outage only fails faster); callers that retry on their own
count these (``ObjectStore.attempts``). So a hung store fails a read or a DELETE after about
``attempts`` x ``read_timeout`` (15 s), and a PUT after about ``attempts`` x (``put_timeout``
+ 1 s: a large body first waits up to a second for ``100 Continue``) (48 s), or sooner: a body
that stops going out fails after ``connect_timeout`` (urllib3 sends with that timeout on the
socket), 3 x 4 s for a pack.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from snapfs.errors import (
    AccessDenied,
    ObjectNotFound,
    SnapfsError,
    StoreError,
    StoreUnavailable,
    UsageError,
)
from snapfs.store.base import ObjectStore

# Error codes, as S3 and S3-compatible servers spell them (HEAD responses carry only the status).
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "403",
    }
)
_UNAVAILABLE = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
    }
)


def _without_userinfo(endpoint: str) -> str:
    """``endpoint`` with any ``user:password@`` removed, fit to print."""
    parts = urlsplit(endpoint)
    if parts.username is None and parts.password is None:
        return endpoint
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _check_endpoint(endpoint: str) -> None:
    """Refuse, in one line, an endpoint botocore would refuse with a ValueError (and one it
    would take for a host without a scheme)."""
    parts = urlsplit(endpoint)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        shown = re.sub(r"//[^/@]*@", "//", endpoint)  # never a password
        raise UsageError(f"not an S3 endpoint URL: {shown!r} (--endpoint-url or "
                         "AWS_ENDPOINT_URL: http:// or https://HOST[:PORT])")


class _S3Loader(botocore.loaders.Loader):
    """botocore's loader of its service models, told that S3 is the one service there is: to
    check a service's name, the stock loader lists every service's directory (over 400 of
    them: a third of making a client, about 50 ms of every S3 command's start here)."""

    def list_available_services(self, type_name: str) -> list[str]:
        return ["s3"]


def _read_body(body: Any) -> bytes:
    """All of a GET's body, read through botocore's ``StreamingBody``, whose ``read`` turns a
    connection cut or stalled mid-body into botocore's errors (``ResponseStreamingError``,
    ``ReadTimeoutError``, ``IncompleteReadError``), which ``_fail`` maps. ``with body as b``
    hands out the raw urllib3 stream instead: its errors escaped every handler (a store killed
    while it answered ended a command in a traceback)."""
    try:
        data: bytes = body.read()
    finally:
        body.close()
    return data


class S3Store(ObjectStore):
    """Objects under ``prefix`` in ``bucket``.

    ``endpoint_url`` selects an S3-compatible server (falling back to ``AWS_ENDPOINT_URL_S3``,
    then ``AWS_ENDPOINT_URL``); without one it is AWS. Credentials and region come the standard
    boto3 way (environment, ``~/.aws``, instance roles). With a custom endpoint, path-style
    addressing is used, since such servers rarely have a wildcard DNS name per bucket.
    """

    concurrency = 16

    #: an unreachable store fails in seconds, not minutes: 3 attempts in all (standard mode's
    #: default), so a refused connection fails within about a second, a silent host within
    #: 3 x 3 s, a hung one (it accepts, never answers) within 3 x ``read_timeout`` for a read,
    #: and throttling or 5xx after backoffs of at most 1 + 2 s (see the module docstring).
    attempts = 3
    connect_timeout = 3.0
    #: seconds a request but a PUT may wait for its next byte (a stall, not a whole transfer):
    #: S3 answers a GET's first byte in tens of milliseconds, and a healthy stream never stops
    #: for seconds
    read_timeout = 5.0
    #: the same for a PUT, whose answer comes once the server has stored the whole body
    put_timeout = 15.0
    stall_timeout = read_timeout
    #: keys per LIST request (S3's most)
    list_page_size = 1000

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None) -> None:
        if not bucket:
            raise UsageError("an S3 location needs a bucket: s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        if self.endpoint_url:
            _check_endpoint(self.endpoint_url)
        self._base = f"{self.prefix}/" if self.prefix else ""
        location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if self.endpoint_url:
            self._where = _without_userinfo(self.endpoint_url)
            self.url = f"{location} at {self._where}"
        else:
            self._where = "AWS S3"
            self.url = location
        self._session: Any = None
        self._clients: dict[float, Any] = {}  # by read timeout: see ``_client``
        self._client_lock = threading.Lock()

    # -- the clients --------------------------------------------------------------------------

    def _s3(self) -> Any:
        """The client for every request but a PUT: ``read_timeout``."""
        return self._client(self.read_timeout)

    def _s3_puts(self) -> Any:
        """The client for PUTs: ``put_timeout``."""
        return self._client(self.put_timeout)

    def _client(self, read_timeout: float) -> Any:
        """The client whose reads of the socket stall for at most ``read_timeout`` s, made on
        its first use."""
        client = self._clients.get(read_timeout)
        if client is not None:
            return client
        with self._client_lock:
            client = self._clients.get(read_timeout)
            if client is None:
                client = self._clients[read_timeout] = self._make_client(read_timeout)
            return client

    def _make_client(self, read_timeout: float) -> Any:
        """A client whose reads of the socket stall for at most ``read_timeout`` s; call with
        ``_client_lock`` held."""
        options: dict[str, Any] = {}
        if self.endpoint_url:
            options["s3"] = {"addressing_style": "path"}
        config = Config(
            max_pool_connections=self.concurrency,
            retries={"mode": "standard", "total_max_attempts": self.attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=read_timeout,
            **options,
        )
        # A session per store: a default session is not safe to share between threads (its two
        # clients are made under the lock). botocore directly, not boto3 (which wraps this same
        # session and client): importing boto3 costs start-up time on top of botocore's, and
        # snapfs needs none of its resource layer.
        if self._session is None:
            self._session = botocore.session.get_session()
            paths = self._session.get_config_variable("data_path")
            self._session.register_component("data_loader", _S3Loader(
                extra_search_paths=paths.split(os.pathsep) if paths else None))
        return self._session.create_client("s3", endpoint_url=self.endpoint_url, config=config)

    def close(self) -> None:
        with self._client_lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()

    # -- keys and errors ----------------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad key {key!r}")
        return self._base + key

    def _fail(self, e: Exception, key: str, action: str) -> SnapfsError:
        """The snapfs error for botocore's ``e`` raised while doing ``action`` on ``key``."""
        what = f"{action} {key}" if key else action
        if isinstance(e, ClientError):
            error = e.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code == "NoSuchBucket":
                return ObjectNotFound(f"{self._where}: no bucket {self.bucket}")
            if code in _NOT_FOUND or status == 404:
                return ObjectNotFound(f"{self.url}: no object {key}")
            if code in _DENIED or status == 403:
                return AccessDenied(
                    f"{self._where} refused access to bucket {self.bucket} ({code or status}): "
                    "check the credentials and their permissions"
                )
            if code in _UNAVAILABLE or status >= 500 or status == 429:
                return StoreUnavailable(
                    f"{self._where} is unavailable ({code or status}) for {what} "
                    f"in bucket {self.bucket}, after {self.attempts} attempts"
                )
            return StoreError(f"{self.url}: {what}: {code or status} {error.get('Message', '')}")
        if isinstance(e, (ConnectionError, HTTPClientError, IncompleteReadError)):
            # Connection refused, DNS, TLS, connect/read timeouts, a connection cut mid-body.
            return StoreUnavailable(
                f"cannot reach {self._where} for {what} in bucket {self.bucket} "
                f"after {self.attempts} attempts ({type(e).__name__})"
            )
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return AccessDenied(
                f"no S3 credentials for {self._where} (bucket {self.bucket}): set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or configure ~/.aws"
            )
        return StoreError(f"{self.url}: {what}: {type(e).__name__}")

    @staticmethod
    def _code(e: Exception) -> str:
        if isinstance(e, ClientError):
            return str(e.response.get("Error", {}).get("Code", ""))
        return ""

    @staticmethod
    def _status(e: Exception) -> int:
        if isinstance(e, ClientError):
            return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return 0

    # -- the interface ------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        full = self._key(key)
        try:
            response = self._s3().get_object(Bucket=self.bucket, Key=full)
            return _read_body(response["Body"])
        except (BotoCoreError, ClientError) as e:
            raise self._fail(e, key, "get") from e

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        full = self._key(key)
        if length == 0:
            # An empty Range header is invalid; still tell a missing key from an empty read.
            if not self.exists(key):
                raise ObjectNotFound(f"{self.url}: no object {key}")
            return b""
        try:
            response = self._s3().get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={offset}-{offset + length - 1}"
            )
            data = _read_body(response["Body"])
        except (BotoCoreError, ClientError) as e:
            if self._status(e) == 416 or self._code(e) == "InvalidRange":
                return b""  # the range starts at or past the end of the object
            raise self._fail(e, key, "get") from e
        if not response.get("ContentRange"):
            # A server that ignored the Range header sent the whole object.
            data = data[offset : offset + length]
        return data

    def put(self, key: str, data: bytes) -> None:
        full = self._key(key)
        try:
            self._s3_puts().put_object(Bucket=self.bucket, Key=full, Body=data)
        except (BotoCoreError, ClientError) as e:
            if self._code(e) == "NoSuchBucket":
                raise StoreError(
                    f"{self._where}: bucket {self.bucket} does not exist (create the repository first)"
                ) from e
            raise self._fail(e, key, "put") from e

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self._s3().delete_object(Bucket=self.bucket, Key=full)
        except (BotoCoreError, ClientError) as e:
            error = self._fail(e, key, "delete")
            if isinstance(error, ObjectNotFound):
                return  # a missing key, or a missing bucket: nothing to delete
            raise error from e

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        if prefix.startswith("/"):
            raise ValueError(f"bad prefix {prefix!r}")
        # Page by page with the continuation token, not through botocore's paginator: that
        # loads one more service model (tens of ms) on a mount's start-up path.
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._base + prefix,
                                   "MaxKeys": self.list_page_size}
        start = len(self._base)
        try:
            while True:
                page = self._s3().list_objects_v2(**request)
                for item in page.get("Contents", ()):
                    name: str = item["Key"]
                    if name.endswith("/"):
                        continue
                    yield name[start:], int(item["Size"])
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    return
                if token == request.get("ContinuationToken"):
                    raise StoreError(f"{self.url}: list {prefix}: the server repeats its "
                                     "continuation token")
                request["ContinuationToken"] = token
        except (BotoCoreError, ClientError) as e:
            if self._code(e) == "NoSuchBucket":
                return  # as a missing directory lists nothing for the local store
            raise self._fail(e, prefix, "list") from e

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            self._s3().head_object(Bucket=self.bucket, Key=full)
        except (BotoCoreError, ClientError) as e:
            error = self._fail(e, key, "head")
            if isinstance(error, ObjectNotFound):
                return False
            raise error from e
        return True

    def ensure_container(self) -> None:
        if self.container_exists():
            return
        client = self._s3()
        region = client.meta.region_name
        request: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            request["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            client.create_bucket(**request)
        except (BotoCoreError, ClientError) as e:
            code = self._code(e)
            if code == "BucketAlreadyOwnedByYou":
                return  # another process created it between our check and our request
            if code == "BucketAlreadyExists":
                if self.container_exists():
                    return
                raise AccessDenied(
                    f"{self._where}: bucket {self.bucket} belongs to someone else"
                ) from e
            raise self._fail(e, "", "create bucket") from e

    def container_exists(self) -> bool:
        try:
            self._s3().head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as e:
            error = self._fail(e, "", "head bucket")
            if isinstance(error, ObjectNotFound):
                return False
            raise error from e
        return True
