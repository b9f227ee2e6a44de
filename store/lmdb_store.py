"""The LMDB store: session records, token ids and KV blocks of every session.

Three named databases in one environment:
    sessions  id                                  -> SessionRecord bytes
    tokens    id \\0 index(u32 BE)                 -> block of little-endian int32 token ids
    kv        id \\0 layer(u16 BE) index(u32 BE)    -> block of KV payload bytes
Ids cannot contain \\0, so a prefix scan over `id \\0` finds exactly one
session's blocks. Every write (create, commit, fork, delete) is one LMDB write
transaction: a crash leaves a session before or after the call, never between.
When the map is full it grows (doubling) and the write is retried.

Knows bytes; knows nothing about models or tensors.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import threading
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Sequence

import lmdb

from .blocks import KIND_KV, KIND_TOKENS, decode_block, encode_block
from .errors import CorruptBlock, SessionExists, SessionMissing, StoreError
from .records import SessionRecord

_KV_KEY = struct.Struct(">HI")
_TOK_KEY = struct.Struct(">I")
_DBS = ("sessions", "tokens", "kv")


class _RWLock:
    """Many readers or one exclusive holder (used only to resize the map)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def shared(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _prefix(sid: str) -> bytes:
    return sid.encode() + b"\0"


class Store:
    def __init__(self, path: str | os.PathLike, *, map_size: int = 256 << 20, readonly: bool = False,
                 token_block: int = 1024):
        if token_block < 1:
            raise ValueError("token_block must be >= 1")
        self.path = Path(path)
        self.readonly = readonly
        self.token_block = token_block
        if readonly:
            if not (self.path / "data.mdb").is_file():
                raise StoreError(f"data dir {self.path} does not exist or holds no memsvc store")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=len(_DBS), readonly=readonly,
                                 lock=True, metasync=True, sync=True, max_readers=256)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        self._db = {name: self.env.open_db(name.encode(), create=not readonly) for name in _DBS}
        self._rw = _RWLock()
        self._write_lock = threading.Lock()

    # ---- plumbing ----------------------------------------------------------------

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _read(self):
        with self._rw.shared():
            with self.env.begin() as txn:
                yield txn

    def _write(self, fn):
        """Run fn(txn) in one write transaction; grow the map and retry when it is full."""
        if self.readonly:
            raise StoreError("the store is open read-only")
        with self._write_lock:
            while True:
                try:
                    with self._rw.shared():
                        with self.env.begin(write=True) as txn:
                            return fn(txn)
                except lmdb.MapFullError:
                    with self._rw.exclusive():
                        self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _record(self, txn, sid: str) -> SessionRecord | None:
        raw = txn.get(sid.encode(), db=self._db["sessions"])
        return None if raw is None else SessionRecord.from_bytes(raw, sid.encode())

    def _scan(self, txn, db: str, sid: str):
        prefix = _prefix(sid)
        cur = txn.cursor(db=self._db[db])
        if cur.set_range(prefix):
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                yield key, value

    # ---- reads -------------------------------------------------------------------

    def get(self, sid: str) -> SessionRecord | None:
        with self._read() as txn:
            return self._record(txn, sid)

    def list(self, after: str = "", limit: int = 100, labels: Mapping[str, str] | None = None
             ) -> list[SessionRecord]:
        out: list[SessionRecord] = []
        with self._read() as txn:
            cur = txn.cursor(db=self._db["sessions"])
            start = after.encode() + b"\0" if after else b""
            if not cur.set_range(start):
                return out
            for key, value in cur:
                rec = SessionRecord.from_bytes(value, key)
                if labels and any(rec.labels.get(k) != v for k, v in labels.items()):
                    continue
                out.append(rec)
                if len(out) >= limit:
                    break
        return out

    def count(self) -> int:
        with self._read() as txn:
            return txn.stat(self._db["sessions"])["entries"]

    def tokens(self, sid: str) -> list[int]:
        ids = array("i")
        with self._read() as txn:
            for key, value in self._scan(txn, "tokens", sid):
                _, raw = decode_block(value, key)
                ids.frombytes(raw)
        if struct.pack("=i", 1) != struct.pack("<i", 1):
            ids.byteswap()
        return ids.tolist()

    def kv_blocks(self, sid: str) -> dict[tuple[int, int], bytes]:
        out: dict[tuple[int, int], bytes] = {}
        plen = len(_prefix(sid))
        with self._read() as txn:
            for key, value in self._scan(txn, "kv", sid):
                layer, index = _KV_KEY.unpack(key[plen:])
                _, raw = decode_block(value, key)
                out[(layer, index)] = raw
        return out

    def kv_block(self, sid: str, layer: int, index: int) -> bytes | None:
        key = _prefix(sid) + _KV_KEY.pack(layer, index)
        with self._read() as txn:
            value = txn.get(key, db=self._db["kv"])
            return None if value is None else decode_block(value, key)[1]

    def session_keys(self, sid: str) -> tuple[int, int]:
        """(number of keys, bytes of values) this session holds, record included."""
        with self._read() as txn:
            return self._usage(txn, sid)

    def _usage(self, txn, sid: str) -> tuple[int, int]:
        n, nbytes = 0, 0
        raw = txn.get(sid.encode(), db=self._db["sessions"])
        if raw is not None:
            n, nbytes = 1, len(raw)
        for db in ("tokens", "kv"):
            for _, value in self._scan(txn, db, sid):
                n += 1
                nbytes += len(value)
        return n, nbytes

    def dump(self) -> dict[tuple[str, bytes], bytes]:
        out = {}
        with self._read() as txn:
            for name in _DBS:
                for key, value in txn.cursor(db=self._db[name]):
                    out[(name, bytes(key))] = bytes(value)
        return out

    def stats(self) -> dict:
        with self._read() as txn:
            sessions = txn.stat(self._db["sessions"])["entries"]
            blocks = txn.stat(self._db["kv"])["entries"]
        info, stat = self.env.info(), self.env.stat()
        return {"sessions": sessions, "kv_blocks": blocks, "map_size": info["map_size"],
                "used_bytes": (info["last_pgno"] + 1) * stat["psize"]}

    # ---- writes ------------------------------------------------------------------

    def _put_record(self, txn, rec: SessionRecord, others: int) -> SessionRecord:
        """Write rec; stored_bytes = `others` (its blocks) + the record's own size."""
        size = 0
        while True:  # the record's size depends on the digits of stored_bytes: settle it
            final = dataclasses.replace(rec, stored_bytes=others + size)
            data = final.to_bytes()
            if len(data) == size:
                break
            size = len(data)
        txn.put(rec.id.encode(), data, db=self._db["sessions"])
        return final

    def create(self, record: SessionRecord) -> SessionRecord:
        def fn(txn):
            if txn.get(record.id.encode(), db=self._db["sessions"]) is not None:
                raise SessionExists(record.id)
            return self._put_record(txn, dataclasses.replace(record, n_tokens=0), 0)
        return self._write(fn)

    def commit(self, record: SessionRecord, *, first_token: int, tokens: Sequence[int],
               blocks: Mapping[tuple[int, int], bytes],
               block_tokens: Mapping[tuple[int, int], int] | None = None) -> SessionRecord:
        """Append token ids at first_token and write/replace KV blocks and the record, atomically."""
        tokens = [int(t) for t in tokens]
        for t in tokens:
            if not -(1 << 31) <= t < (1 << 31):
                raise ValueError(f"token id {t} does not fit in int32")

        def fn(txn):
            old_raw = txn.get(record.id.encode(), db=self._db["sessions"])
            if old_raw is None:
                raise SessionMissing(record.id)
            old = SessionRecord.from_bytes(old_raw, record.id.encode())
            if first_token != old.n_tokens:
                raise ValueError(f"commit at token {first_token}, but session {record.id!r} holds {old.n_tokens}")
            delta = 0
            prefix = _prefix(record.id)
            tb = self.token_block
            total = old.n_tokens + len(tokens)
            first_block = old.n_tokens // tb
            if tokens:
                head: list[int] = []
                if old.n_tokens % tb:
                    key = prefix + _TOK_KEY.pack(first_block)
                    prev = txn.get(key, db=self._db["tokens"])
                    if prev is None:
                        raise CorruptBlock(f"token block {first_block} of {record.id!r} is missing", key)
                    delta -= len(prev)
                    head = array("i", decode_block(prev, key)[1]).tolist()
                merged = head + tokens
                for i in range(0, len(merged), tb):
                    idx = first_block + i // tb
                    part = array("i", merged[i:i + tb])
                    value = encode_block(part.tobytes(), kind=KIND_TOKENS, layer=0, index=idx,
                                         n_tokens=len(part))
                    txn.put(prefix + _TOK_KEY.pack(idx), value, db=self._db["tokens"])
                    delta += len(value)
            for (layer, index), payload in blocks.items():
                key = prefix + _KV_KEY.pack(layer, index)
                n = (block_tokens or {}).get((layer, index), 0)
                value = encode_block(payload, kind=KIND_KV, layer=layer, index=index, n_tokens=n)
                prev = txn.get(key, db=self._db["kv"])
                if prev is not None:
                    delta -= len(prev)
                txn.put(key, value, db=self._db["kv"])
                delta += len(value)
            others = old.stored_bytes - len(old_raw) + delta
            return self._put_record(txn, dataclasses.replace(record, n_tokens=total), others)
        return self._write(fn)

    def fork(self, src_id: str, dst_record: SessionRecord) -> SessionRecord:
        def fn(txn):
            src_raw = txn.get(src_id.encode(), db=self._db["sessions"])
            if src_raw is None:
                raise SessionMissing(src_id)
            if txn.get(dst_record.id.encode(), db=self._db["sessions"]) is not None:
                raise SessionExists(dst_record.id)
            src = SessionRecord.from_bytes(src_raw, src_id.encode())
            src_prefix, dst_prefix = _prefix(src_id), _prefix(dst_record.id)
            nbytes = 0
            for db in ("tokens", "kv"):
                items = list(self._scan(txn, db, src_id))
                for key, value in items:
                    txn.put(dst_prefix + bytes(key[len(src_prefix):]), value, db=self._db[db])
                    nbytes += len(value)
            return self._put_record(txn, dataclasses.replace(dst_record, n_tokens=src.n_tokens), nbytes)
        return self._write(fn)

    def delete(self, sid: str) -> bool:
        if self.readonly:
            raise StoreError("the store is open read-only")
        with self._read() as txn:
            if txn.get(sid.encode(), db=self._db["sessions"]) is None:
                return False

        def fn(txn):
            if not txn.delete(sid.encode(), db=self._db["sessions"]):
                return False
            for db in ("tokens", "kv"):
                keys = [bytes(k) for k, _ in self._scan(txn, db, sid)]
                for key in keys:
                    txn.delete(key, db=self._db[db])
            return True
        return self._write(fn)
