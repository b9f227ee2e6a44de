"""Integrity of the PostgreSQL store: one session checked, exported, the reference counts checked against the
pointers (check_refs), settled (gc), and what the store holds (stats). Each read is one statement.

The schema makes some damage impossible: token blocks and KV entries belong to a stored session (foreign keys,
ON DELETE CASCADE), a KV entry points at a stored blob (a foreign key), a count belongs to a stored blob. A
raw write that bypasses those (session_replication_role = replica) can still make them, and the checks find
them all the same. A crash cannot leave an unreferenced blob or a wrong count (every write is one
transaction); an older bug or a raw write can, and gc() is how they go.
"""
from __future__ import annotations

from ..archive import Export, export_header
from ..blocks import decode_kv, decode_tokens
from ..errors import CorruptBlock, CorruptRecord, SessionMissing
from ..records import SessionRecord
from .db import Tx
from .sessions import key

TABLES = ("sessions", "tokens", "kv", "blobs", "blob_refs", "leases", "schema_migrations")
POINTER, COUNT = 8, 12  # bytes of a KV entry's value (a blob id) and of a count (refs, size), as LMDB's

# kind 0: the record; 1: a token block; 2: a KV entry (its blob's bytes and count, NULL when missing)
_ROWS = ("SELECT 0 AS kind, 0 AS layer, 0::int8 AS idx, 0::int8 AS blob_id, data, 1 AS refs FROM sessions "
         "WHERE id = %(s)s UNION ALL "
         "SELECT 1, 0, idx, 0, data, 1 FROM tokens WHERE session_id = %(s)s UNION ALL "
         "SELECT 2, k.layer, k.idx, k.blob_id, b.data, r.refs FROM kv k LEFT JOIN blobs b ON b.id = k.blob_id "
         "LEFT JOIN blob_refs r ON r.blob_id = k.blob_id WHERE k.session_id = %(s)s ORDER BY 1, 2, 3")


def _kv(sid: str, layer: int, index: int, bid: int, data) -> bytes:
    if data is None:
        raise CorruptBlock(f"KV block points to blob {bid}, which is missing", key(sid, layer, index), db="kv",
                           field="blob")
    decode_kv(data, layer, index, key(sid, layer, index), "blobs")
    return data


def export(tx: Tx, sid: str) -> Export:
    """The session in one statement: its record, token blocks and KV blocks as stored, each checked."""
    rows = tx.rows(_ROWS, {"s": sid})
    if not rows or rows[0][0] != 0:
        raise SessionMissing(f"no session {sid!r}")
    rec = SessionRecord.from_bytes(rows[0][4], sid.encode())
    out = Export(header={}, record=bytes(rows[0][4]))
    for kind, layer, index, bid, data, _ in rows[1:]:
        if kind == 1:
            decode_tokens(data, index, key(sid, index))
            out.tokens.append((index, bytes(data)))
        else:
            out.kv.append(((layer, index), bytes(_kv(sid, layer, index, bid, data))))
    out.header = export_header(rec, len(out.tokens), len(out.kv))
    return out


def check_session(tx: Tx, sid: str) -> dict | None:
    """Store.check_session's report, or None when there is no such session."""
    rows = tx.rows(_ROWS, {"s": sid})
    if not rows or rows[0][0] != 0:
        return None
    out = {"record": None, "tokens": {}, "kv": {}, "bad_keys": [], "token_count": 0, "kv_entries": 0}
    rec = None
    try:
        rec = SessionRecord.from_bytes(rows[0][4], sid.encode())
    except CorruptRecord as exc:
        out["record"] = str(exc)
    expected = 0
    for kind, layer, index, bid, data, refs in rows[1:]:
        try:
            if kind == 1:
                if index != expected:
                    raise CorruptBlock(f"token block {expected} is missing (found {index})", key(sid, index),
                                       db="tokens", field="index")
                out["token_count"] += len(decode_tokens(data, index, key(sid, index)))
            else:
                out["kv_entries"] += 1
                _kv(sid, layer, index, bid, data)
                if refs is None or refs < 1:
                    raise CorruptBlock(f"blob {bid} has no valid reference count" if refs is None else
                                       f"blob {bid} counts no reference", key(sid, layer, index), db="blob_refs",
                                       field="count")
        except CorruptRecord as exc:
            out["tokens" if kind == 1 else "kv"][index if kind == 1 else (layer, index)] = str(exc)
        if kind == 1:
            expected = index + 1
    if rec is not None and not out["tokens"] and out["token_count"] != rec.n_tokens:
        out["tokens"][-1] = f"the session holds {out['token_count']} token ids, its record says {rec.n_tokens}"
    return out


_WANTED = "w AS (SELECT blob_id, count(*)::int8 AS n FROM kv GROUP BY blob_id)"
_ORPHANS = ("(SELECT count(*) FROM tokens t WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = t.session_id)) "
            "+ (SELECT count(*) FROM kv k WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = k.session_id))")


def check_refs(tx: Tx) -> dict:
    """Store.check_refs in one statement; bad_meta: the blob id sequence is behind the stored blobs."""
    row = tx.one(
        f"WITH {_WANTED} SELECT {_ORPHANS}, "
        "(SELECT count(*) FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.blob_id = b.id)), "
        "(SELECT count(*) FROM w JOIN blob_refs r USING (blob_id) WHERE r.refs <> w.n) + "
        "(SELECT count(*) FROM w JOIN blobs b ON b.id = w.blob_id "
        " WHERE NOT EXISTS (SELECT 1 FROM blob_refs r WHERE r.blob_id = w.blob_id)) + "
        "(SELECT count(*) FROM blob_refs r WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.id = r.blob_id)), "
        "(SELECT coalesce(sum(n), 0)::int8 FROM w WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.id = w.blob_id)), "
        "(SELECT (coalesce(max(id), 0) >= (SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END "
        " FROM blob_ids))::int FROM blobs)")
    return dict(zip(("orphan_entries", "unreferenced_blobs", "wrong_counts", "dangling_pointers", "bad_meta"), row))


def gc(tx: Tx) -> dict:
    """Store.gc, in the caller's transaction, with writes to the tables held off meanwhile (EXCLUSIVE locks:
    reads go on) so that the counts it sets are those of the pointers it counted."""
    tx.rows("LOCK TABLE sessions, tokens, kv, blobs, blob_refs IN EXCLUSIVE MODE")
    out = dict(orphan_entries=0, freed_blobs=0, freed_bytes=0, fixed_counts=0, dangling_pointers=0)
    for table, column in (("tokens", "session_id"), ("kv", "session_id")):
        out["orphan_entries"] += len(tx.write(
            f"DELETE FROM {table} t WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = t.{column}) "
            f"RETURNING 1"))
    freed = tx.write("DELETE FROM blobs b WHERE NOT EXISTS (SELECT 1 FROM kv k WHERE k.blob_id = b.id) "
                     "RETURNING octet_length(b.data)")
    out["freed_blobs"], out["freed_bytes"] = len(freed), sum(n for (n,) in freed)
    out["fixed_counts"] += len(tx.write(
        "DELETE FROM blob_refs r WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.id = r.blob_id) RETURNING 1"))
    out["fixed_counts"] += len(tx.write(
        f"WITH {_WANTED} UPDATE blob_refs r SET refs = w.n FROM w WHERE r.blob_id = w.blob_id AND r.refs <> w.n "
        f"RETURNING 1"))
    out["fixed_counts"] += len(tx.write(
        f"WITH {_WANTED} INSERT INTO blob_refs (blob_id, refs, size) SELECT w.blob_id, w.n, octet_length(b.data) "
        f"FROM w JOIN blobs b ON b.id = w.blob_id WHERE NOT EXISTS (SELECT 1 FROM blob_refs r "
        f"WHERE r.blob_id = w.blob_id) RETURNING 1"))
    dangling, blob_count, blob_bytes, behind = tx.one(
        "SELECT (SELECT count(*) FROM kv k WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.id = k.blob_id)), "
        "count(*), coalesce(sum(octet_length(data)), 0)::int8, coalesce(max(id), 0) >= "
        "(SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM blob_ids) FROM blobs")
    if behind:  # the next blob id must be past every stored one
        tx.write("SELECT setval('blob_ids', (SELECT max(id) FROM blobs))")
    out.update(dangling_pointers=dangling, blobs=blob_count, blob_bytes=blob_bytes)
    return out


def stats(tx: Tx) -> dict:
    """Store.stats in one statement; used_bytes is the tables' size on disk (rows, TOAST, indexes)."""
    names = ("sessions", "record_bytes", "token_blocks", "token_bytes", "kv_blocks", "blobs", "blob_bytes",
             "shared_blobs", "shared_blob_bytes", "references", "logical_blob_bytes", "counts", "used_bytes")
    row = tx.one(
        "SELECT * FROM (SELECT count(*), coalesce(sum(octet_length(data)), 0)::int8 FROM sessions) s, "
        "(SELECT count(*), coalesce(sum(octet_length(data)), 0)::int8 FROM tokens) t, "
        "(SELECT count(*) FROM kv) k, (SELECT count(*), coalesce(sum(octet_length(data)), 0)::int8 FROM blobs) b, "
        "(SELECT count(*) FILTER (WHERE refs > 1), coalesce(sum(size) FILTER (WHERE refs > 1), 0)::int8, "
        " coalesce(sum(refs), 0)::int8, coalesce(sum(refs::int8 * size), 0)::int8, count(*) FROM blob_refs) r, "
        "(SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0)::int8 FROM unnest(%s::text[]) t) u",
        (list(TABLES),))
    out = dict(zip(names, row))
    counts = out.pop("counts")
    out["pointer_bytes"] = POINTER * out["kv_blocks"]
    out["total_bytes"] = (out["record_bytes"] + out["token_bytes"] + out["blob_bytes"] + out["pointer_bytes"]
                          + COUNT * counts)
    return out
