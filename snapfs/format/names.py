"""The rules for names a user gives that become part of a file or object name.

Each rule is one function, called by the command line before it asks anything of a store or a
daemon (so a bad name costs one line and exit 2, and nothing is written), and again by the
library that makes the name (a daemon's request, a caller that is not the CLI).

- A snapshot's name: every mount serves it as ``snapshots/NAME.img``.
- A served disk's name: every mount serves it as ``disks/NAME.img``, and it names the disk's
  state in the daemon's cache directory.
- A disk's label (``snapshot create SOURCE --disk``, the lineage a snapshot belongs to) is any
  non-empty UTF-8 text (so is a tag), kept as given; it becomes part of an object name only in a retention policy
  of that disk (``policies/disk/NAME``, percent-encoded), which must fit the longest file name.

Pure: no I/O. The command line imports it to check names, so it stays light.
"""

from __future__ import annotations

import re

from snapfs.errors import UsageError

#: the longest snapshot name, in bytes of UTF-8: NAME.img must be a file name in every mount
NAME_MAX_BYTES = 200
#: a served disk's name: DISK.img, and its state's files, must be file names anywhere
DISK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
#: the longest disk name of a policy, percent-encoded. A file name holds 255 bytes, and a local
#: store writes an object first as ``.NAME.PID.ADDRESS.tmp-snapfs`` (up to 37 more bytes)
POLICY_DISK_MAX_BYTES = 200


def check_snapshot_name(name: str) -> str:
    """``name`` if a snapshot may have it; else a ``UsageError`` that says the rule. Every
    mount serves a snapshot as ``snapshots/NAME.img``: one name the kernel refuses (a ``/``)
    made the whole directory unlistable, on every host, until that snapshot was deleted."""
    bad = (not name or name.startswith(".") or "/" in name
           or any(ord(c) < 32 or ord(c) == 127 for c in name))
    try:
        too_long = len(name.encode()) > NAME_MAX_BYTES
    except UnicodeEncodeError:  # undecodable bytes from the command line
        bad = too_long = True
    if bad or too_long:
        raise UsageError(f"bad snapshot name {name!r}: it must be UTF-8, 1 to {NAME_MAX_BYTES} "
                         "bytes, without '/' or control characters, and not start with '.'")
    return name


def group_snapshot_names(name: str, disks: list[str]) -> list[str]:
    """The snapshot names ``--name name`` gives ``disks`` snapshotted at one instant: ``name``
    itself for one disk, ``NAME-DISK`` for each of a consistency group; checked."""
    disks = list(dict.fromkeys(disks))
    if len(disks) == 1:
        return [check_snapshot_name(name)]
    return [check_snapshot_name(f"{name}-{disk}") for disk in disks]


def name_part(label: str) -> str:
    """``label`` (a disk's label, which may be any text) made fit to begin a snapshot name."""
    cleaned = "".join("_" if c == "/" or ord(c) < 32 or ord(c) == 127 else c for c in label)
    fitted = cleaned.lstrip(".").encode(errors="replace")[: NAME_MAX_BYTES - 40]
    return fitted.decode(errors="ignore") or "disk"


def check_disk_name(name: str) -> str:
    """``name`` if a served disk may have it; else a ``UsageError`` that says the rule."""
    if not DISK_NAME_PATTERN.fullmatch(name):
        raise UsageError(f"bad disk name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(up to 100, not starting with '.', '_' or '-')")
    return name


def check_disk_label(label: str) -> str:
    """``label`` if it may name a disk's snapshots (any text but none: an unset variable in
    ``--disk "$DISK"``, most likely, which was taken as no label at all)."""
    return check_text(label, "--disk")


def check_text(text: str, what: str) -> str:
    """``text`` if it may be stored as a disk's label or a tag (``what``: the option that
    gave it): any text, but not none, and text: bytes of the command line that are not UTF-8
    came as lone surrogates, which a JSON document stored (a snapshot root, a policy) holds
    only as escapes that no other reader takes for text, and which no one can type again."""
    if not text:
        raise UsageError(f"{what} must not be empty")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{what} {_shown(text)} is not UTF-8 text") from None
    return text


def policy_disk_part(disk: str, stored: bool = True) -> str:
    """The part of a retention policy's object name that names ``disk``: percent-encoded, dots
    too (no ``.``/``..``, nothing hidden); a ``UsageError`` if that is too long for a file.
    ``stored=False``: for a policy looked for, to delete it, which may be that long (stored by
    a snapfs without this rule, on S3)."""
    from urllib.parse import quote  # (here: every command imports this module, few need it)

    check_disk_label(disk)
    try:
        encoded = quote(disk, safe="").replace(".", "%2E")
    except UnicodeEncodeError:  # undecodable bytes from the command line
        raise UsageError(f"bad disk name {disk!r}: it must be UTF-8") from None
    if stored and len(encoded) > POLICY_DISK_MAX_BYTES:
        raise UsageError(
            f"disk name {_shown(disk)} is too long for a retention policy: at most "
            f"{POLICY_DISK_MAX_BYTES} bytes percent-encoded (letters, digits, '-', '_' and '~' "
            f"count one byte, every other byte of its UTF-8 three; it has {len(encoded)})")
    return encoded


def shell_word(text: str) -> str:
    """``text`` as one word of a command a message suggests, on one line: quoted where a shell
    needs it, and where it holds control characters as ``$'…'`` with them escaped (bash and
    zsh read that back as the text it was)."""
    if not any(ord(c) < 32 or ord(c) == 127 for c in text):
        import shlex  # (here: this module is on every command's start-up path)

        return shlex.quote(text)
    escaped = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127
                      else "\\" + c if c in "\\'" else c for c in text)
    return f"$'{escaped}'"


def _shown(text: str, most: int = 60) -> str:
    """``text`` quoted for a message, cut short: a name too long to store is long to read too."""
    return repr(text) if len(text) <= most else repr(text[:most]) + "…"
