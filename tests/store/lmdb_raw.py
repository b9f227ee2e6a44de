"""LMDB-only test helpers: a store's raw entries (from dump()) and writes behind its back."""
from __future__ import annotations

from memsvc.store.lmdb import LmdbStore


def session_values(store: LmdbStore, sid: str) -> dict[tuple[str, bytes], bytes]:
    """This session's entries, picked out of dump() independently of the store's own scans,
    with each KV pointer replaced by the blob it names."""
    return session_values_from(store.dump(), sid)


def session_values_from(dump: dict, sid: str, *, resolve: bool = True) -> dict:
    prefix = sid.encode() + b"\0"
    out = {}
    for (db, key), value in dump.items():
        if (db == "sessions" and key == sid.encode()) or (db == "tokens" and key.startswith(prefix)):
            out[(db, key)] = value
        elif db == "kv" and key.startswith(prefix):
            out[(db, key)] = dump[("blobs", value)] if resolve else value
    return out


def session_bytes(store: LmdbStore, sid: str) -> int:
    return sum(len(v) for v in session_values(store, sid).values())


def raw_put(store: LmdbStore, db: str, key: bytes, value: bytes | None) -> None:
    """Damage the store behind its back (value None deletes)."""
    with store.env.begin(write=True) as txn:
        if value is None:
            txn.delete(key, db=store._db[db])
        else:
            txn.put(key, value, db=store._db[db])
