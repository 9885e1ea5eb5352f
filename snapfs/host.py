"""Facts about this host that several layers need: its name, and whether a process lives.

(Repository locks and the shared block cache both recognise the leftovers of dead processes.)
"""

from __future__ import annotations

import os


def hostname() -> str:
    return os.uname().nodename


def machine_id() -> str:
    """This machine's /etc/machine-id (empty where there is none): unlike the host name, a
    cloned machine is expected to get a new one."""
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
