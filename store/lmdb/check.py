"""Integrity of the LMDB store: one session's entries checked, the reference counts checked against
the pointers (check_refs), settled (gc), and what the store holds (stats).

A crash cannot leave an unreferenced blob or a wrong count (every write is one
transaction); an older bug or a raw write can, and gc() is how they go.

Functions over one open transaction.
"""
from __future__ import annotations

from ..blocks import decode_tokens
from ..errors import CorruptBlock, CorruptRecord
from ..records import SessionRecord
from .blobs import blob_id, payload, ref
from .env import Txn
from .layout import BLOB_ID, DBS, FORMAT_KEY, KV_KEY, NEXT_BLOB_KEY, REF, STORE_FORMAT, TOK_KEY, U32, U64, owner, \
    prefix


def check_session(tx: Txn, sid: str) -> dict | None:
    """Store.check_session's report, or None when there is no such session."""
    pfx = prefix(sid)
    plen = len(pfx)
    out = {"record": None, "tokens": {}, "kv": {}, "bad_keys": [], "token_count": 0, "kv_entries": 0}
    raw = tx.get("sessions", sid.encode())
    if raw is None:
        return None
    rec = None
    try:
        rec = SessionRecord.from_bytes(raw, sid.encode())
    except CorruptRecord as exc:
        out["record"] = str(exc)
    expected = 0
    for key, value in tx.scan("tokens", pfx):
        if len(key) != plen + TOK_KEY.size:
            out["bad_keys"].append(f"token key {bytes(key)!r} has the wrong length")
            continue
        index = TOK_KEY.unpack(key[plen:])[0]
        try:
            if index != expected:
                raise CorruptBlock(f"token block {expected} is missing (found {index})", key, db="tokens",
                                   field="index")
            out["token_count"] += len(decode_tokens(value, index, key))
        except CorruptRecord as exc:
            out["tokens"][index] = str(exc)
        expected = index + 1
    if rec is not None and not out["tokens"] and out["token_count"] != rec.n_tokens:
        out["tokens"][-1] = f"the session holds {out['token_count']} token ids, its record says {rec.n_tokens}"
    for key, ptr in tx.scan("kv", pfx):
        if len(key) != plen + KV_KEY.size:
            out["bad_keys"].append(f"KV key {bytes(key)!r} has the wrong length")
            continue
        out["kv_entries"] += 1
        layer, index = KV_KEY.unpack(key[plen:])
        try:
            payload(tx, key, ptr, layer, index)
            count, _ = ref(tx, key, blob_id(key, ptr))
            if count < 1:
                raise CorruptBlock(f"blob {BLOB_ID.unpack(bytes(ptr))[0]} counts no reference", key, db="refs",
                                   field="count")
        except CorruptRecord as exc:
            out["kv"][(layer, index)] = str(exc)
    return out


def _known_owners(tx: Txn) -> tuple[dict[bytes, bool], list[tuple[str, bytes]]]:
    """{session id: has a record} for every owner of a tokens or kv key, and (db, key) of the orphans."""
    known: dict[bytes, bool] = {}
    orphans = []
    for db in ("tokens", "kv"):
        for key in tx.cursor(db).iternext(keys=True, values=False):
            sid = owner(key)
            if sid not in known:
                known[sid] = tx.get("sessions", sid) is not None
            if not known[sid]:
                orphans.append((db, bytes(key)))
    return known, orphans


def check_refs(tx: Txn) -> dict:
    """Store.check_refs: what gc() would find; bad_meta: the format stamp or the next blob id is damaged
    or behind the stored blobs (the next write moves the id past them)."""
    out = dict(orphan_entries=0, unreferenced_blobs=0, wrong_counts=0, dangling_pointers=0, bad_meta=0)
    fmt = tx.get("meta", FORMAT_KEY)
    out["bad_meta"] += fmt is None or len(fmt) != U32.size or U32.unpack(fmt)[0] != STORE_FORMAT
    nxt = tx.get("meta", NEXT_BLOB_KEY)
    cur = tx.cursor("blobs")
    if cur.last():
        top = BLOB_ID.unpack(cur.key())[0] if len(cur.key()) == BLOB_ID.size else None
        out["bad_meta"] += top is None or nxt is None or len(nxt) != U64.size or U64.unpack(nxt)[0] <= top
    known, orphans = _known_owners(tx)
    out["orphan_entries"] = len(orphans)
    wanted: dict[bytes, int] = {}
    for key, ptr in tx.cursor("kv"):
        if not known.get(owner(key), False):
            continue  # an orphan: gc() removes it
        if len(ptr) != BLOB_ID.size:
            out["dangling_pointers"] += 1
            continue
        wanted[bytes(ptr)] = wanted.get(bytes(ptr), 0) + 1
    for bid in tx.cursor("blobs").iternext(keys=True, values=False):
        out["unreferenced_blobs"] += bytes(bid) not in wanted
    for bid, raw in tx.cursor("refs"):
        n = wanted.get(bytes(bid))
        if n is not None and (len(raw) != REF.size or REF.unpack(raw)[0] != n):
            out["wrong_counts"] += 1
        elif n is None and tx.get("blobs", bytes(bid)) is not None:
            pass  # an unreferenced blob with its count: counted above
        elif n is None:
            out["wrong_counts"] += 1
    for bid, n in wanted.items():
        if tx.get("blobs", bid) is None:
            out["dangling_pointers"] += n
        elif tx.get("refs", bid) is None:
            out["wrong_counts"] += 1
    return out


def gc(tx: Txn) -> tuple[dict, bool]:
    """Store.gc's report, and whether it changed anything."""
    out = dict(orphan_entries=0, freed_blobs=0, freed_bytes=0, fixed_counts=0, dangling_pointers=0)
    _, orphans = _known_owners(tx)
    for db, key in orphans:
        tx.delete(db, key)
    out["orphan_entries"] = len(orphans)
    wanted: dict[bytes, int] = {}
    for key, ptr in tx.cursor("kv"):
        if len(ptr) != BLOB_ID.size:
            out["dangling_pointers"] += 1
            continue
        wanted[bytes(ptr)] = wanted.get(bytes(ptr), 0) + 1
    blobs = tx.cursor("blobs")
    for bid in [bytes(k) for k in blobs.iternext(keys=True, values=False)]:
        if bid not in wanted:
            out["freed_bytes"] += len(tx.get("blobs", bid))
            out["freed_blobs"] += 1
            tx.delete("blobs", bid)
            tx.delete("refs", bid)
    for bid, raw in [(bytes(k), bytes(v)) for k, v in tx.cursor("refs")]:
        if bid not in wanted:  # a count whose blob never existed
            tx.delete("refs", bid)
            out["fixed_counts"] += 1
        elif not blobs.set_key(bid):  # pointers to a blob that is gone
            out["dangling_pointers"] += wanted.pop(bid)
        elif len(raw) != REF.size or REF.unpack(raw)[0] != wanted[bid]:
            size = REF.unpack(raw)[1] if len(raw) == REF.size else len(blobs.value())
            tx.put("refs", bid, REF.pack(wanted[bid], size))
            out["fixed_counts"] += 1
    for bid, count in wanted.items():
        if tx.get("refs", bid) is None:
            if blobs.set_key(bid):
                tx.put("refs", bid, REF.pack(count, len(blobs.value())))
                out["fixed_counts"] += 1
            else:
                out["dangling_pointers"] += count
    out["blobs"] = tx.entries("blobs")
    out["blob_bytes"] = sum(REF.unpack(v)[1] for v in tx.cursor("refs").iternext(keys=False, values=True))
    return out, any(out[k] for k in ("orphan_entries", "freed_blobs", "fixed_counts"))


def stats(tx: Txn) -> dict:
    """Store.stats without the map's figures (Env.info gives those)."""
    out = {"sessions": tx.entries("sessions"), "token_blocks": tx.entries("tokens"), "kv_blocks": tx.entries("kv"),
           "blobs": tx.entries("blobs")}
    sizes = {}
    for name in DBS:
        total = 0
        cur = tx.cursor(name)
        for _ in cur.iternext(keys=True, values=False):
            total += len(cur.value())
        sizes[name] = total
    shared = shared_bytes = refs = logical = 0
    for raw in tx.cursor("refs").iternext(keys=False, values=True):
        if len(raw) != REF.size:
            continue  # gc() reports and fixes it
        count, size = REF.unpack(raw)
        refs += count
        logical += count * size
        if count > 1:
            shared += 1
            shared_bytes += size
    out.update(shared_blobs=shared, references=refs, record_bytes=sizes["sessions"], token_bytes=sizes["tokens"],
               blob_bytes=sizes["blobs"], shared_blob_bytes=shared_bytes, pointer_bytes=sizes["kv"],
               logical_blob_bytes=logical, total_bytes=sum(sizes.values()))
    return out


def dump(tx: Txn) -> dict[tuple[str, bytes], bytes]:
    """Every (db name, key) -> value: for tests that compare whole stores."""
    return {(name, bytes(key)): bytes(value) for name in DBS for key, value in tx.cursor(name)}
