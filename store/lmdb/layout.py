"""The LMDB store's on-disk layout (store format 2): named databases, keys and values.

    sessions  id                                  -> SessionRecord bytes
    tokens    id \\0 index(u32 BE)                 -> token block (blocks.py): little-endian int32 ids
    kv        id \\0 layer(u16 BE) index(u32 BE)    -> blob id (u64 BE): a pointer
    blobs     blob id (u64 BE)                     -> KV block (blocks.py)
    refs      blob id (u64 BE)                     -> reference count (u32 LE), blob bytes (u64 LE)
    meta      b"format" -> u32 LE store format; b"next_blob" -> u64 LE next blob id

Ids cannot contain \\0, so a prefix scan over `id \\0` finds exactly one
session's entries. Blob ids only grow, so a stale pointer never finds a newer
blob. Format 1 (before blobs were shared) had no blobs, refs or meta databases:
each kv entry held its block itself (upgrade.py converts it).

Changing anything here changes the format: STORE_FORMAT goes up and upgrade.py
learns the step.
"""
from __future__ import annotations

import struct

from ..records import check_id
from ..turn import check_kv_key

STORE_FORMAT = 2
DBS = ("sessions", "tokens", "kv", "blobs", "refs", "meta")
KV_KEY = struct.Struct(">HI")  # layer, index
TOK_KEY = struct.Struct(">I")  # token block index
BLOB_ID = struct.Struct(">Q")
REF = struct.Struct("<IQ")  # reference count, bytes of the blob
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
FORMAT_KEY, NEXT_BLOB_KEY = b"format", b"next_blob"


def prefix(sid: str) -> bytes:
    """b"id\\0": the start of every tokens and kv key of the session (ValueError for a bad id)."""
    return check_id(sid).encode() + b"\0"


def kv_key(pfx: bytes, layer, index) -> bytes:
    """The kv key of (layer, index) under a session's prefix (ValueError when out of range)."""
    return pfx + KV_KEY.pack(*check_kv_key(layer, index))


def token_key(pfx: bytes, index: int) -> bytes:
    return pfx + TOK_KEY.pack(index)


def owner(key: bytes) -> bytes:
    """The session id (bytes) a tokens or kv key belongs to."""
    return bytes(key).split(b"\0", 1)[0]
