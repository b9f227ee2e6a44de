"""`--store postgresql://...` for the operator CLI and the server: every command that opens a store works on a
PostgreSQL database a server filled, and /metrics counts the store's round trips and bytes."""
from __future__ import annotations

import json
import urllib.request

from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from memsvc.cli import main
from tests.conftest import running_server
from tests.service.servers import client, served


def _cli(*args: str) -> str:
    out = CliRunner().invoke(main, list(args))
    assert out.exit_code == 0, out.output
    return out.stdout  # stderr: progress (verify, import, upgrade)


def test_every_store_command_takes_a_postgresql_url(pg_url, tiny_model, tiny_model_dirs, tmp_path):
    with running_server(pg_url, tiny_model) as (c, _):
        c.create_session("alpha", labels={"team": "red"})
        c.append("alpha", text="The quick brown fox jumps over the lazy dog. " * 10)
        c.create_session("beta")
        want = {s.id: (s.tokens, s.bytes_stored) for s in c.list_sessions()}
    rows = [json.loads(line) for line in _cli("sessions", "ls", "--store", pg_url, "--json").splitlines()]
    assert {r["id"]: (r["tokens"], r["bytes_stored"]) for r in rows} == want
    assert "team=red" in _cli("sessions", "show", "alpha", "--store", pg_url)
    assert json.loads(_cli("sessions", "stats", "--store", pg_url, "--json"))["sessions"] == 2
    assert json.loads(_cli("sessions", "verify", "--store", pg_url, "--json"))["ok"] is True
    assert json.loads(_cli("sessions", "gc", "--store", pg_url, "--json"))["freed_blobs"] == 0
    assert "migrations applied: none needed" in _cli("sessions", "upgrade", "--store", pg_url)
    file = tmp_path / "alpha.memsvc"
    _cli("sessions", "export", "alpha", str(file), "--store", pg_url)
    assert "into postgresql://memsvc@127.0.0.1" in _cli("sessions", "import", str(file), "--as", "gamma", "--store",
                                                        pg_url, "--model", str(tiny_model_dirs[0]))
    assert "deleted beta" in _cli("sessions", "rm", "beta", "--store", pg_url)
    rows = [json.loads(line) for line in _cli("sessions", "ls", "--store", pg_url, "--json").splitlines()]
    assert {r["id"]: r["tokens"] for r in rows} == {"alpha": want["alpha"][0], "gamma": want["alpha"][0]}
    # the old spelling still names the store; an unknown scheme says what is valid
    assert "2 sessions" in _cli("sessions", "ls", "--data-dir", pg_url)
    bad = CliRunner().invoke(main, ["sessions", "ls", "--store", "redis://h/0"])
    assert bad.exit_code != 0 and "postgresql://" in bad.output


def test_password_never_printed(pg_url):
    url = pg_url.replace("memsvc@", "memsvc:secret-pw@")  # trust auth: the password is not checked
    out = _cli("sessions", "upgrade", "--store", url)
    assert "secret-pw" not in out and "memsvc@127.0.0.1" in out


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_the_databases_round_trips_and_bytes(pg_url, tiny_model):
    with served(pg_url, tiny_model, metrics_port=0) as (server, port), client(port) as c:
        c.create_session("s")
        c.append("s", text="Hello there, how are you today? " * 8)
        before = _scrape(server.metrics_port)
        c.resume("s")
        after = _scrape(server.metrics_port)
        commits = after[("memsvc_store_round_trips_total", (("op", "commit"),))]
        assert commits >= 3  # BEGIN, the statements, COMMIT
        assert after[("memsvc_store_bytes_written_total", ())] > 0
        assert after[("memsvc_store_bytes_read_total", ())] >= before[("memsvc_store_bytes_read_total", ())]
        io = server.store.io_counters()
        assert commits == io["round_trips"]["commit"]


def test_lmdb_store_exposes_no_round_trips(tmp_path, tiny_model):
    with served(tmp_path / "data", tiny_model, metrics_port=0) as (server, port), client(port) as c:
        c.create_session("s")
        assert not any(name.startswith("memsvc_store_round_trips") for name, _ in _scrape(server.metrics_port))
