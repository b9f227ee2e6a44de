"""The backends the contract tests (test_store_contract*.py) run over, and what those tests share.

Each backend says how to open a store at a place, how to damage one behind its
back (`damage`) and how to make the n-th write inside its next transaction fail
(`failing_writes`); the tests themselves only call the Store interface. A
PostgreSQL backend adds its class to BACKENDS.
"""
from __future__ import annotations

import contextlib
import struct
from pathlib import Path

from memsvc.store.base import Store
from memsvc.store.errors import StoreError
from memsvc.store.lmdb import LmdbStore
from memsvc.store.lmdb.env import Txn
from memsvc.store.records import SessionRecord

# the stats() keys every backend gives (base.Store.stats)
COMMON_STATS = ("sessions", "token_blocks", "kv_blocks", "blobs", "shared_blobs", "references", "record_bytes",
                "token_bytes", "blob_bytes", "shared_blob_bytes", "pointer_bytes", "total_bytes",
                "logical_blob_bytes")
# what damage() can do: to a session (sid), at a KV entry or token block (where), or store-wide
DAMAGE = ("record", "token_block", "token_gone", "kv_blob", "kv_dangling", "kv_count_gone", "kv_count_wrong",
          "leaked_blob")


class InjectedFailure(RuntimeError):
    """Raised by failing_writes inside a transaction."""


def rec(sid: str, **kw) -> SessionRecord:
    return SessionRecord(id=sid, model_name="m", model_fingerprint="f" * 64, policy="full", **kw)


def ids_for(start: int, count: int) -> list[int]:
    return [(start + j) * 7919 % 49152 - (j % 3 == 0) * 5 for j in range(count)]  # includes negatives


def snapshot(store: Store) -> dict:
    """Everything the interface shows of a store, errors included (to compare a store before and after)."""
    def safe(fn):
        try:
            return fn()
        except StoreError as exc:
            return ("error", type(exc).__name__, str(exc))

    out = {"_ids": store.session_ids(), "_refs": store.check_refs()}
    st = store.stats()
    out["_stats"] = {k: st[k] for k in COMMON_STATS}
    for sid in out["_ids"]:
        out[sid] = {"record": safe(lambda: store.get(sid)), "tokens": safe(lambda: store.tokens(sid)),
                    "kv": safe(lambda: store.kv_blocks(sid)), "keys": store.kv_keys(sid),
                    "blobs": safe(lambda: store.session_blobs(sid)), "usage": safe(lambda: store.session_keys(sid)),
                    "check": store.check_session(sid)}
    return out


class LmdbBackend:
    name = "lmdb"

    def open(self, where: Path, *, token_block: int = 1024, readonly: bool = False) -> Store:
        return LmdbStore(where, token_block=token_block, readonly=readonly)

    def damage(self, store: LmdbStore, what: str, sid: str | None = None, where=None) -> None:
        """Break one thing behind the store's back. where: (layer, index) of a KV entry, or a token
        block index."""
        if what not in DAMAGE:
            raise ValueError(f"unknown damage {what!r}: valid are {DAMAGE}")
        with store.env.begin(write=True) as txn:
            db = store._db
            pfx = None if sid is None else sid.encode() + b"\0"
            kv = None if where is None or what.startswith("token") else pfx + struct.pack(">HI", *where)
            if what == "record":
                raw = bytearray(txn.get(sid.encode(), db=db["sessions"]))
                raw[-5] ^= 1
                txn.put(sid.encode(), bytes(raw), db=db["sessions"])
            elif what in ("token_block", "token_gone"):
                key = pfx + struct.pack(">I", where)
                if what == "token_gone":
                    assert txn.delete(key, db=db["tokens"])
                else:
                    raw = bytearray(txn.get(key, db=db["tokens"]))
                    raw[-1] ^= 1
                    txn.put(key, bytes(raw), db=db["tokens"])
            elif what == "kv_blob":
                bid = txn.get(kv, db=db["kv"])
                raw = bytearray(txn.get(bid, db=db["blobs"]))
                raw[-1] ^= 1
                txn.put(bid, bytes(raw), db=db["blobs"])
            elif what == "kv_dangling":
                txn.put(kv, (10 ** 12).to_bytes(8, "big"), db=db["kv"])
            elif what == "kv_count_gone":
                assert txn.delete(txn.get(kv, db=db["kv"]), db=db["refs"])
            elif what == "kv_count_wrong":
                bid = txn.get(kv, db=db["kv"])
                count, size = struct.unpack("<IQ", txn.get(bid, db=db["refs"]))
                txn.put(bid, struct.pack("<IQ", count + 5, size), db=db["refs"])
            else:  # leaked_blob: a blob with its count, nothing pointing to it
                bid = (10 ** 11).to_bytes(8, "big")
                txn.put(bid, b"leaked" * 50, db=db["blobs"])
                txn.put(bid, struct.pack("<IQ", 1, 300), db=db["refs"])
                nxt = (10 ** 11 + 1).to_bytes(8, "little")
                txn.put(b"next_blob", nxt, db=db["meta"])

    @contextlib.contextmanager
    def failing_writes(self, store: LmdbStore, at: int):
        """The at-th put or delete of any transaction opened inside raises InjectedFailure; yields the
        list of writes attempted."""
        calls: list[str] = []
        real_put, real_delete = Txn.put, Txn.delete

        def count(what: str, db: str) -> None:
            calls.append(f"{what} {db}")
            if len(calls) == at:
                raise InjectedFailure(f"injected failure at write {at} ({what} {db})")

        def put(tx, db, key, value):
            count("put", db)
            real_put(tx, db, key, value)

        def delete(tx, db, key):
            count("delete", db)
            return real_delete(tx, db, key)

        Txn.put, Txn.delete = put, delete
        try:
            yield calls
        finally:
            Txn.put, Txn.delete = real_put, real_delete


BACKENDS = [LmdbBackend()]


class StoreFactory:
    """store_factory: opens stores of one backend under a test's tmp_path, closes them at the end."""

    def __init__(self, backend, root: Path):
        self.backend = backend
        self.root = root
        self._open: list[Store] = []

    def __call__(self, name: str = "a", **options) -> Store:
        """The store called `name` (opened again if it was before), with backend options
        (token_block, readonly)."""
        store = self.backend.open(self.root / name, **options)
        self._open.append(store)
        return store

    def damage(self, store: Store, what: str, sid: str | None = None, where=None) -> None:
        self.backend.damage(store, what, sid, where)

    def failing_writes(self, store: Store, at: int):
        return self.backend.failing_writes(store, at)

    def close_all(self) -> None:
        for store in self._open:
            store.close()
