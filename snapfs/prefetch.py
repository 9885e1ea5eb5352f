"""The ``--prefetch-list`` file: which images, or byte ranges of them, a mount fetches first.

A line is ``NAME.img`` (the whole image) or ``NAME.img OFFSET LENGTH`` (sizes may use K/M/G/T
suffixes); a line whose first character (after blanks) is ``#`` is a comment; a name may hold
spaces and ``#``. Light (no trio): ``mount`` parses the list before it forks, so that a bad one
is one line at once, and the daemon's sweep parses it again to use it.
"""

from __future__ import annotations

import os
import re
import stat

from snapfs.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", text, re.IGNORECASE)
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_prefetch_list(path: str) -> dict[str, list[tuple[int, int | None]]]:
    """Image name -> byte ranges (length None: to the end). Raises UsageError on bad lines."""
    out: dict[str, list[tuple[int, int | None]]] = {}
    try:  # (not blocking: a FIFO waited for a writer for good)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UsageError(f"prefetch list {path} is not a regular file")
            lines = f.readlines()
    except OSError as e:
        raise UsageError(f"cannot read prefetch list {path}: {e.strerror}") from None
    for lineno, raw in enumerate(lines, 1):
        try:  # image names are UTF-8, whatever the locale
            line = raw.decode()
        except UnicodeDecodeError:
            raise UsageError(f"{path}:{lineno}: not UTF-8 text (is it a prefetch list?)") from None
        # A snapshot's name may hold spaces and '#' ("web #2.img"): a line is the whole name,
        # or the name then two words; '#' begins a comment only as a line's first character.
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            if text.endswith(".img"):
                out.setdefault(text, []).append((0, None))
            else:
                words = text.rsplit(None, 2)
                if len(words) != 3 or not words[0].endswith(".img"):
                    raise ValueError(line)
                out.setdefault(words[0], []).append((_size(words[1]), _size(words[2])))
        except ValueError:
            raise UsageError(
                f"{path}:{lineno}: expected 'NAME.img' or 'NAME.img OFFSET LENGTH'"
            ) from None
    return out
