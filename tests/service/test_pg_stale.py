"""Stale owner (issue 23, acceptance 3), with real processes: replica A is stopped (SIGSTOP) in the middle of
an Append of a long text, past its lease; replica B takes the session over (ABORTED until A's lease expires,
naming A) and commits turns; A is continued. The Append A had in flight is refused when it commits (ABORTED
naming B), and so is A's next call on the session; what is stored is B's session, intact: its tokens are the
ones B acknowledged, the store's checks and `memsvc sessions verify` are clean, and B resumes it. The parts are
tests/service/crashes.py's."""
from __future__ import annotations

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
from tests.service.crashes import Proc, retrying, verify_store

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
        with MemoryClient(f"127.0.0.1:{a.ready()}", timeout=120) as ca, \
                MemoryClient(f"127.0.0.1:{b.ready()}", timeout=120) as cb:
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
