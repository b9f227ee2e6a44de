"""The LMDB store: session records, token ids and KV blocks of every session.

Named databases in one environment (store format 2):
    sessions  id                                  -> SessionRecord bytes
    tokens    id \\0 index(u32 BE)                 -> block of little-endian int32 token ids
    kv        id \\0 layer(u16 BE) index(u32 BE)    -> blob id (u64 BE): a pointer
    blobs     blob id (u64 BE)                     -> block of KV payload bytes
    refs      blob id (u64 BE)                     -> reference count (u32 LE), blob bytes (u64 LE)
    meta      b"format" -> u32 LE store format; b"next_blob" -> u64 LE next blob id
Ids cannot contain \\0, so a prefix scan over `id \\0` finds exactly one
session's entries. KV payloads are shared copy-on-write: a fork copies the
record, the token blocks and the pointers and counts one more reference to
each blob; a commit that writes (layer, index) stores a new blob and drops its
reference to the old one (a blob is never changed once written); a delete
drops every reference; a blob whose count reaches zero is removed in the same
transaction. Blob ids only grow, so a stale pointer never finds a newer blob.
`gc()` removes blobs nothing points to (none after clean deletes; a crash
cannot leave any, an older bug or a raw write can) and fixes wrong counts.

Every write (create, commit, fork, delete, import, gc) is one LMDB write
transaction: if anything raises, the transaction is aborted and nothing is
written; a crash leaves a session before or after the call, never between.
When the map is full it grows (doubling) and the whole write is retried.

A record's stored_bytes is what the session references: its record, its token
blocks and every blob it points to, counted in full even when shared (so a
fork reports the size of its source); `stats()` counts physical bytes.

Token ids are cut into blocks of `token_block` ids; a commit rewrites the
session's last, partially filled block. Reads concatenate whatever blocks are
stored, so reopening a store with another `token_block` is safe.

A store of format 1 (KV blocks copied per session, no `meta` database) is
refused with a clear error; `upgrade_store()` (`memsvc sessions upgrade`)
converts it in place, in one transaction.

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
import time
from array import array
from pathlib import Path
from typing import Mapping, Sequence

import lmdb

from .archive import Export
from .blocks import KIND_KV, KIND_TOKENS, decode_block, encode_block
from .errors import CorruptBlock, CorruptRecord, SessionExists, SessionMissing, StoreError
from .records import SessionRecord, check_id

STORE_FORMAT = 2
_KV_KEY = struct.Struct(">HI")
_TOK_KEY = struct.Struct(">I")
_BLOB_ID = struct.Struct(">Q")
_REF = struct.Struct("<IQ")  # reference count, bytes of the blob
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_DBS = ("sessions", "tokens", "kv", "blobs", "refs", "meta")
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
            self._db = self._open_dbs()
        except BaseException:
            self.env.close()
            raise
        self._rw = _RWLock()
        self._write_lock = threading.Lock()
        self._closed = False

    # ---- plumbing ----------------------------------------------------------------

    def _existing_db(self, name: str):
        try:
            return self.env.open_db(name.encode(), create=False)
        except lmdb.NotFoundError:
            return None
        except lmdb.Error as exc:
            raise StoreError(f"{self.path} is not a memsvc store ({name}: {exc})") from exc

    def _open_dbs(self) -> dict:
        """Open every database; refuse a store of another format before changing anything."""
        if self._existing_db("meta") is None:
            used = False
            for name in ("sessions", "tokens", "kv"):
                db = self._existing_db(name)
                if db is not None:
                    with self.env.begin() as txn:
                        used = used or txn.stat(db)["entries"] > 0
            if used:
                raise StoreError(
                    f"the store at {self.path} has format 1 (KV blocks copied per session); this memsvc reads "
                    f"format {STORE_FORMAT} only (blocks shared between forks). Convert it in place with "
                    f"`memsvc sessions upgrade --data-dir {self.path}` (stop the server first), or start a fresh "
                    f"data dir")
            if self.readonly:
                raise StoreError(f"{self.path} is not a memsvc store (it has no format stamp)")
        try:
            dbs = {name: self.env.open_db(name.encode(), create=not self.readonly) for name in _DBS}
        except lmdb.Error as exc:
            raise StoreError(f"{self.path} is not a memsvc store (database missing: {exc})") from exc
        with self.env.begin(write=not self.readonly) as txn:
            raw = txn.get(b"format", db=dbs["meta"])
            if raw is None and any(txn.stat(dbs[name])["entries"] for name in ("sessions", "tokens", "kv")):
                raise StoreError(f"the store at {self.path} holds sessions but no format stamp; it was not "
                                 f"written by this memsvc")
            if raw is None and not self.readonly:
                txn.put(b"format", _U32.pack(STORE_FORMAT), db=dbs["meta"])
            elif raw is None or len(raw) != _U32.size or _U32.unpack(raw)[0] != STORE_FORMAT:
                found = _U32.unpack(raw)[0] if raw is not None and len(raw) == _U32.size else repr(raw)
                raise StoreError(f"the store at {self.path} has format {found}; this memsvc reads format "
                                 f"{STORE_FORMAT} only")
        return dbs

    def close(self) -> None:
        """Close the environment once every running call has finished. Idempotent."""
        self._rw.acquire_exclusive()
        try:
            if not self._closed:
                self._closed = True
                self.env.close()
        finally:
            self._rw.release_exclusive()

    @property
    def closed(self) -> bool:
        return self._closed

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

    # ---- blobs and their reference counts --------------------------------------------

    @staticmethod
    def _blob_id(key: bytes, ptr) -> bytes:
        """The blob id a kv entry holds (CorruptBlock for anything else)."""
        if len(ptr) != _BLOB_ID.size:
            raise CorruptBlock(f"KV pointer is {len(ptr)} bytes, not {_BLOB_ID.size}", key, db="kv", field="pointer")
        return bytes(ptr)

    def _blob(self, txn, key: bytes, ptr) -> bytes:
        """The stored (encoded) blob a kv entry points to."""
        bid = self._blob_id(key, ptr)
        value = txn.get(bid, db=self._db["blobs"])
        if value is None:
            raise CorruptBlock(f"KV block points to blob {_BLOB_ID.unpack(bid)[0]}, which is missing", key,
                               db="kv", field="blob")
        return value

    def _ref(self, txn, key: bytes, bid: bytes) -> tuple[int, int]:
        raw = txn.get(bid, db=self._db["refs"])
        if raw is None or len(raw) != _REF.size:
            raise CorruptBlock(f"blob {_BLOB_ID.unpack(bid)[0]} has no valid reference count", key, db="refs",
                               field="count")
        return _REF.unpack(raw)

    def _incref(self, txn, key: bytes, bid: bytes) -> int:
        """One more reference to bid; returns the blob's bytes."""
        count, size = self._ref(txn, key, bid)
        self._put(txn, "refs", bid, _REF.pack(count + 1, size))
        return size

    def _decref(self, txn, key: bytes, bid: bytes) -> int:
        """One reference fewer to bid, removing the blob at zero; returns the blob's bytes."""
        count, size = self._ref(txn, key, bid)
        if count <= 1:
            txn.delete(bid, db=self._db["refs"])
            txn.delete(bid, db=self._db["blobs"])
        else:
            self._put(txn, "refs", bid, _REF.pack(count - 1, size))
        return size

    def _put_blobs(self, txn, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Each (kv key, encoded block) as a new blob with one reference, the key pointing to it
        (whatever it pointed to is the caller's). Returns the bytes of the blobs."""
        if not items:
            return 0
        raw = txn.get(b"next_blob", db=self._db["meta"])
        next_blob = 1 if raw is None or len(raw) != _U64.size else _U64.unpack(raw)[0]
        cur = txn.cursor(db=self._db["blobs"])
        if cur.last() and len(cur.key()) == _BLOB_ID.size:  # a damaged counter must never reuse an id
            next_blob = max(next_blob, _BLOB_ID.unpack(cur.key())[0] + 1)
        nbytes = 0
        for key, value in items:
            bid = _BLOB_ID.pack(next_blob)
            next_blob += 1
            self._put(txn, "blobs", bid, value)
            self._put(txn, "refs", bid, _REF.pack(1, len(value)))
            self._put(txn, "kv", key, bid)
            nbytes += len(value)
        self._put(txn, "meta", b"next_blob", _U64.pack(next_blob))
        return nbytes

    # ---- decoding ----------------------------------------------------------------

    def _kv_block(self, txn, key: bytes, ptr, layer: int, index: int) -> bytes:
        head, raw = decode_block(self._blob(txn, key, ptr), key, "kv")
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

    def session_ids(self) -> list[str]:
        """Every stored session id, in order, whether or not its record reads back."""
        return self._read(lambda txn: [bytes(k).decode("utf-8", "replace") for k in
                                       txn.cursor(db=self._db["sessions"]).iternext(keys=True, values=False)])

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
                out[(layer, index)] = self._kv_block(txn, key, value, layer, index)
            return out
        return self._read(fn)

    def kv_keys(self, sid: str) -> list[tuple[int, int]]:
        """(layer, index) of every KV entry of the session, in order (nothing is read but the keys)."""
        plen = len(_prefix(sid))

        def fn(txn):
            return [_KV_KEY.unpack(key[plen:]) for key, _ in self._scan(txn, "kv", sid)
                    if len(key) == plen + _KV_KEY.size]
        return self._read(fn)

    def kv_block(self, sid: str, layer: int, index: int) -> bytes | None:
        return self.kv_blocks_at(sid, layer, [index])[0]

    def kv_blocks_at(self, sid: str, layer: int, indices: Sequence[int]) -> list[bytes | None]:
        """kv_block for each of `indices` of one layer, in order, in one read transaction."""
        prefix = _prefix(sid)

        def fn(txn):
            out: list[bytes | None] = []
            for index in indices:
                key = prefix + _pack_kv(layer, index)
                value = txn.get(key, db=self._db["kv"])
                out.append(None if value is None else self._kv_block(txn, key, value, layer, index))
            return out
        return self._read(fn)

    def session_keys(self, sid: str) -> tuple[int, int]:
        """(entries, bytes) this session references: its record, token blocks and KV pointers, and the
        bytes of the record, the token blocks and every blob it points to (shared ones in full)."""
        _prefix(sid)
        return self._read(lambda txn: self._usage(txn, sid))

    def _usage(self, txn, sid: str) -> tuple[int, int]:
        n, nbytes = 0, 0
        raw = txn.get(sid.encode(), db=self._db["sessions"])
        if raw is not None:
            n, nbytes = 1, len(raw)
        for _, value in self._scan(txn, "tokens", sid):
            n += 1
            nbytes += len(value)
        for key, ptr in self._scan(txn, "kv", sid):
            n += 1
            nbytes += len(self._blob(txn, key, ptr))
        return n, nbytes

    def session_blobs(self, sid: str) -> dict:
        """How the session's KV blocks are stored: blocks, shared (blobs other sessions point to as well),
        shared_bytes, own_bytes (bytes that deleting this session would free)."""
        _prefix(sid)

        def fn(txn):
            out = dict(blocks=0, shared=0, shared_bytes=0, own_bytes=0)
            for key, ptr in self._scan(txn, "kv", sid):
                count, size = self._ref(txn, key, self._blob_id(key, ptr))
                out["blocks"] += 1
                if count > 1:
                    out["shared"] += 1
                    out["shared_bytes"] += size
                else:
                    out["own_bytes"] += size
            return out
        return self._read(fn)

    def export(self, sid: str) -> Export:
        """The session as an export (see `archive`), read in one transaction; every block is checked first.
        StoreError when there is no such session."""
        plen = len(_prefix(sid))

        def fn(txn):
            rec, raw = self._record(txn, sid)
            if rec is None:
                raise SessionMissing(f"no session {sid!r}")
            out = Export(header={}, record=bytes(raw))
            for key, value in self._scan(txn, "tokens", sid):
                index = _TOK_KEY.unpack(key[plen:])[0]
                self._token_block(key, value, index)
                out.tokens.append((index, bytes(value)))
            for key, ptr in self._scan(txn, "kv", sid):
                layer, index = _KV_KEY.unpack(key[plen:])
                self._kv_block(txn, key, ptr, layer, index)
                out.kv.append(((layer, index), bytes(self._blob(txn, key, ptr))))
            out.header = {"session": rec.id, "model_name": rec.model_name, "model_fingerprint": rec.model_fingerprint,
                          "policy": rec.policy, "n_tokens": rec.n_tokens, "token_blocks": len(out.tokens),
                          "kv_blocks": len(out.kv), "exported_unix": time.time()}
            return out
        return self._read(fn)

    def check_session(self, sid: str) -> dict:
        """Check every entry of one session in one read transaction; nothing is changed.

        Returns {"record": error or None, "tokens": {index: error}, "kv": {(layer, index): error},
        "bad_keys": [errors of entries whose key does not parse], "token_count": ids stored,
        "kv_entries": KV pointers}. A KV entry is damaged when its pointer is not a blob id, its blob is
        missing, has no valid reference count, fails its checksums or is another block; a token block
        when it fails its checks, is out of sequence, or the ids do not add up to the record's n_tokens
        (reported under index -1). StoreError when there is no such session."""
        plen = len(_prefix(sid))

        def fn(txn):
            out = {"record": None, "tokens": {}, "kv": {}, "bad_keys": [], "token_count": 0, "kv_entries": 0}
            raw = txn.get(sid.encode(), db=self._db["sessions"])
            if raw is None:
                raise SessionMissing(f"no session {sid!r}")
            rec = None
            try:
                rec = SessionRecord.from_bytes(raw, sid.encode())
            except CorruptRecord as exc:
                out["record"] = str(exc)
            expected = 0
            for key, value in self._scan(txn, "tokens", sid):
                if len(key) != plen + _TOK_KEY.size:
                    out["bad_keys"].append(f"token key {bytes(key)!r} has the wrong length")
                    continue
                index = _TOK_KEY.unpack(key[plen:])[0]
                try:
                    if index != expected:
                        raise CorruptBlock(f"token block {expected} is missing (found {index})", key, db="tokens",
                                           field="index")
                    out["token_count"] += len(self._token_block(key, value, index))
                except CorruptRecord as exc:
                    out["tokens"][index] = str(exc)
                expected = index + 1
            if rec is not None and not out["tokens"] and out["token_count"] != rec.n_tokens:
                out["tokens"][-1] = (f"the session holds {out['token_count']} token ids, its record says "
                                     f"{rec.n_tokens}")
            for key, ptr in self._scan(txn, "kv", sid):
                if len(key) != plen + _KV_KEY.size:
                    out["bad_keys"].append(f"KV key {bytes(key)!r} has the wrong length")
                    continue
                out["kv_entries"] += 1
                layer, index = _KV_KEY.unpack(key[plen:])
                try:
                    self._kv_block(txn, key, ptr, layer, index)
                    count, _ = self._ref(txn, key, self._blob_id(key, ptr))
                    if count < 1:
                        raise CorruptBlock(f"blob {_BLOB_ID.unpack(bytes(ptr))[0]} counts no reference", key,
                                           db="refs", field="count")
                except CorruptRecord as exc:
                    out["kv"][(layer, index)] = str(exc)
            return out
        return self._read(fn)

    def check_refs(self) -> dict:
        """What `gc()` would find, without changing anything: orphan_entries (token and KV entries of
        sessions without a record), unreferenced_blobs, wrong_counts (reference counts that disagree with
        the pointers, or are missing or malformed), dangling_pointers (KV pointers that are not blob ids or
        whose blob is missing); bad_meta: the format stamp or the next blob id is damaged or behind the
        stored blobs (the next write moves the id past them)."""
        def fn(txn):
            out = dict(orphan_entries=0, unreferenced_blobs=0, wrong_counts=0, dangling_pointers=0, bad_meta=0)
            fmt = txn.get(b"format", db=self._db["meta"])
            out["bad_meta"] += fmt is None or len(fmt) != _U32.size or _U32.unpack(fmt)[0] != STORE_FORMAT
            nxt = txn.get(b"next_blob", db=self._db["meta"])
            cur = txn.cursor(db=self._db["blobs"])
            if cur.last():
                top = _BLOB_ID.unpack(cur.key())[0] if len(cur.key()) == _BLOB_ID.size else None
                out["bad_meta"] += (top is None or nxt is None or len(nxt) != _U64.size
                                    or _U64.unpack(nxt)[0] <= top)
            known: dict[bytes, bool] = {}
            for db in ("tokens", "kv"):
                for key in txn.cursor(db=self._db[db]).iternext(keys=True, values=False):
                    sid = bytes(key).split(b"\0", 1)[0]
                    if sid not in known:
                        known[sid] = txn.get(sid, db=self._db["sessions"]) is not None
                    out["orphan_entries"] += not known[sid]
            wanted: dict[bytes, int] = {}
            for key, ptr in txn.cursor(db=self._db["kv"]):
                if not known.get(bytes(key).split(b"\0", 1)[0], False):
                    continue  # an orphan: gc() removes it
                if len(ptr) != _BLOB_ID.size:
                    out["dangling_pointers"] += 1
                    continue
                wanted[bytes(ptr)] = wanted.get(bytes(ptr), 0) + 1
            blobs = txn.cursor(db=self._db["blobs"])
            for bid in blobs.iternext(keys=True, values=False):
                out["unreferenced_blobs"] += bytes(bid) not in wanted
            for bid, raw in txn.cursor(db=self._db["refs"]):
                n = wanted.get(bytes(bid))
                if n is not None and (len(raw) != _REF.size or _REF.unpack(raw)[0] != n):
                    out["wrong_counts"] += 1
                elif n is None and txn.get(bytes(bid), db=self._db["blobs"]) is not None:
                    pass  # an unreferenced blob with its count: counted above
                elif n is None:
                    out["wrong_counts"] += 1
            for bid, n in wanted.items():
                if txn.get(bid, db=self._db["blobs"]) is None:
                    out["dangling_pointers"] += n
                elif txn.get(bid, db=self._db["refs"]) is None:
                    out["wrong_counts"] += 1
            return out
        return self._read(fn)

    def dump(self) -> dict[tuple[str, bytes], bytes]:
        """Every (db name, key) -> value: for tests that compare whole stores."""
        def fn(txn):
            return {(name, bytes(key)): bytes(value)
                    for name in _DBS for key, value in txn.cursor(db=self._db[name])}
        return self._read(fn)

    def stats(self) -> dict:
        """What the store holds, physically:

        sessions, token_blocks, kv_blocks (KV pointers of all sessions), blobs, shared_blobs (referenced
        more than once), references (sum of counts); bytes of values: record_bytes, token_bytes, blob_bytes,
        shared_blob_bytes, pointer_bytes, total_bytes (every value of every database); logical_blob_bytes
        (blob bytes counted once per reference: what the blobs would take without sharing); map_size,
        page_size, used_pages, used_bytes (of the map).
        """
        def fn(txn):
            out = {"sessions": txn.stat(self._db["sessions"])["entries"],
                   "token_blocks": txn.stat(self._db["tokens"])["entries"],
                   "kv_blocks": txn.stat(self._db["kv"])["entries"],
                   "blobs": txn.stat(self._db["blobs"])["entries"]}
            sizes = {}
            for name in _DBS:
                total = 0
                cur = txn.cursor(db=self._db[name])
                for _ in cur.iternext(keys=True, values=False):
                    total += len(cur.value())
                sizes[name] = total
            shared = shared_bytes = refs = logical = 0
            for raw in txn.cursor(db=self._db["refs"]).iternext(keys=False, values=True):
                if len(raw) != _REF.size:
                    continue  # gc() reports and fixes it
                count, size = _REF.unpack(raw)
                refs += count
                logical += count * size
                if count > 1:
                    shared += 1
                    shared_bytes += size
            out.update(shared_blobs=shared, references=refs, record_bytes=sizes["sessions"],
                       token_bytes=sizes["tokens"], blob_bytes=sizes["blobs"], shared_blob_bytes=shared_bytes,
                       pointer_bytes=sizes["kv"], logical_blob_bytes=logical, total_bytes=sum(sizes.values()))
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
               block_tokens: Mapping[tuple[int, int], int] | None = None,
               drop: Sequence[tuple[int, int]] = ()) -> SessionRecord:
        """Append token ids at first_token, write/replace KV blocks, remove the KV entries in `drop`
        (absent ones are ignored) and write the record, in one transaction.

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
        both = set(drop) & set(blocks.keys())
        if both:
            raise ValueError(f"blocks both written and dropped: {sorted(both)[:5]}")
        dropped = [prefix + _pack_kv(layer, index) for layer, index in drop]

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
            for key in [key for key, _ in encoded] + dropped:
                prev = txn.get(key, db=self._db["kv"])
                if prev is not None:  # drop this session's reference; a shared blob stays as it is
                    delta -= self._decref(txn, key, self._blob_id(key, prev))
                    if key in dropped:
                        txn.delete(key, db=self._db["kv"])
            delta += self._put_blobs(txn, encoded)
            others = old.stored_bytes - len(old_raw) + delta
            if others < 0:
                raise CorruptRecord(f"session {sid!r} records stored_bytes {old.stored_bytes}, fewer than it holds",
                                    sid.encode(), db="sessions", field="stored_bytes")
            total = old.n_tokens + len(new_ids)
            return self._put_record(txn, dataclasses.replace(record, n_tokens=total), others), True
        return self._write(fn)

    def rewrite_kv(self, sid: str, *, n_tokens: int, blocks: Mapping[tuple[int, int], bytes],
                   block_tokens: Mapping[tuple[int, int], int] | None = None, drop: Sequence[tuple[int, int]] = (),
                   extra: Mapping | None = None) -> SessionRecord:
        """Repair: write `blocks` (layer, index) -> payload as new blobs, remove the KV entries in `drop`,
        and merge `extra` into the record's extra, in one transaction, only if the session still holds
        `n_tokens` tokens (else ValueError: it changed since it was rebuilt). Each rewritten entry drops
        its reference to the old blob when the pointer and count are readable (a damaged one is left to
        gc()); other sessions pointing to a damaged blob keep pointing to it. stored_bytes is recounted;
        `updated` is left as it was (a repair is not a change of the conversation)."""
        prefix = _prefix(sid)
        counts = dict(block_tokens or {})
        encoded = []
        for (layer, index), payload in blocks.items():
            key = prefix + _pack_kv(layer, index)
            encoded.append((key, encode_block(payload, kind=KIND_KV, layer=layer, index=index,
                                              n_tokens=counts.get((layer, index), 0))))
        dropped = [prefix + _pack_kv(layer, index) for layer, index in drop]

        def fn(txn):
            rec, raw = self._record(txn, sid)
            if rec is None:
                raise SessionMissing(f"no session {sid!r}")
            if rec.n_tokens != n_tokens:
                raise ValueError(f"session {sid!r} holds {rec.n_tokens} tokens, not the {n_tokens} it was "
                                 f"rebuilt from")
            for key in [key for key, _ in encoded] + dropped:
                prev = txn.get(key, db=self._db["kv"])
                if prev is None:
                    continue
                try:
                    self._decref(txn, key, self._blob_id(key, prev))
                except CorruptBlock:
                    pass  # a damaged pointer or count: gc() settles that blob
                if key in dropped:
                    txn.delete(key, db=self._db["kv"])
            self._put_blobs(txn, encoded)
            n, nbytes = self._usage(txn, sid)
            new = dataclasses.replace(rec, extra={**rec.extra, **(extra or {})})
            return self._put_record(txn, new, nbytes - len(raw)), True
        return self._write(fn)

    def fork(self, src_id: str, dst_record: SessionRecord) -> SessionRecord:
        """dst_record.id gets src_id's tokens and KV blocks, in one transaction: token blocks are copied,
        KV blocks shared (one more reference to each blob)."""
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
            for key, value in list(self._scan(txn, "tokens", src_id)):
                self._put(txn, "tokens", dst_prefix + bytes(key[len(src_prefix):]), value)
                nbytes += len(value)
            for key, ptr in list(self._scan(txn, "kv", src_id)):
                bid = self._blob_id(key, ptr)
                nbytes += self._incref(txn, key, bid)
                self._put(txn, "kv", dst_prefix + bytes(key[len(src_prefix):]), bid)
            return self._put_record(txn, dataclasses.replace(dst_record, n_tokens=src.n_tokens), nbytes), True
        return self._write(fn)

    def delete(self, sid: str, *, expired_at: float | None = None, default_ttl: float = 0.0) -> bool:
        """Remove the session's record and entries and drop its references (blobs at zero go too).

        False when there is no such session. With expired_at (a unix time), the session is removed
        only if it has expired by then (see `SessionRecord.expires`), checked inside the write
        transaction, so a commit that just refreshed it wins.
        """
        if not isinstance(sid, str) or "\0" in sid:
            return False
        if self.readonly:
            raise StoreError(f"the store at {self.path} is open read-only")

        def fn(txn):
            if expired_at is not None:
                rec, _ = self._record(txn, sid)
                if rec is None or rec.expires(default_ttl) > expired_at:
                    return False, False
            if not txn.delete(sid.encode(), db=self._db["sessions"]):
                return False, False
            for key in [bytes(k) for k, _ in self._scan(txn, "tokens", sid)]:
                txn.delete(key, db=self._db["tokens"])
            for key, ptr in [(bytes(k), bytes(v)) for k, v in self._scan(txn, "kv", sid)]:
                txn.delete(key, db=self._db["kv"])
                try:
                    self._decref(txn, key, self._blob_id(key, ptr))
                except CorruptBlock:
                    pass  # a damaged pointer or count: the session goes anyway; gc() settles the blobs
            return True, True
        if not self._read(lambda txn: txn.get(sid.encode(), db=self._db["sessions"]) is not None):
            return False  # the common miss needs no write transaction (a damaged record can still be deleted)
        return self._write(fn)

    def import_session(self, export: Export, new_id: str | None = None) -> SessionRecord:
        """Store an exported session (under new_id when given) in one transaction: its record, token
        blocks and KV blocks, each checked first. SessionExists if the id is taken; CorruptRecord or
        CorruptBlock for a damaged or inconsistent export."""
        rec = SessionRecord.from_bytes(export.record)
        if new_id is not None:
            rec = dataclasses.replace(rec, id=check_id(new_id))
        prefix = _prefix(rec.id)
        n_ids = 0
        for expected, (index, value) in enumerate(sorted(export.tokens)):
            if index != expected:
                raise CorruptBlock(f"the export has no token block {expected}", db="tokens", field="index")
            n_ids += len(self._token_block(b"", value, index))
        if n_ids != rec.n_tokens:
            raise CorruptRecord(f"the export holds {n_ids} token ids, its record says {rec.n_tokens}",
                                db="sessions", field="n_tokens")
        kv = []
        for (layer, index), value in export.kv:
            key = prefix + _pack_kv(layer, index)
            head, _ = decode_block(value, key, "kv")
            if head.kind != KIND_KV or (head.layer, head.index) != (layer, index):
                raise CorruptBlock(f"the export's KV block ({layer}, {index}) is not that block", key, db="kv",
                                   field="index")
            kv.append((key, bytes(value)))
        if len({key for key, _ in kv}) != len(kv):
            raise CorruptBlock("the export holds a KV block twice", db="kv", field="key")

        def fn(txn):
            if txn.get(rec.id.encode(), db=self._db["sessions"]) is not None:
                raise SessionExists(f"session {rec.id!r} already exists")
            nbytes = 0
            for index, value in export.tokens:
                self._put(txn, "tokens", prefix + _TOK_KEY.pack(index), value)
                nbytes += len(value)
            nbytes += self._put_blobs(txn, kv)
            return self._put_record(txn, rec, nbytes), True
        return self._write(fn)

    def expired(self, now: float, default_ttl: float = 0.0) -> list[str]:
        """Ids of the sessions expired at unix time `now` (default_ttl: for records without their own ttl).
        A damaged record never expires here."""
        def fn(txn):
            out = []
            for key, value in txn.cursor(db=self._db["sessions"]):
                try:
                    rec = SessionRecord.from_bytes(value, key)
                except CorruptRecord:
                    continue
                if rec.expires(default_ttl) <= now:
                    out.append(rec.id)
            return out
        return self._read(fn)

    def gc(self) -> dict:
        """Compact references, in one write transaction; returns what it did:

        orphan_entries: token and KV entries of sessions that have no record (removed);
        freed_blobs, freed_bytes: blobs no session points to (removed, with their counts);
        fixed_counts: reference counts that disagreed with the pointers (set to the pointers' count);
        dangling_pointers: KV pointers whose blob is missing or that are not blob ids (left alone:
        the session fails its reads until it is repaired or deleted);
        blobs, blob_bytes: what is left.
        """
        def fn(txn):
            out = dict(orphan_entries=0, freed_blobs=0, freed_bytes=0, fixed_counts=0, dangling_pointers=0)
            known: dict[bytes, bool] = {}
            for db in ("tokens", "kv"):
                for key in [bytes(k) for k in txn.cursor(db=self._db[db]).iternext(keys=True, values=False)]:
                    sid = key.split(b"\0", 1)[0]
                    if sid not in known:
                        known[sid] = txn.get(sid, db=self._db["sessions"]) is not None
                    if not known[sid]:
                        txn.delete(key, db=self._db[db])
                        out["orphan_entries"] += 1
            wanted: dict[bytes, int] = {}
            for key, ptr in txn.cursor(db=self._db["kv"]):
                if len(ptr) != _BLOB_ID.size:
                    out["dangling_pointers"] += 1
                    continue
                wanted[bytes(ptr)] = wanted.get(bytes(ptr), 0) + 1
            blobs = txn.cursor(db=self._db["blobs"])
            for bid in [bytes(k) for k in blobs.iternext(keys=True, values=False)]:
                if bid not in wanted:
                    out["freed_bytes"] += len(txn.get(bid, db=self._db["blobs"]))
                    out["freed_blobs"] += 1
                    txn.delete(bid, db=self._db["blobs"])
                    txn.delete(bid, db=self._db["refs"])
            for bid, raw in [(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._db["refs"])]:
                if bid not in wanted:  # a count whose blob never existed
                    txn.delete(bid, db=self._db["refs"])
                    out["fixed_counts"] += 1
                elif not blobs.set_key(bid):  # pointers to a blob that is gone
                    out["dangling_pointers"] += wanted.pop(bid)
                elif len(raw) != _REF.size or _REF.unpack(raw)[0] != wanted[bid]:
                    size = _REF.unpack(raw)[1] if len(raw) == _REF.size else len(blobs.value())
                    self._put(txn, "refs", bid, _REF.pack(wanted[bid], size))
                    out["fixed_counts"] += 1
            for bid, count in wanted.items():
                if txn.get(bid, db=self._db["refs"]) is None:
                    if blobs.set_key(bid):
                        self._put(txn, "refs", bid, _REF.pack(count, len(blobs.value())))
                        out["fixed_counts"] += 1
                    else:
                        out["dangling_pointers"] += count
            out["blobs"] = txn.stat(self._db["blobs"])["entries"]
            out["blob_bytes"] = sum(_REF.unpack(v)[1] for v in
                                    txn.cursor(db=self._db["refs"]).iternext(keys=False, values=True))
            changed = any(out[k] for k in ("orphan_entries", "freed_blobs", "fixed_counts"))
            return out, changed
        return self._write(fn)


def upgrade_store(path: str | os.PathLike) -> int:
    """Convert a format-1 store at path to format 2 in one write transaction: each session's KV
    block becomes a blob with one reference and the session's entry a pointer to it. Returns
    the number of KV blocks converted; StoreError if path holds no format-1 store. Nothing else
    may have the store open while it runs."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise StoreError(f"data dir {path} does not exist or holds no memsvc store")
    size = (path / "data.mdb").stat().st_size
    try:
        env = lmdb.open(str(path), map_size=max(2 * size + (64 << 20), 256 << 20), max_dbs=len(_DBS), lock=True)
    except lmdb.Error as exc:
        raise StoreError(f"cannot open the store at {path}: {exc}") from exc
    try:
        try:
            env.open_db(b"meta", create=False)
            raise StoreError(f"the store at {path} already has a format stamp: nothing to upgrade")
        except lmdb.NotFoundError:
            pass
        with env.begin(write=True) as txn:  # the new databases too: an abort leaves the store as it was
            dbs = {name: env.open_db(name.encode(), txn=txn) for name in _DBS}
            n = 0
            for key, value in list(txn.cursor(db=dbs["kv"])):
                n += 1
                bid = _BLOB_ID.pack(n)
                txn.put(bid, value, db=dbs["blobs"])
                txn.put(bid, _REF.pack(1, len(value)), db=dbs["refs"])
                txn.put(key, bid, db=dbs["kv"])
            txn.put(b"next_blob", _U64.pack(n + 1), db=dbs["meta"])
            txn.put(b"format", _U32.pack(STORE_FORMAT), db=dbs["meta"])
        return n
    except lmdb.Error as exc:
        raise StoreError(f"cannot upgrade the store at {path}: {exc}") from exc
    finally:
        env.close()


def _check_record(record) -> None:
    if not isinstance(record, SessionRecord):
        raise ValueError(f"expected a SessionRecord, got {type(record).__name__}")


def _pack_kv(layer, index) -> bytes:
    for name, v, top in (("layer", layer, 0xFFFF), ("index", index, 0xFFFFFFFF)):
        if not _is_int(v) or not 0 <= v <= top:
            raise ValueError(f"KV block {name} must be an integer in 0..{top}, got {v!r}")
    return _KV_KEY.pack(layer, index)
