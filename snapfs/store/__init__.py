"""Object stores: a local directory (the embedded default) and S3 through boto3.

``open_store`` turns a repository location into a store: ``s3://bucket/prefix`` is S3, anything
else a local directory path.
"""

from __future__ import annotations

from snapfs.store.base import ObjectStore
from snapfs.store.local import LocalStore

__all__ = ["LocalStore", "ObjectStore", "open_store"]


def open_store(location: str, endpoint_url: str | None = None) -> ObjectStore:
    if location.startswith("s3://"):
        from snapfs.store.s3 import S3Store

        bucket, _, prefix = location[len("s3://") :].partition("/")
        return S3Store(bucket, prefix, endpoint_url=endpoint_url)
    return LocalStore(location)
