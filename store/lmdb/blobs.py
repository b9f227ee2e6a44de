"""KV entries of the LMDB store: pointers to blobs, shared copy-on-write by reference counts.

A fork copies a session's pointers and counts one more reference to each blob;
writing (layer, index) stores a new blob and drops the session's reference to
the old one (a blob never changes once written); a delete drops every
reference; a blob whose count reaches zero is removed in the same transaction.

Functions over one open transaction; they know the kv, blobs, refs and meta
databases, not what a payload means.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from ..blocks import decode_kv
from ..errors import CorruptBlock
from .env import Txn
from .layout import BLOB_ID, KV_KEY, NEXT_BLOB_KEY, REF, U64, kv_key, prefix


def blob_id(key: bytes, ptr) -> bytes:
    """The blob id a kv entry holds (CorruptBlock for anything else)."""
    if len(ptr) != BLOB_ID.size:
        raise CorruptBlock(f"KV pointer is {len(ptr)} bytes, not {BLOB_ID.size}", key, db="kv", field="pointer")
    return bytes(ptr)


def blob(tx: Txn, key: bytes, ptr) -> bytes:
    """The stored (encoded) blob a kv entry points to."""
    bid = blob_id(key, ptr)
    value = tx.get("blobs", bid)
    if value is None:
        raise CorruptBlock(f"KV block points to blob {BLOB_ID.unpack(bid)[0]}, which is missing", key, db="kv",
                           field="blob")
    return value


def ref(tx: Txn, key: bytes, bid: bytes) -> tuple[int, int]:
    """(reference count, blob bytes) of blob bid, which kv entry `key` points to."""
    raw = tx.get("refs", bid)
    if raw is None or len(raw) != REF.size:
        raise CorruptBlock(f"blob {BLOB_ID.unpack(bid)[0]} has no valid reference count", key, db="refs",
                           field="count")
    return REF.unpack(raw)


def incref(tx: Txn, key: bytes, bid: bytes) -> int:
    """One more reference to bid; returns the blob's bytes."""
    count, size = ref(tx, key, bid)
    tx.put("refs", bid, REF.pack(count + 1, size))
    return size


def decref(tx: Txn, key: bytes, bid: bytes) -> int:
    """One reference fewer to bid, removing the blob at zero; returns the blob's bytes."""
    count, size = ref(tx, key, bid)
    if count <= 1:
        tx.delete("refs", bid)
        tx.delete("blobs", bid)
    else:
        tx.put("refs", bid, REF.pack(count - 1, size))
    return size


def put_blobs(tx: Txn, items: Sequence[tuple[bytes, bytes]]) -> int:
    """Each (kv key, encoded block) as a new blob with one reference, the key pointing to it
    (whatever it pointed to is the caller's). Returns the bytes of the blobs."""
    if not items:
        return 0
    raw = tx.get("meta", NEXT_BLOB_KEY)
    next_blob = 1 if raw is None or len(raw) != U64.size else U64.unpack(raw)[0]
    cur = tx.cursor("blobs")
    if cur.last() and len(cur.key()) == BLOB_ID.size:  # a damaged counter must never reuse an id
        next_blob = max(next_blob, BLOB_ID.unpack(cur.key())[0] + 1)
    nbytes = 0
    for key, value in items:
        bid = BLOB_ID.pack(next_blob)
        next_blob += 1
        tx.put("blobs", bid, value)
        tx.put("refs", bid, REF.pack(1, len(value)))
        tx.put("kv", key, bid)
        nbytes += len(value)
    tx.put("meta", NEXT_BLOB_KEY, U64.pack(next_blob))
    return nbytes


def release(tx: Txn, keys: Iterable[bytes], delete: set | frozenset, *, strict: bool) -> int:
    """Drop the reference each of `keys` holds (absent entries are skipped), removing the entries in
    `delete`; returns the bytes of the blobs released. strict: a damaged pointer or count raises
    CorruptBlock; else that blob keeps its reference (gc() settles it) and counts 0 bytes."""
    nbytes = 0
    for key in keys:
        prev = tx.get("kv", key)
        if prev is None:
            continue
        try:
            nbytes += decref(tx, key, blob_id(key, prev))
        except CorruptBlock:
            if strict:
                raise
        if key in delete:
            tx.delete("kv", key)
    return nbytes


def payload(tx: Txn, key: bytes, ptr, layer: int, index: int) -> bytes:
    """The checked, decompressed payload of KV entry (layer, index) holding pointer ptr."""
    return decode_kv(blob(tx, key, ptr), layer, index, key)


def read_at(tx: Txn, sid: str, layer: int, indices: Sequence[int]) -> list[bytes | None]:
    pfx = prefix(sid)
    out: list[bytes | None] = []
    for index in indices:
        key = kv_key(pfx, layer, index)
        ptr = tx.get("kv", key)
        out.append(None if ptr is None else payload(tx, key, ptr, layer, index))
    return out


def read_all(tx: Txn, sid: str) -> dict[tuple[int, int], bytes]:
    pfx = prefix(sid)
    plen = len(pfx)
    out: dict[tuple[int, int], bytes] = {}
    for key, ptr in tx.scan("kv", pfx):
        if len(key) != plen + KV_KEY.size:
            raise CorruptBlock("KV block key has the wrong length", key, db="kv", field="key")
        layer, index = KV_KEY.unpack(key[plen:])
        out[(layer, index)] = payload(tx, key, ptr, layer, index)
    return out


def keys(tx: Txn, sid: str) -> list[tuple[int, int]]:
    pfx = prefix(sid)
    plen = len(pfx)
    return [KV_KEY.unpack(key[plen:]) for key, _ in tx.scan("kv", pfx) if len(key) == plen + KV_KEY.size]


def usage(tx: Txn, sid: str) -> tuple[int, int]:
    """(entries, bytes) the session references: record, token blocks, KV entries (their blobs in full)."""
    pfx = prefix(sid)
    n, nbytes = 0, 0
    raw = tx.get("sessions", sid.encode())
    if raw is not None:
        n, nbytes = 1, len(raw)
    for _, value in tx.scan("tokens", pfx):
        n += 1
        nbytes += len(value)
    for key, ptr in tx.scan("kv", pfx):
        n += 1
        nbytes += len(blob(tx, key, ptr))
    return n, nbytes


def sharing(tx: Txn, sid: str) -> dict:
    """Store.session_blobs: blocks, shared, shared_bytes, own_bytes."""
    out = dict(blocks=0, shared=0, shared_bytes=0, own_bytes=0)
    for key, ptr in tx.scan("kv", prefix(sid)):
        count, size = ref(tx, key, blob_id(key, ptr))
        out["blocks"] += 1
        if count > 1:
            out["shared"] += 1
            out["shared_bytes"] += size
        else:
            out["own_bytes"] += size
    return out
