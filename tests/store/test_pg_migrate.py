"""PostgreSQL schema migrations (store/postgres/migrate.py) on a real server: applied once, in order, a new file
applied on the next open, an edited or unknown applied migration refused, a read-only open of an unmigrated
database refused with what to run."""
from __future__ import annotations

import shutil

import psycopg
import pytest

from memsvc.store.errors import StoreError
from memsvc.store.postgres import PgStore, SCHEMA_VERSION, migrate
from memsvc.store.postgres.migrate import MIGRATIONS, migrations


def _versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]


def test_migrations_apply_once_in_order(pg_url):
    with PgStore(pg_url) as store:
        assert store.migrated == [f"{m.version:03d}_{m.name}" for m in migrations()]
    assert _versions(pg_url) == list(range(1, SCHEMA_VERSION + 1))
    with PgStore(pg_url) as store:
        assert store.migrated == []  # up to date: nothing applied again


def test_a_new_migration_is_applied_and_an_edited_one_refused(pg_url, tmp_path):
    folder = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, folder)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert len(migrate(conn, folder)) == SCHEMA_VERSION
        (folder / f"{SCHEMA_VERSION + 1:03d}_extra.sql").write_text("CREATE TABLE extra (x int);\n")
        assert migrate(conn, folder) == [f"{SCHEMA_VERSION + 1:03d}_extra"]
        assert conn.execute("SELECT count(*) FROM extra").fetchone()[0] == 0
        first = sorted(folder.glob("001_*.sql"))[0]
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(StoreError, match="differs from the one applied"):
            migrate(conn, folder)
    # the database now has a migration this memsvc's files lack: refused, naming it
    with pytest.raises(StoreError, match=rf"migrations \[{SCHEMA_VERSION + 1}\].*upgrade memsvc"):
        PgStore(pg_url)


def test_a_gap_in_the_files_is_refused(tmp_path):
    (tmp_path / "001_a.sql").write_text("SELECT 1;")
    (tmp_path / "003_c.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="without a gap"):
        migrations(tmp_path)


def test_read_only_open_of_an_empty_database_says_what_to_run(pg_url):
    with pytest.raises(StoreError, match="no memsvc store.*sessions upgrade"):
        PgStore(pg_url, readonly=True)
    with PgStore(pg_url):
        pass
    with PgStore(pg_url, readonly=True) as store:
        assert store.readonly and store.count() == 0
        with pytest.raises(StoreError, match="read-only"):
            store.gc()
