"""The database down (issue 23, database death, in process): calls that need the database fail fast with
UNAVAILABLE and a message a person can act on, nothing half-written shows, and the same server serves again
once the database is back, without a restart. The test starts a PostgreSQL server of its own (it stops it)."""
from __future__ import annotations

import time

import grpc
import pytest

from tests.service.servers import client, served


@pytest.fixture
def own_pg():
    from tools.pgserver import PgServer

    server = PgServer.start(fsync=False)
    yield server
    server.stop()


def _unavailable(call) -> tuple[str, float]:
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    return err.value.details(), time.perf_counter() - t0


def test_calls_fail_fast_while_the_database_is_down_and_recover_when_it_returns(own_pg, tiny_model):
    url = own_pg.create_database()
    with served(url, tiny_model) as (server, port), client(port) as c:
        c.create_session("s")
        before = c.append("s", text="Before the outage. " * 5).session.tokens
        own_pg.stop(remove=False)

        message, seconds = _unavailable(lambda: c.append("s", text="During the outage."))
        assert "unavailable" in message and "retry" in message and "127.0.0.1" in message
        assert seconds < 3  # not the pool's 5 s wait: the probe fails at once
        _, seconds = _unavailable(lambda: c.create_session("t"))
        assert seconds < 3  # not the pool's 5 s wait: the probe fails at once
        _unavailable(lambda: list(c.list_sessions()))

        own_pg.start_again()
        after = c.append("s", text="After the outage.")
        assert after.session.tokens == before + len(after.token_ids)  # the failed Append left nothing
        assert c.generate_text("s", max_new_tokens=3, commit=True).token_ids
        stored = server.store.get("s")
        assert stored.n_tokens == c.get_session("s").tokens == len(server.store.tokens("s"))
        assert [s.id for s in c.list_sessions()] == ["s"]
