"""The repository's ``config`` object: format version, block size, codec, secret.

Stored as JSON with a magic and a version; ``decode`` refuses any version it does not know, and
(as damaged) a config of this version whose fields cannot be right.
The secret keys the block-ID hash. It is stored in plain text: snapfs repositories are not
encrypted yet, and the secret's job is collision resistance against disk contents, not secrecy
of the store.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass
from typing import Any

from snapfs.errors import FormatError, IntegrityError, RepositoryNotFound, UsageError

CONFIG_FORMAT = "snapfs-repository"
CONFIG_VERSION = 1

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4 << 20


def check_block_size(size: int) -> int:
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise UsageError(f"block size must be a power of two from 4K to 4M, not {size}")
    return size


def check_compression_level(level: int) -> int:
    if not -7 <= level <= 22:
        raise UsageError(f"compression level must be from -7 to 22, not {level}")
    return level


@dataclass(frozen=True)
class RepoConfig:
    id: str
    block_size: int
    codec: str
    compression_level: int
    pack_size: int
    secret: str  # hex
    created: str
    encrypted: bool = False

    def encode(self) -> bytes:
        doc = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **asdict(self)}
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> RepoConfig:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise RepositoryNotFound(f"{where} is not a snapfs repository (config unreadable)") from None
        if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT:
            raise RepositoryNotFound(f"{where} is not a snapfs repository")
        if doc.get("version") != CONFIG_VERSION:
            raise FormatError(
                f"{where}: repository format version {doc.get('version')} is not supported "
                f"by this snapfs (it knows version {CONFIG_VERSION})"
            )
        if doc.get("codec") != "zstd" or doc.get("encrypted"):
            raise FormatError(f"{where}: repository uses features this snapfs does not know")
        known = set(cls.__dataclass_fields__)
        fields = {k: v for k, v in doc.items() if k in known}
        damage = _damage(fields)
        if damage is not None:
            # a config of this format and version that cannot be right (bit rot, a hand edit):
            # every command would otherwise fail with a traceback of its own
            raise IntegrityError(f"{where}: the repository config is damaged ({damage}); put it "
                                 "back from a copy")
        return cls(**fields)

    @property
    def secret_bytes(self) -> bytes:
        return bytes.fromhex(self.secret)


#: the type of every field a config holds, and how a message names it (``bool`` is no ``int``
#: here, nor the reverse)
_FIELD_TYPES: dict[str, tuple[type, str]] = {
    "id": (str, "text"), "block_size": (int, "a number"), "codec": (str, "text"),
    "compression_level": (int, "a number"), "pack_size": (int, "a number"),
    "secret": (str, "text"), "created": (str, "text"), "encrypted": (bool, "true or false"),
}


def _damage(fields: dict[str, Any]) -> str | None:
    """What is wrong with a config's ``fields`` (those ``RepoConfig`` knows), or None."""
    for name, f in RepoConfig.__dataclass_fields__.items():
        if name not in fields and f.default is MISSING:
            return f"it has no {name}"
    for name, value in fields.items():
        kind, what = _FIELD_TYPES[name]
        if type(value) is not kind:
            return f"its {name} is not {what}"
    try:
        check_block_size(fields["block_size"])
        check_compression_level(fields["compression_level"])
    except UsageError as e:
        return e.message
    if fields["pack_size"] <= 0:
        return "its pack size is not positive"
    if not re.fullmatch(r"[0-9a-fA-F]{64}", fields["secret"]):
        return "its secret is not 32 bytes in hex"
    return None
