"""The lease benchmark (benchmarks/pg_leases.py) end to end, briefly: a throwaway PostgreSQL server with fsync
on, 20 leases acquired, renewed from 1 and 2 threads, released; every figure present and the last line JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lease_benchmark_runs_and_counts_each_kind_of_call():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pg_leases.py"), "--sessions", "20", "--rounds", "1",
           "--threads", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(r["op"], r["threads"]) for r in out["rows"]] == [("acquire", 1), ("renew", 1), ("renew", 2),
                                                              ("release", 1)]
    for r in out["rows"]:
        assert r["n"] == 20 and r["per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["round_trips_per_op"] >= 1  # each call is one transaction of its own
    assert out["rows"][0]["wal_bytes_per_op"] > 0  # a new lease row is logged
    assert out["postgres"]["fsync"] is True
    assert [f["renewals_per_s_needed"] for f in out["fleets"]] == [100.0, 1000.0, 10000.0]  # n x 3 / 30 s
