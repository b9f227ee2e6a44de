"""PostgreSQL killed (issue 23, acceptance 4, database death): SIGKILL of the postmaster, fsync and
synchronous_commit on (the defaults), during a load of Appends from two replicas; while it is down every
call answers UNAVAILABLE at once with a message a person can act on (no other status, no hang); once it is
started again (crash recovery from its WAL) both replicas serve again by themselves; every acknowledged turn
is stored, nothing is torn, every session resumes.

The default run kills it once; `-m slow` kills it 5 times in one run."""
from __future__ import annotations

import random
import time

import pytest

from tests.service.pg_load import Writer, check_statuses, check_stored, run_writers, stop_writers, wait_for_oks
from tests.service.servers import served

FAST = 3.0  # seconds: the slowest any call may answer, the one in flight at the kill included


@pytest.fixture
def durable_pg():
    from tools.pgserver import PgServer

    server = PgServer.start(fsync=True)
    yield server
    server.stop()


def _kill_loop(pg, model, kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    url = pg.create_database()
    out = {"kills": 0, "restart_s": [], "recovered_s": []}
    with served(url, model) as (_, port_a), served(url, model) as (_, port_b):
        writers = [Writer(port, f"r{r}w{i}", seed * 100 + 10 * r + i)
                   for r, port in enumerate((port_a, port_b)) for i in range(2)]
        threads = run_writers(writers)
        try:
            wait_for_oks(writers, 0.0, 3, limit=60)
            for _ in range(kills):
                time.sleep(rng.uniform(0.3, 1.5))
                down = time.monotonic()
                pg.kill()
                out["kills"] += 1
                time.sleep(1.5 + rng.uniform(0, 1))  # down: every writer keeps calling
                up = time.monotonic()
                pg.start_again()  # crash recovery: it fsyncs its data directory, then replays its WAL
                out["restart_s"].append(round(time.monotonic() - up, 2))
                out["recovered_s"].append(round(wait_for_oks(writers, up, 3, limit=30), 2))
                out.update(check_statuses(writers, down, up, slowest=FAST))
        finally:
            stop_writers(writers, threads)
    out["sessions"] = check_stored(url, writers, model)
    out["acked_turns"] = sum(1 for w in writers for c in w.calls if c.code == "OK")
    return out


def test_an_acknowledged_turn_survives_a_sigkill_of_postgresql(durable_pg, tiny_model):
    out = _kill_loop(durable_pg, tiny_model, kills=1, seed=3)
    assert out["kills"] == 1 and out["oks_before"] > 4 and out["oks_after"] > 4
    print(f"postgresql SIGKILL: {out}")


@pytest.mark.slow
def test_five_sigkills_of_postgresql(durable_pg, tiny_model):
    out = _kill_loop(durable_pg, tiny_model, kills=5, seed=5)
    assert out["kills"] == 5
    print(f"postgresql SIGKILL x5: {out}")
