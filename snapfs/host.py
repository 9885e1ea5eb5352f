"""Facts about this host that several layers need: its name, its boot, and whether a process
lives.

(Repository locks and the shared block cache both recognise the leftovers of dead processes; the
block cache and the disks' state both tell a power loss from kill -9 by the boot.)
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
    """Whether a process with this pid runs on this host (one we may not signal counts). A
    zombie does not: it was killed and holds nothing open, but stays until its parent reaps
    it, which a PID 1 that reaps nothing (as in many containers) never does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc to tell: it exists
        return True
    return state not in ("Z", "X")


def pid_started_after(pid: int, when: float) -> bool:
    """Whether the process with this pid on this host started after ``when`` (a Unix time),
    give or take a second: if so, it is not the process that was using the pid then (pids are
    reused). False when it cannot be told (no such process, no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # field 22, counted after the command (which may hold spaces), in ticks since boot
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return btime + ticks / os.sysconf("SC_CLK_TCK") > when + 1.0


def boot_id() -> str:
    """This boot's identity: a reboot since a process last wrote unsynced state means that
    state may be lost or torn (kill -9 keeps it: the kernel's cache survives the process).
    ``SNAPFS_BOOT_ID`` stands in for the kernel's, for tests that cut the power of a file
    system (a clone of its device) without rebooting the machine."""
    explicit = os.environ.get("SNAPFS_BOOT_ID")
    if explicit:
        return explicit
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"
