"""Session records: what the store keeps about a session besides its blocks.

A record is JSON behind a small versioned header (magic, format version, crc32
of the JSON body), so a damaged record is detected, never misread. The store
treats `layout`, `messages` and `extra` as opaque data: it knows bytes, not
models, and checks only their shape (dicts and lists of plain JSON values).
"""
from __future__ import annotations

import json
import math
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field

from .errors import CorruptRecord

FORMAT_VERSION = 1
_MAGIC = b"MSRC"
_HEAD = struct.Struct("<4sHI")  # magic, format version, crc32 of the JSON body
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_id(sid) -> str:
    """Return sid if it is a valid session id, else raise ValueError."""
    if not isinstance(sid, str) or not _ID.fullmatch(sid):
        raise ValueError(f"session id {sid!r} is invalid: use 1 to 128 characters from A-Z a-z 0-9 . _ : -")
    return sid


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
    ttl: float = 0.0  # seconds without a change after which the session expires; 0: the server's default
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        check_id(self.id)
        for name in ("model_name", "model_fingerprint", "policy"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("n_tokens", "stored_bytes"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.ttl, (int, float)) or isinstance(self.ttl, bool) or not math.isfinite(self.ttl) \
                or self.ttl < 0:
            raise ValueError(f"ttl must be a finite number of seconds >= 0, got {self.ttl!r}")
        self.ttl = float(self.ttl)
        for name in ("created", "updated"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite unix time >= 0, got {v!r}")
            setattr(self, name, float(v))
        if not isinstance(self.labels, dict):
            raise ValueError(f"labels must be a dict, got {type(self.labels).__name__}")
        for k, v in self.labels.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k:
                raise ValueError(f"labels must map non-empty strings to strings, got {k!r}: {v!r}")
        if not isinstance(self.messages, list):
            raise ValueError(f"messages must be a list, got {type(self.messages).__name__}")
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        for name in ("layout", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"record format {self.format_version!r} is not supported (expected {FORMAT_VERSION})")

    def expires(self, default_ttl: float = 0.0) -> float:
        """Unix time at which the session expires: `updated` plus its ttl (or default_ttl when its own
        is 0); infinity when both are 0."""
        ttl = self.ttl or default_ttl
        return self.updated + ttl if ttl > 0 else math.inf

    def to_bytes(self) -> bytes:
        try:
            body = json.dumps(asdict(self), separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
        except TypeError as exc:
            raise ValueError(f"session record {self.id!r} holds a value JSON cannot store: {exc}") from exc
        return _HEAD.pack(_MAGIC, FORMAT_VERSION, zlib.crc32(body)) + body

    @classmethod
    def from_bytes(cls, buf: bytes, key: bytes | None = None) -> "SessionRecord":
        buf = bytes(buf)
        if len(buf) < _HEAD.size:
            raise CorruptRecord("session record is truncated", key, db="sessions", field="length")
        magic, version, crc = _HEAD.unpack_from(buf)
        if magic != _MAGIC:
            raise CorruptRecord("session record has a bad magic number", key, db="sessions", field="magic")
        if version != FORMAT_VERSION:
            raise CorruptRecord(f"session record format {version} is not supported (expected {FORMAT_VERSION})",
                                key, db="sessions", field="version")
        body = buf[_HEAD.size:]
        if zlib.crc32(body) != crc:
            raise CorruptRecord("session record fails its checksum", key, db="sessions", field="crc")
        try:
            fields = json.loads(body)
            if not isinstance(fields, dict):
                raise TypeError("the body is not a JSON object")
            rec = cls(**fields)
        except (ValueError, TypeError) as exc:
            raise CorruptRecord(f"session record does not parse: {exc}", key, db="sessions", field="body") from exc
        if key is not None and rec.id.encode() != bytes(key):
            raise CorruptRecord(f"session record of {rec.id!r} is stored under another key", key,
                                db="sessions", field="id")
        return rec
