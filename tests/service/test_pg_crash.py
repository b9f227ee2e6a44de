"""Replica death (issue 23, acceptance 2), with real processes: two `memsvc serve` replicas over one PostgreSQL
database with short leases. A writer appends random token turns to sessions on one replica, which is SIGKILLed
at a random point of the Appends; the other replica takes the sessions over once the dead one's leases expire
(ABORTED until then, naming the owner) and finds every session equal to its acknowledged turns, plus possibly
the whole in-flight one: nothing lost, nothing torn (Resume reads every block, the store's checks and
`memsvc sessions verify` are clean). The killed replica is restarted and the roles swap. At the end, Resume +
greedy Generate on the surviving replica give exactly the ids a never-killed single server gives after the same
acknowledged Appends, replayed in order into a fresh LMDB directory. The parts are tests/service/crashes.py's.

The default run kills a replica 3 times; `-m slow` 20 times and prints a summary line.
"""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from memsvc.clients.client import MemoryClient
from memsvc.model import load_model
from tests.conftest import make_tiny_model, running_server
from tests.service.crashes import Ledger, Proc, check, retrying, write

SESSIONS = ("c0", "c1", "c2")
LEASE = 1.0  # seconds: a dead replica's sessions are taken over this soon
TAKEOVER = 30.0  # the most a takeover may take (the lease, on a loaded machine)
REPLY = {"max_new_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def context_model_dir(tmp_path_factory, real_model_dir) -> Path:
    """A tiny model whose greedy replies depend on the context."""
    return make_tiny_model(tmp_path_factory.mktemp("pg-crash") / "tiny", real_model_dir, seed=5,
                           initializer_range=0.3)


def _replica(url: str, model_dir: Path, tmp_path: Path, which: str) -> Proc:
    return Proc(url, model_dir, tmp_path / f"replica-{which}.log", "--lease-seconds", str(LEASE), wait=False)


def _crash_loop(tmp_path: Path, url: str, model_dir: Path, kills: int, seed: int) -> tuple[Ledger, dict]:
    """Kill the writing replica `kills` times; the ledger, and the replies of the surviving replica."""
    rng = random.Random(seed)
    ledger = Ledger(list(SESSIONS))
    procs = [_replica(url, model_dir, tmp_path, "a"), _replica(url, model_dir, tmp_path, "b")]
    try:
        with MemoryClient(f"127.0.0.1:{procs[0].ready()}", timeout=60, follow=False) as c:
            for sid in SESSIONS:
                c.create_session(sid)
        w = 0  # the writing replica; the other takes over when it dies
        for _ in range(kills):
            stop = threading.Event()
            writer = threading.Thread(target=write, args=(procs[w].ready(), ledger, rng, stop))
            writer.start()
            time.sleep(rng.uniform(0.05, 0.8))
            procs[w].kill()  # SIGKILL mid-write
            stop.set()
            writer.join(timeout=60)
            assert not writer.is_alive()
            assert not ledger.errors, ledger.errors[:3]
            procs[w] = _replica(url, model_dir, tmp_path, "ab"[w])  # it starts while the other checks and writes
            check(url, procs[1 - w].ready(), ledger, takeover=TAKEOVER)
            w = 1 - w  # the replica that took over writes next
        # the last one to take over
        with MemoryClient(f"127.0.0.1:{procs[w].port}", timeout=60, follow=False) as c:
            replies = {}
            for sid, toks in ledger.acked.items():
                assert retrying(lambda: c.resume(sid), TAKEOVER).tokens == len(toks)
                if toks:
                    replies[sid] = list(c.generate_text(sid, **REPLY).token_ids)
    finally:
        for p in procs:
            p.kill()
    return ledger, replies


def _never_killed(tmp_path: Path, model_dir: Path, ledger: Ledger) -> dict:
    """The replies of one in-process server that ran the acknowledged Appends, in order, without a kill."""
    model = load_model(str(model_dir))
    with running_server(tmp_path / "reference", model) as (c, _):
        for sid in ledger.acked:
            c.create_session(sid)
        for sid, ids in ledger.log:
            c.append(sid, tokens=ids)
        return {sid: list(c.generate_text(sid, **REPLY).token_ids) for sid, toks in ledger.acked.items() if toks}


def _run(tmp_path: Path, url: str, model_dir: Path, kills: int, seed: int) -> Ledger:
    ledger, replies = _crash_loop(tmp_path, url, model_dir, kills, seed)
    assert replies == _never_killed(tmp_path, model_dir, ledger)
    assert len({tuple(r) for r in replies.values()}) > 1  # replies that depend on the context
    return ledger


def test_a_killed_replicas_sessions_go_on_on_the_other_one(tmp_path, pg_url, context_model_dir):
    ledger = _run(tmp_path, pg_url, context_model_dir, kills=3, seed=7)
    assert ledger.appends > 3


@pytest.mark.slow
def test_replica_killed_20_times(tmp_path, pg_url, context_model_dir):
    started = time.monotonic()
    ledger = _run(tmp_path, pg_url, context_model_dir, kills=20, seed=13)
    assert ledger.appends > 20
    print(f"replica crash test: 20 kills, {ledger.appends} acknowledged appends, {ledger.landed} unacknowledged "
          f"appends landed whole, {len(ledger.acked)} sessions, {time.monotonic() - started:.0f} s")
