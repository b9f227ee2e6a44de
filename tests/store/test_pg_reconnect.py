"""Connections the database ended under a live PostgreSQL store (a restart's, an operator's
pg_terminate_backend, idle_in_transaction_session_timeout while the process was paused): a read, and a write
whose connection was lost before its COMMIT was sent, run once more on a fresh connection, so the caller sees
no error and the write lands once. Lost a second time, the call answers StoreUnavailable and changed nothing."""
from __future__ import annotations

import time

import psycopg
import pytest

from memsvc.store.errors import StoreUnavailable
from memsvc.store.postgres import PgStore
from memsvc.store.postgres.db import Db
from tests.store.backends import rec


def _end_store_connections(url: str) -> int:
    """pg_terminate_backend on every memsvc connection to url's database; how many it ended."""
    with psycopg.connect(url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'memsvc' AND pid <> pg_backend_pid()"
        ).fetchone()[0]
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
                            "application_name = 'memsvc'").fetchone()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
    return ended


def test_calls_on_connections_the_database_ended_go_through_on_fresh_ones(pg_url):
    with PgStore(pg_url, pool_min=2, pool_max=2) as store:
        store.create(rec("s"))
        store.commit(rec("s"), first_token=0, tokens=[1, 2], blocks={(0, 0): b"one"})
        assert _end_store_connections(pg_url) >= 1
        store.commit(rec("s"), first_token=2, tokens=[3], blocks={(0, 1): b"two"})  # a write: no error
        assert store.tokens("s") == [1, 2, 3]  # landed once
        assert _end_store_connections(pg_url) >= 1
        assert store.tokens("s") == [1, 2, 3]  # a read: no error
        assert store.kv_blocks("s") == {(0, 0): b"one", (0, 1): b"two"}


def _db(url: str) -> Db:
    db = Db(url, readonly=False, pool_min=1, pool_max=2, timeout=5)
    db.open()
    db.write("setup", lambda tx: tx.write("CREATE TABLE IF NOT EXISTS t (x int)"))
    return db


def test_a_write_whose_transaction_the_database_ended_runs_once_more(pg_url):
    """The process paused inside a write's transaction past idle_in_transaction_session_timeout: the database
    ended it (rolled back); its next statement meets that, and the write runs again from its start."""
    db = _db(f"{pg_url}?options=-c%20idle_in_transaction_session_timeout%3D300")
    try:
        tries = []

        def write(tx):
            tries.append(tx.conn.info.backend_pid)
            tx.write("INSERT INTO t VALUES (%s)", (len(tries),))
            if len(tries) == 1:
                time.sleep(1.5)  # paused mid-transaction: the database ends it after 0.3 s
            tx.write("INSERT INTO t VALUES (%s)", (10 * len(tries),))
            return len(tries)

        assert db.write("w", write) == 2
        assert tries[0] != tries[1]  # on another connection
        assert sorted(db.read("r", lambda tx: tx.rows("SELECT x FROM t"))) == [(2,), (20,)]  # the first rolled back
    finally:
        db.close()


def test_a_write_lost_twice_answers_unavailable_and_changed_nothing(pg_url):
    db = _db(f"{pg_url}?options=-c%20idle_in_transaction_session_timeout%3D300")
    try:
        tries = []

        def write(tx):
            tries.append(1)
            tx.write("INSERT INTO t VALUES (1)")
            time.sleep(1.5)  # every time
            tx.write("INSERT INTO t VALUES (2)")

        with pytest.raises(StoreUnavailable, match="nothing of it was written; retry it"):
            db.write("w", write)
        assert len(tries) == 2  # once more, not more
        assert db.read("r", lambda tx: tx.rows("SELECT x FROM t")) == []
    finally:
        db.close()
