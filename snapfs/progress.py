"""How long-running library calls report progress, without knowing about terminals.

The CLI passes a bar that draws on a terminal; scripts and tests pass nothing (``NO_PROGRESS``).
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...


class _NoProgress:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


NO_PROGRESS: Progress = _NoProgress()
