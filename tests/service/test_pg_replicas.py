"""Two replicas over one PostgreSQL database (issue 23, acceptance 3 in process): the replica serving a session
holds its lease; the other answers ABORTED naming it; once the lease has expired (the first replica paused: its
renewal is off and the lease short) the other takes the session over and commits; the old owner's commit is
then refused, it drops the session from memory, and the stored session is the new owner's, intact."""
from __future__ import annotations

import time

import grpc
import pytest

from memsvc.store.errors import LeaseLost
from tests.service.servers import client, served

TEXT = "The lighthouse keeper counted the ships that passed each night. "


def test_a_stale_replica_cannot_overwrite_the_new_owners_turns(pg_url, tiny_model):
    with served(pg_url, tiny_model, lease_seconds=1.0, lease_renew=False) as (a, a_port), \
            served(pg_url, tiny_model, lease_seconds=1.0) as (b, b_port), \
            client(a_port, follow=False) as ca, client(b_port, follow=False) as cb:  # the bare statuses
        ca.create_session("s")
        ca.append("s", text=TEXT * 4)
        held = a.manager._live["s"]
        assert held.epoch is not None
        with pytest.raises(grpc.RpcError) as refused:  # A's lease is live
            cb.append("s", text="Hello from B.")
        assert refused.value.code() == grpc.StatusCode.ABORTED
        assert a.manager.leases.owner in refused.value.details()

        time.sleep(1.3)  # A is paused past its lease: nothing renews it
        cb.append("s", text="B takes over. " * 3)
        reply = cb.generate_text("s", max_new_tokens=4, commit=True)
        on_b = cb.get_session("s")
        assert b.manager._live["s"].epoch > held.epoch

        # A is continued and commits what it had: refused inside the transaction
        with pytest.raises(LeaseLost, match=b.manager.leases.owner):
            a.store.commit(held.record, first_token=held.record.n_tokens, tokens=[5, 6], blocks={},
                           epoch=held.epoch)
        with pytest.raises(grpc.RpcError) as stale:  # and its next call finds the lease lost
            ca.append("s", text="A again.")
        assert stale.value.code() == grpc.StatusCode.ABORTED
        assert b.manager.leases.owner in stale.value.details()
        assert dict(stale.value.trailing_metadata()) == {"memsvc-owner": b.manager.leases.owner,
                                                         "memsvc-owner-address": f"127.0.0.1:{b_port}",
                                                         "memsvc-retry-safe": "1"}
        assert "s" not in a.manager._live  # dropped from A's memory

        stored = b.store.get("s")
        assert stored.n_tokens == on_b.tokens == len(b.store.tokens("s")) == len(b.manager._live["s"].tokens)
        assert b.store.tokens("s") == b.manager._live["s"].tokens
        check = b.store.check_session("s")
        assert check["record"] is None and not check["tokens"] and not check["kv"]
        assert len(reply.token_ids) > 0
        # B answers from what is stored, after a reload too
        b.manager._forget("s")
        assert cb.resume("s").tokens == on_b.tokens


def test_a_replica_that_stops_gives_its_leases_up(pg_url, tiny_model):
    with served(pg_url, tiny_model, lease_seconds=30.0) as (a, a_port), client(a_port) as ca:
        ca.create_session("s")
        ca.append("s", text=TEXT)
        a.manager.close()  # a clean stop releases the leases: the other replica need not wait 30 s
    with served(pg_url, tiny_model, lease_seconds=30.0) as (b, b_port), client(b_port) as cb:
        assert cb.append("s", text="B goes on.").session.tokens > 0
