"""restic as the peer of snapfs's snapshot benchmarks: the same image, backed up by restic.

What this module owns: running the ``restic`` binary (init, backup) against a local
repository directory or an S3 repository (``s3:http://127.0.0.1:PORT/bucket/prefix``, e.g. on
SeaweedFS), timing it, parsing its JSON summary, and measuring what it left in storage (bytes
stored, objects written). It does not start servers or make images; the benchmark runner does
(``start_seaweed`` below is a convenience around ``snapfs.testing.seaweedfs``).

How the figures are taken, so that they compare with snapfs's:
- ``seconds`` is the wall time of the ``restic backup`` process, scrypt key derivation and
  repository open included, as a user would see it; ``restic_seconds`` is restic's own
  ``total_duration`` from its summary.
- Before a timed run the page cache is dropped (``echo 3 > /proc/sys/vm/drop_caches``, needs
  root; ``cold`` in the result says whether that happened), so the image is read from disk.
  restic's own cache (``RESTIC_CACHE_DIR``) is kept between the runs of one benchmark, as a
  nightly job keeps it: give each benchmark run its own directory (``restic_env``).
- Repositories are created with ``--repository-version 2`` when restic supports it (0.14+),
  which gives restic's default ``auto`` zstd compression.
- ``bytes_added`` is restic's ``data_added``: bytes of new blobs *before* compression in
  restic 0.14 (0.17 added ``data_added_packed``); what really landed in storage is
  ``stored_bytes_added``. ``stored_bytes`` and ``objects`` are counted in the storage itself, and
  ``objects_written`` is the difference across the run (restic deletes nothing during a
  backup; its lock file comes and goes).

Module import needs only the standard library; boto3 is imported for S3 repositories only.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

#: restic's --host for every backup, so that an incremental run finds its parent snapshot
#: whatever machine name the benchmark runs on.
BACKUP_HOST = "snapfs-bench"


class ResticError(RuntimeError):
    """restic failed, or its output could not be understood."""


# ---- environment ---------------------------------------------------------------------------


def restic_binary() -> str:
    found = shutil.which("restic")
    if found is None:
        raise ResticError("restic not found on PATH (apt-get install restic)")
    return found


def restic_version() -> tuple[int, int, int]:
    """restic's version, e.g. (0, 14, 0)."""
    out = subprocess.run(
        [restic_binary(), "version"], capture_output=True, text=True, check=False
    ).stdout
    m = re.search(r"restic (\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        raise ResticError(f"cannot read restic's version from {out.strip()!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def restic_env(
    password: str,
    cache_dir: str | os.PathLike[str],
    access_key: str | None = None,
    secret_key: str | None = None,
) -> dict[str, str]:
    """The variables restic needs: the repository password, a cache directory of this
    benchmark run, and for S3 the credentials (restic reads AWS_* from the environment)."""
    env = {"RESTIC_PASSWORD": password, "RESTIC_CACHE_DIR": os.fspath(cache_dir)}
    if access_key is not None and secret_key is not None:
        env["AWS_ACCESS_KEY_ID"] = access_key
        env["AWS_SECRET_ACCESS_KEY"] = secret_key
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return env


def s3_repo_url(endpoint_url: str, bucket: str, prefix: str) -> str:
    """restic's name for an S3 repository: ``s3:http://host:port/bucket/prefix``."""
    return f"s3:{endpoint_url.rstrip('/')}/{bucket}/{prefix.strip('/')}"


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache; False if not allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _run_restic(
    args: list[str], env: Mapping[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env)
    proc = subprocess.run(
        [restic_binary(), *args], env=full_env, capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ResticError(f"restic {args[0]} failed: {detail}")
    return proc


# ---- storage accounting --------------------------------------------------------------------


def _split_s3(repo: str) -> tuple[str, str, str]:
    """(endpoint_url, bucket, key prefix) of ``s3:http(s)://host:port/bucket/prefix``."""
    if not repo.startswith("s3:http://") and not repo.startswith("s3:https://"):
        raise ResticError(f"only s3:http(s)://HOST:PORT/BUCKET/PREFIX repositories: {repo!r}")
    parts = urlsplit(repo[3:])
    bucket, _, prefix = parts.path.lstrip("/").partition("/")
    if not bucket:
        raise ResticError(f"no bucket in {repo!r}")
    return f"{parts.scheme}://{parts.netloc}", bucket, prefix.strip("/")


def _s3_client(endpoint_url: str, env: Mapping[str, str]) -> Any:
    import boto3  # only S3 repositories need it

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID")),
        aws_secret_access_key=env.get(
            "AWS_SECRET_ACCESS_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY")
        ),
    )


def repo_usage(repo: str, env: Mapping[str, str]) -> tuple[int, int]:
    """(objects, bytes) the repository occupies in its storage right now.

    Local: regular files under the directory and the sum of their sizes. S3: the objects
    under the prefix (``list_objects_v2``, all pages) and the sum of their sizes.
    """
    if repo.startswith("s3:"):
        endpoint_url, bucket, prefix = _split_s3(repo)
        client = _s3_client(endpoint_url, env)
        objects = size = 0
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    objects += 1
                    size += obj["Size"]
        finally:
            client.close()
        return objects, size
    objects = size = 0
    for dirpath, _dirnames, filenames in os.walk(repo):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            objects += 1
            size += st.st_size
    return objects, size


def repo_stored_bytes(repo: str, env: Mapping[str, str]) -> int:
    """Bytes the repository occupies in its storage (see ``repo_usage``)."""
    return repo_usage(repo, env)[1]


def repo_object_count(repo: str, env: Mapping[str, str]) -> int:
    """Objects (files, for a local repository) the repository holds (see ``repo_usage``)."""
    return repo_usage(repo, env)[0]


# ---- restic commands -----------------------------------------------------------------------


def restic_init(repo: str, env: Mapping[str, str]) -> dict[str, Any]:
    """Create the repository (format 2, compression auto, where restic supports it)."""
    version = restic_version()
    args = ["init", "--repo", repo]
    repo_version = 1
    if version >= (0, 14, 0):
        args += ["--repository-version", "2"]
        repo_version = 2
    start = time.perf_counter()
    _run_restic(args, env)
    return {
        "seconds": time.perf_counter() - start,
        "repository_version": repo_version,
        "compression": "auto" if repo_version >= 2 else "none",
        "restic_version": ".".join(map(str, version)),
    }


def _parse_summary(stdout: str) -> dict[str, Any]:
    summary: dict[str, Any] | None = None
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("message_type") == "summary":
            summary = msg
    if summary is None:
        raise ResticError("restic backup printed no JSON summary")
    return summary


def restic_backup(
    image_path: str | os.PathLike[str],
    repo: str,
    env: Mapping[str, str],
    *,
    cold: bool = True,
    count_objects: bool = True,
) -> dict[str, Any]:
    """Back up one image file with restic and measure the run.

    ``repo`` is a local directory or ``s3:http://HOST:PORT/BUCKET/PREFIX``; ``env`` holds
    RESTIC_PASSWORD, RESTIC_CACHE_DIR and for S3 the AWS_* credentials (``restic_env``).
    A second backup of the same path is an incremental one (restic finds the parent by host
    and path, re-reads the changed file and stores only new chunks).

    Returns seconds (wall), restic_seconds, cpu_seconds (restic's user + system time: steadier
    than wall time on a shared machine), bytes_added (restic's data_added: bytes of new blobs
    before compression in restic 0.14), bytes_processed,
    files_new/changed/unmodified, data_blobs, tree_blobs, snapshot_id, cold (whether the page
    cache was dropped first) and, with count_objects, objects_written, objects, stored_bytes
    and stored_bytes_added (counted in storage, outside the timed part).
    """
    image = os.fspath(image_path)
    if not os.path.isfile(image):
        raise ResticError(f"no such image: {image}")
    before = repo_usage(repo, env) if count_objects else (0, 0)
    dropped = drop_caches() if cold else False
    args = ["backup", "--repo", repo, "--json", "--host", BACKUP_HOST, image]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = _run_restic(args, env)
    seconds = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = _parse_summary(proc.stdout)
    result: dict[str, Any] = {
        "seconds": seconds,
        "restic_seconds": float(summary.get("total_duration", 0.0)),
        "cpu_seconds": (used.ru_utime - usage.ru_utime) + (used.ru_stime - usage.ru_stime),
        "bytes_added": int(summary.get("data_added", 0)),
        "bytes_processed": int(summary.get("total_bytes_processed", 0)),
        "files_new": int(summary.get("files_new", 0)),
        "files_changed": int(summary.get("files_changed", 0)),
        "files_unmodified": int(summary.get("files_unmodified", 0)),
        "data_blobs": int(summary.get("data_blobs", 0)),
        "tree_blobs": int(summary.get("tree_blobs", 0)),
        "snapshot_id": summary.get("snapshot_id", ""),
        "cold": dropped,
    }
    if count_objects:
        after = repo_usage(repo, env)
        result.update(
            objects_written=after[0] - before[0],
            objects=after[0],
            stored_bytes=after[1],
            stored_bytes_added=after[1] - before[1],
        )
    return result


# ---- S3 server -----------------------------------------------------------------------------


def start_seaweed(data_dir: str | os.PathLike[str], access_key: str, secret_key: str) -> Any:
    """A started ``snapfs.testing.seaweedfs.SeaweedServer`` with that identity (restic's
    signed requests need one); the caller stops it."""
    from snapfs.testing.seaweedfs import SeaweedServer

    server = SeaweedServer(data_dir, access_key=access_key, secret_key=secret_key)
    server.start()
    return server
