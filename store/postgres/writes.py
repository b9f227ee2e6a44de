"""The PostgreSQL store's writes, each the body of one transaction (Db.write): create, commit, rewrite_kv,
fork, delete, import. Arguments arrive checked and encoded (../turn.py).

Each write first locks the record it changes (SELECT ... FOR UPDATE; a fork's source FOR SHARE), so two
writes of one session run one after the other and each sees the other's result; under READ COMMITTED every
later statement reads what is committed by then. A commit given a fencing epoch checks it against the
session's lease inside the same transaction (phase 2 of issue 23: the replica holding the lease passes it).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from ..archive import Export
from ..errors import CorruptRecord, LeaseLost, SessionExists, SessionMissing
from ..records import SessionRecord
from ..turn import KVKey, Turn
from . import blobs
from .db import Tx
from .sessions import append_tokens, exists, insert_record, lock_record, update_record


def create(tx: Tx, record: SessionRecord) -> SessionRecord:
    stored = insert_record(tx, dataclasses.replace(record, n_tokens=0), 0)
    if stored is None:
        raise SessionExists(f"session {record.id!r} already exists")
    return stored


def check_epoch(tx: Tx, sid: str, epoch: int) -> None:
    """LeaseLost unless the session's lease holds `epoch` (the row stays locked FOR SHARE: a takeover, which
    raises the epoch, waits for this transaction)."""
    row = tx.one("SELECT epoch, owner, address FROM leases WHERE session_id = %s FOR SHARE", (sid,))
    if row is None or row[0] != epoch:
        held = "no lease" if row is None else f"the lease of {row[1]!r} at epoch {row[0]}"
        raise LeaseLost(f"session {sid!r}: this commit holds epoch {epoch}, but the session has {held}: another "
                        f"replica took it over", sid=sid, epoch=epoch, found=None if row is None else row[0],
                        owner=None if row is None else row[1], address="" if row is None else row[2])


def commit(tx: Tx, turn: Turn, token_block: int, epoch: int | None) -> SessionRecord:
    sid = turn.record.id
    old, old_raw = lock_record(tx, sid)
    if old is None:
        raise SessionMissing(f"no session {sid!r}")
    if epoch is not None:
        check_epoch(tx, sid, epoch)
    if turn.first_token != old.n_tokens:
        raise ValueError(f"commit at token {turn.first_token}, but session {sid!r} holds {old.n_tokens}")
    delta = append_tokens(tx, old, turn.ids, token_block)
    # each written or dropped entry drops this session's reference; a shared blob stays as it is
    delta -= blobs.release(tx, sid, [w for w, _ in turn.blocks] + list(turn.drop), strict=True)
    delta += blobs.put_blobs(tx, sid, turn.blocks)
    others = old.stored_bytes - len(old_raw) + delta
    if others < 0:
        raise CorruptRecord(f"session {sid!r} records stored_bytes {old.stored_bytes}, fewer than it holds",
                            sid.encode(), db="sessions", field="stored_bytes")
    return update_record(tx, dataclasses.replace(turn.record, n_tokens=old.n_tokens + len(turn.ids)), others)


def rewrite_kv(tx: Tx, sid: str, n_tokens: int, items: Sequence[tuple[KVKey, bytes]], drop: Sequence[KVKey],
               extra: Mapping | None) -> SessionRecord:
    rec, raw = lock_record(tx, sid)
    if rec is None:
        raise SessionMissing(f"no session {sid!r}")
    if rec.n_tokens != n_tokens:
        raise ValueError(f"session {sid!r} holds {rec.n_tokens} tokens, not the {n_tokens} it was rebuilt from")
    blobs.release(tx, sid, [w for w, _ in items] + list(drop), strict=False)  # gc() settles damaged ones
    blobs.put_blobs(tx, sid, items)
    _, nbytes = blobs.usage(tx, sid)
    new = dataclasses.replace(rec, extra={**rec.extra, **(extra or {})})
    return update_record(tx, new, nbytes - len(raw))


def fork(tx: Tx, src_id: str, dst_record: SessionRecord) -> SessionRecord:
    dst = dst_record.id
    src, _ = lock_record(tx, src_id, "SHARE")
    if src is None:
        raise SessionMissing(f"no session {src_id!r}")
    if exists(tx, dst):
        raise SessionExists(f"session {dst!r} already exists")
    token_bytes = tx.one("SELECT coalesce(sum(octet_length(data)), 0)::int8 FROM tokens WHERE session_id = %s",
                         (src_id,))[0]
    nbytes = token_bytes + blobs.share(tx, src_id, dst)
    stored = insert_record(tx, dataclasses.replace(dst_record, n_tokens=src.n_tokens), nbytes)
    if stored is None:  # created meanwhile
        raise SessionExists(f"session {dst!r} already exists")
    blobs.copy_pointers(tx, src_id, dst)
    tx.write("INSERT INTO tokens (session_id, idx, data) SELECT %s, idx, data FROM tokens WHERE session_id = %s",
             (dst, src_id))
    return stored


def delete(tx: Tx, sid: str, expired_at: float | None, default_ttl: float) -> bool:
    row = tx.one("SELECT data FROM sessions WHERE id = %s FOR UPDATE", (sid,))
    if row is None:
        return False
    if expired_at is not None:
        rec = SessionRecord.from_bytes(row[0], sid.encode())
        if rec.expires(default_ttl) > expired_at:
            return False
    gone = tx.write("DELETE FROM kv WHERE session_id = %s RETURNING blob_id", (sid,))
    blobs.drop_refs(tx, sid, [bid for (bid,) in gone], strict=False)  # damaged counts: gc() settles them
    tx.write("DELETE FROM sessions WHERE id = %s", (sid,))  # its token blocks go with it (ON DELETE CASCADE)
    tx.write("DELETE FROM leases WHERE session_id = %s", (sid,))
    return True


def import_checked(tx: Tx, rec: SessionRecord, export: Export) -> SessionRecord:
    """Store rec with the export's blocks (archive.check_import has passed them)."""
    if exists(tx, rec.id):
        raise SessionExists(f"session {rec.id!r} already exists")
    token_bytes = sum(len(value) for _, value in export.tokens)
    kv = [((layer, index), bytes(value)) for (layer, index), value in export.kv]
    stored = insert_record(tx, rec, token_bytes + sum(len(value) for _, value in kv))
    if stored is None:
        raise SessionExists(f"session {rec.id!r} already exists")
    if export.tokens:
        tx.write("INSERT INTO tokens (session_id, idx, data) SELECT %s, * FROM unnest(%s::int8[], %s::bytea[])",
                 (rec.id, [i for i, _ in export.tokens], [bytes(v) for _, v in export.tokens]))
    blobs.put_blobs(tx, rec.id, kv)
    return stored
