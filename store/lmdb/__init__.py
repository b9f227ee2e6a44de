"""The LMDB backend of the Store interface: one embedded environment per data directory.

    layout.py    the on-disk format (databases, keys, values; STORE_FORMAT)
    env.py       the environment: opening, transactions, map growth, locks
    sessions.py  session records and token ids
    blobs.py     KV entries: pointers to blobs shared by reference counts
    writes.py    create, commit, rewrite_kv, fork, delete: one transaction each
    archive.py   export and import of one session
    check.py     check_session, check_refs, gc, stats
    upgrade.py   format 1 -> 2 in place
    dirlock.py   who has the data dir to itself (a server, an offline writer)
    store.py     LmdbStore, which puts them behind ../base.py's Store
"""
from __future__ import annotations

from .layout import STORE_FORMAT
from .store import LmdbStore
from .upgrade import upgrade_store

__all__ = ["LmdbStore", "STORE_FORMAT", "upgrade_store"]
