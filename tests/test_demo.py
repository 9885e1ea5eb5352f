"""The quick start README.md gives: ``./tools/demo`` runs to its end and checks what it shows."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from mountutil import MOUNTS

pytestmark = MOUNTS

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_through_and_leaves_nothing_mounted(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    env = {**os.environ, "SNAPFS_DEMO_DIR": str(work)}
    env.pop("SNAPFS_REPO", None)
    proc = subprocess.run([str(ROOT / "tools" / "demo")], env=env, capture_output=True,
                          text=True, timeout=600)
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "demo OK: every snapshot came back byte for byte, mounted, browsed and as a disk." in out
    # the incremental snapshot of the disk read and uploaded exactly the blocks written to it
    changed = re.search(r"blocks_changed=(\d+) blocks_read=(\d+) blocks_uploaded=(\d+)", out)
    assert changed is not None, out
    written, read, uploaded = map(int, changed.groups())
    assert 0 < written == read and 0 < uploaded <= written
    assert re.search(r"disk work rolled back to day2 \((\d+) blocks reset\)", out)
    assert "restored 1 file (" in out
    with open("/proc/mounts") as f:
        assert str(work) not in f.read()
    assert not work.exists()  # removed at the end (SNAPFS_DEMO_KEEP unset)
