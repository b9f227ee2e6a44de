"""The load driver (benchmarks/load.py) end to end, briefly: a real `memsvc serve`
subprocess with the tiny model, 2 clients over 3 sessions for ~5 s; no call
fails, the resident sessions stay within the budget and the last line is JSON.
And the same over PostgreSQL: 2 replicas over one database of a throwaway server,
each session's calls routed to the replica that created it, so no lease refuses one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(model, budget: int, *extra: str, sessions: int = 3) -> tuple[dict, list[str]]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--seconds", "5", "--clients", "2",
           "--sessions", str(sessions), "--model", str(model), "--max-session-tokens", "300",
           "--resident-budget", str(budget), "--progress-every", "2", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, lines


def test_load_driver_runs_clean(tiny_model_dirs):
    budget = 300_000  # a few tiny sessions: the budget drops some
    out, lines = _run(tiny_model_dirs[0], budget)
    assert out["store"] == "lmdb" and out["replicas"] == 1 and out["database"] is None
    assert out["benchmark"] == "load" and out["errors"] == 0 and out["stuck_clients"] == 0
    assert out["server_exit_code"] == 0
    assert out["calls"] > 0 and set(out["rpcs"]) >= {"Append", "Generate", "Resume"}
    mem = out["memory"]
    assert mem["budget_bytes"] == budget and mem["within_budget"] and mem["rss_max_bytes"] > 0
    assert any("calls" in line and "errors" in line for line in lines[:-1])  # progress and the table


def test_load_driver_runs_clean_on_two_replicas_over_postgresql(tiny_model_dirs):
    budget = 300_000
    out, lines = _run(tiny_model_dirs[0], budget, "--store", "postgresql", "--replicas", "2", sessions=4)
    assert out["store"] == "postgresql" and out["replicas"] == 2
    assert out["errors"] == 0 and out["errors_by_code"] == {} and out["stuck_clients"] == 0
    assert out["server_exit_codes"] == [0, 0]
    assert set(out["rpcs"]) >= {"Append", "Generate", "Resume"}
    by_replica = out["memory_by_replica"]
    assert len(by_replica) == 2 and all(m["rss_max_bytes"] > 0 and m["within_budget"] for m in by_replica)
    assert all(m["resident_sessions_max"] >= 1 for m in by_replica)  # each replica served its own sessions
    assert out["server_counters"]["tokens_appended"] > 0
    db = out["database"]  # the run's own commits and WAL, read from the database's statistics
    assert db["commits"] > 0 and db["wal_bytes"] > 0 and db["rows_inserted"] > 0
    assert out["memory"]["data_dir_bytes"] >= db["database_bytes_after_setup"] > 0
    assert any("database during the run" in line for line in lines[:-1])
