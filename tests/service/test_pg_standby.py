"""Failover to a synchronous standby (issue 23, acceptance 4): a PostgreSQL primary with a streaming-replication
standby that each commit waits for (synchronous_standby_names, synchronous_commit on, fsync on); two replicas
write through a multi-host URL that names both (libpq takes the first that accepts writes:
target_session_attrs=read-write). The primary gets SIGKILL during Appends; while no server accepts writes
every call answers UNAVAILABLE; the standby is promoted; the replicas go on against it by themselves, and it
holds every acknowledged turn. With the standby gone, the primary's commits wait for it: an Append does not
answer until it is back (the price of the promise)."""
from __future__ import annotations

import random
import threading
import time

import grpc
import psycopg
import pytest

from memsvc.proto import memsvc_pb2 as pb
from memsvc.proto import memsvc_pb2_grpc as pb_grpc
from memsvc.store.postgres.db import describe
from tests.service.pg_load import Writer, check_statuses, check_stored, run_writers, stop_writers, wait_for_oks
from tests.service.servers import client, served

FAST = 3.0  # seconds: the slowest any call may answer


@pytest.fixture
def replicated_pg():
    """(primary, standby, database name): a durable primary, a database on it, a synchronous standby of it."""
    from tools.pgserver import PgServer

    primary = PgServer.start(fsync=True)
    standby = None
    try:
        name = primary.create_database().rsplit("/", 1)[1]
        standby = primary.start_standby("standby")
        yield primary, standby, name
    finally:
        for server in (standby, primary):
            if server is not None:
                server.stop()


def _both(primary, standby, name: str) -> str:
    return (f"postgresql://memsvc@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{name}"
            f"?target_session_attrs=read-write")


def test_a_multi_host_url_is_named_host_by_host_without_its_password():
    url = "postgresql://u:secret@10.0.0.1:5432,10.0.0.2:5433/db?target_session_attrs=read-write"
    assert describe(url) == "postgresql://u@10.0.0.1:5432,10.0.0.2:5433/db"
    assert describe("postgresql://u@h1,h2:5433/db") == "postgresql://u@h1,h2:5433/db"  # h1 on the default port
    assert describe("postgresql://u@h1,h2/db?port=6000") == "postgresql://u@h1:6000,h2:6000/db"


def test_acknowledged_turns_survive_the_primarys_death_on_the_promoted_standby(replicated_pg, tiny_model):
    primary, standby, name = replicated_pg
    url = _both(primary, standby, name)
    rng = random.Random(13)
    with served(url, tiny_model) as (_, port_a), served(url, tiny_model) as (_, port_b):
        writers = [Writer(port, f"r{r}w{i}", 130 + 10 * r + i) for r, port in enumerate((port_a, port_b))
                   for i in range(2)]
        threads = run_writers(writers)
        try:
            wait_for_oks(writers, 0.0, 3, limit=60)
            time.sleep(rng.uniform(0.3, 1.5))
            down = time.monotonic()
            primary.kill()
            time.sleep(1.5)  # no server accepts writes: the standby refuses them (read-only)
            up = time.monotonic()
            standby.promote()
            promoted = time.monotonic() - up
            recovered = wait_for_oks(writers, up, 3, limit=30)
            out = check_statuses(writers, down, up, slowest=FAST)
        finally:
            stop_writers(writers, threads)
    out["sessions"] = check_stored(standby.url(name), writers, tiny_model)
    messages = {c.details for w in writers for c in w.calls if c.code == "UNAVAILABLE"}
    assert any(f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}" in m for m in messages), list(messages)[:2]
    assert out["oks_before"] > 4 and out["oks_after"] > 4
    print(f"failover to the standby: promoted in {promoted:.2f} s, serving again {recovered:.2f} s later: {out}")


def test_with_its_synchronous_standby_gone_the_primarys_commits_wait_for_it(replicated_pg, tiny_model):
    primary, standby, name = replicated_pg
    with served(primary.url(name), tiny_model) as (server, port), client(port) as c:
        c.create_session("s")
        before = c.append("s", tokens=[11, 12, 13]).session.tokens
        standby.stop(remove=False)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as waited:
            pb_grpc.MemoryServiceStub(channel).Append(_tokens("s", [21, 22]), timeout=2.0)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # its commit waits for the standby
        done = threading.Event()
        threading.Thread(target=lambda: (_insert(primary.url(name)), done.set()), daemon=True).start()
        assert not done.wait(1.0)  # a plain commit waits too
        standby.start_again()
        assert done.wait(30), "the commit did not return once the standby was back"
        deadline = time.monotonic() + 30  # the waiting Append's commit lands once the standby has it
        while server.store.get("s").n_tokens != before + 2:
            assert time.monotonic() < deadline, server.store.get("s").n_tokens
            time.sleep(0.05)
        assert server.store.tokens("s")[-2:] == [21, 22]
    with psycopg.connect(standby.url(name)) as conn:  # the standby has what the primary acknowledged
        assert conn.execute("SELECT count(*) FROM waited").fetchone() == (1,)


def _tokens(sid: str, ids: list[int]) -> pb.AppendRequest:
    req = pb.AppendRequest(session_id=sid)
    req.tokens.ids.extend(ids)
    return req


def _insert(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE waited (x int)")
        conn.execute("INSERT INTO waited VALUES (1)")
