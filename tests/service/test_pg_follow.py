"""The client over two replicas of one PostgreSQL database (issue 23: "the Python client retries or follows it").

A call on a session that replica A serves, sent to replica B, is answered ABORTED with A's name and address in
trailing metadata and marked retry-safe; a client that follows sends it to A and gets A's reply, and sends the
session's next calls to A. Once A stops (its leases given up, or left to expire), the client's retry lands on B.
"""
from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest

from memsvc.clients.client import AsyncMemoryClient
from memsvc.model import load_model
from memsvc.server.build import advertised
from tests.conftest import make_tiny_model
from tests.service.servers import client, served

TEXT = "The lighthouse keeper counted the ships that passed each night, and wrote their names down. "


@pytest.fixture(scope="module")
def context_model(tmp_path_factory, real_model_dir):
    """A tiny model whose replies depend on the context: a followed reply can be told from another one."""
    path = make_tiny_model(tmp_path_factory.mktemp("pg-follow") / "tiny", real_model_dir, seed=5,
                           initializer_range=0.3)
    return load_model(str(path))


def _aborted(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    assert err.value.code() == grpc.StatusCode.ABORTED, err.value.details()
    return err.value


def _count(server, method: str, code: str) -> float:
    return server.metrics.rpcs.labels(method, code)._value.get()


def test_a_client_sent_to_b_follows_to_a_and_gets_as_reply(pg_url, context_model):
    with served(pg_url, context_model) as (a, a_port), served(pg_url, context_model) as (b, b_port), \
            client(a_port) as ca, client(b_port) as cb, client(b_port, follow=False) as bare:
        ca.create_session("s")
        ca.append("s", text=TEXT * 3)  # A serves it now: it holds its lease
        at_a = f"127.0.0.1:{a_port}"
        assert a.advertise == at_a

        want = {"memsvc-owner": a.manager.leases.owner, "memsvc-owner-address": at_a, "memsvc-retry-safe": "1"}
        refused = _aborted(lambda: bare.append("s", text="From B."))
        assert dict(refused.trailing_metadata()) == want
        assert a.manager.leases.owner in refused.details() and at_a in refused.details()
        assert dict(_aborted(lambda: bare.generate("s", max_new_tokens=2)).trailing_metadata()) == want
        assert dict(_aborted(lambda: bare.resume("s")).trailing_metadata()) == want

        reply = ca.generate_text("s", max_new_tokens=12)  # A's reply, not committed
        followed = cb.generate_text("s", max_new_tokens=12)  # sent to B, followed to A
        assert followed.token_ids == reply.token_ids and followed.text == reply.text
        assert len(set(reply.token_ids)) > 1  # a reply that says something about the context
        assert cb.replica("s") == at_a and "s" not in b.manager._live

        aborted_at_b = _count(b, "Append", "ABORTED")
        tokens = a.store.get("s").n_tokens
        appended = cb.append("s", text="One more line.")  # straight to A now
        assert _count(b, "Append", "ABORTED") == aborted_at_b
        assert appended.session.tokens == tokens + len(appended.token_ids) == a.store.get("s").n_tokens
        assert a.store.tokens("s")[-len(appended.token_ids):] == list(appended.token_ids)
        committed = cb.generate_text("s", max_new_tokens=4, commit=True)
        assert committed.session.tokens == a.store.get("s").n_tokens
        assert cb.resume("s").tokens == committed.session.tokens and "s" not in b.manager._live

        # a session B serves needs no hop; a session nobody serves is B's to take
        cb.create_session("t")
        cb.append("t", text=TEXT)
        assert cb.replica("t") == f"127.0.0.1:{b_port}" and "t" in b.manager._live


def test_after_the_owner_stops_and_gives_its_leases_up_the_retry_lands_on_b(pg_url, context_model):
    with served(pg_url, context_model) as (b, b_port), client(b_port, retry_seconds=30.0) as cb:
        with served(pg_url, context_model) as (a, a_port), client(a_port) as ca:
            ca.create_session("s")
            ca.append("s", text=TEXT * 2)
            first = cb.append("s", text="Through B to A.")
            assert cb.replica("s") == f"127.0.0.1:{a_port}"
        # A stopped: it refuses connections, and its leases are given up
        tokens = b.store.get("s").n_tokens
        assert tokens == first.session.tokens
        again = cb.append("s", text="A is gone; B goes on.")
        assert cb.replica("s") == f"127.0.0.1:{b_port}" and "s" in b.manager._live
        assert again.session.tokens == tokens + len(again.token_ids) == b.store.get("s").n_tokens
        assert b.store.tokens("s")[-len(again.token_ids):] == list(again.token_ids)


def test_a_dead_owners_lease_is_waited_out_then_b_takes_the_session(pg_url, context_model):
    with served(pg_url, context_model, lease_seconds=2.0) as (b, b_port), \
            client(b_port, retry_seconds=30.0) as cb, client(b_port) as no_retry:
        with served(pg_url, context_model, lease_seconds=2.0, lease_renew=False) as (a, a_port), \
                client(a_port) as ca:
            ca.create_session("s")
            tokens = ca.append("s", text=TEXT * 2).session.tokens
            a.stop(grace=None).wait()  # A is gone, and its lease stays until it expires (nothing renews it)
            owner = a.manager.leases.owner

            # without retries: B names A, A does not connect, and B's ABORTED is what the caller gets
            refused = _aborted(lambda: no_retry.append("s", text="Too early."))
            assert dict(refused.trailing_metadata()) == {"memsvc-owner": owner,
                                                         "memsvc-owner-address": f"127.0.0.1:{a_port}",
                                                         "memsvc-retry-safe": "1"}
            assert no_retry.replica("s") == f"127.0.0.1:{b_port}"

            started = time.monotonic()
            landed = cb.append("s", text="B waited for the lease to run out.")
            assert time.monotonic() - started < 20
            assert "s" in b.manager._live and cb.replica("s") == f"127.0.0.1:{b_port}"
            assert _count(b, "Append", "ABORTED") >= 2  # refused while A's lease ran, then taken over
            assert landed.session.tokens == tokens + len(landed.token_ids) == b.store.get("s").n_tokens
            assert b.store.tokens("s")[-len(landed.token_ids):] == list(landed.token_ids)


def test_the_advertised_address_is_what_clients_are_told(pg_url, context_model):
    with served(pg_url, context_model, advertise="replica-a.invalid:7000") as (a, a_port), \
            served(pg_url, context_model) as (b, b_port), client(a_port) as ca, client(b_port) as cb:
        ca.create_session("s")
        ca.append("s", text=TEXT)
        refused = _aborted(lambda: cb.append("s", text="From B."))  # followed to a name that does not resolve
        assert dict(refused.trailing_metadata())["memsvc-owner-address"] == "replica-a.invalid:7000"
        assert cb.replica("s") == f"127.0.0.1:{b_port}"
    assert advertised("0.0.0.0", 50051) == f"{socket.gethostname()}:50051"
    assert advertised("::1", 7) == "[::1]:7" and advertised("10.0.0.5", 7) == "10.0.0.5:7"
    with pytest.raises(ValueError, match="--advertise"):
        with served(pg_url, context_model, advertise="no-port"):
            pass


def test_the_async_client_follows_too(pg_url, context_model):
    async def run(a_port: int, b_port: int):
        async with AsyncMemoryClient(f"127.0.0.1:{a_port}", timeout=120) as ca, \
                AsyncMemoryClient(f"127.0.0.1:{b_port}", timeout=120) as cb:
            await ca.create_session("s")
            await ca.append("s", text=TEXT * 2)
            reply = await ca.generate_text("s", max_new_tokens=8)
            followed = await cb.generate_text("s", max_new_tokens=8)
            assert followed.token_ids == reply.token_ids
            assert cb.replica("s") == f"127.0.0.1:{a_port}"
            appended = await cb.append("s", text="Async, through B.")
            return appended

    with served(pg_url, context_model) as (a, a_port), served(pg_url, context_model) as (b, b_port):
        appended = asyncio.run(run(a_port, b_port))
        assert appended.session.tokens == a.store.get("s").n_tokens and "s" not in b.manager._live
