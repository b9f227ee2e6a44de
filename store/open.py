"""Open a store from a spec: a plain path or `lmdb://path` is an LMDB data directory.

The scheme picks the backend from `BACKENDS` (a plain dict: scheme -> opener);
an unknown scheme is a ValueError that lists the valid ones. A PostgreSQL
backend adds its `postgresql` entry here.
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


BACKENDS: dict[str, Callable[[str, bool], Store]] = {"lmdb": _open_lmdb}


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
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a store spec must be a path or a URL such as lmdb://DIR, got {spec!r}")
    m = _SCHEME.fullmatch(spec)
    if m is None:
        return _open_lmdb(spec, readonly)
    scheme, rest = m.group(1).lower(), m.group(2)
    opener = BACKENDS.get(scheme)
    if opener is None:
        valid = ", ".join(f"{name}://" for name in sorted(BACKENDS))
        raise ValueError(f"unknown store scheme {scheme!r} in {spec!r}: valid are {valid} (or a plain path)")
    return opener(rest, readonly)
