"""The LMDB store's writes, each the body of one write transaction: create, commit, rewrite_kv,
fork, delete. Arguments arrive checked and encoded (../turn.py); each function returns
(result, changed) for Env.write, which commits only when changed is true.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from ..errors import CorruptBlock, CorruptRecord, SessionExists, SessionMissing
from ..records import SessionRecord
from ..turn import KVKey, Turn
from .blobs import blob_id, decref, incref, put_blobs, release, usage
from .env import Txn
from .layout import kv_key, prefix
from .sessions import append_tokens, exists, put_record, read_record


def create(tx: Txn, record: SessionRecord) -> tuple[SessionRecord, bool]:
    if exists(tx, record.id):
        raise SessionExists(f"session {record.id!r} already exists")
    return put_record(tx, dataclasses.replace(record, n_tokens=0), 0), True


def commit(tx: Txn, turn: Turn, token_block: int) -> tuple[SessionRecord, bool]:
    sid = turn.record.id
    pfx = prefix(sid)
    old, old_raw = read_record(tx, sid)
    if old is None:
        raise SessionMissing(f"no session {sid!r}")
    if turn.first_token != old.n_tokens:
        raise ValueError(f"commit at token {turn.first_token}, but session {sid!r} holds {old.n_tokens}")
    delta = append_tokens(tx, old, turn.ids, token_block)
    written = [(kv_key(pfx, layer, index), value) for (layer, index), value in turn.blocks]
    dropped = [kv_key(pfx, layer, index) for layer, index in turn.drop]
    # each written or dropped entry drops this session's reference; a shared blob stays as it is
    delta -= release(tx, [key for key, _ in written] + dropped, set(dropped), strict=True)
    delta += put_blobs(tx, written)
    others = old.stored_bytes - len(old_raw) + delta
    if others < 0:
        raise CorruptRecord(f"session {sid!r} records stored_bytes {old.stored_bytes}, fewer than it holds",
                            sid.encode(), db="sessions", field="stored_bytes")
    total = old.n_tokens + len(turn.ids)
    return put_record(tx, dataclasses.replace(turn.record, n_tokens=total), others), True


def rewrite_kv(tx: Txn, sid: str, n_tokens: int, blocks: Sequence[tuple[KVKey, bytes]], drop: Sequence[KVKey],
               extra: Mapping | None) -> tuple[SessionRecord, bool]:
    pfx = prefix(sid)
    rec, raw = read_record(tx, sid)
    if rec is None:
        raise SessionMissing(f"no session {sid!r}")
    if rec.n_tokens != n_tokens:
        raise ValueError(f"session {sid!r} holds {rec.n_tokens} tokens, not the {n_tokens} it was rebuilt from")
    written = [(kv_key(pfx, layer, index), value) for (layer, index), value in blocks]
    dropped = [kv_key(pfx, layer, index) for layer, index in drop]
    release(tx, [key for key, _ in written] + dropped, set(dropped), strict=False)  # gc() settles damaged ones
    put_blobs(tx, written)
    _, nbytes = usage(tx, sid)
    new = dataclasses.replace(rec, extra={**rec.extra, **(extra or {})})
    return put_record(tx, new, nbytes - len(raw)), True


def fork(tx: Txn, src_id: str, dst_record: SessionRecord) -> tuple[SessionRecord, bool]:
    src_pfx, dst_pfx = prefix(src_id), prefix(dst_record.id)
    src, _ = read_record(tx, src_id)
    if src is None:
        raise SessionMissing(f"no session {src_id!r}")
    if exists(tx, dst_record.id):
        raise SessionExists(f"session {dst_record.id!r} already exists")
    nbytes = 0
    for key, value in list(tx.scan("tokens", src_pfx)):
        tx.put("tokens", dst_pfx + bytes(key[len(src_pfx):]), value)
        nbytes += len(value)
    for key, ptr in list(tx.scan("kv", src_pfx)):
        bid = blob_id(key, ptr)
        nbytes += incref(tx, key, bid)
        tx.put("kv", dst_pfx + bytes(key[len(src_pfx):]), bid)
    return put_record(tx, dataclasses.replace(dst_record, n_tokens=src.n_tokens), nbytes), True


def delete(tx: Txn, sid: str, expired_at: float | None, default_ttl: float) -> tuple[bool, bool]:
    if expired_at is not None:
        rec, _ = read_record(tx, sid)
        if rec is None or rec.expires(default_ttl) > expired_at:
            return False, False
    if not tx.delete("sessions", sid.encode()):
        return False, False
    pfx = prefix(sid)
    for key in [bytes(k) for k, _ in tx.scan("tokens", pfx)]:
        tx.delete("tokens", key)
    for key, ptr in [(bytes(k), bytes(v)) for k, v in tx.scan("kv", pfx)]:
        tx.delete("kv", key)
        try:
            decref(tx, key, blob_id(key, ptr))
        except CorruptBlock:
            pass  # a damaged pointer or count: the session goes anyway; gc() settles the blobs
    return True, True
