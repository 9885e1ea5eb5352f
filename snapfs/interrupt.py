"""Stop signals for commands: SIGTERM and SIGHUP interrupt a block as ^C does.

Used by the CLI around every command but ``mount`` (whose daemon has its own handling; while
``mount`` forks its daemon and waits for it to start, it takes the same signals its own way:
``snapfs.mount._NotedSignals``).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: what else stops a command (kill, timeout(1), systemd, a closed terminal)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt the block as ^C does, so that a command undoes what it had
    begun (an export's partial file, a snapshot's lock, restore-files' temporary browse) rather
    than end where it stood. The signal goes to the SIGINT handler in place: Python's (which
    raises ``KeyboardInterrupt``) or, inside ``trio.run``, trio's (which keeps it out of code
    that must not be interrupted). Only the first such signal interrupts: a repeat while the
    block unwinds is ignored, so that it cannot cut the clean-up short (SIGKILL still can). A
    signal ignored when the block began (``nohup``) stays ignored; the handlers from before are
    back after it.

    SIGINT ignored (a script's background job, ``snapfs … &``) stays ignored too, but trio
    defers an interrupt to a checkpoint only through the SIGINT handler it installs, and it
    installs one only over Python's default: so Python's stands in for the block, with SIGINT
    itself blocked. (Raising ``KeyboardInterrupt`` straight from a SIGTERM made trio abandon
    its run wherever it stood: the lock left, a hang with ``--debug``.)"""
    received: list[int] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)  # raises, or (trio, protected code) defers it
            return
        raise KeyboardInterrupt  # SIGINT ignored (a script's background job): all the same

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if sigint_ignored:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(signum, interrupt)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        if sigint_ignored:  # ignored first: a SIGINT that came meanwhile is dropped
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
