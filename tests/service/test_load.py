"""The load driver (benchmarks/load.py) end to end, briefly: a real `memsvc serve`
subprocess with the tiny model, 2 clients over 3 sessions for ~5 s; no call
fails, the resident sessions stay within the budget and the last line is JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_load_driver_runs_clean(tiny_model_dirs):
    budget = 300_000  # a few tiny sessions: the budget drops some
    cmd = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--seconds", "5", "--clients", "2",
           "--sessions", "3", "--model", str(tiny_model_dirs[0]), "--max-session-tokens", "300",
           "--resident-budget", str(budget), "--progress-every", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out["benchmark"] == "load" and out["errors"] == 0 and out["stuck_clients"] == 0
    assert out["server_exit_code"] == 0
    assert out["calls"] > 0 and set(out["rpcs"]) >= {"Append", "Generate", "Resume"}
    mem = out["memory"]
    assert mem["budget_bytes"] == budget and mem["within_budget"] and mem["rss_max_bytes"] > 0
    assert any("calls" in line and "errors" in line for line in lines[:-1])  # progress and the table
