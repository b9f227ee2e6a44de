"""Stale owner (issue 23, acceptance 3), with real processes: replica A is stopped (SIGSTOP) past its lease,
in the middle of an Append of a long text; replica B takes the session over (ABORTED until A's lease expires,
naming A) and commits turns; A is continued. The Append A had in flight is refused when it commits (ABORTED
naming B), and so is A's next call on the session; what is stored is B's session, intact: its tokens are the
ones B acknowledged, the store's checks and `memsvc sessions verify` are clean, and B resumes it.

Stopped inside a commit's transaction instead (past its epoch check, holding the lease row), A must not hold
the session from B for as long as it stays stopped: B answers at once (ABORTED naming A) while A's transaction
is open, the database ends that transaction once it has idled past idle_in_transaction_session_timeout (the
store sets it, 10 s), and B takes over; A's commit never lands. The parts are tests/service/crashes.py's."""
from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from memsvc.clients.client import MemoryClient
from memsvc.store.open import open_store
from tests.conftest import make_tiny_model
from tests.service.crashes import Ledger, Proc, retrying, verify_store, write

LEASE = 2.0  # seconds: B's first call comes well within A's lease, even on a loaded machine
TEXT = "The lighthouse keeper counted the ships that passed each night. "
LONG = TEXT * 400  # ~4,400 tokens: an Append that runs long enough to be stopped in its middle


@pytest.fixture(scope="module")
def context_model_dir(tmp_path_factory, real_model_dir) -> Path:
    """A tiny model whose greedy replies depend on the context."""
    return make_tiny_model(tmp_path_factory.mktemp("pg-stale") / "tiny", real_model_dir, seed=5,
                           initializer_range=0.3)


def _lease(url: str, sid: str) -> tuple[str, int]:
    """(owner, epoch) of sid's lease, read from the database."""
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT owner, epoch FROM leases WHERE session_id = %s", (sid,)).fetchone()


def _refused(call) -> str:
    """The details of an ABORTED refusal of call()."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.ABORTED, (err.value.code(), err.value.details())
    return err.value.details()


def test_a_stopped_replica_cannot_commit_over_the_new_owners_turns(tmp_path, pg_url, context_model_dir):
    procs = [Proc(pg_url, context_model_dir, tmp_path / f"replica-{n}.log", "--lease-seconds", str(LEASE),
                  wait=False) for n in "ab"]
    a, b = procs
    try:
        with MemoryClient(f"127.0.0.1:{a.ready()}", timeout=120, follow=False) as ca, \
                MemoryClient(f"127.0.0.1:{b.ready()}", timeout=120, follow=False) as cb:
            ca.create_session("t")
            started = time.monotonic()
            ca.append("t", text=LONG)  # how long such an Append runs here
            seconds = time.monotonic() - started
            ca.create_session("s")
            first = list(ca.append("s", text=TEXT * 3).token_ids)
            a_owner, a_epoch = _lease(pg_url, "s")
            assert f":{a.pid}:" in a_owner

            inflight: dict = {}

            def long_append():
                try:
                    inflight["reply"] = ca.append("s", text=LONG)
                except grpc.RpcError as exc:
                    inflight["error"] = exc

            appending = threading.Thread(target=long_append)
            appending.start()
            time.sleep(seconds * 0.3)
            a.signal(signal.SIGSTOP)  # in the middle of the Append's forward, before its commit
            stopped = time.monotonic()
            with open_store(pg_url, readonly=True) as store:
                assert store.tokens("s") == first, "A committed before it was stopped: the stop came too late"
            try:
                held = _refused(lambda: cb.append("s", text="Hello from B."))  # A's lease runs (or ran) still
                assert a_owner in held
                ids = list(retrying(lambda: cb.append("s", text="B takes over. " * 3), 30).token_ids)
                assert time.monotonic() - stopped >= LEASE * 0.5  # not before A's lease ran out
                reply = list(cb.generate_text("s", max_new_tokens=4, commit=True).token_ids)
                on_b = cb.get_session("s")
                b_owner, b_epoch = _lease(pg_url, "s")
                assert f":{b.pid}:" in b_owner and b_epoch > a_epoch
            finally:
                a.signal(signal.SIGCONT)

            appending.join(timeout=120)
            assert not appending.is_alive()
            assert "reply" not in inflight, "the stopped replica's Append was acknowledged over B's turns"
            err = inflight["error"]
            assert err.code() == grpc.StatusCode.ABORTED, (err.code(), err.details())
            assert b_owner in err.details()  # refused inside its commit, naming the new owner
            assert b_owner in _refused(lambda: ca.append("s", text="A again."))  # and its next call too
            assert b_owner in _refused(lambda: ca.resume("s"))
            assert _lease(pg_url, "s") == (b_owner, b_epoch)

            # the stored session is B's, intact
            with open_store(pg_url, readonly=True) as store:
                assert store.tokens("s") == first + ids + reply
                assert store.get("s").n_tokens == on_b.tokens == len(first + ids + reply)
                report = store.check_session("s")
                assert report["record"] is None and not report["tokens"] and not report["kv"], report
            verify_store(pg_url)
            assert cb.resume("s").tokens == on_b.tokens
            assert cb.append("s", text="B goes on.").session.tokens > on_b.tokens
            assert cb.stats().repairs == 0
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.signal(signal.SIGCONT)
            p.kill()


IN_COMMIT = ("SELECT a.pid, a.xact_start FROM pg_stat_activity a WHERE a.datname = current_database() AND "
             "a.state = 'idle in transaction' AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND "
             "l.relation = 'leases'::regclass AND l.mode = 'RowShareLock')")  # a commit past its epoch check


def _stop_inside_a_commit(proc: Proc, url: str, writer: threading.Thread, ledger: Ledger,
                          within: float = 60.0) -> None:
    """SIGSTOP proc while one of its commits is inside its transaction, past the epoch check (the lease row
    locked FOR SHARE), and make sure the transaction is still open once it is stopped."""
    deadline = time.monotonic() + within
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            assert writer.is_alive(), ledger.errors
            row = conn.execute(IN_COMMIT).fetchone()
            if row is None:
                continue
            proc.signal(signal.SIGSTOP)
            time.sleep(0.1)  # a statement it had sent would be answered by now
            if conn.execute(IN_COMMIT).fetchone() == row:
                return
            proc.signal(signal.SIGCONT)
    raise AssertionError(f"the replica was never caught inside a commit ({ledger.appends} appends)")


def test_a_replica_stopped_inside_a_commit_does_not_hold_the_session_from_the_other(tmp_path, pg_url,
                                                                                     context_model_dir):
    procs = [Proc(pg_url, context_model_dir, tmp_path / f"replica-{n}.log", "--lease-seconds", str(LEASE),
                  wait=False) for n in "ab"]
    a, b = procs
    ledger = Ledger(["s"])
    try:
        with MemoryClient(f"127.0.0.1:{a.ready()}", timeout=60, follow=False) as ca, \
                MemoryClient(f"127.0.0.1:{b.ready()}", timeout=8, follow=False) as cb:  # a hang fails the test
            ca.create_session("s")
            ledger.ack("s", list(ca.append("s", text=TEXT).token_ids))
            a_owner, _ = _lease(pg_url, "s")
            stop = threading.Event()
            writer = threading.Thread(target=write, args=(a.port, ledger, random.Random(5), stop),
                                      kwargs={"max_tokens": 10 ** 6})
            writer.start()
            try:
                _stop_inside_a_commit(a, pg_url, writer, ledger)
                stopped = time.monotonic()
                stop.set()
                assert a_owner in _refused(lambda: cb.append("s", text="Hello from B."))
                assert time.monotonic() - stopped < 5  # at once, not when A's transaction ends
                ids = list(retrying(lambda: cb.append("s", text="B takes over."), 60).token_ids)
                took = time.monotonic() - stopped
                b_owner, _ = _lease(pg_url, "s")
                assert f":{b.pid}:" in b_owner
            finally:
                a.signal(signal.SIGCONT)
            writer.join(timeout=60)
            assert not writer.is_alive()
            assert ledger.inflight is not None  # the Append whose commit was cut: never acknowledged
            assert all(code == grpc.StatusCode.ABORTED and b_owner in details for code, details in ledger.errors), \
                ledger.errors
            assert b_owner in _refused(lambda: ca.append("s", text="A again."))  # its ended connections cost it nothing
            with open_store(pg_url, readonly=True) as store:
                assert store.tokens("s") == ledger.acked["s"] + ids
                report = store.check_session("s")
                assert report["record"] is None and not report["tokens"] and not report["kv"], report
            verify_store(pg_url)
            assert cb.resume("s").tokens == len(ledger.acked["s"] + ids)
            assert took < 30, took  # the database's idle-in-transaction timeout, A's lease, a loaded machine
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.signal(signal.SIGCONT)
            p.kill()


def test_a_following_client_does_not_hang_on_a_stopped_owner(tmp_path, pg_url, context_model_dir):
    """A default client (follow on) at B, for a session whose owner A is stopped: the hop to A fails its health
    check within CONNECT_SECONDS (A's kernel still accepts the connection), the call goes back to B, and with
    retry_seconds it lands on B once A's lease has run out; stored once."""
    from memsvc.clients.routes import CONNECT_SECONDS

    procs = [Proc(pg_url, context_model_dir, tmp_path / f"replica-{n}.log", "--lease-seconds", str(LEASE),
                  wait=False) for n in "ab"]
    a, b = procs
    try:
        with MemoryClient(f"127.0.0.1:{a.ready()}", timeout=60) as ca, \
                MemoryClient(f"127.0.0.1:{b.ready()}", timeout=60, retry_seconds=30) as cb:
            ca.create_session("s")
            first = list(ca.append("s", text=TEXT * 3).token_ids)
            a.signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                ids = list(cb.append("s", text="B takes over.").token_ids)
                took = time.monotonic() - started
                assert cb.replica("s") == f"127.0.0.1:{b.port}"  # served at home, not at the stopped owner
                assert took < LEASE + 3 * CONNECT_SECONDS + 10, took
            finally:
                a.signal(signal.SIGCONT)
            with open_store(pg_url, readonly=True) as store:
                assert store.tokens("s") == first + ids
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.signal(signal.SIGCONT)
            p.kill()
