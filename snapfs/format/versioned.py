"""The envelope of snapfs's small JSON objects (snapshot roots, holds, retention policies): a
``format`` name and a ``version`` beside the fields, checked the same way for each."""

from __future__ import annotations

import json
from typing import Any

from snapfs.errors import CorruptBlock, FormatError


def encode_versioned(fmt: str, version: int, fields: dict[str, Any],
                     sort_keys: bool = False) -> bytes:
    doc = {"format": fmt, "version": version, **fields}
    return json.dumps(doc, separators=(",", ":"), sort_keys=sort_keys).encode()


def decode_versioned(data: bytes, fmt: str, version: int, what: str,
                     version_name: str | None = None) -> dict[str, Any]:
    """The fields of an object of format ``fmt`` and ``version`` (without those two keys).
    ``CorruptBlock`` if it is not JSON or not such an object, ``FormatError`` for another
    version; ``what`` names it in the message ("snapshot root"), ``version_name`` its version
    (default: ``what``)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise CorruptBlock(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise CorruptBlock(f"object is not a snapfs {what}")
    if doc.get("version") != version:
        raise FormatError(f"unknown {version_name or what} version {doc.get('version')}")
    doc.pop("format")
    doc.pop("version")
    return doc
