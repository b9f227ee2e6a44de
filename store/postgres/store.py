"""PgStore: the Store interface (../base.py) over one PostgreSQL database, shared by any number of processes.

Each method checks its arguments, then runs one function of sessions.py, blobs.py, writes.py or check.py
through db.py: a read as one SQL statement (one snapshot, one round trip), a write in one transaction (all or
nothing). Opening it for writing applies the schema's missing migrations (migrate.py, under an advisory lock);
a read-only store refuses a database that is not at this memsvc's schema version and runs its connections with
default_transaction_read_only.

Knows bytes; knows nothing about models or tensors: KV payloads, `layout`, `messages` and `extra` are the
caller's.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from ..archive import Export, check_import
from ..base import KVKey, Lease, Store
from ..errors import SessionMissing, StoreError
from ..records import SessionRecord, check_id
from ..turn import check_kv_key, check_page, check_record, encode_kv, is_int, possible_id, prepare_commit
from . import blobs, check, leases, sessions, writes
from .db import Db, locked
from .migrate import check_schema, migrate


def _check_lease_args(sid, owner, seconds) -> None:
    check_id(sid)
    if not isinstance(owner, str) or not owner or "\0" in owner:
        raise ValueError(f"a lease owner must be a non-empty string, got {owner!r}")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds <= 86400:
        raise ValueError(f"a lease runs for 0 < seconds <= 86400, got {seconds!r}")


class PgStore(Store):
    def __init__(self, url: str, *, readonly: bool = False, token_block: int = 1024, pool_min: int = 1,
                 pool_max: int = 10, timeout: float = 5.0):
        if not is_int(token_block) or token_block < 1:
            raise ValueError(f"token_block must be an integer >= 1, got {token_block!r}")
        if not is_int(pool_min) or not is_int(pool_max) or not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError(f"pool sizes must be integers with 0 <= pool_min <= pool_max, pool_max >= 1, got "
                             f"{pool_min!r}, {pool_max!r}")
        self.url = url
        self.readonly = bool(readonly)
        self.token_block = token_block
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < 3600:
            raise ValueError(f"timeout must be a number of seconds in (0, 3600), got {timeout!r}")
        # timeout: how long a call waits for a connection (the database down: it fails after that)
        self._db = Db(url, readonly=self.readonly, pool_min=pool_min, pool_max=pool_max, timeout=timeout)
        self.where = self._db.where
        with self._db.connect() as conn:
            if self.readonly:
                check_schema(conn, self.where)
                self.migrated: list[str] = []
            else:
                self.migrated = migrate(conn)  # the migrations this open applied
        self._db.open()

    # ---- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    @property
    def closed(self) -> bool:
        return self._db.closed

    def io_counters(self) -> dict:
        return self._db.io.snapshot()

    # ---- records -----------------------------------------------------------------------

    def get(self, sid: str) -> SessionRecord | None:
        if not possible_id(sid):
            return None
        return self._db.read("get", lambda tx: sessions.read_record(tx, sid))

    def list(self, after: str = "", limit: int = 100, labels: Mapping[str, str] | None = None
             ) -> list[SessionRecord]:
        check_page(after, limit)
        wanted = dict(labels or {})
        return self._db.read("list", lambda tx: sessions.list_records(tx, after, limit, wanted))

    def session_ids(self) -> list[str]:
        return self._db.read("session_ids", lambda tx: [sid for (sid,) in tx.rows("SELECT id FROM sessions "
                                                                                    "ORDER BY id")])

    def count(self) -> int:
        return self._db.read("count", lambda tx: tx.one("SELECT count(*) FROM sessions")[0])

    def expired(self, now: float, default_ttl: float = 0.0) -> list[str]:
        return self._db.read("expired", lambda tx: sessions.expired(tx, now, default_ttl))

    # ---- token ids and KV entries -------------------------------------------------------

    def tokens(self, sid: str) -> list[int]:
        check_id(sid)
        return self._db.read("tokens", lambda tx: sessions.read_tokens(tx, sid))

    def kv_keys(self, sid: str) -> list[KVKey]:
        check_id(sid)
        return self._db.read("kv_keys", lambda tx: blobs.keys(tx, sid))

    def kv_blocks_at(self, sid: str, layer: int, indices: Sequence[int]) -> list[bytes | None]:
        check_id(sid)
        wanted = list(indices)
        for index in wanted:
            check_kv_key(layer, index)
        return self._db.read("kv_blocks_at", lambda tx: blobs.read_at(tx, sid, layer, wanted))

    def kv_blocks_for(self, sid: str, keys: Sequence[KVKey]) -> list[bytes | None]:
        check_id(sid)
        wanted = [check_kv_key(*k) for k in keys]
        return self._db.read("kv_blocks_for", lambda tx: blobs.read_keys(tx, sid, wanted))

    def kv_blocks(self, sid: str) -> dict[KVKey, bytes]:
        check_id(sid)
        return self._db.read("kv_blocks", lambda tx: blobs.read_all(tx, sid))

    def session_keys(self, sid: str) -> tuple[int, int]:
        check_id(sid)
        return self._db.read("session_keys", lambda tx: blobs.usage(tx, sid))

    def session_blobs(self, sid: str) -> dict:
        check_id(sid)
        return self._db.read("session_blobs", lambda tx: blobs.sharing(tx, sid))

    # ---- writes ----------------------------------------------------------------------------

    def create(self, record: SessionRecord) -> SessionRecord:
        check_record(record)
        return self._db.write("create", lambda tx: writes.create(tx, record))

    def commit(self, record: SessionRecord, *, first_token: int, tokens: Sequence[int],
               blocks: Mapping[KVKey, bytes], block_tokens: Mapping[KVKey, int] | None = None,
               drop: Sequence[KVKey] = (), epoch: int | None = None) -> SessionRecord:
        if epoch is not None and (not is_int(epoch) or epoch < 1):
            raise ValueError(f"epoch must be an integer >= 1 or None, got {epoch!r}")
        turn = prepare_commit(record, first_token=first_token, tokens=tokens, blocks=blocks,
                              block_tokens=block_tokens, drop=drop)  # checked and compressed before the transaction
        return self._db.write("commit", lambda tx: writes.commit(tx, turn, self.token_block, epoch))

    def rewrite_kv(self, sid: str, *, n_tokens: int, blocks: Mapping[KVKey, bytes],
                   block_tokens: Mapping[KVKey, int] | None = None, drop: Sequence[KVKey] = (),
                   extra: Mapping | None = None) -> SessionRecord:
        check_id(sid)
        encoded = encode_kv(blocks, block_tokens)
        dropped = [check_kv_key(layer, index) for layer, index in drop]
        return self._db.write("rewrite_kv", lambda tx: writes.rewrite_kv(tx, sid, n_tokens, encoded, dropped, extra))

    def fork(self, src_id: str, dst_record: SessionRecord) -> SessionRecord:
        check_id(src_id)
        check_record(dst_record)
        return self._db.write("fork", lambda tx: writes.fork(tx, src_id, dst_record))

    def delete(self, sid: str, *, expired_at: float | None = None, default_ttl: float = 0.0) -> bool:
        if not possible_id(sid):
            return False
        self._db.check_writable()
        if not self._db.read("delete", lambda tx: sessions.exists(tx, sid)):
            return False  # the common miss needs no transaction (a damaged record can still be deleted)
        return self._db.write("delete", lambda tx: writes.delete(tx, sid, expired_at, default_ttl))

    def import_session(self, export: Export, new_id: str | None = None) -> SessionRecord:
        rec = check_import(export, new_id)
        return self._db.write("import", lambda tx: writes.import_checked(tx, rec, export))

    # ---- leases ------------------------------------------------------------------------------

    def acquire_lease(self, sid: str, owner: str, seconds: float, address: str = "") -> Lease:
        _check_lease_args(sid, owner, seconds)
        if not isinstance(address, str) or "\0" in address:
            raise ValueError(f"a lease's address must be a string (host:port, or empty), got {address!r}")
        try:
            return self._db.write("acquire_lease", lambda tx: leases.acquire(tx, sid, owner, float(seconds), address))
        except StoreError as exc:
            if not locked(exc):
                raise
            raise self._db.read("acquire_lease", lambda tx: leases.busy(tx, sid)) from exc

    def renew_lease(self, lease: Lease, seconds: float) -> Lease:
        _check_lease_args(lease.sid, lease.owner, seconds)
        return self._db.write("renew_lease", lambda tx: leases.renew(tx, lease, float(seconds)))

    def release_lease(self, lease: Lease) -> None:
        self._db.write("release_lease", lambda tx: leases.release(tx, lease))

    # ---- export, integrity, maintenance ------------------------------------------------------

    def export(self, sid: str) -> Export:
        check_id(sid)
        return self._db.read("export", lambda tx: check.export(tx, sid))

    def check_session(self, sid: str) -> dict:
        check_id(sid)
        out = self._db.read("check_session", lambda tx: check.check_session(tx, sid))
        if out is None:
            raise SessionMissing(f"no session {sid!r}")
        return out

    def check_refs(self) -> dict:
        return self._db.read("check_refs", check.check_refs)

    def gc(self) -> dict:
        return self._db.write("gc", check.gc)

    def stats(self) -> dict:
        return self._db.read("stats", check.stats)
