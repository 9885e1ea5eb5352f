"""How long-running library calls report progress, without knowing about terminals.

The CLI passes a bar that draws on a terminal; scripts and tests pass nothing (``NO_PROGRESS``).
A call with several long phases starts each in turn. ``advance`` may be called from worker
threads.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int, unit: str | None = None) -> None:
        """A phase begins: ``total`` bytes, or with ``unit`` (a singular noun, "pack") that
        many of those."""

    def advance(self, amount: int) -> None: ...


class _NoProgress:
    def start(self, label: str, total: int, unit: str | None = None) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


NO_PROGRESS: Progress = _NoProgress()
