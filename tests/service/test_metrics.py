"""The Prometheus endpoint moves as RPCs happen; the RPC log is one JSON line per
call with no conversation content."""
from __future__ import annotations

import io
import json
import logging
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from memsvc.auth import KeyRing, hash_key
from tests.service.servers import client, served

KEY = "tenant-key-0123456789abcdef"


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(m, name, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_counts_rpcs_tokens_and_bytes(tmp_path, tiny_model):
    with served(tmp_path / "data", tiny_model, metrics_port=0) as (server, port), client(port) as c:
        mport = server.metrics_port
        assert mport and mport != port
        server.metrics.collector.store_every = 0  # read the store on every scrape
        m0 = _scrape(mport)
        assert _get(m0, "memsvc_tokens_appended_total") == 0
        c.create_session("s")
        appended = len(c.append("s", tokens=list(range(10, 40))).token_ids)
        out = c.generate_text("s", max_new_tokens=4)
        c.resume("s")
        with pytest.raises(grpc.RpcError):
            c.get_session("missing")
        with pytest.raises(grpc.RpcError):
            c.append("s", tokens=[-1])
        m1 = _scrape(mport)
        ok = {"code": "OK"}
        for method in ("CreateSession", "Append", "Generate", "Resume"):
            assert _get(m1, "memsvc_rpc_total", method=method, **ok) == 1, method
            assert _get(m1, "memsvc_rpc_duration_seconds_count", method=method, **ok) == 1, method
            assert _get(m1, "memsvc_rpc_duration_seconds_sum", method=method, **ok) > 0, method
        assert _get(m1, "memsvc_rpc_total", method="GetSession", code="NOT_FOUND") == 1
        assert _get(m1, "memsvc_rpc_total", method="Append", code="INVALID_ARGUMENT") == 1
        assert _get(m1, "memsvc_rpc_duration_seconds_bucket", method="Append", code="OK", le="+Inf") == 1
        assert _get(m1, "memsvc_tokens_appended_total") == appended == 30
        assert _get(m1, "memsvc_tokens_generated_total") == len(out.token_ids)
        assert _get(m1, "memsvc_model_tokens_processed_total") >= appended
        assert _get(m1, "memsvc_resumes_total") == 1
        assert _get(m1, "memsvc_session_loads_total") == 1  # by the first Append; Resume found it in memory
        assert _get(m1, "memsvc_sessions_unloaded_total") == 0
        assert _get(m1, "memsvc_sessions_resident") == 1
        assert _get(m1, "memsvc_bytes_resident") == c.get_session("s").bytes_resident > 0
        assert _get(m1, "memsvc_resident_budget_bytes") == 512 << 20
        tiers = dict(c.get_session("s").tier_tokens)
        assert tiers["hot"] > 0
        for tier, n in tiers.items():
            assert _get(m1, "memsvc_tier_tokens_resident", tier=tier) == pytest.approx(n)
            assert _get(m1, "memsvc_tier_tokens_stored", tier=tier) == pytest.approx(n)
        by_tier = {tier: _get(m1, "memsvc_tier_bytes_resident", tier=tier)
                   for tier in ("sink", "hot", "warm", "summaries", "window", "cold")}
        assert by_tier["hot"] > 0 and sum(by_tier.values()) == _get(m1, "memsvc_bytes_resident")
        assert _get(m1, "memsvc_sessions_stored") == 1
        assert _get(m1, "memsvc_bytes_stored") > _get(m0, "memsvc_bytes_stored")
        c.append("s", text="more")
        m2 = _scrape(mport)
        assert _get(m2, "memsvc_rpc_total", method="Append", **ok) == 2
        assert _get(m2, "memsvc_tokens_appended_total") > appended
        for name in ("memsvc_kv_entries_written_total", "memsvc_kv_bytes_written_total"):
            assert _get(m2, name) > _get(m1, name) > 0, name
        assert _get(m2, "memsvc_kv_bytes_written_total") == c.stats().kv_bytes_written
    with pytest.raises(OSError):  # the endpoint closes with the server
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2)


def test_budget_loads_and_cold_cache_are_counted(tmp_path, tiny_model):
    history = [(10 + j) % 1000 for j in range(450)]  # past sink + hot: retrieval reads cold blocks
    with served(tmp_path / "data", tiny_model, metrics_port=0, resident_budget=1) as (server, port), \
            client(port) as c:
        mport = server.metrics_port
        server.metrics.collector.store_every = 0
        c.create_session("s")
        c.append("s", tokens=history)
        m1 = _scrape(mport)
        assert _get(m1, "memsvc_resident_budget_bytes") == 1
        assert _get(m1, "memsvc_session_loads_total") == 1
        assert _get(m1, "memsvc_sessions_unloaded_total") == 1  # the 1-byte budget drops every idle session
        assert _get(m1, "memsvc_sessions_resident") == _get(m1, "memsvc_bytes_resident") == 0
        assert _get(m1, "memsvc_tier_tokens_resident", tier="hot") == 0
        assert _get(m1, "memsvc_tier_tokens_stored", tier="hot") > 0
        hits1, misses1 = _get(m1, "memsvc_cold_cache_hits_total"), _get(m1, "memsvc_cold_cache_misses_total")
        reused1 = _get(m1, "memsvc_decoded_cache_hits_total")
        c.generate_text("s", max_new_tokens=4)  # loads again: its cold LRU starts empty
        m2 = _scrape(mport)
        assert _get(m2, "memsvc_session_loads_total") == 2 and _get(m2, "memsvc_sessions_unloaded_total") == 2
        assert _get(m2, "memsvc_cold_cache_misses_total") > misses1
        # later decode steps read the same blocks: from the layers' last decodes, or parsed again from the cache
        assert _get(m2, "memsvc_decoded_cache_hits_total") > reused1
        assert _get(m2, "memsvc_cold_cache_hits_total") >= hits1
        assert _get(m2, "memsvc_decoded_cache_bytes") == 0  # dropped with the session (the 1-byte budget)
        assert _get(m2, "memsvc_decoded_cache_capacity_bytes") == 256 << 20
        assert _get(m2, "memsvc_decoded_cache_skipped_total") == 0  # one session: it may fill the whole cache
        c.resume("s")
        m3 = _scrape(mport)
        assert _get(m3, "memsvc_resumes_total") == 1 and _get(m3, "memsvc_session_loads_total") == 3
        # counts of dropped sessions are kept
        assert _get(m3, "memsvc_cold_cache_misses_total") == _get(m2, "memsvc_cold_cache_misses_total")


def test_auth_failures_are_counted(tmp_path, tiny_model):
    ring = KeyRing.parse(f"t={hash_key(KEY)}", source="test", allow_plain=False)
    with served(tmp_path / "data", tiny_model, api_keys=ring, metrics_port=0) as (server, port), \
            client(port, api_key="wrong-key-0123456789") as c:
        with pytest.raises(grpc.RpcError):
            c.stats()
        m = _scrape(server.metrics_port)
        assert _get(m, "memsvc_auth_failures_total") == 1
        assert _get(m, "memsvc_rpc_total", method="GetStats", code="UNAUTHENTICATED") == 1


@pytest.fixture
def rpc_log():
    logger = logging.getLogger("memsvc.rpc")
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_one_json_line_per_rpc_without_content(tmp_path, tiny_model, rpc_log):
    ring = KeyRing.parse(f"acme={hash_key(KEY)}", source="test", allow_plain=False)
    secret = "my locker code is 4512"
    with served(tmp_path / "data", tiny_model, api_keys=ring) as (_, port), client(port, api_key=KEY) as c:
        c.create_session("chat")
        r = c.append("chat", messages=[{"role": "user", "content": secret}])
        g = c.generate_text("chat", max_new_tokens=3, commit=True, prefix="Sure: ")
        with pytest.raises(grpc.RpcError):
            c.append("chat", text="")
        with pytest.raises(grpc.RpcError):
            c.resume("other")
    lines = [json.loads(line) for line in rpc_log.getvalue().splitlines()]
    assert [(d["method"], d["code"]) for d in lines] == [
        ("CreateSession", "OK"), ("Append", "OK"), ("Generate", "OK"), ("Append", "INVALID_ARGUMENT"),
        ("Resume", "NOT_FOUND")]
    for d in lines:
        assert d["tenant"] == "acme" and d["ms"] >= 0 and d["peer"]
    assert lines[1]["session"] == "chat" and lines[1]["tokens_in"] == len(r.token_ids)
    assert lines[2]["tokens_out"] == len(g.token_ids) and lines[2]["finish"] == g.finish_reason
    assert "error" not in lines[3]  # INVALID_ARGUMENT messages may quote the request
    assert lines[4]["error"] == "no session 'other'"
    text = rpc_log.getvalue()
    assert secret not in text and "4512" not in text and "Sure" not in text and KEY not in text


def test_first_token_inter_token_and_session_wait_are_histograms(tmp_path, tiny_model):
    """Generate's time to first token (one sample per call) and its gaps between tokens (one per later token),
    and the time calls wait in line for a session another call holds."""
    import threading

    with served(tmp_path / "data", tiny_model, metrics_port=0) as (server, port), client(port) as c:
        c.create_session("s")
        c.append("s", tokens=list(range(10, 60)))
        n = len(c.generate_text("s", max_new_tokens=6).token_ids)
        m = _scrape(server.metrics_port)
        assert n >= 2
        assert _get(m, "memsvc_generate_first_token_seconds_count") == 1
        assert _get(m, "memsvc_generate_first_token_seconds_sum") > 0
        assert _get(m, "memsvc_generate_inter_token_seconds_count") == n - 1
        waits0 = _get(m, "memsvc_session_wait_seconds_count")
        assert waits0 == 3  # CreateSession, Append and Generate each took the session, without waiting

        held = threading.Event()
        release = threading.Event()

        def hold_it():
            with server.manager.holds.hold("s", "a test"):
                held.set()
                release.wait(10)

        t = threading.Thread(target=hold_it)
        t.start()
        held.wait(10)
        threading.Timer(0.4, release.set).start()
        c.append("s", tokens=[11, 12])  # waits in line until the holder lets go
        t.join()
        m = _scrape(server.metrics_port)
        assert _get(m, "memsvc_session_wait_seconds_count") == waits0 + 2
        assert _get(m, "memsvc_session_wait_seconds_sum") >= 0.3
        assert _get(m, "memsvc_session_wait_seconds_bucket", le="0.25") <= waits0 + 1  # the waiting call is past it
