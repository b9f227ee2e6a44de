"""Crash test: a writer appends turns in a loop while the server process is
SIGKILLed at random moments. After every restart each session must equal its
state after some prefix of the acknowledged Appends (the one in flight at the
kill may or may not have landed, whole): no acknowledged turn lost, nothing
torn, every session still resumes (its blocks pass their checksums), and
`memsvc sessions verify` finds no damage (records, token blocks, KV pointers,
blobs, reference counts). The parts are tests/service/crashes.py's.

The default run kills the server 3 times; `-m slow` kills it 30 times.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from memsvc.clients.client import MemoryClient
from tests.service.crashes import Ledger, Proc, check, write

SESSIONS = ("c0", "c1", "c2")


def _crash_loop(tmp_path: Path, model_dir: Path, kills: int, seed: int) -> dict:
    data, log = tmp_path / "data", tmp_path / "server.log"
    rng = random.Random(seed)
    ledger = Ledger(list(SESSIONS))
    proc = Proc(data, model_dir, log)
    try:
        with MemoryClient(f"127.0.0.1:{proc.port}", timeout=60) as c:
            for sid in SESSIONS:
                c.create_session(sid)
        for _ in range(kills):
            stop = threading.Event()
            writer = threading.Thread(target=write, args=(proc.port, ledger, rng, stop))
            writer.start()
            time.sleep(rng.uniform(0.05, 0.8))
            proc.kill()  # SIGKILL mid-write
            stop.set()
            writer.join(timeout=60)
            assert not writer.is_alive()
            assert not ledger.errors, ledger.errors[:3]
            proc = Proc(data, model_dir, log)
            check(data, proc.port, ledger)
    finally:
        proc.kill()
    return {"kills": kills, "acked": ledger.appends, "landed": ledger.landed}


def test_sigkill_during_appends_loses_no_acknowledged_turn(tmp_path, tiny_model_dirs):
    counts = _crash_loop(tmp_path, tiny_model_dirs[0], kills=3, seed=7)
    assert counts["kills"] == 3 and counts["acked"] > 3


@pytest.mark.slow
def test_sigkill_30_times(tmp_path, tiny_model_dirs):
    started = time.monotonic()
    counts = _crash_loop(tmp_path, tiny_model_dirs[0], kills=30, seed=11)
    assert counts["kills"] == 30 and counts["acked"] > 30
    print(f"crash test: {counts['kills']} kills, {counts['acked']} acknowledged appends, "
          f"{counts['landed']} unacknowledged appends landed whole, {time.monotonic() - started:.0f} s")
