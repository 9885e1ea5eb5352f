"""The CLI stays light to start: ``snapfs --help`` and a command's help import none of the heavy
libraries, and a local repository's commands never import boto3 (see ``snapfs.cli``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("trio", "pyfuse3", "lmdb", "boto3", "botocore", "rich", "zstandard", "blake3",
         "snapfs.mount", "snapfs.browse", "snapfs.repo.repository")


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("args", [["--help"], ["mount", "--help"], ["snapshot", "create", "--help"],
                                  ["restore-files", "--help"], ["disk", "--help"]])
def test_help_imports_nothing_heavy(args: list[str]) -> None:
    loaded = modules_after(
        "import sys\nfrom snapfs.cli import cli\n"
        f"try:\n    cli.main({args!r}, prog_name='snapfs')\nexcept SystemExit:\n    pass")
    assert not {m for m in HEAVY if m in loaded}


def test_local_repository_commands_do_not_import_boto3(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    loaded = modules_after(
        "from snapfs.cli import cli\n"
        f"for args in (['-r', {str(repo)!r}, 'init'], ['-r', {str(repo)!r}, 'snapshot', 'list']):\n"
        "    try:\n        cli.main(args, prog_name='snapfs')\n    except SystemExit as e:\n"
        "        assert not e.code, e.code")
    assert "snapfs.repo.repository" in loaded  # it did open the repository
    assert not {m for m in ("boto3", "botocore", "pyfuse3", "snapfs.mount") if m in loaded}
