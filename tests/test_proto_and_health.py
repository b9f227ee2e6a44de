"""The committed stubs match memsvc.proto; health and reflection answer."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memsvc.proto.build import HERE, OUTPUTS, generate, generator_version, stale

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def _locked(package: str) -> str:
    for line in LOCK.read_text().splitlines():
        if line.lower().startswith(package + "=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{package} is not in {LOCK}")


def test_committed_stubs_are_current(tmp_path):
    generate(tmp_path)
    assert stale(HERE, tmp_path) == [], "the committed stubs are stale: run `make proto`"
    # they come from the generator the lock pins; with that generator installed they match byte for byte
    assert generator_version() == _locked("grpcio-tools")
    if version("grpcio-tools") == _locked("grpcio-tools"):
        for name in OUTPUTS:
            assert (tmp_path / name).read_text() == (HERE / name).read_text(), name


def test_stubs_check_fails_on_a_proto_edit_without_make_proto(tmp_path):
    edited = tmp_path / "memsvc.proto"
    edited.write_text((HERE / "memsvc.proto").read_text() + "\nmessage Unused { string note = 1; }\n")
    generate(tmp_path / "out", proto=edited)
    assert stale(HERE, tmp_path / "out") == ["memsvc_pb2.py", "memsvc_pb2.pyi"]  # no service changed
    # a changed field number is caught too (it only changes the serialized descriptor)
    src = (HERE / "memsvc.proto").read_text()
    assert "ttl_seconds = 17;" in src
    edited.write_text(src.replace("ttl_seconds = 17;", "ttl_seconds = 19;", 1))
    generate(tmp_path / "out2", proto=edited)
    assert "memsvc_pb2.py" in stale(HERE, tmp_path / "out2")


def test_health_and_reflection(tiny_server):
    client, server = tiny_server
    channel = client._channel
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="memsvc.v1.MemoryService"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"memsvc.v1.MemoryService", "grpc.health.v1.Health"} <= names


def test_async_client(tiny_server):
    import asyncio

    from memsvc.clients.client import AsyncMemoryClient

    _, server = tiny_server
    port = server.port

    async def go():
        async with AsyncMemoryClient(f"127.0.0.1:{port}", timeout=60) as c:
            await c.create_session("aio")
            await c.append("aio", text="An asyncio client appends")
            out = await c.generate_text("aio", max_new_tokens=3)
            listed = await c.list_sessions()
            return out, listed

    out, listed = asyncio.run(go())
    assert 1 <= len(out.token_ids) <= 3 and out.finish_reason in ("length", "stop")
    assert [s.id for s in listed] == ["aio"]
