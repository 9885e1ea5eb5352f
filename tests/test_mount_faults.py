"""A lazy mount whose store goes down and comes back: real SeaweedFS, killed and restarted,
or stopped (SIGSTOP: the kernel still accepts its connections, nothing answers them) and
continued.

Reads of uncached blocks fail with EIO within seconds (bounded retries), cached blocks keep
reading, the daemon stays up and answers ``stats``, and once the store is back the same reads
return the right bytes, and the background sweep finishes what the outage interrupted. A mount
whose store hangs also unmounts in bounded time.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from diskimages import make_image, random_image
from mountutil import mounted, pid_running, pread
from testkit import (
    EXIT_STORE,
    SEAWEED_STOP_TIMEOUT,
    Snapfs,
    reap,
    wait_until,
    wait_until_packs_read,
)

from snapfs.browse import store_failing
from snapfs.cache import BlockCache
from snapfs.hydration.scheduler import FAILED_MEMORY, HydrationConfig, Hydrator
from snapfs.image.catalog import SnapshotCatalog
from snapfs.image.sweep import Sweeper
from snapfs.repo.create import CreateOptions, create_snapshot
from snapfs.repo.repository import Repository
from snapfs.store.s3 import S3Store
from snapfs.testing.seaweedfs import SeaweedServer

ACCESS, SECRET = "faults-access", "faults-secret-0123456789"
BS = 16384


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path_factory.mktemp("weed-faults"), ACCESS, SECRET,
                       stop_timeout=SEAWEED_STOP_TIMEOUT) as sw:
        yield sw


def drop_page_cache() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def wait_until_serving(server: SeaweedServer, prefix: str = "repo") -> None:
    """Until the repository at ``prefix`` on the restarted ``server`` reads again."""
    store = S3Store("faults", prefix, endpoint_url=server.endpoint_url)
    try:
        wait_until_packs_read(store)
    finally:
        store.close()


@contextmanager
def stopped(server: SeaweedServer) -> Iterator[None]:
    """The store hangs: SeaweedFS stopped (SIGSTOP), so the kernel completes connections to it
    and takes requests into its buffers, and nothing ever answers; continued (SIGCONT)
    afterwards, whatever happens."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def cache_backwards(served: Path, source: bytes, nbytes: int) -> None:
    """The first ``nbytes`` of the image read into the block cache, a MiB at a time from the
    last: no read continues the one before, so the daemon reads nothing ahead (a stream's
    read-ahead reaches tens of MiB past where it is: the blocks the tests then read must stay
    uncached)."""
    step = 1 << 20
    for end in range(nbytes, 0, -step):
        assert pread(served, end - step, step) == source[end - step : end]


def snapshot_on(server: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                runtime: Path, prefix: str, size: str, data: str, seed: int,
                ) -> tuple[Snapfs, bytes]:
    """A repository at ``prefix`` on ``server`` holding one snapshot ``vm`` of a new image; the
    ``snapfs`` command for it, and the image's bytes."""
    for name, value in (("AWS_ACCESS_KEY_ID", ACCESS), ("AWS_SECRET_ACCESS_KEY", SECRET),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)  # for this process's own S3 client
    image = make_image(tmp_path / "disk.img", size=size, data=data, seed=seed)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SNAPFS_"))}
    env.update(AWS_ACCESS_KEY_ID=ACCESS, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    env["SNAPFS_RUNTIME_DIR"] = str(runtime)
    snapfs = Snapfs(f"s3://faults/{prefix}", server.endpoint_url, env)
    snapfs.ok("init")
    snapfs.ok("snapshot", "create", image, "--name", "vm")
    return snapfs, image.read_bytes()


def test_store_down_then_back(server: SeaweedServer, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch, runtime_dir: Path) -> None:
    snapfs, source = snapshot_on(server, tmp_path, monkeypatch, runtime_dir, "repo", "64M",
                                 "24M", seed=3)

    nonzero = [o for o in range(8 << 20, len(source), BS) if source[o : o + BS] != bytes(BS)]
    later = nonzero[len(nonzero) // 2]  # a block nobody has read yet
    with mounted(snapfs, tmp_path / "mnt", tmp_path / "cache", "--no-background") as daemon:
        served = daemon.images / "vm.img"
        cache_backwards(served, source, 8 << 20)

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


def test_store_hangs_then_answers(server: SeaweedServer, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, runtime_dir: Path) -> None:
    """A hung store fails a waiting read with EIO in seconds (S3 reads give up on a request
    that has no byte for 5 s, 3 tries: about 15 s, and the kernel's retry fails at once; it
    was about 180 s: 3 tries of 30 s, then as many for the kernel's retry), reads of cached
    blocks go on, the same read succeeds once the store answers again, and ``umount`` of a
    mount whose store hangs ends in bounded time, its daemon exiting by itself."""
    snapfs, source = snapshot_on(server, tmp_path, monkeypatch, runtime_dir, "hung", "32M", "12M", seed=4)
    nonzero = [o for o in range(4 << 20, len(source), BS) if source[o : o + BS] != bytes(BS)]
    later = nonzero[len(nonzero) // 2]  # a block nobody has read yet
    with mounted(snapfs, tmp_path / "mnt", tmp_path / "cache", "--no-background") as daemon:
        served = daemon.images / "vm.img"
        cache_backwards(served, source, 4 << 20)

        with stopped(server):
            drop_page_cache()  # so reads reach the daemon, not the kernel's copy
            assert pread(served, 0, 4 << 20) == source[: 4 << 20]  # cached: still readable

            started = time.monotonic()
            with pytest.raises(OSError) as e:
                pread(served, later, 4096)
            waited = time.monotonic() - started
            assert e.value.errno == errno.EIO
            assert waited < 30, waited  # bounded: about 15 s
            assert pid_running(daemon.pid)
            stats = snapfs.json("stats", daemon.mountpoint)
            assert stats["hydrator"]["failed_requests"] >= 1, stats
            # what restore-files asks after a read failed: the store is not answering
            assert "cannot reach" in (stats["hydrator"]["store_failing"] or ""), stats
            monkeypatch.setenv("SNAPFS_RUNTIME_DIR", snapfs.env["SNAPFS_RUNTIME_DIR"])
            assert store_failing(str(daemon.mountpoint)) == stats["hydrator"]["store_failing"]
            assert pread(served, 0, 4 << 20) == source[: 4 << 20]  # and still readable
        wait_until_serving(server, "hung")
        time.sleep(FAILED_MEMORY)  # the failure is forgotten by then (the kernel's retry is not)
        assert pread(served, later, 4096) == source[later : later + 4096]
        assert snapfs.json("stats", daemon.mountpoint)["hydrator"]["store_failing"] is None
        assert store_failing(str(daemon.mountpoint)) is None

        with stopped(server):  # storing its access profile hangs: it gives up in time
            started = time.monotonic()
            result = snapfs("umount", daemon.mountpoint)
            waited = time.monotonic() - started
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert result.stdout == f"unmounted {daemon.mountpoint}\n"  # not killed
        assert waited < 50, waited  # the daemon's own limits: 15 s, then 20 s at most


def test_background_sweep_finishes_once_the_store_is_back(server: SeaweedServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The store dies while the sweep hydrates an image: the runs in flight fail, and once the
    store is back the sweep tries the blocks still missing again until the image is whole."""
    for name, value in (("AWS_ACCESS_KEY_ID", ACCESS), ("AWS_SECRET_ACCESS_KEY", SECRET),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    image = make_image(tmp_path / "disk.img", size="32M", data="12M", seed=5)
    source = image.read_bytes()
    store = S3Store("faults", "sweep", endpoint_url=server.endpoint_url)
    repo = Repository.init(store, block_size=BS)
    trio.run(create_snapshot, repo, str(image), CreateOptions(name="vm"))
    # runs of 256 KiB at 1 MiB/s: the store dies in the middle of the sweep; few, quick retries
    config = HydrationConfig(hydrate_rate=1 << 20, max_background_run=256 << 10, attempts=2,
                             retry_delay=0.1, sweep_retry=0.5)
    cache = BlockCache(tmp_path / "cache", capacity=256 << 20)

    async def body() -> tuple[bytes, int]:
        hydrator = Hydrator(repo, repo.load_index(), cache, config)
        catalog = SnapshotCatalog(repo, hydrator)
        await catalog.refresh(force=True)
        view = catalog.images()["vm.img"]
        catalog.use(view.root.id)  # opened: the sweep hydrates it
        async with trio.open_nursery() as nursery:
            await nursery.start(hydrator.run)
            nursery.start_soon(Sweeper(catalog, hydrator, config).run)
            await wait_until(lambda: view.data_blocks is not None and len(view.pending) < view.data_blocks, 30)
            server.crash()
            try:
                await wait_until(lambda: hydrator.counters.failed_requests >= 1, 60)
                failed_while_down = len(view.pending)
            finally:
                server.restart()
            await trio.to_thread.run_sync(wait_until_serving, server, "sweep")
            await wait_until(lambda: not view.pending, 60)
            nursery.cancel_scope.cancel()
        # every block is in the cache now: read the image back with the store out of reach
        index = repo.load_index()
        hydrator = Hydrator(Repository(S3Store("faults", "sweep", endpoint_url="http://127.0.0.1:9"),
                                       repo.config), index, cache, config)
        catalog = SnapshotCatalog(repo, hydrator)
        catalog.load(repo.list_snapshots(), index)  # as a daemon starts: nothing asked of the store
        view = catalog.images()["vm.img"]
        return await view.read(0, len(source)), failed_while_down

    try:
        data, failed_while_down = trio.run(body)
    finally:
        cache.close()
        store.close()
    assert failed_while_down > 0  # the sweep had not finished when the store died
    assert data == source


def test_a_snapshot_whose_store_goes_down_fails_in_one_line(
        server: SeaweedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        runtime_dir: Path) -> None:
    """SeaweedFS killed while ``snapshot create`` uploads (its lock stored): the PUTs fail, and
    then so does the removal of its lock. That removal's warning came first, a second line
    before the error that said the same (the store cannot be reached); the lock it leaves
    holds nothing up."""
    snapfs, _ = snapshot_on(server, tmp_path, monkeypatch, runtime_dir, "oneline", "16M", "4M",
                            seed=5)
    source = random_image(tmp_path / "big.img", 24 << 20, seed=6)
    store = S3Store("faults", "oneline", endpoint_url=server.endpoint_url)
    try:
        proc = snapfs.popen("snapshot", "create", source, "--rate", "1")
        try:
            deadline = time.monotonic() + 60
            while not any(store.list("locks/")):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the snapshot never took its lock"
                time.sleep(0.05)
            server.crash()
            _, stderr = proc.communicate(timeout=120)
        finally:
            reap(proc)
            if server.pid is None:
                server.restart()
        assert proc.returncode == EXIT_STORE, stderr
        assert len(stderr.splitlines()) == 1 and "cannot reach" in stderr, stderr
        wait_until_serving(server, "oneline")
        assert len(list(store.list("locks/"))) == 1  # let go of later
    finally:
        store.close()
    snapfs.ok("prune")
    assert snapfs.json("verify")["ok"] is True
