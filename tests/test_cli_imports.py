"""The CLI stays light to start: ``snapfs --help`` and a command's help import none of the heavy
libraries, and a local repository's commands never import boto3 (see ``snapfs.cli``).

On a cold page cache every module is a disk read, so the quick commands are held to fewer still:
``snapfs --help`` imports no command's module, a command only its own, and asking a running
daemon (``snapshot create --disk``) imports neither ``logging`` nor the rest of the library.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any

import click
import pytest
from testkit import answering_once

import snapfs.cli
from snapfs.cli import COMMANDS, cli
from snapfs.control import PidFile, RunFiles

HEAVY = ("trio", "pyfuse3", "lmdb", "boto3", "botocore", "rich", "zstandard", "blake3",
         "snapfs.mount", "snapfs.browse", "snapfs.repo.repository")
COMMAND_MODULES = {f"snapfs.cli.{module}" for module, _ in COMMANDS.values()}

#: printed after the code under test: the modules it loaded, and the root logger's level and
#: formats (None if ``logging`` was never imported)
REPORT = """
import json, sys
logging = sys.modules.get("logging")
root = logging.getLogger() if logging else None
print(json.dumps({"modules": sorted(sys.modules), "logging": root and
                  [root.level, [h.formatter and h.formatter._fmt for h in root.handlers]]}))
"""

#: ``snapfs ARGS...`` in this process (as the ``snapfs`` script runs it), ending in ``REPORT``
CLI = """
import sys
from snapfs.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="snapfs")
except SystemExit as e:
    assert not e.code, e.code
"""

LOG_FORMAT = "snapfs: %(levelname)s: %(message)s"
DEBUG, WARNING = 10, 30


def modules_after(code: str) -> set[str]:
    return set(report_after(code)[1]["modules"])


def report_after(code: str, *args: str, env: dict[str, str] | None = None
                 ) -> tuple[str, dict[str, Any]]:
    """The stdout of ``code`` (run with ``args`` in a fresh interpreter), and its ``REPORT``."""
    out = subprocess.run([sys.executable, "-c", code + REPORT, *args], check=True,
                         capture_output=True, text=True, env=env).stdout
    before, _, last = out.rstrip("\n").rpartition("\n")
    return before, json.loads(last)


@pytest.mark.parametrize("args", [["--help"], ["mount", "--help"], ["snapshot", "create", "--help"],
                                  ["restore-files", "--help"], ["disk", "--help"]])
def test_help_imports_nothing_heavy(args: list[str]) -> None:
    loaded = modules_after(
        "import sys\nfrom snapfs.cli import cli\n"
        f"try:\n    cli.main({args!r}, prog_name='snapfs')\nexcept SystemExit:\n    pass")
    assert not {m for m in HEAVY if m in loaded}


def test_version_is_given_not_looked_up() -> None:
    """``snapfs --version`` asked importlib.metadata, which scans site-packages: a third of a
    cold start. The version is snapfs.__version__, which the package's metadata takes too."""
    from importlib.metadata import version

    out, report = report_after(CLI, "--version")
    assert out == f"snapfs, version {version('snapfs')}"
    assert "importlib.metadata" not in report["modules"]


def test_local_repository_commands_do_not_import_boto3(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _, report = report_after(
        "from snapfs.cli import cli\n"
        f"for args in (['-r', {str(repo)!r}, 'init'], ['-r', {str(repo)!r}, 'snapshot', 'list']):\n"
        "    try:\n        cli.main(args, prog_name='snapfs')\n    except SystemExit as e:\n"
        "        assert not e.code, e.code")
    loaded = set(report["modules"])
    assert "snapfs.repo.repository" in loaded  # it did open the repository
    assert not {m for m in ("boto3", "botocore", "pyfuse3", "snapfs.mount") if m in loaded}
    assert report["logging"] == [WARNING, [LOG_FORMAT]]  # the library's warnings read as ours


def test_help_lists_the_commands_without_importing_them() -> None:
    out, report = report_after(CLI, "--help")
    assert "restore-files  Copy files out of snapshot SNAP into a directory," in out
    # each command's whole first line of help, wrapped: it was cut off with "..." at the
    # terminal's width ("Mount the files inside snapshot SNAP read-only at...")
    assert "..." not in out.partition("Commands:")[2]
    words = " ".join(out.split())
    for name, (_, text) in COMMANDS.items():
        assert f"{name} {text}" in words
    assert not COMMAND_MODULES & set(report["modules"])
    assert report["logging"] is None


def test_a_groups_help_lists_its_commands_whole() -> None:
    out = subprocess.run([sys.executable, "-m", "snapfs", "snapshot", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "..." not in out.partition("Commands:")[2]
    words = " ".join(out.split())
    assert ("create Snapshot SOURCE (an image file or block device: full the first time, then "
            "incremental), or, without SOURCE, the --disk disks the running mount serves (only "
            "their changed blocks). delete Delete snapshots") in words


def test_a_commands_help_imports_its_module_alone() -> None:
    out, report = report_after(CLI, "snapshot", "create", "--help")
    assert "--disk NAME" in out
    assert COMMAND_MODULES & set(report["modules"]) == {"snapfs.cli.snapshot"}
    assert report["logging"] is None


# -- asking a running daemon ---------------------------------------------------------------------


@contextmanager
def fake_daemon(runtime: Path, repository: str, reply: dict[str, Any]
                ) -> Iterator[list[dict[str, Any]]]:
    """A live daemon of ``repository`` as a client finds it (its locked pid file, its info, its
    socket) that answers one request with ``reply``; yields the requests it got."""
    key = "0" * 16
    files = RunFiles("/nowhere", key, runtime / f"{key}.pid", runtime / f"{key}.sock")
    pid_file = PidFile.try_claim(files.pid_file)
    assert pid_file is not None
    files.write_info({"repository": repository, "mountpoint": "/nowhere", "disks": True})
    requests: list[dict[str, Any]] = []

    def answer(line: bytes) -> bytes:
        requests.append(json.loads(line))
        return json.dumps({"ok": True, **reply}).encode() + b"\n"

    try:
        with answering_once(files.socket, answer):
            yield requests
    finally:
        pid_file.close()


@pytest.mark.parametrize("debug", [False, True])
def test_a_snapshot_of_a_served_disk_asks_the_daemon_and_imports_little(
    tmp_path: Path, debug: bool
) -> None:
    repo = str(tmp_path / "repo")
    task = {"id": "t1", "state": "accomplished", "consistency": "crash",
            "parts": [{"disk": "d1", "snapshot_id": "s1", "blocks": 0, "done": True}]}
    # short: a Unix socket path must fit in 108 bytes
    with tempfile.TemporaryDirectory(prefix="snapfs-run-") as runtime:
        env = dict(os.environ, SNAPFS_RUNTIME_DIR=runtime)
        with fake_daemon(Path(runtime), repo, {"task": task}) as requests:
            out, report = report_after(CLI, *(["--debug"] if debug else []), "-r", repo,
                                       "snapshot", "create", "--disk", "d1", "--json", env=env)
    assert requests == [{"op": "snapshot", "disks": ["d1"], "name": None, "tags": [],
                         "consistency": "crash"}]
    assert json.loads(out) == {**task, "frozen_seconds": 0.0}
    loaded = set(report["modules"])
    assert "snapfs.write.client" in loaded  # it did go through the client
    assert COMMAND_MODULES & loaded == {"snapfs.cli.snapshot"}
    # (pathlib brings fnmatch, urllib.parse and ipaddress: 5 ms of a cold start)
    assert not {m for m in (*HEAVY, "snapfs.repo", "snapfs.write.freeze", "subprocess",
                            "pathlib") if m in loaded}
    if debug:  # --debug logs from the start, whatever the command
        assert report["logging"] == [DEBUG, [LOG_FORMAT]]
    else:
        assert "logging" not in loaded


def test_a_snapshot_that_freezes_sets_up_logging(tmp_path: Path) -> None:
    """Freezing logs (a thaw that came early, or failed), as our one-line warnings."""
    env = dict(os.environ, SNAPFS_RUNTIME_DIR=str(tmp_path / "run"))
    _, report = report_after(
        CLI.replace("assert not e.code", "assert e.code == 3"),  # 3: no daemon serves it
        "-r", str(tmp_path / "repo"), "snapshot", "create", "--disk", "d1",
        "--freeze", str(tmp_path), env=env)
    assert report["logging"] == [WARNING, [LOG_FORMAT]]


# -- the table ``snapfs --help`` lists ------------------------------------------------------------


def defined_commands() -> dict[str, click.Command]:
    """The commands the modules of ``snapfs.cli`` define, but not those inside their groups."""
    found: dict[str, click.Command] = {}
    for info in pkgutil.iter_modules(snapfs.cli.__path__):
        module = import_module(f"snapfs.cli.{info.name}")
        commands = [v for v in vars(module).values() if isinstance(v, click.Command)]
        held = [c for g in commands if isinstance(g, click.Group) for c in g.commands.values()]
        found.update({c.name: c for c in commands if c not in held and c.name})
    return found


def test_the_table_names_every_command_and_where_it_is() -> None:
    defined = defined_commands()
    assert set(COMMANDS) == set(defined)
    with click.Context(cli) as ctx:
        for name, command in defined.items():
            assert cli.get_command(ctx, name) is command


def test_the_table_lists_each_command_as_its_own_help_would() -> None:
    for name, command in defined_commands().items():
        stand_in = click.Command(name, help=COMMANDS[name][1])
        assert not command.hidden
        for limit in range(20, 200):
            assert stand_in.get_short_help_str(limit) == command.get_short_help_str(limit), name


def test_a_mistyped_command_is_still_answered_with_a_suggestion() -> None:
    result = subprocess.run([sys.executable, "-m", "snapfs", "snapshto"], capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr == ("snapfs: no such command 'snapshto'. Did you mean 'snapshot'? "
                             "(try 'snapfs --help')\n")
