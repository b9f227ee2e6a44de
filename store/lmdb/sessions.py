"""Session records and token ids in the LMDB store: functions over one open transaction.

Token ids are cut into blocks of `token_block` ids; a commit rewrites the
session's last, partially filled block. Reads concatenate whatever blocks are
stored, so reopening a store with another `token_block` is safe.

Knows the sessions and tokens databases; KV entries and blobs are blobs.py's.
"""
from __future__ import annotations

import dataclasses
from array import array
from typing import Mapping

from ..blocks import decode_tokens, encode_tokens
from ..errors import CorruptBlock, CorruptRecord
from ..records import SessionRecord
from .env import Txn
from .layout import TOK_KEY, prefix, token_key


def read_record(tx: Txn, sid: str) -> tuple[SessionRecord | None, bytes | None]:
    """(record, its stored bytes), or (None, None) when there is none."""
    key = sid.encode()
    raw = tx.get("sessions", key)
    return (None, None) if raw is None else (SessionRecord.from_bytes(raw, key), raw)


def exists(tx: Txn, sid: str) -> bool:
    return tx.get("sessions", sid.encode()) is not None


def put_record(tx: Txn, rec: SessionRecord, others: int) -> SessionRecord:
    """Write rec; stored_bytes = `others` (its blocks) + the record's own size."""
    size = 0
    while True:  # the record's size depends on the digits of stored_bytes: settle it
        final = dataclasses.replace(rec, stored_bytes=others + size)
        data = final.to_bytes()
        if len(data) == size:
            break
        size = len(data)
    tx.put("sessions", rec.id.encode(), data)
    return final


def list_records(tx: Txn, after: str, limit: int, wanted: Mapping[str, str],
                 damaged: list[tuple[str, str]] | None = None) -> list[SessionRecord]:
    """Up to `limit` records after `after`. damaged: None raises CorruptRecord at a damaged record; a list
    gets (id, reason) of each damaged one instead (counted in `limit`), and the listing goes on."""
    out: list[SessionRecord] = []
    cur = tx.cursor("sessions")
    if limit == 0 or not cur.set_range(after.encode() + b"\0" if after else b""):
        return out
    for key, value in cur:
        try:
            rec = SessionRecord.from_bytes(value, key)
        except CorruptRecord as exc:
            if damaged is None:
                raise
            damaged.append((bytes(key).decode("utf-8", "replace"), str(exc)))
        else:
            if any(rec.labels.get(k) != v for k, v in wanted.items()):
                continue
            out.append(rec)
        if len(out) + len(damaged or ()) >= limit:
            break
    return out


def session_ids(tx: Txn) -> list[str]:
    return [bytes(k).decode("utf-8", "replace") for k in tx.cursor("sessions").iternext(keys=True, values=False)]


def expired(tx: Txn, now: float, default_ttl: float) -> list[str]:
    out = []
    for key, value in tx.cursor("sessions"):
        try:
            rec = SessionRecord.from_bytes(value, key)
        except CorruptRecord:
            continue
        if rec.expires(default_ttl) <= now:
            out.append(rec.id)
    return out


def read_tokens(tx: Txn, sid: str) -> list[int]:
    """Every token id of the session, checked block by block and against the record's n_tokens."""
    pfx = prefix(sid)
    plen = len(pfx)
    rec, _ = read_record(tx, sid)
    ids = array("i")
    for expected, (key, value) in enumerate(tx.scan("tokens", pfx)):
        if len(key) != plen + TOK_KEY.size:
            raise CorruptBlock("token block key has the wrong length", key, db="tokens", field="key")
        index = TOK_KEY.unpack(key[plen:])[0]
        if index != expected:
            raise CorruptBlock(f"token block {expected} of {sid!r} is missing", key, db="tokens", field="index")
        ids.extend(decode_tokens(value, index, key))
    if rec is not None and len(ids) != rec.n_tokens:
        raise CorruptRecord(f"session {sid!r} holds {len(ids)} token ids, its record says {rec.n_tokens}",
                            sid.encode(), db="sessions", field="n_tokens")
    return ids.tolist()


def _last_token_block(tx: Txn, pfx: bytes) -> tuple[bytes, int, bytes] | None:
    """(key, index, value) of the session's last token block, or None."""
    top = token_key(pfx, 0xFFFFFFFF)
    cur = tx.cursor("tokens")
    if cur.set_range(top):
        if cur.key() != top and not cur.prev():
            return None
    elif not cur.last():
        return None
    key = cur.key()
    if not key.startswith(pfx):
        return None
    if len(key) != len(top):
        raise CorruptBlock("token block key has the wrong length", key, db="tokens", field="key")
    return key, TOK_KEY.unpack(key[len(pfx):])[0], cur.value()


def append_tokens(tx: Txn, rec: SessionRecord, new_ids: array, token_block: int) -> int:
    """Append new_ids after the rec.n_tokens ids stored (the last block refilled first, then new blocks
    of token_block ids). Returns how many bytes the token blocks grew by."""
    if not new_ids:
        return 0
    sid = rec.id
    pfx = prefix(sid)
    delta = 0
    merged, start = new_ids, 0
    last = _last_token_block(tx, pfx)
    if last is None and rec.n_tokens:
        raise CorruptBlock(f"session {sid!r} holds {rec.n_tokens} tokens but no token block", pfx, db="tokens",
                           field="index")
    if last is not None:
        if not rec.n_tokens:
            raise CorruptBlock(f"session {sid!r} holds no tokens but has token blocks", last[0], db="tokens",
                               field="index")
        key, index, value = last
        head = decode_tokens(value, index, key)
        if len(head) < token_block:  # partially filled: rewrite it
            merged, start = head + new_ids, index
            delta -= len(value)
        else:
            start = index + 1
    for i in range(0, len(merged), token_block):
        index = start + i // token_block
        value = encode_tokens(merged[i:i + token_block], index)
        tx.put("tokens", token_key(pfx, index), value)
        delta += len(value)
    return delta
