"""``control.request``, the CLI's side of a daemon's control socket, against a socket the test
serves: what a command says when the daemon goes away in the middle of a request."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from testkit import answering_once

from snapfs.control import RunFiles, repository_daemons, request
from snapfs.errors import MountError


@contextmanager
def daemon_answering(answer: bytes) -> Iterator[RunFiles]:
    """A control socket whose daemon reads one request, sends ``answer`` and closes."""
    with tempfile.TemporaryDirectory(prefix="snapfs-ctl-", dir="/tmp") as d:  # short: a socket
        files = RunFiles("/mnt/disks", "k", Path(d) / "k.pid", Path(d) / "k.sock")
        with answering_once(files.socket, lambda _line: answer):
            yield files


def test_a_daemon_that_stops_before_it_replies_is_said_to_have_stopped() -> None:
    """As kill -9 of a daemon leaves a command waiting for its snapshot's upload: the
    connection closes without a byte. That is no garbled reply."""
    with daemon_answering(b"") as files, pytest.raises(MountError) as e:
        request(files, {"op": "task", "id": "x", "wait": 0.5})
    assert str(e.value) == ("the snapfs daemon of /mnt/disks stopped before it replied; what "
                            "was asked may or may not be done")


@pytest.mark.parametrize("answer", [b"{not json\n", b"[1]\n", b'{"ok": tr'])
def test_a_reply_that_is_not_one_is_garbled(answer: bytes) -> None:
    with daemon_answering(answer) as files, pytest.raises(MountError, match="garbled reply"):
        request(files, {"op": "task", "id": "x"})


def test_looking_for_daemons_makes_no_runtime_directory(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every snapshot create, delete and forget looks for mounts to tell: with no runtime
    directory there are none, and looking must not make one."""
    where = tmp_path / "run"
    monkeypatch.setenv("SNAPFS_RUNTIME_DIR", str(where))
    assert repository_daemons(str(tmp_path / "repo")) == []
    assert not where.exists()
