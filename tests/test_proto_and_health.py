"""The committed stubs match memsvc.proto; health and reflection answer."""
from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memsvc.proto.build import HERE, OUTPUTS, generate


def test_committed_stubs_are_current(tmp_path):
    generate(tmp_path)
    for name in OUTPUTS:
        assert (tmp_path / name).read_text() == (HERE / name).read_text(), f"{name} is stale: run `make proto`"


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

    from memsvc.clients import AsyncMemoryClient

    _, server = tiny_server
    port = server.memsvc_port

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
