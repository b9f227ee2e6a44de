"""The old import path of the LMDB store, kept so that code written against it keeps working:
`Store` here is `memsvc.store.lmdb.LmdbStore`. New code imports the interface from
`memsvc.store.base`, opens a store with `memsvc.store.open.open_store`, and names the LMDB
backend `memsvc.store.lmdb.LmdbStore`."""
from __future__ import annotations

from .lmdb import STORE_FORMAT, LmdbStore as Store, upgrade_store

__all__ = ["STORE_FORMAT", "Store", "upgrade_store"]
