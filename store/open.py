"""Open a store from a spec: a plain path or `lmdb://path` is an LMDB data directory;
`postgresql://user@host:port/dbname` (or `postgres://...`, any libpq URL, query
parameters included) is a PostgreSQL database.

The scheme picks the backend from `BACKENDS` (a plain dict: scheme -> opener);
an unknown scheme is a ValueError that lists the valid ones. `describe(spec)`
names a store for messages without a password a URL may hold; `parse_spec(spec)` says which
backend a spec names.
"""
from __future__ import annotations

import os
import re
from typing import Callable

from .base import Store

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def _open_lmdb(rest: str, readonly: bool) -> Store:
    from .lmdb import LmdbStore  # only the backend asked for is imported

    if not rest:
        raise ValueError("lmdb:// needs a path: lmdb://DIR or lmdb:///absolute/dir")
    return LmdbStore(rest, readonly=readonly)


def _open_postgres(scheme: str):
    def opener(rest: str, readonly: bool) -> Store:
        from .postgres import PgStore  # psycopg is imported only when a PostgreSQL store is asked for

        return PgStore(f"{scheme}://{rest}", readonly=readonly)

    return opener


BACKENDS: dict[str, Callable[[str, bool], Store]] = {
    "lmdb": _open_lmdb, "postgresql": _open_postgres("postgresql"), "postgres": _open_postgres("postgres")}


def describe(spec: str | os.PathLike) -> str:
    """The store a spec names, for messages and logs: a path as it is, a URL without its password."""
    if isinstance(spec, os.PathLike) or not isinstance(spec, str):
        return str(spec)
    m = _SCHEME.fullmatch(spec)
    if m is None or m.group(1).lower() == "lmdb":
        return spec
    user, at, host = m.group(2).split("?", 1)[0].rpartition("@")
    return f"{m.group(1)}://{user.split(':', 1)[0]}{at}{host}"


def parse_spec(spec: str | os.PathLike) -> tuple[str, str]:
    """(backend, where) of a spec: ("lmdb", the directory) for a path or lmdb://DIR, ("postgresql", the URL) for a
    postgresql:// or postgres:// URL. ValueError for an unknown scheme or an empty spec."""
    if isinstance(spec, os.PathLike):
        return "lmdb", os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a store spec must be a path or a URL such as lmdb://DIR, got {spec!r}")
    m = _SCHEME.fullmatch(spec)
    if m is None:
        return "lmdb", spec
    scheme = m.group(1).lower()
    if scheme not in BACKENDS:
        valid = ", ".join(f"{name}://" for name in sorted(BACKENDS))
        raise ValueError(f"unknown store scheme {scheme!r} in {spec!r}: valid are {valid} (or a plain path)")
    return ("lmdb", m.group(2)) if scheme == "lmdb" else ("postgresql", spec)


def _lmdb_path(spec: str | os.PathLike) -> str | None:
    """The data dir an LMDB spec names (None: another backend's spec, or not a spec)."""
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        return None
    m = _SCHEME.fullmatch(spec)
    if m is None:
        return spec
    return m.group(2) if m.group(1).lower() == "lmdb" and m.group(2) else None


def claim(spec: str | os.PathLike, who: str, *, create: bool = True):
    """Have the data dir `spec` names to oneself (a server, an offline writer): a lock to release() when done,
    DataDirBusy (a StoreError naming the holder) when another one has it. None for a store that is not a data
    dir (a database shared by servers has leases of its own), and, without create, for a dir that does not
    exist (open_store then says so)."""
    path = _lmdb_path(spec)
    if path is None or not (create or os.path.isdir(path)):
        return None
    from .lmdb.dirlock import DirLock

    return DirLock(path, who)


def open_store(spec: str | os.PathLike, *, readonly: bool = False) -> Store:
    """The store `spec` names: a path (str or os.PathLike) or `lmdb://path` opens that LMDB data dir.
    ValueError for an unknown scheme or an empty spec; StoreError when the backend cannot open it."""
    if isinstance(spec, os.PathLike):
        return _open_lmdb(os.fspath(spec), readonly)
    backend, where = parse_spec(spec)
    if backend == "lmdb":
        return _open_lmdb(where, readonly)
    m = _SCHEME.fullmatch(spec)
    return BACKENDS[m.group(1).lower()](m.group(2), readonly)
