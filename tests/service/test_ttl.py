"""Session expiry: the server's ttl and a session's own ttl_seconds; expired sessions
are deleted when a call or a listing meets them and by the periodic sweep."""
from __future__ import annotations

import time

import grpc
import pytest

from memsvc.sessions import SessionManager
from tests.conftest import running_server


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_expired_sessions_are_deleted_when_met(tmp_path, tiny_model):
    with running_server(tmp_path / "d", tiny_model, ttl=1.0, sweep_every=0) as (c, server):
        store = server.store
        c.create_session("default", policy="tiered")
        c.append("default", tokens=list(range(10, 300)))  # resident, with blobs
        c.create_session("longer", ttl_seconds=3600)
        c.create_session("listed", ttl_seconds=0.5)
        c.create_session("forked", ttl_seconds=0.5)
        assert store.get("longer").ttl == 3600 and store.get("default").ttl == 0
        time.sleep(1.2)

        code, details = _code(lambda: c.append("default", tokens=[5]))
        assert code == grpc.StatusCode.NOT_FOUND and "expired" in details
        assert store.get("default") is None and server.manager.resident()[0] == 0
        code, _ = _code(lambda: c.fork_session("forked", "copy"))
        assert code == grpc.StatusCode.NOT_FOUND and store.get("copy") is None
        assert [s.id for s in c.list_sessions()] == ["longer"]  # "listed" went while listing
        assert store.get("listed") is None and store.stats()["blobs"] == 0
        assert c.get_session("longer").id == "longer"
        assert server.manager.counters.expired == 3


def test_sweep_deletes_untouched_sessions(tmp_path, tiny_model):
    with running_server(tmp_path / "d", tiny_model, sweep_every=0.1) as (c, server):
        c.create_session("brief", ttl_seconds=0.3)
        c.append("brief", tokens=list(range(10, 100)))
        c.create_session("kept")
        deadline = time.monotonic() + 10
        while server.store.get("brief") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.store.get("brief") is None
        assert [s.id for s in c.list_sessions()] == ["kept"]


def test_a_commit_refreshes_the_ttl_and_bad_ttls_are_refused(tmp_path, tiny_model):
    with running_server(tmp_path / "d", tiny_model, sweep_every=0) as (c, server):
        c.create_session("s", ttl_seconds=1.0)
        for _ in range(4):
            time.sleep(0.4)
            c.append("s", tokens=[7, 8])  # each change starts the ttl again
        assert c.get_session("s").tokens == 8
        before = server.store.dump()
        for bad in (-1.0, float("inf"), float("nan")):
            code, details = _code(lambda: c.create_session("t", ttl_seconds=bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "ttl_seconds" in details
        assert server.store.dump() == before
    for bad in (-1, float("nan"), "10"):
        with pytest.raises(ValueError, match="ttl"):
            SessionManager(None, tiny_model, ttl=bad)


def test_session_replies_say_when_the_session_expires(tmp_path, tiny_model):
    with running_server(tmp_path / "d", tiny_model, ttl=600.0, sweep_every=0) as (c, server):
        own = c.create_session("own", ttl_seconds=30)
        default = c.create_session("default")
        assert (own.ttl_seconds, default.ttl_seconds) == (30, 600)
        assert own.expires_unix == pytest.approx(own.updated_unix + 30)
        assert default.expires_unix == pytest.approx(default.updated_unix + 600)
        time.sleep(0.05)
        c.append("own", tokens=[7, 8])  # a change moves the expiry with updated_unix
        got = c.get_session("own")
        assert got.updated_unix > own.updated_unix and got.expires_unix == pytest.approx(got.updated_unix + 30)
        assert c.resume("own").expires_unix == got.expires_unix
        listed = {s.id: s for s in c.list_sessions()}
        assert (listed["own"].expires_unix, listed["default"].ttl_seconds) == (got.expires_unix, 600)
    with running_server(tmp_path / "e", tiny_model, sweep_every=0) as (c, server):
        never = c.create_session("never")
        assert (never.ttl_seconds, never.expires_unix) == (0, 0)  # no ttl anywhere: never expires
