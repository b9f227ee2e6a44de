"""Session records: what the store keeps about a session besides its blocks.

A record is JSON behind a small versioned header with a crc32, so a damaged
record is detected, never misread. The store treats `layout`, `messages` and
`extra` as opaque: it knows bytes, not models.
"""
from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field

from .errors import CorruptRecord

FORMAT_VERSION = 1
_MAGIC = b"MSRC"
_HEAD = struct.Struct("<4sHI")  # magic, format version, crc32 of the JSON body
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class SessionRecord:
    id: str
    model_name: str
    model_fingerprint: str
    policy: str
    n_tokens: int = 0
    created: float = 0.0
    updated: float = 0.0
    labels: dict[str, str] = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)
    layout: dict = field(default_factory=dict)
    stored_bytes: int = 0
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise ValueError(
                f"session id {self.id!r} is invalid: use 1 to 128 characters from A-Z a-z 0-9 . _ : -"
            )
        if self.n_tokens < 0 or self.stored_bytes < 0:
            raise ValueError("n_tokens and stored_bytes must be >= 0")
        for k, v in self.labels.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k:
                raise ValueError(f"labels must map non-empty strings to strings, got {k!r}: {v!r}")

    def to_bytes(self) -> bytes:
        body = json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()
        return _HEAD.pack(_MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body

    @classmethod
    def from_bytes(cls, buf: bytes, key: bytes | None = None) -> "SessionRecord":
        buf = bytes(buf)
        if len(buf) < _HEAD.size:
            raise CorruptRecord("session record is truncated", key)
        magic, version, crc = _HEAD.unpack_from(buf)
        if magic != _MAGIC:
            raise CorruptRecord("session record has a bad magic number", key)
        if version != FORMAT_VERSION:
            raise CorruptRecord(f"session record format {version} is not supported (expected {FORMAT_VERSION})", key)
        body = buf[_HEAD.size:]
        if zlib.crc32(body) != crc:
            raise CorruptRecord("session record fails its checksum", key)
        try:
            return cls(**json.loads(body))
        except (ValueError, TypeError) as exc:
            raise CorruptRecord(f"session record does not parse: {exc}", key) from exc
