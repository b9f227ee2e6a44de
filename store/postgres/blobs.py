"""KV entries of the PostgreSQL store: pointers (session, layer, index) -> blob, shared copy-on-write by
reference counts (blob_refs), read by key lists in one statement each.

A fork copies a session's pointers and counts one more reference to each blob; writing (layer, index)
stores a new blob and drops the session's reference to the old one (a blob never changes once written); a
delete drops every reference; a blob whose count reaches zero is removed in the same transaction. A read of
many entries is one statement (`= ANY(...)` or a join with unnest), never one per entry.

Functions over one `Tx`; they know the kv, blobs and blob_refs tables, not what a payload means.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from ..blocks import decode_kv
from ..errors import CorruptBlock
from .db import Tx
from .sessions import key

KVKey = tuple[int, int]
_READ = "SELECT k.layer, k.idx, k.blob_id, b.data FROM kv k LEFT JOIN blobs b ON b.id = k.blob_id "


def _payload(sid: str, layer: int, index: int, blob_id: int, data) -> bytes:
    """The checked, decompressed payload of entry (layer, index), whose blob is `data` (None: it is missing)."""
    if data is None:
        raise CorruptBlock(f"KV block points to blob {blob_id}, which is missing", key(sid, layer, index), db="kv",
                           field="blob")
    return decode_kv(data, layer, index, key(sid, layer, index), "blobs")


def read_at(tx: Tx, sid: str, layer: int, indices: Sequence[int]) -> list[bytes | None]:
    if not indices:
        return []
    rows = tx.rows(_READ + "WHERE k.session_id = %s AND k.layer = %s AND k.idx = ANY(%s::int8[])",
                   (sid, layer, list(indices)))
    found = {index: (bid, data) for _, index, bid, data in rows}
    return [None if i not in found else _payload(sid, layer, i, *found[i]) for i in indices]


def read_keys(tx: Tx, sid: str, keys: Sequence[KVKey]) -> list[bytes | None]:
    """The payload of each (layer, index) of keys, across layers, in one statement."""
    if not keys:
        return []
    layers, indices = zip(*keys)
    rows = tx.rows(_READ + "JOIN unnest(%s::int4[], %s::int8[]) AS w(layer, idx) ON (w.layer, w.idx) = "
                   "(k.layer, k.idx) WHERE k.session_id = %s", (list(layers), list(indices), sid))
    found = {(layer, index): (bid, data) for layer, index, bid, data in rows}
    return [None if w not in found else _payload(sid, *w, *found[w]) for w in keys]


def read_all(tx: Tx, sid: str) -> dict[KVKey, bytes]:
    rows = tx.rows(_READ + "WHERE k.session_id = %s ORDER BY k.layer, k.idx", (sid,))
    return {(layer, index): _payload(sid, layer, index, bid, data) for layer, index, bid, data in rows}


def keys(tx: Tx, sid: str) -> list[KVKey]:
    return [(layer, index) for layer, index in
            tx.rows("SELECT layer, idx FROM kv WHERE session_id = %s ORDER BY layer, idx", (sid,))]


def usage(tx: Tx, sid: str) -> tuple[int, int]:
    """(entries, bytes) the session references: record, token blocks, KV entries (their blobs in full)."""
    rows = tx.rows("SELECT count(*), coalesce(sum(octet_length(data)), 0)::int8, 0::int8 FROM sessions "
                   "WHERE id = %(s)s UNION ALL "
                   "SELECT count(*), coalesce(sum(octet_length(data)), 0)::int8, 0 FROM tokens "
                   "WHERE session_id = %(s)s UNION ALL "
                   "SELECT count(*), coalesce(sum(octet_length(b.data)), 0)::int8, count(*) - count(b.id) "
                   "FROM kv k LEFT JOIN blobs b ON b.id = k.blob_id WHERE k.session_id = %(s)s", {"s": sid})
    if rows[2][2]:
        raise CorruptBlock(f"{rows[2][2]} KV entries of {sid!r} point to missing blobs", key(sid), db="kv",
                           field="blob")
    return sum(r[0] for r in rows), sum(r[1] for r in rows)


def sharing(tx: Tx, sid: str) -> dict:
    """Store.session_blobs: blocks, shared, shared_bytes, own_bytes."""
    n, shared, shared_bytes, own, uncounted = tx.one(
        "SELECT count(*), count(*) FILTER (WHERE r.refs > 1), coalesce(sum(r.size) FILTER (WHERE r.refs > 1), 0)"
        "::int8, coalesce(sum(r.size) FILTER (WHERE r.refs <= 1), 0)::int8, count(*) - count(r.blob_id) "
        "FROM kv k LEFT JOIN blob_refs r ON r.blob_id = k.blob_id WHERE k.session_id = %s", (sid,))
    if uncounted:
        raise CorruptBlock(f"{uncounted} KV entries of {sid!r} point to blobs with no valid reference count",
                           key(sid), db="blob_refs", field="count")
    return dict(blocks=n, shared=shared, shared_bytes=shared_bytes, own_bytes=own)


def drop_refs(tx: Tx, sid: str, blob_ids: Sequence[int], *, strict: bool) -> int:
    """One reference fewer to each of blob_ids (a blob listed twice loses two), removing the blobs left with
    none. Returns the bytes of the references dropped. strict: a blob with no count raises CorruptBlock; else
    it keeps its reference (gc settles it) and counts 0 bytes."""
    if not blob_ids:
        return 0
    counts = Counter(blob_ids)
    ids = sorted(counts)
    rows = tx.write("UPDATE blob_refs r SET refs = r.refs - c.n FROM unnest(%s::int8[], %s::int4[]) AS c(id, n) "
                    "WHERE r.blob_id = c.id RETURNING r.blob_id, r.refs, r.size", (ids, [counts[i] for i in ids]))
    found = {bid: (refs, size) for bid, refs, size in rows}
    missing = [bid for bid in ids if bid not in found]
    if missing and strict:
        raise CorruptBlock(f"blob {missing[0]} has no valid reference count", key(sid), db="blob_refs",
                           field="count")
    gone = sorted(bid for bid, (refs, _) in found.items() if refs <= 0)
    if gone:
        tx.write("DELETE FROM blobs WHERE id = ANY(%s::int8[])", (gone,))
    return sum(size * counts[bid] for bid, (_, size) in found.items())


def release(tx: Tx, sid: str, where: Sequence[KVKey], *, strict: bool) -> int:
    """Remove the session's entries at `where` (absent ones are skipped) and drop their references; returns the
    bytes of the blobs released (see drop_refs)."""
    if not where:
        return 0
    layers, indices = zip(*where)
    gone = tx.write("DELETE FROM kv k USING unnest(%s::int4[], %s::int8[]) AS w(layer, idx) WHERE k.session_id = "
                    "%s AND (k.layer, k.idx) = (w.layer, w.idx) RETURNING k.blob_id",
                    (list(layers), list(indices), sid))
    return drop_refs(tx, sid, [bid for (bid,) in gone], strict=strict)


def put_blobs(tx: Tx, sid: str, items: Sequence[tuple[KVKey, bytes]]) -> int:
    """Each ((layer, index), encoded block) as a new blob with one reference and the session's entry pointing
    to it (the entry must not exist). Blobs go by COPY, counts and pointers by one statement each.
    Returns the bytes of the blobs."""
    if not items:
        return 0
    ids = [bid for (bid,) in tx.rows("SELECT nextval('blob_ids') FROM generate_series(1, %s)", (len(items),))]
    tx.copy("COPY blobs (id, data) FROM STDIN (FORMAT BINARY)",
            ((bid, value) for bid, (_, value) in zip(ids, items)), ("int8", "bytea"))
    sizes = [len(value) for _, value in items]
    tx.write("INSERT INTO blob_refs (blob_id, refs, size) SELECT id, 1, size FROM unnest(%s::int8[], %s::int4[]) "
             "AS t(id, size)", (ids, sizes))
    tx.write("INSERT INTO kv (session_id, layer, idx, blob_id) SELECT %s, * FROM "
             "unnest(%s::int4[], %s::int8[], %s::int8[])",
             (sid, [w[0] for w, _ in items], [w[1] for w, _ in items], ids))
    return sum(sizes)


def share(tx: Tx, src: str, dst: str) -> int:
    """Point dst at every blob src points to, one more reference each; returns their bytes (in full).
    CorruptBlock when a count to raise is missing."""
    rows = tx.write("WITH c AS (SELECT blob_id, count(*)::int4 AS n FROM kv WHERE session_id = %(src)s "
                    "GROUP BY blob_id), u AS (UPDATE blob_refs r SET refs = r.refs + c.n FROM c "
                    "WHERE r.blob_id = c.blob_id RETURNING r.blob_id, r.size) "
                    "SELECT c.blob_id, c.n, u.size FROM c LEFT JOIN u USING (blob_id) ORDER BY c.blob_id",
                    {"src": src})
    for bid, _, size in rows:
        if size is None:
            raise CorruptBlock(f"blob {bid} has no valid reference count", key(src), db="blob_refs", field="count")
    return sum(n * size for _, n, size in rows)


def copy_pointers(tx: Tx, src: str, dst: str) -> None:
    tx.write("INSERT INTO kv (session_id, layer, idx, blob_id) SELECT %s, layer, idx, blob_id FROM kv "
             "WHERE session_id = %s", (dst, src))
