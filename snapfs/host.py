"""Facts about this host that several layers need: its name, and whether a process lives.

(Repository locks and the shared block cache both recognise the leftovers of dead processes.)
"""

from __future__ import annotations

import os


def hostname() -> str:
    return os.uname().nodename


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
