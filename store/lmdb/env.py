"""The LMDB environment of one store: opening it (and refusing another format), transactions,
map growth, closing.

Every write is one LMDB write transaction (`Env.write`): committed only when
its function returns having changed something, aborted when it raises, so a
crash leaves a session before or after a call, never between. When the map is
full it grows (doubling) and the whole write is rerun. Writes are serialized by
a lock; reads run concurrently; resizing the map (which LMDB allows only with
no transaction open in the process) takes a readers-writer lock exclusively,
and so does close().

Knows databases and transactions; knows nothing of what the values mean.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb

from ..errors import StoreError
from .layout import DBS, FORMAT_KEY, STORE_FORMAT, U32

T = TypeVar("T")


class RWLock:
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


class Txn:
    """One open transaction; values addressed by (database name, key). Every put of the store goes
    through `put`."""

    __slots__ = ("raw", "_dbs")

    def __init__(self, raw: lmdb.Transaction, dbs: dict):
        self.raw = raw
        self._dbs = dbs

    def get(self, db: str, key: bytes):
        return self.raw.get(key, db=self._dbs[db])

    def put(self, db: str, key: bytes, value: bytes) -> None:
        self.raw.put(key, value, db=self._dbs[db])

    def delete(self, db: str, key: bytes) -> bool:
        return self.raw.delete(key, db=self._dbs[db])

    def cursor(self, db: str) -> lmdb.Cursor:
        return self.raw.cursor(db=self._dbs[db])

    def entries(self, db: str) -> int:
        return self.raw.stat(self._dbs[db])["entries"]

    def scan(self, db: str, pfx: bytes) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) of every entry of db whose key starts with pfx, in key order."""
        cur = self.cursor(db)
        if cur.set_range(pfx):
            for key, value in cur:
                if not key.startswith(pfx):
                    break
                yield key, value


class Env:
    """An open LMDB environment holding a format-2 store."""

    def __init__(self, path: Path, *, map_size: int, readonly: bool):
        self.path = path
        self.readonly = readonly
        if readonly:
            if not (path / "data.mdb").is_file():
                raise StoreError(f"data dir {path} does not exist or holds no memsvc store")
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the data dir {path}: {exc}") from exc
        try:
            self.env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DBS), readonly=readonly, lock=True,
                                 metasync=True, sync=True, max_readers=256)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc
        try:
            self.dbs = self._open_dbs()
        except BaseException:
            self.env.close()
            raise
        self._rw = RWLock()
        self._write_lock = threading.Lock()
        self.closed = False

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
            dbs = {name: self.env.open_db(name.encode(), create=not self.readonly) for name in DBS}
        except lmdb.Error as exc:
            raise StoreError(f"{self.path} is not a memsvc store (database missing: {exc})") from exc
        with self.env.begin(write=not self.readonly) as txn:
            raw = txn.get(FORMAT_KEY, db=dbs["meta"])
            if raw is None and any(txn.stat(dbs[name])["entries"] for name in ("sessions", "tokens", "kv")):
                raise StoreError(f"the store at {self.path} holds sessions but no format stamp; it was not "
                                 f"written by this memsvc")
            if raw is None and not self.readonly:
                txn.put(FORMAT_KEY, U32.pack(STORE_FORMAT), db=dbs["meta"])
            elif raw is None or len(raw) != U32.size or U32.unpack(raw)[0] != STORE_FORMAT:
                found = U32.unpack(raw)[0] if raw is not None and len(raw) == U32.size else repr(raw)
                raise StoreError(f"the store at {self.path} has format {found}; this memsvc reads format "
                                 f"{STORE_FORMAT} only")
        return dbs

    def close(self) -> None:
        """Close the environment once every running call has finished. Idempotent."""
        self._rw.acquire_exclusive()
        try:
            if not self.closed:
                self.closed = True
                self.env.close()
        finally:
            self._rw.release_exclusive()

    def check_open(self) -> None:
        if self.closed:
            raise StoreError(f"the store at {self.path} is closed")

    def check_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the store at {self.path} is open read-only")

    def _resize(self, grow: bool) -> None:
        """Double the map (grow) or adopt the size another process set; no transaction may be open."""
        self._rw.acquire_exclusive()
        try:
            self.check_open()
            self.env.set_mapsize(self.env.info()["map_size"] * 2 if grow else 0)
        finally:
            self._rw.release_exclusive()

    def read(self, fn: Callable[[Txn], T], buffers: bool = False) -> T:
        """fn(txn) in one read transaction (buffers: values are memoryviews into the map)."""
        while True:
            self._rw.acquire_shared()
            try:
                self.check_open()
                with self.env.begin(buffers=buffers) as txn:
                    return fn(Txn(txn, self.dbs))
            except lmdb.MapResizedError:
                pass  # another process grew the map: adopt its size below, then retry
            finally:
                self._rw.release_shared()
            self._resize(grow=False)

    def write(self, fn: Callable[[Txn], tuple[T, bool]]) -> T:
        """fn(txn) -> (result, changed) in one write transaction, all or nothing.

        The transaction is committed only when fn returns with changed true; it is
        aborted when fn raises or changes nothing. A full map is doubled and fn rerun.
        """
        self.check_writable()
        with self._write_lock:
            while True:
                self._rw.acquire_shared()
                try:
                    self.check_open()
                    txn = self.env.begin(write=True)
                    try:
                        result, changed = fn(Txn(txn, self.dbs))
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

    def info(self) -> dict:
        """map_size, page_size, used_pages, used_bytes of the map (call inside read())."""
        info, stat = self.env.info(), self.env.stat()
        used = info["last_pgno"] + 1
        return dict(map_size=info["map_size"], page_size=stat["psize"], used_pages=used,
                    used_bytes=used * stat["psize"])
