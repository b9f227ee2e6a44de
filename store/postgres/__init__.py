"""The PostgreSQL backend of the Store interface: one database shared by any number of memsvc processes.

    migrations/  the schema, plain SQL files 001_*.sql, 002_*.sql, ... applied in order
    migrate.py   applying them (once, under an advisory lock) and checking a database's version
    db.py        the connection pool, reads and transactions, round trips and bytes counted
    sessions.py  session records and token ids
    blobs.py     KV entries: pointers to blobs shared by reference counts
    writes.py    create, commit, rewrite_kv, fork, delete, import: one transaction each
    check.py     export, check_session, check_refs, gc, stats
    store.py     PgStore, which puts them behind ../base.py's Store

Open one with `open_store("postgresql://user@host:port/db")` (../open.py).
"""
from __future__ import annotations

from .migrate import SCHEMA_VERSION, migrate
from .store import PgStore

__all__ = ["PgStore", "SCHEMA_VERSION", "migrate"]
