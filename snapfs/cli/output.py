"""What the CLI shows: progress bars on a terminal, JSON for scripts, sizes both ways."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from snapfs.errors import UsageError
from snapfs.plural import counted

if TYPE_CHECKING:
    from snapfs.progress import Progress as ProgressSink

T = TypeVar("T")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``16K``, ``4M``, ``1G``, ``1.5T`` or plain bytes (binary units; a trailing B or iB is ok)."""
    # (at most 30 digits a side: 10**30 bytes is past any size, and a longer number was a
    # traceback, from float's overflow or int's limit on digits)
    m = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([KMGT]?)(?:i?B)?\s*", text,
                     re.IGNORECASE)
    if not m:
        raise UsageError(f"not a size: {text!r} (try 16K, 4M, 1G)")
    # in integers: a float lost bytes past 2**53
    whole, _, fraction = m.group(1).partition(".")
    unit = _UNITS[m.group(2).upper()]
    return int(whole) * unit + int(fraction or "0") * unit // 10 ** len(fraction)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


#: control characters as a table or a ``show`` line prints them: a disk's label and a tag are
#: kept as given (a label may come from a file name), but a newline in one broke its row in two
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {
    ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r"}


def printable(text: str) -> str:
    """``text`` on one line: its control characters escaped (``\\n``, ``\\t``, ``\\x1b``)."""
    return text.translate(_ESCAPES)


def local_time(created: str) -> str:
    """A root's creation time (ISO 8601 in UTC) as a table shows it: in local time, to the
    second, as the default names (DISK-YYYYMMDD-HHMMSS) and forget's days count it."""
    from datetime import datetime

    try:
        when = datetime.fromisoformat(created)
    except ValueError:  # (not a time at all: shown as it is)
        return created
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table_lines(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows (the first one the header) as left-aligned columns two spaces apart, each cell on
    one line (``printable``)."""
    rows = [[printable(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


class TerminalProgress:
    """A rich progress bar on stderr, shown only when stderr is a terminal: one line per phase
    (``start``), which counts bytes (with a speed) or things of a unit ("3/40 packs"). A
    counted phase with nothing to count (no pack to repack) is not shown."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None

    def start(self, label: str, total: int, unit: str | None = None) -> None:
        if unit is not None and total == 0:
            self._task = None
            return
        if self._bar is None:
            # imported here: rich costs ~0.1 s at start-up, and scripts never draw a bar
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            amount, speed = _amount_columns()
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), amount, speed,
                TimeRemainingColumn(), transient=True, console=Console(stderr=True),
                redirect_stdout=False, redirect_stderr=False,
            )
            self._bar.start()
        self._task = self._bar.add_task(label, total=total, unit=unit)

    def advance(self, amount: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, amount)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _amount_columns() -> tuple[Any, Any]:
    """rich columns for how far a phase is (sizes, or "3/40 packs") and how fast (bytes only).
    Made when the first bar is: they subclass rich's, which is imported only to draw one."""
    from rich.progress import DownloadColumn, ProgressColumn, Task, TransferSpeedColumn
    from rich.text import Text

    class Amount(DownloadColumn):
        def render(self, task: Task) -> Text:
            unit = task.fields.get("unit")
            if unit is None:
                return super().render(task)
            total = int(task.total or 0)
            return Text(f"{int(task.completed)}/{counted(total, unit)}", style="progress.download")

    class Speed(ProgressColumn):
        def __init__(self) -> None:
            super().__init__()
            self._bytes = TransferSpeedColumn()

        def render(self, task: Task) -> Text:
            return self._bytes.render(task) if task.fields.get("unit") is None else Text("")

    return Amount(), Speed()


def progress_for(json_output: bool) -> TerminalProgress | None:
    if json_output or not sys.stderr.isatty():
        return None
    return TerminalProgress()


def run_async(fn: Callable[[ProgressSink], Awaitable[T]], json_output: bool = False) -> T:
    """Run one async library call under trio with a progress bar if on a terminal.

    ^C (and SIGTERM or SIGHUP, which ``stop_signals_interrupt`` turns into it) interrupts at
    the next checkpoint, never between two bytecodes of the library or of trio: there it could
    leave a task created and never run (a "coroutine was never awaited" warning after
    "interrupted") or a clean-up half done. The library does its long work on worker threads,
    so a checkpoint is never far."""
    import trio  # imported here, as everything heavy in the CLI: only commands that use it pay

    from snapfs.progress import NO_PROGRESS
    from snapfs.repo.parallel import single_error

    bar = progress_for(json_output)
    try:
        with single_error():
            return trio.run(fn, bar or NO_PROGRESS,
                            restrict_keyboard_interrupt_to_checkpoints=True)
    finally:
        if bar is not None:
            bar.close()
