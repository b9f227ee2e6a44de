"""The backends the contract tests (test_store_contract*.py) run over, and what those tests share.

Each backend says how to open a store at a place, how to damage one behind its
back (`damage`) and how to make the n-th write inside its next transaction fail
(`failing_writes`); the tests themselves only call the Store interface.
`backend.ready(request)` is the backend the tests use: PostgreSQL's asks for the
session's server (the pg_server fixture) and gives every store name its own
fresh database, dropped when the test ends (`done()`).
"""
from __future__ import annotations

import contextlib
import os
import struct
import threading
from pathlib import Path

import psycopg

from memsvc.store.base import Store
from memsvc.store.errors import StoreError
from memsvc.store.lmdb import LmdbStore
from memsvc.store.lmdb.env import Txn
from memsvc.store.postgres import PgStore
from memsvc.store.postgres.db import Tx
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

    def ready(self, request) -> "LmdbBackend":
        return self

    def done(self) -> None:
        pass

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


class PgBackend:
    """PostgreSQL: each store name a database of the session's server, created on first open."""

    name = "postgresql"

    def __init__(self, server=None):
        self.server = server
        self.databases: dict[str, str] = {}  # where -> database URL

    def ready(self, request) -> "PgBackend":
        return PgBackend(request.getfixturevalue("pg_server"))

    def open(self, where: Path, *, token_block: int = 1024, readonly: bool = False) -> Store:
        if str(where) not in self.databases:
            self.databases[str(where)] = self.server.create_database()
        return PgStore(self.databases[str(where)], token_block=token_block, readonly=readonly, pool_max=8)

    def done(self) -> None:
        for url in self.databases.values():
            self.server.drop_database(url.rsplit("/", 1)[1])

    def damage(self, store: PgStore, what: str, sid: str | None = None, where=None) -> None:
        """Break one thing behind the store's back, as a raw write would: foreign keys unchecked
        (session_replication_role = replica). where: (layer, index) of a KV entry, or a token block index."""
        if what not in DAMAGE:
            raise ValueError(f"unknown damage {what!r}: valid are {DAMAGE}")
        flip = "set_byte(data, octet_length(data) - {0}, get_byte(data, octet_length(data) - {0}) # 1)"
        kv = "(SELECT blob_id FROM kv WHERE session_id = %(s)s AND layer = %(l)s AND idx = %(i)s)"
        layer, index = where if isinstance(where, tuple) else (0, where)
        sql = {
            "record": f"UPDATE sessions SET data = {flip.format(5)} WHERE id = %(s)s",
            "token_block": f"UPDATE tokens SET data = {flip.format(1)} WHERE session_id = %(s)s AND idx = %(i)s",
            "token_gone": "DELETE FROM tokens WHERE session_id = %(s)s AND idx = %(i)s",
            "kv_blob": f"UPDATE blobs SET data = {flip.format(1)} WHERE id = {kv}",
            "kv_dangling": "UPDATE kv SET blob_id = 1000000000000 WHERE session_id = %(s)s AND layer = %(l)s "
                           "AND idx = %(i)s",
            "kv_count_gone": f"DELETE FROM blob_refs WHERE blob_id = {kv}",
            "kv_count_wrong": f"UPDATE blob_refs SET refs = refs + 5 WHERE blob_id = {kv}",
            "leaked_blob": "WITH b AS (INSERT INTO blobs (id, data) VALUES (nextval('blob_ids'), %(leak)s) "
                           "RETURNING id) INSERT INTO blob_refs (blob_id, refs, size) SELECT id, 1, 300 FROM b",
        }[what]
        with psycopg.connect(store.url) as conn:  # one transaction, committed at the end
            conn.execute("SET session_replication_role = replica")
            done = conn.execute(sql, {"s": sid, "l": layer, "i": index, "leak": b"leaked" * 50})
            if done.rowcount != 1:
                raise ValueError(f"damage {what!r} of {sid!r} at {where!r} changed {done.rowcount} rows")

    @contextlib.contextmanager
    def failing_writes(self, store: PgStore, at: int):
        """The at-th statement that changes rows (a write or a COPY) of any transaction opened inside raises
        InjectedFailure; yields the list of writes attempted."""
        calls: list[str] = []
        real_write, real_copy = Tx.write, Tx.copy

        def count(sql: str) -> None:
            calls.append(" ".join(sql.split()[:3]))
            if len(calls) == at:
                raise InjectedFailure(f"injected failure at write {at} ({calls[-1]})")

        def write(tx, sql, params=None):
            count(sql)
            return real_write(tx, sql, params)

        def copy(tx, sql, rows, types):
            count(sql)
            return real_copy(tx, sql, rows, types)

        Tx.write, Tx.copy = write, copy
        try:
            yield calls
        finally:
            Tx.write, Tx.copy = real_write, real_copy


BACKENDS = [LmdbBackend(), PgBackend()]


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
        self.backend.done()


def hammer(s) -> None:
    """4 threads each create, extend (15 commits) and fork a session while 2 read every session in a loop:
    no error, every reader sees a consistent snapshot, and every session ends whole with its blocks shared."""
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(sid):
        try:
            s.create(rec(sid))
            for i in range(15):
                s.commit(rec(sid), first_token=i * 10, tokens=[i] * 10,
                         blocks={(0, i): os.urandom(3000), (1, 0): os.urandom(2000 + i)})
            s.fork(sid, rec(sid + "f"))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    def reader():
        try:
            while not done.is_set():
                for r in s.list():
                    toks = s.tokens(r.id)  # checks its count against the record in the same snapshot
                    assert toks == [j for j in range(len(toks) // 10) for _ in range(10)]
                    kv = s.kv_blocks(r.id)  # a later snapshot: at least as far along
                    assert (len(toks) // 10 + 1 if toks else 0) <= len(kv) <= 16
                s.stats()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not errors, errors
    for i in range(4):
        for sid in (f"w{i}", f"w{i}f"):
            assert s.tokens(sid) == [j for j in range(15) for _ in range(10)] and len(s.kv_blocks(sid)) == 16
            assert s.get(sid).stored_bytes == s.session_keys(sid)[1]
    assert s.stats()["shared_blobs"] == 4 * 16 and not any(s.check_refs().values())
