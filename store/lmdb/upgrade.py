"""Format-1 LMDB stores (KV blocks copied per session, no meta database) converted in place to format 2.

`upgrade_store(path)` (`memsvc sessions upgrade`) runs in one write transaction:
an abort leaves the store as it was. Nothing else may have the store open.
"""
from __future__ import annotations

import os
from pathlib import Path

import lmdb

from ..errors import StoreError
from .layout import BLOB_ID, DBS, FORMAT_KEY, NEXT_BLOB_KEY, REF, STORE_FORMAT, U32, U64


def upgrade_store(path: str | os.PathLike) -> int:
    """Convert a format-1 store at path to format 2: each session's KV block becomes a blob with one
    reference and the session's entry a pointer to it. Returns the number of KV blocks converted;
    StoreError if path holds no format-1 store."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise StoreError(f"data dir {path} does not exist or holds no memsvc store")
    size = (path / "data.mdb").stat().st_size
    try:
        env = lmdb.open(str(path), map_size=max(2 * size + (64 << 20), 256 << 20), max_dbs=len(DBS), lock=True)
    except lmdb.Error as exc:
        raise StoreError(f"cannot open the store at {path}: {exc}") from exc
    try:
        try:
            env.open_db(b"meta", create=False)
            raise StoreError(f"the store at {path} already has a format stamp: nothing to upgrade")
        except lmdb.NotFoundError:
            pass
        with env.begin(write=True) as txn:  # the new databases too: an abort leaves the store as it was
            dbs = {name: env.open_db(name.encode(), txn=txn) for name in DBS}
            n = 0
            for key, value in list(txn.cursor(db=dbs["kv"])):
                n += 1
                bid = BLOB_ID.pack(n)
                txn.put(bid, value, db=dbs["blobs"])
                txn.put(bid, REF.pack(1, len(value)), db=dbs["refs"])
                txn.put(key, bid, db=dbs["kv"])
            txn.put(NEXT_BLOB_KEY, U64.pack(n + 1), db=dbs["meta"])
            txn.put(FORMAT_KEY, U32.pack(STORE_FORMAT), db=dbs["meta"])
        return n
    except lmdb.Error as exc:
        raise StoreError(f"cannot upgrade the store at {path}: {exc}") from exc
    finally:
        env.close()
