"""Holds: the snapshots that the writable disks of one host's daemon state need.

A disk reads its unwritten blocks from its base snapshot and makes its next snapshot from its
parent's manifest, so neither may be deleted while the disk exists, even while no daemon runs
(a machine that is off, a mount not restarted) and from another host. Each disk state keeps
one object ``holds/HOLDER-ID`` in the repository naming them; ``snapshot delete`` and
``forget`` read every hold. JSON with a format name and a version:
``{"format", "version", "host", "machine", "state", "updated", "snapshots": {ID: REASON}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from snapfs.errors import CorruptBlock, FormatError

HOLD_FORMAT = "snapfs-hold"
HOLD_VERSION = 1


@dataclass
class Hold:
    host: str
    state: str  # the daemon state directory that holds them, on ``host``
    updated: str
    snapshots: dict[str, str] = field(default_factory=dict)  # snapshot id -> what needs it
    machine: str = ""  # /etc/machine-id of the host, where it has one

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"format": HOLD_FORMAT, "version": HOLD_VERSION, "host": self.host,
                               "machine": self.machine, "state": self.state,
                               "updated": self.updated, "snapshots": self.snapshots}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Hold:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise CorruptBlock("hold is not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != HOLD_FORMAT:
            raise CorruptBlock("object is not a snapfs hold")
        if doc.get("version") != HOLD_VERSION:
            raise FormatError(f"unknown hold version {doc.get('version')}")
        snapshots = doc.get("snapshots")
        if not isinstance(snapshots, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in snapshots.items()):
            raise CorruptBlock("hold has malformed snapshots")
        return cls(str(doc.get("host", "?")), str(doc.get("state", "?")),
                   str(doc.get("updated", "?")), snapshots, str(doc.get("machine", "")))
