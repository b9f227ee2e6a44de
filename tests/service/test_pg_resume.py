"""A Resume from PostgreSQL reads what it needs in a few round trips (issue 23): one read of the session's
record, one of its token ids, one of every layer's state head and one of every part the heads list, however
many layers the model has and however long the session is; /metrics shows those round trips and the bytes."""
from __future__ import annotations

import pytest

from memsvc.corpus import haystack_tokens
from memsvc.model import load_model
from tests.conftest import make_tiny_model
from tests.service.servers import client, served
from tests.service.test_pg_cli import _scrape

BOUND = 10  # round trips of one Resume: record, lease, record again, token ids, heads, parts (and slack)


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory, real_model_dir):
    """A tiny model of 6 layers (the default tiny one has 2), with room for cold blocks."""
    path = make_tiny_model(tmp_path_factory.mktemp("pg-resume") / "six", real_model_dir, seed=5,
                           max_positions=2048, layers=6)
    return load_model(str(path))


def _trips(server) -> dict[str, int]:
    return dict(server.store.io_counters()["round_trips"])


def _resume_trips(url: str, model, n_tokens: int) -> dict[str, int]:
    """Build a tiered session of n_tokens by Appends, then Resume it on a fresh server: the round trips of the
    Resume alone, by store method."""
    ids = haystack_tokens(model.tokenizer, n_tokens)
    with served(url, model) as (_, port), client(port) as c:
        c.create_session("s", policy="tiered")
        for lo in range(0, len(ids), 300):
            c.append("s", tokens=ids[lo:lo + 300])
    with served(url, model) as (server, port), client(port) as c:
        before = _trips(server)
        c.resume("s")
        after = _trips(server)
        assert c.get_session("s").tokens == n_tokens
    return {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}


def test_resume_round_trips_do_not_grow_with_layers_or_length(pg_server, long_model, six_layers):
    got = {}
    for name, model, n in (("2 layers, 300", long_model, 300), ("2 layers, 1500", long_model, 1500),
                           ("6 layers, 1500", six_layers, 1500)):
        url = pg_server.create_database()
        try:
            got[name] = _resume_trips(url, model, n)
        finally:
            pg_server.drop_database(url.rsplit("/", 1)[1])
    for name, trips in got.items():
        assert sum(trips.values()) <= BOUND, (name, trips)
        assert trips.get("kv_blocks_for") == 2, (name, trips)  # the heads, then every part they list
        assert "kv_blocks_at" not in trips, (name, trips)  # nothing read layer by layer
    assert got["2 layers, 300"] == got["2 layers, 1500"] == got["6 layers, 1500"]


def test_metrics_show_a_resumes_round_trips_and_bytes(pg_url, long_model):
    ids = haystack_tokens(long_model.tokenizer, 900)
    with served(pg_url, long_model) as (_, port), client(port) as c:
        c.create_session("s", policy="tiered")
        c.append("s", tokens=ids)
    with served(pg_url, long_model, metrics_port=0) as (server, port), client(port) as c:
        before = _scrape(server.metrics_port)
        c.resume("s")
        after = _scrape(server.metrics_port)
        io = server.store.io_counters()
    key = ("memsvc_store_round_trips_total", (("op", "kv_blocks_for"),))
    assert after[key] - before.get(key, 0) == 2 == io["round_trips"]["kv_blocks_for"]
    read = ("memsvc_store_bytes_read_total", ())
    assert after[read] - before[read] > 1000  # the state parts of every layer came back
    assert after[read] == io["bytes_read"]
