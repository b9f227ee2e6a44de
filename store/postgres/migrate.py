"""The PostgreSQL store's schema: plain SQL migrations (migrations/NNN_name.sql) applied in order, each once,
its version recorded in schema_migrations.

`migrate(conn)` applies what is missing in one transaction under an advisory lock, so replicas that start
at once apply each migration once (the others wait, then find nothing to do), and a failure leaves the
schema as it was. `check_schema(conn)` refuses a database that is not at this memsvc's version (read-only
opens, which never migrate). An applied migration is never edited: its checksum is recorded, and a file
that no longer matches it is refused; a change is a new file.

Knows SQL files and the version table; knows nothing about what the tables hold.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreError

MIGRATIONS = Path(__file__).with_name("migrations")
LOCK_KEY = 0x6D656D737663  # "memsvc": the advisory lock migrations take
_NAME = re.compile(r"(\d{3})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations(folder: Path = MIGRATIONS) -> list[Migration]:
    """The migration files, in order; ValueError unless they are numbered 1, 2, ... without a gap."""
    found = []
    for path in sorted(folder.glob("*.sql")):
        m = _NAME.fullmatch(path.name)
        if m is None:
            raise ValueError(f"migration file {path.name} is not named NNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path.read_text(encoding="utf-8")))
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 001, 002, ... without a gap: {[m.version for m in found]}")
    return found


SCHEMA_VERSION = len(migrations())

_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())"""


def _applied(conn) -> dict[int, tuple[str, str]] | None:
    """{version: (name, checksum)} recorded, or None when the database has no schema_migrations table."""
    if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
        return None
    return {v: (n, c) for v, n, c in conn.execute("SELECT version, name, checksum FROM schema_migrations")}


def _check(applied: dict[int, tuple[str, str]], known: list[Migration]) -> None:
    newer = sorted(set(applied) - {m.version for m in known})
    if newer:
        raise StoreError(f"the database's schema has migrations {newer} that this memsvc does not know (it was "
                         f"written by a newer memsvc, schema version {max(applied)}; this one has "
                         f"{len(known)}): upgrade memsvc")
    for m in known:
        if m.version in applied and applied[m.version][1] != m.checksum:
            raise StoreError(f"migration {m.version:03d}_{m.name} differs from the one applied to this database "
                             f"(checksum {applied[m.version][1][:12]}, the file's {m.checksum[:12]}): applied "
                             f"migrations must not change")


def migrate(conn, folder: Path = MIGRATIONS) -> list[str]:
    """Apply the missing migrations (of `folder`) to the database of `conn` (a psycopg connection in autocommit
    mode), all in one transaction under the advisory lock; returns the names applied ([] when it was up to
    date)."""
    known = migrations(folder)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(_TABLE)
        applied = _applied(conn)
        _check(applied, known)
        done = []
        for m in known:
            if m.version not in applied:
                conn.execute(m.sql)
                conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                             (m.version, m.name, m.checksum))
                done.append(f"{m.version:03d}_{m.name}")
        return done


def check_schema(conn, where: str) -> None:
    """StoreError unless the database is at this memsvc's schema version."""
    applied = _applied(conn)
    if applied is None:
        raise StoreError(f"{where} holds no memsvc store (no schema_migrations table): open it once for writing "
                         f"(`memsvc serve --store ...`) or run `memsvc sessions upgrade --store ...`")
    known = migrations()
    _check(applied, known)
    missing = [f"{m.version:03d}_{m.name}" for m in known if m.version not in applied]
    if missing:
        raise StoreError(f"{where} lacks schema migrations {missing}: run `memsvc sessions upgrade --store ...` "
                         f"(or open it for writing once)")
