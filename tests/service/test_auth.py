"""API keys and tenants: who may call, and that no tenant can see, touch or even
detect another tenant's sessions."""
from __future__ import annotations

import os
import stat

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.auth import KeyRing, Tenant, bearer_key, hash_key, is_loopback
from memsvc.errors import InvalidArgument
from memsvc.proto import memsvc_pb2 as pb
from memsvc.proto import memsvc_pb2_grpc as pb_grpc
from tests.service.servers import client, self_signed_cert, served

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef-bob"


def _ring() -> KeyRing:
    return KeyRing.parse(f"alice={hash_key(ALICE_KEY)}\nbob={hash_key(BOB_KEY)}\n", source="test", allow_plain=False)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    return info.value.code(), info.value.details()


@pytest.fixture
def tenants(tmp_path, tiny_model):
    with served(tmp_path / "data", tiny_model, api_keys=_ring()) as (server, port):
        assert server.auth
        with client(port, api_key=ALICE_KEY) as alice, client(port, api_key=BOB_KEY) as bob:
            yield server, port, alice, bob


# ---- keys ---------------------------------------------------------------------------


def test_keyring_maps_keys_to_tenants_and_keeps_only_hashes():
    ring = _ring()
    assert ring.tenant_for(ALICE_KEY) == "alice" and ring.tenant_for(BOB_KEY) == "bob"
    assert ring.tenant_for("alice-key-0123456789abcdeX") is None and ring.tenant_for("") is None
    assert ring.tenants == {"alice", "bob"}
    assert ALICE_KEY not in repr(vars(ring))
    env = KeyRing.load(env={"MEMSVC_API_KEYS": f"carol={'c' * 20}, dave={hash_key('d' * 20)}"})
    assert env.tenant_for("c" * 20) == "carol" and env.tenant_for("d" * 20) == "dave"


@pytest.mark.parametrize("text, words", [
    (f"alice={ALICE_KEY}", ["hashed", "memsvc keys new"]),          # plain keys never sit in a file
    ("alice", ["TENANT=sha256"]),
    ("al:ice=" + hash_key(ALICE_KEY), ["tenant name"]),
    ("alice=sha256:abc", ["64"]),
    (f"alice={hash_key(ALICE_KEY)}\nbob={hash_key(ALICE_KEY)}", ["two tenants"]),
])
def test_bad_keys_files_are_refused_with_the_line(text, words):
    with pytest.raises(ValueError) as info:
        KeyRing.parse(text, source="keys.txt", allow_plain=False)
    for w in words:
        assert w in str(info.value)
    assert "keys.txt line" in str(info.value)


def test_short_plain_keys_are_refused_in_the_environment():
    with pytest.raises(ValueError, match="shorter than 16"):
        KeyRing.load(env={"MEMSVC_API_KEYS": "eve=short"})


def test_bearer_metadata_and_loopback():
    assert bearer_key([("authorization", "Bearer abc")]) == "abc"
    assert bearer_key([("x", "y"), ("authorization", "bearer  abc ")]) == "abc"
    assert bearer_key([("authorization", "Basic abc")]) is None
    assert bearer_key([("authorization", "Bearer")]) is None
    assert bearer_key([]) is None
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "[::1]", "127.3.2.1"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "[::]", "", "10.0.0.1", "example.com"))


def test_tenant_namespace_round_trips_and_bounds_ids():
    t = Tenant("alice")
    assert t.inner("chat") == "alice:chat" and t.outer("alice:chat") == "chat"
    assert t.owns("alice:chat") and not t.owns("alice:") and not t.owns("alicex:chat")
    assert t.inner("a:b") == "alice:a:b"  # ids may hold ':'; tenant names may not
    assert t.inner("x" * 122) and t.scrub("no session 'alice:chat'") == "no session 'chat'"
    for bad in ("x" * 123, "", "has space", "ü"):
        with pytest.raises(InvalidArgument, match="122 characters"):
            t.inner(bad)
    assert Tenant().inner("anything") == "anything"


def test_keys_new_writes_only_the_hash(tmp_path):
    from memsvc.cli import main

    path = tmp_path / "keys.txt"
    res = CliRunner().invoke(main, ["keys", "new", "alice", "--keys-file", str(path)])
    assert res.exit_code == 0, res.output
    key = res.stdout.strip().splitlines()[-1]
    assert key not in path.read_text() and path.read_text().startswith("alice=sha256:")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert KeyRing.load(path, env={}).tenant_for(key) == "alice"


# ---- when auth is on ------------------------------------------------------------------


def test_auth_is_on_by_default_off_loopback_and_refuses_to_start_without_keys(tmp_path, tiny_model):
    with pytest.raises(ValueError) as info:
        with served(tmp_path / "d1", tiny_model, address="0.0.0.0:0"):
            pass
    assert "not a loopback" in str(info.value) and "--api-keys-file" in str(info.value)
    with pytest.raises(ValueError, match="--auth on"):
        with served(tmp_path / "d2", tiny_model, auth="on"):
            pass
    with served(tmp_path / "d3", tiny_model, address="0.0.0.0:0", api_keys=_ring()) as (server, _):
        assert server.auth
    with served(tmp_path / "d4", tiny_model, address="0.0.0.0:0", auth="off") as (server, _):
        assert not server.auth
    with served(tmp_path / "d5", tiny_model) as (server, _):
        assert not server.auth  # loopback, no keys: off


def test_cli_serve_refuses_a_public_address_without_keys(tmp_path):
    from memsvc.cli import main

    res = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)],
                             env={"MEMSVC_API_KEYS": ""})
    assert res.exit_code != 0
    assert "API keys are required" in res.output and "not a loopback" in res.output
    assert not (tmp_path / "data.mdb").exists()  # refused before touching anything


def test_calls_without_a_valid_key_are_unauthenticated_but_health_answers(tenants):
    server, port, alice, _ = tenants
    alice.create_session("mine")
    before = server.store.dump()
    for kwargs in ({}, {"api_key": "not-a-key-0123456789"}, {"api_key": ALICE_KEY + "x"}):
        with client(port, **kwargs) as c:
            for call in (lambda: c.create_session("x"), lambda: c.get_session("mine"), lambda: c.resume("mine"),
                         lambda: c.append("mine", text="hi"), lambda: c.generate("mine", max_new_tokens=2),
                         lambda: list(c.list_sessions()), lambda: c.fork_session("mine", "y"),
                         lambda: c.delete_session("mine"), c.stats):
                code, details = _code(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, details
                assert ("Bearer" in details) if not kwargs else ("not valid" in details)
    # a key sent with another scheme is no key
    stub = pb_grpc.MemoryServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    code, _ = _code(lambda: stub.GetStats(pb.GetStatsRequest(), metadata=(("authorization", f"Basic {ALICE_KEY}"),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="memsvc.v1.MemoryService"),
                                                    timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert server.store.dump() == before
    assert server.metrics.auth_failures._value.get() >= 27


RPCS = ("GetSession", "Resume", "Append(text)", "Append(messages)", "Append(tokens)", "Append(bad tokens)",
        "Generate", "Generate(commit)", "ForkSession", "DeleteSession")


def _probe(c, rpc: str, sid: str, vocab: int):
    return {
        "GetSession": lambda: c.get_session(sid),
        "Resume": lambda: c.resume(sid),
        "Append(text)": lambda: c.append(sid, text="let me in"),
        "Append(messages)": lambda: c.append(sid, messages=[{"role": "user", "content": "hi"}]),
        "Append(tokens)": lambda: c.append(sid, tokens=[5, 6]),
        "Append(bad tokens)": lambda: c.append(sid, tokens=[vocab + 5]),
        "Generate": lambda: c.generate(sid, max_new_tokens=2),
        "Generate(commit)": lambda: c.generate(sid, max_new_tokens=2, commit=True),
        "ForkSession": lambda: c.fork_session(sid, "stolen"),
        "DeleteSession": lambda: c.delete_session(sid),
    }[rpc]


def test_tenants_cannot_see_or_touch_each_others_sessions(tenants):
    """Acceptance 1: each tenant tries every RPC on the other's sessions: all NOT_FOUND, nothing changed."""
    server, _, alice, bob = tenants
    store = server.store
    own = {}
    for name, c in (("alice", alice), ("bob", bob)):
        own[name] = f"{name}-diary"
        c.create_session(own[name], labels={"owner": name})
        c.append(own[name], messages=[{"role": "user", "content": f"I am {name}; my PIN is 1234."}])
        c.generate_text(own[name], max_new_tokens=3, commit=True)
        c.create_session("shared-name", labels={"owner": name})  # the same id in both namespaces
        c.append("shared-name", text=f"{name} wrote this")
    vocab = server.manager.model.vocab_size
    assert store.get("alice:alice-diary") is not None and store.get("bob:bob-diary") is not None
    bob_tokens = bob.get_session("bob-diary").tokens
    before = store.dump()
    NF = grpc.StatusCode.NOT_FOUND
    for me, other, c in (("alice", "bob", alice), ("bob", "alice", bob)):
        for target in (own[other], f"{other}:{own[other]}"):  # the other's id, bare and store-qualified
            for rpc in RPCS:
                code, details = _code(_probe(c, rpc, target, vocab))
                assert code == NF, (me, rpc, target, code, details)
                # the answer for the other's session reads exactly like the one for no session at all
                code2, details2 = _code(_probe(c, rpc, "no-such-session", vocab))
                assert code2 == NF and details2.replace("no-such-session", target) == details, (rpc, details2)
        listed = {s.id: s.labels["owner"] for s in c.list_sessions()}
        assert listed == {own[me]: me, "shared-name": me}
        assert [s.id for s in c.list_sessions(labels={"owner": other})] == []
        assert c.get_session("shared-name").labels == {"owner": me}
    assert store.dump() == before
    # the same ids stay free in every namespace: no ALREADY_EXISTS that would tell them apart
    alice.create_session(own["bob"])
    alice.fork_session("shared-name", "alice-copy")
    assert {s.id for s in bob.list_sessions()} == {"bob-diary", "shared-name"}
    assert bob.get_session("bob-diary").tokens == bob_tokens


def test_paging_stays_inside_the_tenant(tenants):
    server, _, alice, bob = tenants
    for i in range(5):
        alice.create_session(f"a{i}")
        bob.create_session(f"a{i}x")
    assert [s.id for s in alice.list_sessions(page_size=2)] == [f"a{i}" for i in range(5)]
    assert [s.id for s in bob.list_sessions(page_size=3)] == [f"a{i}x" for i in range(5)]
    # with auth off an operator sees the store's ids (the `memsvc sessions ls` view)
    assert len(server.store.list(limit=100)) == 10


def test_tls_serves_with_a_certificate(tmp_path, tiny_model):
    cert, key = self_signed_cert(tmp_path)
    with pytest.raises(ValueError, match="both"):
        with served(tmp_path / "d0", tiny_model, tls_cert=cert):
            pass
    with served(tmp_path / "data", tiny_model, api_keys=_ring(), tls_cert=cert, tls_key=key) as (_, port):
        with client(port, api_key=ALICE_KEY, root_certificates=cert.read_bytes()) as c:
            c.create_session("over-tls")
            assert [s.id for s in c.list_sessions()] == ["over-tls"]
        with client(port, api_key=ALICE_KEY) as plain:  # a plaintext client gets no answer
            plain.timeout = 5
            code, _ = _code(lambda: plain.get_session("over-tls"))
            assert code == grpc.StatusCode.UNAVAILABLE


def test_async_client_sends_its_key(tenants):
    import asyncio

    from memsvc.clients.client import AsyncMemoryClient

    _, port, alice, _ = tenants
    alice.create_session("a")

    async def go():
        async with AsyncMemoryClient(f"127.0.0.1:{port}", timeout=60, api_key=ALICE_KEY) as c:
            assert [s.id for s in await c.list_sessions()] == ["a"]
        async with AsyncMemoryClient(f"127.0.0.1:{port}", timeout=60, api_key=BOB_KEY) as c:
            with pytest.raises(grpc.RpcError) as info:
                await c.get_session("a")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        async with AsyncMemoryClient(f"127.0.0.1:{port}", timeout=60) as c:
            with pytest.raises(grpc.RpcError) as info:
                await c.stats()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(go())
