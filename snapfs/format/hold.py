"""Holds: the snapshots that the writable disks of one host's daemon state need.

A disk reads its unwritten blocks from its base snapshot and makes its next snapshot from its
parent's manifest, so neither may be deleted while the disk exists, even while no daemon runs
(a machine that is off, a mount not restarted) and from another host. Each disk state keeps
one object ``holds/HOLDER-ID`` in the repository naming them; ``snapshot delete`` and
``forget`` read every hold. JSON with a format name and a version:
``{"format", "version", "host", "machine", "state", "updated", "snapshots": {ID: REASON}}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from snapfs.errors import CorruptBlock
from snapfs.format.versioned import decode_versioned, encode_versioned

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
        return encode_versioned(HOLD_FORMAT, HOLD_VERSION, asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, data: bytes) -> Hold:
        doc = decode_versioned(data, HOLD_FORMAT, HOLD_VERSION, "hold")
        snapshots = doc.get("snapshots")
        if not isinstance(snapshots, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in snapshots.items()):
            raise CorruptBlock("hold has malformed snapshots")
        return cls(str(doc.get("host", "?")), str(doc.get("state", "?")),
                   str(doc.get("updated", "?")), snapshots, str(doc.get("machine", "")))
