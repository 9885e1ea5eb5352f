"""Counts in what snapfs says, with their noun in the right number: ``1 pack``, ``2 packs``.

Every layer words counts for a user (a CLI summary, an error the daemon sends the CLI, a log
line), so this sits below them all and imports nothing.
"""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``1 file``, ``2 files``: a count and its noun (one that takes an ``s``) in the right
    number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
