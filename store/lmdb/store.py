"""LmdbStore: the Store interface (../base.py) over one LMDB environment, the embedded default.

Each method checks its arguments, then runs one function of sessions.py,
blobs.py, writes.py, archive.py or check.py in one transaction of env.py: reads
in a read transaction (a snapshot), writes in a write transaction (all or
nothing; see env.py for locking and map growth). layout.py is the on-disk
format; upgrade.py converts a format-1 store.

Knows bytes; knows nothing about models or tensors: KV payloads, `layout`,
`messages` and `extra` are the caller's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from ..archive import Export, check_import
from ..base import Damaged, KVKey, Page, Store
from ..errors import SessionMissing
from ..records import SessionRecord
from ..turn import check_kv_key, check_page, check_record, encode_kv, is_int, possible_id, prepare_commit
from . import archive, blobs, check, sessions, writes
from .env import Env
from .layout import prefix


class LmdbStore(Store):
    def __init__(self, path: str | os.PathLike, *, map_size: int = 256 << 20, readonly: bool = False,
                 token_block: int = 1024):
        if not is_int(token_block) or token_block < 1:
            raise ValueError(f"token_block must be an integer >= 1, got {token_block!r}")
        if not is_int(map_size) or map_size < 1:
            raise ValueError(f"map_size must be an integer >= 1, got {map_size!r}")
        self.path = Path(path)
        self.readonly = bool(readonly)
        self.token_block = token_block
        self._env = Env(self.path, map_size=map_size, readonly=self.readonly)
        self.env = self._env.env  # the lmdb.Environment: for tests and tools that inspect it raw
        self._db = self._env.dbs  # database name -> handle, likewise

    # ---- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        self._env.close()

    @property
    def closed(self) -> bool:
        return self._env.closed

    # ---- records -----------------------------------------------------------------------

    def get(self, sid: str) -> SessionRecord | None:
        if not possible_id(sid):
            return None
        return self._env.read(lambda tx: sessions.read_record(tx, sid)[0])

    def list(self, after: str = "", limit: int = 100, labels: Mapping[str, str] | None = None
             ) -> list[SessionRecord]:
        check_page(after, limit)
        wanted = dict(labels or {})
        return self._env.read(lambda tx: sessions.list_records(tx, after, limit, wanted))

    def list_page(self, after: str = "", limit: int = 100, labels: Mapping[str, str] | None = None) -> Page:
        check_page(after, limit)
        wanted = dict(labels or {})

        def one_pass(tx):
            bad: list[tuple[str, str]] = []
            recs = sessions.list_records(tx, after, limit, wanted, bad)
            return Page(recs, [Damaged(sid, reason) for sid, reason in bad])

        return self._env.read(one_pass)

    def session_ids(self) -> list[str]:
        return self._env.read(sessions.session_ids)

    def count(self) -> int:
        return self._env.read(lambda tx: tx.entries("sessions"))

    def expired(self, now: float, default_ttl: float = 0.0) -> list[str]:
        return self._env.read(lambda tx: sessions.expired(tx, now, default_ttl))

    # ---- token ids and KV entries -------------------------------------------------------

    def tokens(self, sid: str) -> list[int]:
        prefix(sid)
        return self._env.read(lambda tx: sessions.read_tokens(tx, sid))

    def kv_keys(self, sid: str) -> list[KVKey]:
        prefix(sid)
        return self._env.read(lambda tx: blobs.keys(tx, sid))

    def kv_blocks_at(self, sid: str, layer: int, indices: Sequence[int]) -> list[bytes | None]:
        prefix(sid)
        return self._env.read(lambda tx: blobs.read_at(tx, sid, layer, indices))

    def kv_blocks_for(self, sid: str, keys: Sequence[KVKey]) -> list[bytes | None]:
        prefix(sid)
        wanted = [check_kv_key(*k) for k in keys]
        return self._env.read(lambda tx: [blobs.read_at(tx, sid, layer, [index])[0] for layer, index in wanted])

    def kv_blocks(self, sid: str) -> dict[KVKey, bytes]:
        prefix(sid)
        return self._env.read(lambda tx: blobs.read_all(tx, sid))

    def session_keys(self, sid: str) -> tuple[int, int]:
        prefix(sid)
        return self._env.read(lambda tx: blobs.usage(tx, sid))

    def session_blobs(self, sid: str) -> dict:
        prefix(sid)
        return self._env.read(lambda tx: blobs.sharing(tx, sid))

    # ---- writes ----------------------------------------------------------------------------

    def create(self, record: SessionRecord) -> SessionRecord:
        check_record(record)
        return self._env.write(lambda tx: writes.create(tx, record))

    def commit(self, record: SessionRecord, *, first_token: int, tokens: Sequence[int],
               blocks: Mapping[KVKey, bytes], block_tokens: Mapping[KVKey, int] | None = None,
               drop: Sequence[KVKey] = (), epoch: int | None = None) -> SessionRecord:
        if epoch is not None:
            raise ValueError("an LMDB store is owned by one process: it has no leases, so a commit takes no epoch")
        turn = prepare_commit(record, first_token=first_token, tokens=tokens, blocks=blocks,
                              block_tokens=block_tokens, drop=drop)  # checked and compressed outside the lock
        return self._env.write(lambda tx: writes.commit(tx, turn, self.token_block))

    def rewrite_kv(self, sid: str, *, n_tokens: int, blocks: Mapping[KVKey, bytes],
                   block_tokens: Mapping[KVKey, int] | None = None, drop: Sequence[KVKey] = (),
                   extra: Mapping | None = None) -> SessionRecord:
        prefix(sid)
        encoded = encode_kv(blocks, block_tokens)
        dropped = [check_kv_key(layer, index) for layer, index in drop]
        return self._env.write(lambda tx: writes.rewrite_kv(tx, sid, n_tokens, encoded, dropped, extra))

    def fork(self, src_id: str, dst_record: SessionRecord) -> SessionRecord:
        prefix(src_id)
        check_record(dst_record)
        return self._env.write(lambda tx: writes.fork(tx, src_id, dst_record))

    def delete(self, sid: str, *, expired_at: float | None = None, default_ttl: float = 0.0) -> bool:
        if not possible_id(sid):
            return False
        self._env.check_writable()
        if not self._env.read(lambda tx: sessions.exists(tx, sid)):
            return False  # the common miss needs no write transaction (a damaged record can still be deleted)
        return self._env.write(lambda tx: writes.delete(tx, sid, expired_at, default_ttl))

    def import_session(self, export: Export, new_id: str | None = None) -> SessionRecord:
        rec = check_import(export, new_id)
        return self._env.write(lambda tx: (archive.import_checked(tx, rec, export), True))

    # ---- export, integrity, maintenance ------------------------------------------------------

    def export(self, sid: str) -> Export:
        prefix(sid)
        return self._env.read(lambda tx: archive.export(tx, sid))

    def check_session(self, sid: str) -> dict:
        prefix(sid)
        out = self._env.read(lambda tx: check.check_session(tx, sid))
        if out is None:
            raise SessionMissing(f"no session {sid!r}")
        return out

    def check_refs(self) -> dict:
        return self._env.read(check.check_refs)

    def gc(self) -> dict:
        return self._env.write(check.gc)

    def stats(self) -> dict:
        return self._env.read(lambda tx: {**check.stats(tx), **self._env.info()}, buffers=True)

    def dump(self) -> dict[tuple[str, bytes], bytes]:
        """Every (db name, key) -> value: for tests that compare whole stores (LMDB only)."""
        return self._env.read(check.dump)
