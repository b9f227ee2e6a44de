"""Crash test: a writer appends turns in a loop while the server process is
SIGKILLed at random moments. After every restart each session must equal its
state after some prefix of the acknowledged Appends (the one in flight at the
kill may or may not have landed, whole): no acknowledged turn lost, nothing
torn, every session still resumes (its blocks pass their checksums), and
`memsvc sessions verify` finds no damage (records, token blocks, KV pointers,
blobs, reference counts).

The default run kills the server 3 times; `-m slow` kills it 30 times.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from memsvc.cli import main
from memsvc.clients.client import MemoryClient
from memsvc.store.lmdb import LmdbStore

SESSIONS = ("c0", "c1", "c2")
START_TIMEOUT = 120


class Proc:
    """`memsvc serve` in a child process on a free port."""

    def __init__(self, data: Path, model_dir: Path, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MEMSVC_API_KEYS": ""}
        self.log = open(log, "ab")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "memsvc", "serve", "--port", "0", "--data-dir", str(data), "--model",
             str(model_dir), "--no-log-rpcs"],
            stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + START_TIMEOUT
        self.port = None
        while self.port is None:
            line = self.p.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"the server exited before serving (rc {self.p.wait()}); see {log}")
            m = re.search(r"serving .* on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start in time")

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()
        self.p.stdout.close()
        self.log.close()


def _check(data: Path, port: int, acked: dict[str, list[int]], inflight: dict[str, list[int] | None]) -> int:
    """Each session equals its acknowledged tokens, plus possibly the whole in-flight append.
    Returns how many in-flight appends landed (they become acknowledged)."""
    landed = 0
    with LmdbStore(data, readonly=True) as store:
        stored = {sid: store.tokens(sid) for sid in list(acked)}
    with MemoryClient(f"127.0.0.1:{port}", timeout=60) as c:
        for sid, toks in stored.items():
            want = acked[sid]
            extra = inflight.get(sid)
            if extra is not None and toks == want + extra:
                acked[sid] = want + extra
                landed += 1
            else:
                assert toks == want, (sid, len(toks), len(want), extra and len(extra))
            s = c.resume(sid)  # reads every block back; a torn or damaged one is DATA_LOSS
            assert s.tokens == len(acked[sid])
        assert c.stats().repairs == 0  # nothing was found damaged (and quietly rebuilt) on the way
    res = CliRunner().invoke(main, ["sessions", "verify", "--data-dir", str(data), "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["ok"], [s for s in doc["sessions"] if not s["ok"]][:3] or doc["store"]
    return landed


def _write(port: int, acked: dict, inflight: dict, rng: random.Random, stop: threading.Event, counts: dict):
    """Append random token turns until the server dies or `stop` is set."""
    try:
        with MemoryClient(f"127.0.0.1:{port}", timeout=30) as c:
            while not stop.is_set():
                active = counts["active"]
                i = rng.randrange(len(active))
                sid = active[i]
                if len(acked[sid]) > 400:  # the tiny model has 512 positions: go on in a new session
                    new = f"c{len(acked)}"
                    c.create_session(new)
                    acked[new] = []
                    active[i] = new
                    continue
                ids = [rng.randrange(10, 5000) for _ in range(rng.randrange(1, 24))]
                inflight[sid] = ids
                resp = c.append(sid, tokens=ids)
                assert list(resp.token_ids) == ids
                acked[sid] = acked[sid] + ids
                inflight[sid] = None
                counts["acked"] += 1
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            counts["errors"].append((exc.code(), exc.details()))


def _crash_loop(tmp_path: Path, model_dir: Path, kills: int, seed: int) -> dict:
    data, log = tmp_path / "data", tmp_path / "server.log"
    rng = random.Random(seed)
    acked = {sid: [] for sid in SESSIONS}
    inflight: dict = {}
    counts = {"acked": 0, "landed": 0, "errors": [], "kills": 0, "active": list(SESSIONS)}
    proc = Proc(data, model_dir, log)
    try:
        with MemoryClient(f"127.0.0.1:{proc.port}", timeout=60) as c:
            for sid in SESSIONS:
                c.create_session(sid)
        for _ in range(kills):
            stop = threading.Event()
            writer = threading.Thread(target=_write, args=(proc.port, acked, inflight, rng, stop, counts))
            writer.start()
            time.sleep(rng.uniform(0.05, 0.8))
            proc.kill()  # SIGKILL mid-write
            counts["kills"] += 1
            stop.set()
            writer.join(timeout=60)
            assert not writer.is_alive()
            assert not counts["errors"], counts["errors"][:3]
            proc = Proc(data, model_dir, log)
            counts["landed"] += _check(data, proc.port, acked, inflight)
            inflight.clear()
    finally:
        proc.kill()
    return counts


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
