"""The LMDB store: session records, token ids and KV blocks of every session.

Three named databases in one environment:
    sessions  id                                  -> SessionRecord bytes
    tokens    id \\0 index(u32 BE)                 -> block of little-endian int32 token ids
    kv        id \\0 layer(u16 BE) index(u32 BE)    -> block of KV payload bytes
Ids cannot contain \\0, so a prefix scan over `id \\0` finds exactly one
session's blocks. Every write (create, commit, fork, delete) is one LMDB write
transaction: if anything raises, the transaction is aborted and nothing is
written; a crash leaves a session before or after the call, never between.
When the map is full it grows (doubling) and the whole write is retried.

Token ids are cut into blocks of `token_block` ids; a commit rewrites the
session's last, partially filled block. Reads concatenate whatever blocks are
stored, so reopening a store with another `token_block` is safe.

Thread-safe: one Store is shared by all worker threads. Writes are serialized
by a lock; reads run concurrently; resizing the map (which LMDB allows only
with no transaction open in the process) takes a readers-writer lock
exclusively.

Knows bytes; knows nothing about models or tensors: KV payloads, `layout`,
`messages` and `extra` are the caller's.
"""
from __future__ import annotations

import dataclasses
import operator
import os
import struct
import sys
import threading
from array import array
from pathlib import Path
from typing import Mapping, Sequence

import lmdb

from .blocks import KIND_KV, KIND_TOKENS, decode_block, encode_block
from .errors import CorruptBlock, CorruptRecord, SessionExists, SessionMissing, StoreError
from .records import SessionRecord, check_id

_KV_KEY = struct.Struct(">HI")
_TOK_KEY = struct.Struct(">I")
_DBS = ("sessions", "tokens", "kv")
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1
_BIG_ENDIAN = sys.byteorder == "big"
if array("i").itemsize != 4:  # pragma: no cover - every platform we run on
    raise ImportError("memsvc.store needs a 4-byte C int for token ids")


class _RWLock:
    """Many shared holders or one exclusive holder; a waiting exclusive blocks new shared ones."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()


def _prefix(sid: str) -> bytes:
    return check_id(sid).encode() + b"\0"


def _ids_from_le(raw: bytes) -> array:
    ids = array("i", raw)
    if _BIG_ENDIAN:  # pragma: no cover
        ids.byteswap()
    return ids


def _ids_to_le(ids: array) -> bytes:
    if _BIG_ENDIAN:  # pragma: no cover
        ids = array("i", ids)
        ids.byteswap()
    return ids.tobytes()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Store:
    def __init__(self, path: str | os.PathLike, *, map_size: int = 256 << 20, readonly: bool = False,
                 token_block: int = 1024):
        if not _is_int(token_block) or token_block < 1:
            raise ValueError(f"token_block must be an integer >= 1, got {token_block!r}")
        if not _is_int(map_size) or map_size < 1:
            raise ValueError(f"map_size must be an integer >= 1, got {map_size!r}")
        self.path = Path(path)
        self.readonly = bool(readonly)
        self.token_block = token_block
        if readonly:
            if not (self.path / "data.mdb").is_file():
                raise StoreError(f"data dir {self.path} does not exist or holds no memsvc store")
        else:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the data dir {self.path}: {exc}") from exc
        try:
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=len(_DBS), readonly=self.readonly,
                                 lock=True, metasync=True, sync=True, max_readers=256)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        try:
            self._db = {name: self.env.open_db(name.encode(), create=not self.readonly) for name in _DBS}
        except lmdb.Error as exc:
            self.env.close()
            raise StoreError(f"{self.path} is not a memsvc store (database missing: {exc})") from exc
        self._rw = _RWLock()
        self._write_lock = threading.Lock()
        self._closed = False

    # ---- plumbing ----------------------------------------------------------------

    def close(self) -> None:
        """Close the environment once every running call has finished. Idempotent."""
        self._rw.acquire_exclusive()
        try:
            if not self._closed:
                self._closed = True
                self.env.close()
        finally:
            self._rw.release_exclusive()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store at {self.path} is closed")

    def _resize(self, grow: bool) -> None:
        """Double the map (grow) or adopt the size another process set; no transaction may be open."""
        self._rw.acquire_exclusive()
        try:
            self._check_open()
            self.env.set_mapsize(self.env.info()["map_size"] * 2 if grow else 0)
        finally:
            self._rw.release_exclusive()

    def _read(self, fn, buffers: bool = False):
        """Run fn(txn) in one read transaction (buffers: values are memoryviews into the map)."""
        while True:
            self._rw.acquire_shared()
            try:
                self._check_open()
                with self.env.begin(buffers=buffers) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                pass  # another process grew the map: adopt its size below, then retry
            finally:
                self._rw.release_shared()
            self._resize(grow=False)

    def _write(self, fn):
        """Run fn(txn) -> (result, changed) in one write transaction, all or nothing.

        The transaction is committed only when fn returns with changed true; it is
        aborted when fn raises or changes nothing. A full map is doubled and fn rerun.
        """
        if self.readonly:
            raise StoreError(f"the store at {self.path} is open read-only")
        with self._write_lock:
            while True:
                self._rw.acquire_shared()
                try:
                    self._check_open()
                    txn = self.env.begin(write=True)
                    try:
                        result, changed = fn(txn)
                        if changed:
                            txn.commit()
                        else:
                            txn.abort()
                        return result
                    except BaseException:
                        txn.abort()  # a no-op when commit already ended the transaction
                        raise
                except lmdb.MapFullError:
                    grow = True
                except lmdb.MapResizedError:
                    grow = False
                finally:
                    self._rw.release_shared()
                self._resize(grow=grow)

    def _put(self, txn, db: str, key: bytes, value: bytes) -> None:
        txn.put(key, value, db=self._db[db])

    def _record(self, txn, sid: str) -> tuple[SessionRecord | None, bytes | None]:
        key = sid.encode()
        raw = txn.get(key, db=self._db["sessions"])
        return (None, None) if raw is None else (SessionRecord.from_bytes(raw, key), raw)

    def _scan(self, txn, db: str, sid: str):
        """(key, value) of every entry of one session in db, in key order."""
        prefix = _prefix(sid)
        cur = txn.cursor(db=self._db[db])
        if cur.set_range(prefix):
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                yield key, value

    def _last_token_block(self, txn, sid: str) -> tuple[bytes, int, bytes] | None:
        """(key, index, value) of the session's last token block, or None."""
        prefix = _prefix(sid)
        top = prefix + _TOK_KEY.pack(0xFFFFFFFF)
        cur = txn.cursor(db=self._db["tokens"])
        if cur.set_range(top):
            if cur.key() != top and not cur.prev():
                return None
        elif not cur.last():
            return None
        key = cur.key()
        if not key.startswith(prefix):
            return None
        if len(key) != len(top):
            raise CorruptBlock("token block key has the wrong length", key, db="tokens", field="key")
        return key, _TOK_KEY.unpack(key[len(prefix):])[0], cur.value()

    @staticmethod
    def _token_block(key: bytes, value: bytes, index: int) -> array:
        head, raw = decode_block(value, key, "tokens")
        if head.kind != KIND_TOKENS:
            raise CorruptBlock(f"token block holds kind {head.kind}", key, db="tokens", field="kind")
        if head.index != index:
            raise CorruptBlock(f"token block {index} says it is block {head.index}", key, db="tokens",
                               field="index")
        if head.raw_len != 4 * head.n_tokens:
            raise CorruptBlock(f"token block holds {head.raw_len} bytes for {head.n_tokens} ids", key,
                               db="tokens", field="n_tokens")
        return _ids_from_le(raw)

    @staticmethod
    def _kv_block(key: bytes, value: bytes, layer: int, index: int) -> bytes:
        head, raw = decode_block(value, key, "kv")
        if head.kind != KIND_KV:
            raise CorruptBlock(f"KV block holds kind {head.kind}", key, db="kv", field="kind")
        if (head.layer, head.index) != (layer, index):
            raise CorruptBlock(f"KV block ({layer}, {index}) says it is ({head.layer}, {head.index})", key,
                               db="kv", field="index")
        return raw

    # ---- reads -------------------------------------------------------------------

    def get(self, sid: str) -> SessionRecord | None:
        """The session's record, or None (also for an id that cannot exist)."""
        if not isinstance(sid, str) or "\0" in sid:
            return None
        return self._read(lambda txn: self._record(txn, sid)[0])

    def list(self, after: str = "", limit: int = 100, labels: Mapping[str, str] | None = None
             ) -> list[SessionRecord]:
        """Up to `limit` records with id > `after`, in id order, whose labels include all of `labels`."""
        if not _is_int(limit) or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
        if not isinstance(after, str) or "\0" in after:
            raise ValueError(f"after must be a session id or empty, got {after!r}")
        wanted = dict(labels or {})

        def fn(txn):
            out: list[SessionRecord] = []
            cur = txn.cursor(db=self._db["sessions"])
            if limit == 0 or not cur.set_range(after.encode() + b"\0" if after else b""):
                return out
            for key, value in cur:
                rec = SessionRecord.from_bytes(value, key)
                if any(rec.labels.get(k) != v for k, v in wanted.items()):
                    continue
                out.append(rec)
                if len(out) >= limit:
                    break
            return out
        return self._read(fn)

    def count(self) -> int:
        return self._read(lambda txn: txn.stat(self._db["sessions"])["entries"])

    def tokens(self, sid: str) -> list[int]:
        """All stored token ids of the session ([] when it does not exist).

        Raises CorruptBlock for a damaged or missing block and CorruptRecord when
        the count disagrees with the record's n_tokens.
        """
        plen = len(_prefix(sid))

        def fn(txn):
            rec, _ = self._record(txn, sid)
            ids = array("i")
            for expected, (key, value) in enumerate(self._scan(txn, "tokens", sid)):
                if len(key) != plen + _TOK_KEY.size:
                    raise CorruptBlock("token block key has the wrong length", key, db="tokens", field="key")
                index = _TOK_KEY.unpack(key[plen:])[0]
                if index != expected:
                    raise CorruptBlock(f"token block {expected} of {sid!r} is missing", key, db="tokens",
                                       field="index")
                ids.extend(self._token_block(key, value, index))
            if rec is not None and len(ids) != rec.n_tokens:
                raise CorruptRecord(f"session {sid!r} holds {len(ids)} token ids, its record says {rec.n_tokens}",
                                    sid.encode(), db="sessions", field="n_tokens")
            return ids.tolist()
        return self._read(fn)

    def kv_blocks(self, sid: str) -> dict[tuple[int, int], bytes]:
        """{(layer, index): verified, decompressed payload} of every KV block of the session."""
        plen = len(_prefix(sid))

        def fn(txn):
            out: dict[tuple[int, int], bytes] = {}
            for key, value in self._scan(txn, "kv", sid):
                if len(key) != plen + _KV_KEY.size:
                    raise CorruptBlock("KV block key has the wrong length", key, db="kv", field="key")
                layer, index = _KV_KEY.unpack(key[plen:])
                out[(layer, index)] = self._kv_block(key, value, layer, index)
            return out
        return self._read(fn)

    def kv_block(self, sid: str, layer: int, index: int) -> bytes | None:
        key = _prefix(sid) + _pack_kv(layer, index)

        def fn(txn):
            value = txn.get(key, db=self._db["kv"])
            return None if value is None else self._kv_block(key, value, layer, index)
        return self._read(fn)

    def session_keys(self, sid: str) -> tuple[int, int]:
        """(number of keys, bytes of values) this session holds, record included."""
        _prefix(sid)
        return self._read(lambda txn: self._usage(txn, sid))

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
        """Every (db name, key) -> value: for tests that compare whole stores."""
        def fn(txn):
            return {(name, bytes(key)): bytes(value)
                    for name in _DBS for key, value in txn.cursor(db=self._db[name])}
        return self._read(fn)

    def stats(self) -> dict:
        """sessions, token_blocks, kv_blocks, total_bytes (all values), map_size, page_size,
        used_pages, used_bytes (of the map)."""
        def fn(txn):
            out = {"sessions": txn.stat(self._db["sessions"])["entries"],
                   "token_blocks": txn.stat(self._db["tokens"])["entries"],
                   "kv_blocks": txn.stat(self._db["kv"])["entries"]}
            total = 0
            for name in _DBS:
                cur = txn.cursor(db=self._db[name])
                for _ in cur.iternext(keys=True, values=False):
                    total += len(cur.value())
            out["total_bytes"] = total
            info, stat = self.env.info(), self.env.stat()
            out.update(map_size=info["map_size"], page_size=stat["psize"], used_pages=info["last_pgno"] + 1,
                       used_bytes=(info["last_pgno"] + 1) * stat["psize"])
            return out
        return self._read(fn, buffers=True)

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
        self._put(txn, "sessions", rec.id.encode(), data)
        return final

    def create(self, record: SessionRecord) -> SessionRecord:
        """Store a new session (n_tokens 0, no blocks); SessionExists if the id is taken."""
        _check_record(record)

        def fn(txn):
            if txn.get(record.id.encode(), db=self._db["sessions"]) is not None:
                raise SessionExists(f"session {record.id!r} already exists")
            return self._put_record(txn, dataclasses.replace(record, n_tokens=0), 0), True
        return self._write(fn)

    def commit(self, record: SessionRecord, *, first_token: int, tokens: Sequence[int],
               blocks: Mapping[tuple[int, int], bytes],
               block_tokens: Mapping[tuple[int, int], int] | None = None) -> SessionRecord:
        """Append token ids at first_token, write/replace KV blocks and the record, in one transaction.

        `blocks` maps (layer, index) to raw payload bytes; `block_tokens` optionally
        gives the n_tokens written in each block's header (default 0). first_token
        must equal the number of tokens stored. The stored record gets n_tokens and
        stored_bytes from the store, everything else from `record`.
        """
        _check_record(record)
        sid = record.id
        prefix = _prefix(sid)
        if not _is_int(first_token) or first_token < 0:
            raise ValueError(f"first_token must be an integer >= 0, got {first_token!r}")
        new_ids = array("i")
        for t in tokens:
            try:
                t = operator.index(t)
            except TypeError:
                raise ValueError(f"token id {t!r} is not an integer") from None
            if not _I32_MIN <= t <= _I32_MAX:
                raise ValueError(f"token id {t} does not fit in int32")
            new_ids.append(t)
        counts = dict(block_tokens or {})
        unknown = set(counts) - set(blocks.keys())
        if unknown:
            raise ValueError(f"block_tokens names blocks that are not written: {sorted(unknown)[:5]}")
        # Compress outside the write lock: it does not depend on what is stored.
        encoded: list[tuple[bytes, bytes]] = []
        for where, payload in blocks.items():
            if not isinstance(where, tuple) or len(where) != 2:
                raise ValueError(f"KV block keys must be (layer, index) pairs, got {where!r}")
            layer, index = where
            key = prefix + _pack_kv(layer, index)
            encoded.append((key, encode_block(payload, kind=KIND_KV, layer=layer, index=index,
                                              n_tokens=counts.get(where, 0))))

        def fn(txn):
            old, old_raw = self._record(txn, sid)
            if old is None:
                raise SessionMissing(f"no session {sid!r}")
            if first_token != old.n_tokens:
                raise ValueError(f"commit at token {first_token}, but session {sid!r} holds {old.n_tokens}")
            delta = 0
            if new_ids:
                merged, start = new_ids, 0
                last = self._last_token_block(txn, sid)
                if last is None and old.n_tokens:
                    raise CorruptBlock(f"session {sid!r} holds {old.n_tokens} tokens but no token block",
                                       prefix, db="tokens", field="index")
                if last is not None:
                    if not old.n_tokens:
                        raise CorruptBlock(f"session {sid!r} holds no tokens but has token blocks", last[0],
                                           db="tokens", field="index")
                    key, index, value = last
                    head = self._token_block(key, value, index)
                    if len(head) < self.token_block:  # partially filled: rewrite it
                        merged, start = head + new_ids, index
                        delta -= len(value)
                    else:
                        start = index + 1
                tb = self.token_block
                for i in range(0, len(merged), tb):
                    index = start + i // tb
                    part = merged[i:i + tb]
                    value = encode_block(_ids_to_le(part), kind=KIND_TOKENS, layer=0, index=index,
                                         n_tokens=len(part))
                    self._put(txn, "tokens", prefix + _TOK_KEY.pack(index), value)
                    delta += len(value)
            for key, value in encoded:
                prev = txn.get(key, db=self._db["kv"])
                if prev is not None:
                    delta -= len(prev)
                self._put(txn, "kv", key, value)
                delta += len(value)
            others = old.stored_bytes - len(old_raw) + delta
            if others < 0:
                raise CorruptRecord(f"session {sid!r} records stored_bytes {old.stored_bytes}, fewer than it holds",
                                    sid.encode(), db="sessions", field="stored_bytes")
            total = old.n_tokens + len(new_ids)
            return self._put_record(txn, dataclasses.replace(record, n_tokens=total), others), True
        return self._write(fn)

    def fork(self, src_id: str, dst_record: SessionRecord) -> SessionRecord:
        """Copy every token and KV value of src_id under dst_record.id, plus dst_record, in one transaction."""
        src_prefix = _prefix(src_id)
        _check_record(dst_record)
        dst_prefix = _prefix(dst_record.id)

        def fn(txn):
            src, _ = self._record(txn, src_id)
            if src is None:
                raise SessionMissing(f"no session {src_id!r}")
            if txn.get(dst_record.id.encode(), db=self._db["sessions"]) is not None:
                raise SessionExists(f"session {dst_record.id!r} already exists")
            nbytes = 0
            for db in ("tokens", "kv"):
                for key, value in list(self._scan(txn, db, src_id)):
                    self._put(txn, db, dst_prefix + bytes(key[len(src_prefix):]), value)
                    nbytes += len(value)
            return self._put_record(txn, dataclasses.replace(dst_record, n_tokens=src.n_tokens), nbytes), True
        return self._write(fn)

    def delete(self, sid: str) -> bool:
        """Remove the session's record and blocks; False when there is no such session."""
        if not isinstance(sid, str) or "\0" in sid:
            return False
        if self.readonly:
            raise StoreError(f"the store at {self.path} is open read-only")

        def fn(txn):
            if not txn.delete(sid.encode(), db=self._db["sessions"]):
                return False, False
            for db in ("tokens", "kv"):
                for key in [bytes(k) for k, _ in self._scan(txn, db, sid)]:
                    txn.delete(key, db=self._db[db])
            return True, True
        if not self._read(lambda txn: txn.get(sid.encode(), db=self._db["sessions"]) is not None):
            return False  # the common miss needs no write transaction (a damaged record can still be deleted)
        return self._write(fn)


def _check_record(record) -> None:
    if not isinstance(record, SessionRecord):
        raise ValueError(f"expected a SessionRecord, got {type(record).__name__}")


def _pack_kv(layer, index) -> bytes:
    for name, v, top in (("layer", layer, 0xFFFF), ("index", index, 0xFFFFFFFF)):
        if not _is_int(v) or not 0 <= v <= top:
            raise ValueError(f"KV block {name} must be an integer in 0..{top}, got {v!r}")
    return _KV_KEY.pack(layer, index)
