"""Leases with fencing epochs in the PostgreSQL store (issue 23, acceptance 3 at the store's level): a live
lease is held against another owner, an expired one is taken over with a greater epoch, and a commit made with
the old owner's epoch is refused inside its transaction, leaving the new owner's turn as stored. An owner
stopped inside a commit's transaction does not hold a takeover for as long as it stays stopped: the takeover is
refused at once (LeaseHeld, naming it), and the database ends the idle transaction, after which it goes
through. LMDB, owned by one process, needs no leases."""
from __future__ import annotations

import time

import psycopg
import pytest

from memsvc.store.errors import LeaseHeld, LeaseLost
from memsvc.store.lmdb import LmdbStore
from memsvc.store.postgres import PgStore
from tests.store.backends import rec


def test_a_stale_owner_cannot_commit_after_a_takeover(pg_url):
    with PgStore(pg_url) as a_store, PgStore(pg_url) as b_store:  # two replicas' stores over one database
        a_store.create(rec("s"))
        a = a_store.acquire_lease("s", "replica-a", 0.4)
        assert a.epoch >= 1 and 0 < a.seconds_left <= 0.4
        with pytest.raises(LeaseHeld, match="served by 'replica-a'") as held:
            b_store.acquire_lease("s", "replica-b", 30)
        assert held.value.owner == "replica-a"
        assert a_store.acquire_lease("s", "replica-a", 0.4).epoch == a.epoch  # its own: the same epoch
        a_store.commit(rec("s"), first_token=0, tokens=[1, 2], blocks={(0, 0): b"a-turn"}, epoch=a.epoch)
        time.sleep(0.5)  # A is paused past its lease
        b = b_store.acquire_lease("s", "replica-b", 30)
        assert b.epoch > a.epoch
        b_store.commit(rec("s"), first_token=2, tokens=[3], blocks={(0, 0): b"b-turn"}, epoch=b.epoch)
        with pytest.raises(LeaseLost, match="replica-b") as lost:
            a_store.commit(rec("s"), first_token=3, tokens=[9], blocks={(0, 0): b"stale"}, epoch=a.epoch)
        assert (lost.value.owner, lost.value.found) == ("replica-b", b.epoch)
        with pytest.raises(LeaseLost):
            a_store.renew_lease(a, 30)
        assert b_store.tokens("s") == [1, 2, 3] and b_store.kv_block("s", 0, 0) == b"b-turn"
        assert b_store.renew_lease(b, 30).epoch == b.epoch
        # released, the lease goes to the next owner at once, with a new epoch: B's old one is refused
        b_store.release_lease(b)
        c = a_store.acquire_lease("s", "replica-a", 30)
        assert c.epoch > b.epoch
        with pytest.raises(LeaseLost):
            b_store.commit(rec("s"), first_token=3, tokens=[4], blocks={}, epoch=b.epoch)
        a_store.commit(rec("s"), first_token=3, tokens=[4], blocks={}, epoch=c.epoch)
        assert b_store.tokens("s") == [1, 2, 3, 4]
        # a delete removes the lease; epochs never repeat, even then
        assert b_store.delete("s")
        b_store.create(rec("s"))
        assert b_store.acquire_lease("s", "replica-b", 30).epoch > c.epoch


def _backend_alive(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] > 0


def test_a_takeover_does_not_wait_on_a_stopped_owners_transaction(pg_url):
    url = f"{pg_url}?options=-c%20idle_in_transaction_session_timeout%3D1500"  # the store's default is 10 s
    with PgStore(url) as a_store, PgStore(url) as b_store:
        a_store.create(rec("s"))
        a = a_store.acquire_lease("s", "replica-a", 0.3)
        stalled = psycopg.connect(url)  # a commit of A's past its epoch check, whose process then stops
        stalled.execute("SELECT epoch FROM leases WHERE session_id = 's' FOR SHARE")
        time.sleep(0.4)  # A's lease has expired meanwhile
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match="being changed by 'replica-a'") as held:
            b_store.acquire_lease("s", "replica-b", 30)
        assert held.value.owner == "replica-a" and time.monotonic() - started < 3  # not a wait without end
        deadline = time.monotonic() + 30  # the database ends the transaction that idled past its timeout
        while _backend_alive(url, stalled.info.backend_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            stalled.execute("SELECT 1")
        stalled.close()
        b = b_store.acquire_lease("s", "replica-b", 30)
        assert b.epoch > a.epoch
        with pytest.raises(LeaseLost, match="replica-b"):
            a_store.commit(rec("s"), first_token=0, tokens=[9], blocks={}, epoch=a.epoch)
        assert b_store.tokens("s") == []


def test_lease_arguments_are_checked(pg_url):
    with PgStore(pg_url) as store:
        for sid, owner, seconds in (("s", "", 1), ("s", "a", 0), ("s", "a", -1), ("s", "a", True), ("", "a", 1)):
            with pytest.raises(ValueError):
                store.acquire_lease(sid, owner, seconds)


def test_lmdb_needs_no_leases(tmp_path):
    with LmdbStore(tmp_path / "d") as store:
        assert store.acquire_lease("s", "me", 30) is None
        assert store.renew_lease(None, 30) is None
