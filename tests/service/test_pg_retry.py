"""What the client sends again, on a PostgreSQL server of the test's own (it stops it and changes its settings).

The database down: an Append fails before any write, UNAVAILABLE marked retry-safe, and a client with
retry_seconds tries it again until the database is back: stored once. The database lost at the COMMIT of an
Append (a synchronous standby that never answers, then the waiting backend terminated: PostgreSQL has committed
it locally): UNAVAILABLE not marked retry-safe, and the client does not send it again: stored once, not twice.
"""
from __future__ import annotations

import threading
import time

import grpc
import psycopg
import pytest

from memsvc import chat
from tests.service.servers import client, served


@pytest.fixture
def own_pg():
    from tools.pgserver import PgServer

    server = PgServer.start(fsync=False)
    yield server
    server.stop()


def _in_thread(call) -> dict:
    """Run call in a thread; the dict gets "result" or "error" once it is done (and "thread")."""
    out: dict = {}

    def run():
        try:
            out["result"] = call()
        except grpc.RpcError as exc:
            out["error"] = exc

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def _appends(server, code: str) -> float:
    return server.metrics.rpcs.labels("Append", code)._value.get()


def test_an_append_refused_while_the_database_is_down_is_retried_until_it_is_back(own_pg, tiny_model):
    url = own_pg.create_database()
    with served(url, tiny_model) as (server, port), client(port) as bare, client(port, retry_seconds=60.0) as c:
        c.create_session("s")
        tokens = c.append("s", text="Before the outage. " * 4).session.tokens
        own_pg.stop(remove=False)
        with pytest.raises(grpc.RpcError) as down:
            bare.append("s", text="During the outage.")
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(down.value.trailing_metadata()) == {"memsvc-retry-safe": "1"}

        waiting = _in_thread(lambda: c.append("s", text="Sent while it is down."))
        deadline = time.monotonic() + 30
        while _appends(server, "UNAVAILABLE") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting["thread"].is_alive()  # refused, and tried again
        own_pg.start_again()
        waiting["thread"].join(60)
        assert "error" not in waiting, waiting.get("error")
        landed = waiting["result"]
        assert landed.session.tokens == tokens + len(landed.token_ids) == server.store.get("s").n_tokens
        assert server.store.tokens("s")[tokens:] == list(landed.token_ids)  # once


def _cut_commits_waiting_for_the_standby(admin: psycopg.Connection, call: dict, timeout: float = 60.0) -> int:
    """Terminate the backends whose COMMIT waits for the (absent) synchronous standby until call is done (a
    thread of _in_thread); how many."""
    deadline, cut = time.monotonic() + timeout, 0
    while call["thread"].is_alive() and time.monotonic() < deadline:
        for (pid,) in admin.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
                                    "AND datname = current_database()").fetchall():
            cut += admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        time.sleep(0.02)
    return cut


def test_an_append_whose_commit_may_have_landed_is_not_sent_again(own_pg, tiny_model):
    url = own_pg.create_database()
    text = "Stored exactly once. "
    with psycopg.connect(url, autocommit=True) as admin:  # the test server runs with synchronous_commit off
        admin.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET synchronous_commit = on")
    with served(url, tiny_model) as (server, port), client(port, retry_seconds=60.0) as c, \
            psycopg.connect(url, autocommit=True) as admin:
        c.create_session("s")
        tokens = c.append("s", text="Before. " * 4).session.tokens
        admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")  # every COMMIT waits for it
        admin.execute("SELECT pg_reload_conf()")
        try:
            cut = _in_thread(lambda: c.append("s", text=text))
            assert _cut_commits_waiting_for_the_standby(admin, cut) >= 1
        finally:
            admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
            admin.execute("SELECT pg_reload_conf()")
        err = cut.get("error")
        assert err is not None, cut.get("result")
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "may or may not have landed" in err.details()
        assert dict(err.trailing_metadata()) == {}  # not retry-safe
        assert _appends(server, "UNAVAILABLE") == 1  # sent once: not again, though retry_seconds allowed it

        ids = chat.encode_text(tiny_model.tokenizer, text)
        stored = server.store.tokens("s")
        assert stored[tokens:] == ids  # PostgreSQL had committed it locally: once, never twice
        after = c.append("s", text="Afterwards.")  # the server reloads the session as stored
        assert after.session.tokens == tokens + len(ids) + len(after.token_ids) == server.store.get("s").n_tokens


def test_a_generate_that_fails_after_its_first_chunk_is_not_sent_again(own_pg, tiny_model):
    url = own_pg.create_database()
    with served(url, tiny_model) as (server, port), client(port, retry_seconds=60.0) as c:
        c.create_session("s")
        tokens = c.append("s", text="Once upon a time there was a lighthouse. " * 3).session.tokens
        forward = server.manager._forward

        def slow(kv, ids, *rest):  # 200 tokens take >= 4 s: time to stop the database mid-reply
            time.sleep(0.02)
            return forward(kv, ids, *rest)

        server.manager._forward = slow
        stream = c.generate("s", max_new_tokens=200, commit=True)
        assert next(stream).token_ids
        own_pg.stop(remove=False)  # the reply's commit finds the database down
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(err.value.trailing_metadata()) == {"memsvc-retry-safe": "1"}  # nothing stored, and yet:
        assert server.metrics.rpcs.labels("Generate", "UNAVAILABLE")._value.get() == 1  # chunks were given
        own_pg.start_again()
        assert c.get_session("s").tokens == tokens == server.store.get("s").n_tokens
