"""A lazy mount whose store goes down and comes back: real SeaweedFS, killed and restarted.

Reads of uncached blocks fail with EIO within seconds (bounded retries), cached blocks keep
reading, the daemon stays up and answers ``stats``, and once the store is back the same reads
return the right bytes.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskimages import make_image
from mountutil import mounted, pid_running
from testkit import Snapfs

from snapfs.errors import SnapfsError
from snapfs.store.s3 import S3Store
from snapfs.testing.seaweedfs import SeaweedServer

ACCESS, SECRET = "faults-access", "faults-secret-0123456789"
BS = 16384


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path_factory.mktemp("weed-faults"), ACCESS, SECRET) as sw:
        yield sw


def drop_page_cache() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def wait_until_serving(server: SeaweedServer) -> None:
    """SeaweedFS answers S3 before its volume server is back: "back" means a pack reads again."""
    store = S3Store("faults", "repo", endpoint_url=server.endpoint_url)
    try:
        pack = next(key for key, _ in store.list("packs/"))
        deadline = time.monotonic() + 60
        while True:
            try:
                store.get_range(pack, 0, 1)
                return
            except SnapfsError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        store.close()


def test_store_down_then_back(server: SeaweedServer, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", ACCESS), ("AWS_SECRET_ACCESS_KEY", SECRET),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)  # for this process's own S3 client
    image = make_image(tmp_path / "disk.img", size="64M", data="24M", seed=3)
    source = image.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SNAPFS_"))}
    env.update(AWS_ACCESS_KEY_ID=ACCESS, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    runtime = Path(f"/tmp/snapfs-faults-{os.getpid()}")
    runtime.mkdir(mode=0o700, exist_ok=True)
    env["SNAPFS_RUNTIME_DIR"] = str(runtime)
    snapfs = Snapfs("s3://faults/repo", server.endpoint_url, env)
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", image, "--name", "vm")

    nonzero = [o for o in range(8 << 20, len(source), BS) if source[o : o + BS] != bytes(BS)]
    later = nonzero[len(nonzero) // 2]  # a block nobody has read yet
    with mounted(snapfs, tmp_path / "mnt", tmp_path / "cache", "--no-background") as daemon:
        served = daemon.images / "vm.img"
        assert pread(served, 0, 8 << 20) == source[: 8 << 20]  # now in the block cache

        server.crash()
        try:
            drop_page_cache()  # so reads reach the daemon, not the kernel's copy
            assert pread(served, 0, 8 << 20) == source[: 8 << 20]  # cached: still readable

            started = time.monotonic()
            with pytest.raises(OSError) as e:
                pread(served, later, 4096)
            assert e.value.errno == errno.EIO
            assert time.monotonic() - started < 30  # bounded retries, not a hang
            assert pid_running(daemon.pid)
            stats = snapfs.json("stats", daemon.mountpoint)
            assert stats["hydrator"]["failed_requests"] >= 1, stats
        finally:
            server.restart()
        wait_until_serving(server)

        assert pread(served, later, 4096) == source[later : later + 4096]
        drop_page_cache()
        assert pread(served, 0, len(source)) == source
        snapfs.ok("umount", daemon.mountpoint)
