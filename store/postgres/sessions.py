"""Session records and token ids in the PostgreSQL store: functions over one `Tx`.

A record is written whole (its bytes, and the columns copied from it for queries) by one statement.
Token ids are cut into blocks of `token_block` ids; a commit rewrites the session's last, partially
filled block. Reads concatenate whatever blocks are stored, so reopening with another token_block is safe.

Knows the sessions and tokens tables; KV entries and blobs are blobs.py's.
"""
from __future__ import annotations

import dataclasses
from array import array
from typing import Mapping

from psycopg.types.json import Jsonb

from ..blocks import decode_tokens, encode_tokens
from ..errors import CorruptBlock, CorruptRecord
from ..records import SessionRecord
from .db import Tx


def key(sid: str, *where) -> bytes:
    """A diagnostic key for errors: b"sid" or b"sid:index" or b"sid:layer:index"."""
    return ":".join([sid, *map(str, where)]).encode()


def settle(rec: SessionRecord, others: int) -> tuple[SessionRecord, bytes]:
    """rec with stored_bytes = others (its blocks) + the record's own size, and its bytes."""
    size = 0
    while True:  # the record's size depends on the digits of stored_bytes: settle it
        final = dataclasses.replace(rec, stored_bytes=others + size)
        data = final.to_bytes()
        if len(data) == size:
            return final, data
        size = len(data)


def _columns(rec: SessionRecord, data: bytes) -> dict:
    return {"id": rec.id, "data": data, "n": rec.n_tokens, "updated": rec.updated, "ttl": rec.ttl,
            "labels": Jsonb(rec.labels), "fp": rec.model_fingerprint}


def insert_record(tx: Tx, rec: SessionRecord, others: int) -> SessionRecord | None:
    """Store a new record; None when the id is taken (nothing written then)."""
    final, data = settle(rec, others)
    done = tx.write("INSERT INTO sessions (id, data, n_tokens, updated, ttl, labels, model_fingerprint) "
                    "VALUES (%(id)s, %(data)s, %(n)s, %(updated)s, %(ttl)s, %(labels)s, %(fp)s) "
                    "ON CONFLICT (id) DO NOTHING RETURNING 1", _columns(final, data))
    return final if done else None


def update_record(tx: Tx, rec: SessionRecord, others: int) -> SessionRecord:
    final, data = settle(rec, others)
    tx.write("UPDATE sessions SET data = %(data)s, n_tokens = %(n)s, updated = %(updated)s, ttl = %(ttl)s, "
             "labels = %(labels)s, model_fingerprint = %(fp)s, version = version + 1 WHERE id = %(id)s",
             _columns(final, data))
    return final


def lock_record(tx: Tx, sid: str, mode: str = "UPDATE") -> tuple[SessionRecord | None, bytes | None]:
    """(record, its bytes) with the row locked FOR UPDATE (or SHARE) until the transaction ends; (None, None)
    when there is none."""
    if mode not in ("UPDATE", "SHARE"):
        raise ValueError(f"lock mode must be UPDATE or SHARE, got {mode!r}")
    row = tx.one(f"SELECT data FROM sessions WHERE id = %s FOR {mode}", (sid,))
    return (None, None) if row is None else (SessionRecord.from_bytes(row[0], sid.encode()), row[0])


def read_record(tx: Tx, sid: str) -> SessionRecord | None:
    row = tx.one("SELECT data FROM sessions WHERE id = %s", (sid,))
    return None if row is None else SessionRecord.from_bytes(row[0], sid.encode())


def exists(tx: Tx, sid: str) -> bool:
    return tx.one("SELECT 1 FROM sessions WHERE id = %s", (sid,)) is not None


def list_records(tx: Tx, after: str, limit: int, wanted: Mapping[str, str]) -> list[SessionRecord]:
    if limit == 0:
        return []
    rows = tx.rows("SELECT id, data FROM sessions WHERE id > %s AND labels @> %s ORDER BY id LIMIT %s",
                   (after, Jsonb(dict(wanted)), limit))
    out = []
    for sid, data in rows:
        rec = SessionRecord.from_bytes(data, sid.encode())
        if all(rec.labels.get(k) == v for k, v in wanted.items()):  # the record is the truth, not the column
            out.append(rec)
    return out


def expired(tx: Tx, now: float, default_ttl: float) -> list[str]:
    """Store.expired: the columns pick the candidates, each one's record decides (a damaged one never expires)."""
    rows = tx.rows("SELECT id, data FROM sessions WHERE (CASE WHEN ttl > 0 THEN ttl ELSE %(d)s END) > 0 "
                   "AND updated + (CASE WHEN ttl > 0 THEN ttl ELSE %(d)s END) <= %(now)s ORDER BY id",
                   {"d": float(default_ttl), "now": float(now)})
    out = []
    for sid, data in rows:
        try:
            rec = SessionRecord.from_bytes(data, sid.encode())
        except CorruptRecord:
            continue
        if rec.expires(default_ttl) <= now:
            out.append(sid)
    return out


def read_tokens(tx: Tx, sid: str) -> list[int]:
    """Every token id of the session, checked block by block and against the record's n_tokens: the record and
    the blocks in one statement (one snapshot)."""
    rows = tx.rows("SELECT -1 AS idx, data FROM sessions WHERE id = %(s)s UNION ALL "
                   "SELECT idx, data FROM tokens WHERE session_id = %(s)s ORDER BY idx", {"s": sid})
    if not rows or rows[0][0] != -1:
        return []
    rec = SessionRecord.from_bytes(rows[0][1], sid.encode())
    ids = array("i")
    for expected, (index, data) in enumerate(rows[1:]):
        if index != expected:
            raise CorruptBlock(f"token block {expected} of {sid!r} is missing", key(sid, expected), db="tokens",
                               field="index")
        ids.extend(decode_tokens(data, index, key(sid, index)))
    if len(ids) != rec.n_tokens:
        raise CorruptRecord(f"session {sid!r} holds {len(ids)} token ids, its record says {rec.n_tokens}",
                            sid.encode(), db="sessions", field="n_tokens")
    return ids.tolist()


def append_tokens(tx: Tx, rec: SessionRecord, new_ids: array, token_block: int) -> int:
    """Append new_ids after the rec.n_tokens ids stored (the last block refilled first, then new blocks of
    token_block ids), in one statement. Returns how many bytes the token blocks grew by."""
    if not new_ids:
        return 0
    sid = rec.id
    last = tx.one("SELECT idx, data FROM tokens WHERE session_id = %s ORDER BY idx DESC LIMIT 1", (sid,))
    if last is None and rec.n_tokens:
        raise CorruptBlock(f"session {sid!r} holds {rec.n_tokens} tokens but no token block", key(sid),
                           db="tokens", field="index")
    delta, merged, start = 0, new_ids, 0
    if last is not None:
        index, value = last
        if not rec.n_tokens:
            raise CorruptBlock(f"session {sid!r} holds no tokens but has token blocks", key(sid, index),
                               db="tokens", field="index")
        head = decode_tokens(value, index, key(sid, index))
        if len(head) < token_block:  # partially filled: rewrite it
            merged, start = head + new_ids, index
            delta -= len(value)
        else:
            start = index + 1
    indices, values = [], []
    for i in range(0, len(merged), token_block):
        indices.append(start + i // token_block)
        values.append(encode_tokens(merged[i:i + token_block], indices[-1]))
    tx.write("INSERT INTO tokens (session_id, idx, data) SELECT %s, * FROM unnest(%s::int8[], %s::bytea[]) "
             "ON CONFLICT (session_id, idx) DO UPDATE SET data = EXCLUDED.data", (sid, indices, values))
    return delta + sum(len(v) for v in values)
