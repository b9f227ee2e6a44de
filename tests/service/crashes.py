"""What the crash tests share (tests/service/test_crash.py over LMDB, test_pg_crash.py and test_pg_stale.py over
PostgreSQL replicas): `memsvc serve` in a child process (Proc), a writer that appends random token turns and
keeps a ledger of what was acknowledged, and the check that a store holds exactly that after a kill."""
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
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from click.testing import CliRunner

from memsvc.cli import main
from memsvc.clients.client import MemoryClient
from memsvc.store.open import open_store

START_TIMEOUT = 120
ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """`memsvc serve` over store (an LMDB directory or a postgresql:// URL) in a child process on a free port.
    extra: more `serve` options. wait=False: started, not yet serving; `ready()` waits for its port."""

    def __init__(self, store: Path | str, model_dir: Path, log: Path, *extra: str, wait: bool = True):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MEMSVC_API_KEYS": ""}
        self.log_path = log
        self.log = open(log, "ab")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "memsvc", "serve", "--port", "0", "--store", str(store), "--model",
             str(model_dir), "--no-log-rpcs", *extra],
            stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=ROOT)
        self.pid = self.p.pid
        self.port: int | None = None
        if wait:
            self.ready()

    def ready(self) -> int:
        """Wait until it serves; its port."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.port is None:
            line = self.p.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"the server exited before serving (rc {self.p.wait()}); see {self.log_path}")
            m = re.search(r"serving .* on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start in time")
        return self.port

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.p.wait()
        self.p.stdout.close()
        self.log.close()


@dataclass
class Ledger:
    """What the writer was told. acked: each session's acknowledged tokens; log: the acknowledged Appends as
    (session, token ids), in order; inflight: the Append sent and not answered (session, ids); creating: the
    session a CreateSession not answered names; active: the sessions appended to."""

    active: list[str]
    acked: dict[str, list[int]] = field(default_factory=dict)
    log: list[tuple[str, list[int]]] = field(default_factory=list)
    inflight: tuple[str, list[int]] | None = None
    creating: str | None = None
    appends: int = 0
    landed: int = 0
    errors: list = field(default_factory=list)

    def __post_init__(self):
        self.acked = {sid: [] for sid in self.active}

    def ack(self, sid: str, ids: list[int]) -> None:
        self.acked[sid] = self.acked[sid] + ids
        self.log.append((sid, ids))


def write(port: int, ledger: Ledger, rng: random.Random, stop: threading.Event, *, max_tokens: int = 400) -> None:
    """Append random token turns until the server dies (UNAVAILABLE) or `stop` is set; a session past
    max_tokens is replaced by a new one (the tiny model has 512 positions). Anything else goes to ledger.errors."""
    try:
        with MemoryClient(f"127.0.0.1:{port}", timeout=30, follow=False) as c:
            while not stop.is_set():
                i = rng.randrange(len(ledger.active))
                sid = ledger.active[i]
                if len(ledger.acked[sid]) > max_tokens:
                    new = f"c{len(ledger.acked)}"
                    ledger.creating = new
                    c.create_session(new)
                    ledger.acked[new] = []
                    ledger.creating = None
                    ledger.active[i] = new
                    continue
                ids = [rng.randrange(10, 5000) for _ in range(rng.randrange(1, 24))]
                ledger.inflight = (sid, ids)
                resp = c.append(sid, tokens=ids)
                if list(resp.token_ids) != ids:
                    ledger.errors.append(("append answered other ids", sid, ids, list(resp.token_ids)))
                    return
                ledger.ack(sid, ids)
                ledger.inflight = None
                ledger.appends += 1
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            ledger.errors.append((exc.code(), exc.details()))
    except Exception as exc:  # noqa: BLE001 - told to the test, which fails on it
        ledger.errors.append(repr(exc))


def retrying(call, within: float):
    """call(), retried while it is refused with ABORTED (another replica's lease has not expired yet), for at
    most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def verify_store(spec: str) -> None:
    """`memsvc sessions verify --json` finds nothing wrong in the store."""
    res = CliRunner().invoke(main, ["sessions", "verify", "--store", str(spec), "--json"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["ok"], [s for s in doc["sessions"] if not s["ok"]][:3] or doc["store"]


def check(spec: Path | str, port: int, ledger: Ledger, *, takeover: float = 0.0) -> None:
    """After a kill: each session equals its acknowledged tokens, plus possibly the whole in-flight Append (it
    becomes acknowledged, counted in ledger.landed); the server on `port` resumes every session, reading every
    block back (a torn or damaged one is DATA_LOSS), with nothing repaired on the way; the store's own checks
    and `memsvc sessions verify` find nothing wrong. takeover: seconds the server may refuse a session with
    ABORTED (the dead replica's lease runs)."""
    with open_store(spec, readonly=True) as store:
        if ledger.creating is not None and store.get(ledger.creating) is not None:
            ledger.acked[ledger.creating] = []  # created, not answered: it exists, empty
        ledger.creating = None
        stored = {sid: store.tokens(sid) for sid in ledger.acked}
    for sid, toks in stored.items():
        want = ledger.acked[sid]
        extra = ledger.inflight[1] if ledger.inflight is not None and ledger.inflight[0] == sid else None
        if extra is not None and toks == want + extra:
            ledger.ack(sid, extra)
            ledger.landed += 1
        else:
            assert toks == want, (sid, len(toks), len(want), extra and len(extra))
    ledger.inflight = None
    with MemoryClient(f"127.0.0.1:{port}", timeout=60, follow=False) as c:
        for sid in stored:
            s = retrying(lambda: c.resume(sid), takeover)
            assert s.tokens == len(ledger.acked[sid])
        assert c.stats().repairs == 0  # nothing was found damaged (and quietly rebuilt) on the way
    with open_store(spec, readonly=True) as store:
        for sid in stored:
            report = store.check_session(sid)
            assert report["record"] is None and not report["tokens"] and not report["kv"], (sid, report)
            assert not report["bad_keys"] and report["token_count"] == len(ledger.acked[sid]), (sid, report)
    verify_store(spec)
