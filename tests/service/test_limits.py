"""Limits and quotas answer RESOURCE_EXHAUSTED naming what was exceeded and the
limit, and change nothing; a cancelled or expired Generate stops computing."""
from __future__ import annotations

import re
import threading
import time

import grpc
import pytest

from memsvc.auth import KeyRing, hash_key
from memsvc.limits import Limits
from tests.service.servers import client, served

RE = grpc.StatusCode.RESOURCE_EXHAUSTED
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef-bob"


def _ring() -> KeyRing:
    return KeyRing.parse(f"alice={hash_key(ALICE)}\nbob={hash_key(BOB)}", source="test", allow_plain=False)


def _fails(call, code, *words) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    assert info.value.code() == code, info.value.details()
    for w in words:
        assert w in info.value.details(), info.value.details()
    return info.value.details()


def test_token_limits_per_append_and_per_session(tmp_path, tiny_model):
    limits = Limits(max_append_tokens=50, max_session_tokens=120)
    with served(tmp_path / "data", tiny_model, limits=limits) as (server, port), client(port) as c:
        c.create_session("s")
        c.append("s", tokens=list(range(10, 60)))  # exactly at the per-Append limit
        store = server.store
        before = store.dump()
        _fails(lambda: c.append("s", tokens=list(range(10, 61))), RE, "51 tokens", "50", "max_append_tokens")
        _fails(lambda: c.append("s", text="word " * 80), RE, "50", "max_append_tokens")  # counted after tokenizing
        c.append("s", tokens=list(range(10, 55)))  # 95 tokens now
        before = store.dump()
        _fails(lambda: c.append("s", tokens=list(range(10, 40))), RE, "95 tokens", "120", "max_session_tokens")
        _fails(lambda: c.generate("s", max_new_tokens=40, commit=True), RE, "120", "max_session_tokens",
               "max_new_tokens")
        assert store.dump() == before
        # generating without commit adds nothing to the session, so it is not limited by it
        assert len(c.generate_text("s", max_new_tokens=40).token_ids) >= 1
        out = c.generate_text("s", max_new_tokens=10, commit=True)
        assert out.session.tokens <= 120
        assert server.metrics.quota_refusals.labels("max_session_tokens")._value.get() == 2
        assert server.metrics.quota_refusals.labels("max_append_tokens")._value.get() == 2


def test_request_size_limit(tmp_path, tiny_model):
    with served(tmp_path / "data", tiny_model, limits=Limits(max_request_bytes=4096)) as (server, port), \
            client(port) as c:
        c.create_session("s")
        before = server.store.dump()
        _fails(lambda: c.append("s", text="x" * 5000), RE, "4096")
        assert server.store.dump() == before
        c.append("s", text="small enough")
        with pytest.raises(grpc.RpcError) as err:  # the project's message, not gRPC's "larger than max"
            c.append("s", tokens=list(range(3000)))
        assert err.value.code() == RE
        assert re.fullmatch(r"this AppendRequest is \d+ bytes, over the limit of 4096 bytes per request message "
                            r"\(the server's --max-request-bytes\); split it into smaller calls, e\.g\. Appends of "
                            r"fewer messages or tokens", err.value.details()), err.value.details()
        assert server.metrics.quota_refusals.labels("max_request_bytes")._value.get() == 2


def test_the_size_message_answers_the_default_limit(tmp_path, tiny_model):
    """The issue's case: a 20 MB request against the default 16 MiB limit."""
    with served(tmp_path / "data", tiny_model) as (server, port), client(port) as c:
        c.create_session("s")
        with pytest.raises(grpc.RpcError) as err:
            c.append("s", text="x" * (20 << 20))
        assert err.value.code() == RE and "--max-request-bytes" in err.value.details()
        assert "larger than max" not in err.value.details()


def test_session_quota_per_tenant(tmp_path, tiny_model):
    with served(tmp_path / "data", tiny_model, api_keys=_ring(),
                limits=Limits(max_sessions_per_tenant=2)) as (server, port), \
            client(port, api_key=ALICE) as alice, client(port, api_key=BOB) as bob:
        alice.create_session("a1")
        alice.create_session("a2")
        before = server.store.dump()
        _fails(lambda: alice.create_session("a3"), RE, "tenant 'alice' has 2 sessions", "max_sessions_per_tenant")
        _fails(lambda: alice.fork_session("a1", "a3"), RE, "max_sessions_per_tenant")
        assert server.store.dump() == before
        bob.create_session("b1")  # another tenant's quota is its own
        bob.create_session("b2")
        alice.delete_session("a2")
        alice.fork_session("a1", "a3")
        assert sorted(s.id for s in alice.list_sessions()) == ["a1", "a3"]


def _stored_bytes(store, prefix: str) -> int:
    return sum(r.stored_bytes for r in store.list(limit=1000) if r.id.startswith(prefix))


def test_byte_quota_per_tenant_counts_every_change_and_survives_restart(tmp_path, tiny_model):
    m = tiny_model
    per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.dtype.itemsize + 4
    quota = 100 * per_token
    limits = Limits(max_bytes_per_tenant=quota)
    data = tmp_path / "data"
    with served(data, tiny_model, api_keys=_ring(), limits=limits) as (server, port), \
            client(port, api_key=ALICE) as alice, client(port, api_key=BOB) as bob:
        store, quotas = server.store, server.servicer.quotas
        alice.create_session("a", policy="full")  # the quota arithmetic above is for the full cache
        alice.append("a", tokens=list(range(10, 50)))
        alice.generate_text("a", max_new_tokens=5, commit=True)
        alice.fork_session("a", "b")
        alice.create_session("c", policy="full")
        alice.delete_session("c")
        bob.create_session("x", policy="full")
        bob.append("x", tokens=list(range(10, 90)))
        # the running count equals what the store holds, tenant by tenant
        assert quotas.usage("alice") == (2, _stored_bytes(store, "alice:"))
        assert quotas.usage("bob") == (1, _stored_bytes(store, "bob:"))
        before = store.dump()
        details = _fails(lambda: alice.append("a", tokens=list(range(10, 60))), RE, "max_bytes_per_tenant",
                         str(quota))
        assert "tenant 'alice'" in details
        _fails(lambda: alice.fork_session("a", "d"), RE, "max_bytes_per_tenant")
        assert store.dump() == before
        alice.delete_session("b")
        alice.append("a", tokens=list(range(10, 20)))  # room again
        usage = quotas.usage("alice")
    with served(data, tiny_model, api_keys=_ring(), limits=limits) as (server, port):
        assert server.servicer.quotas.usage("alice") == usage  # counted from the store at first use


def _slow_model(server, seconds: float):
    """Make every forward pass take at least `seconds` (so a test can act mid-generation)."""
    manager = server.manager
    forward = manager._forward

    def slow(kv, ids, *rest):
        time.sleep(seconds)
        return forward(kv, ids, *rest)

    manager._forward = slow


def _wait(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancelled_or_expired_generate_stops_computing(tmp_path, tiny_model, how):
    with served(tmp_path / "data", tiny_model) as (server, port), client(port) as c:
        c.create_session("s")
        c.append("s", messages=[{"role": "user", "content": "Tell me a long story."}])
        expected = c.generate_text("s", max_new_tokens=8).token_ids
        before = server.store.dump()
        _slow_model(server, 0.02)  # 300 tokens would take >= 6 s
        start = c.stats().model_tokens_processed
        metrics = server.metrics
        if how == "cancel":
            stream = c.generate("s", max_new_tokens=300, commit=True)
            next(stream)
            next(stream)
            stream.cancel()
            code = grpc.StatusCode.CANCELLED
        else:
            c.timeout = 0.5
            _fails(lambda: c.generate("s", max_new_tokens=300, commit=True), grpc.StatusCode.DEADLINE_EXCEEDED)
            c.timeout = 120
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        _wait(lambda: metrics.generate_cancelled._value.get() == 1)
        done = c.stats().model_tokens_processed
        time.sleep(0.3)
        after = c.stats()
        assert after.model_tokens_processed == done  # nothing runs any more
        fed = done - start
        assert fed < 80, f"{fed} tokens ran through the model after asking for 300 and stopping early"
        assert after.tokens_generated == c.stats().tokens_generated
        assert metrics.rpcs.labels("Generate", code.name)._value.get() == 1
        # nothing was committed, the cache was cropped back, and the session's lock is free
        assert server.store.dump() == before
        server.manager._forward = type(server.manager)._forward.__get__(server.manager)
        assert c.generate_text("s", max_new_tokens=8).token_ids == expected


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_append_tokens"):
        Limits(max_append_tokens=-1)
    with pytest.raises(ValueError, match="max_request_bytes"):
        Limits(max_request_bytes=0)
    with pytest.raises(ValueError, match="max_bytes_per_tenant"):
        Limits(max_bytes_per_tenant=1.5)


def test_an_append_whose_deadline_passes_while_it_waits_does_not_run(tmp_path, tiny_model):
    with served(tmp_path / "data", tiny_model) as (server, port), client(port) as c, client(port) as c2:
        c.create_session("s")
        c.append("s", text="Some history.")
        before = server.store.dump()
        appended = c.stats().tokens_appended
        _slow_model(server, 0.02)
        gen = threading.Thread(target=lambda: c.generate_text("s", max_new_tokens=60))
        gen.start()  # holds the session's lock for >= 1.2 s
        time.sleep(0.2)
        c2.timeout = 0.3
        _fails(lambda: c2.append("s", text="too late"), grpc.StatusCode.DEADLINE_EXCEEDED)
        gen.join()
        assert server.store.dump() == before
        assert c.stats().tokens_appended == appended
        m = server.metrics.rpcs
        _wait(lambda: m.labels("Append", "DEADLINE_EXCEEDED")._value.get() == 1)
