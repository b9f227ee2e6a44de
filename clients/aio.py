"""The asyncio client (grpc.aio): MemoryClient's methods, awaitable, with the same options (follow,
retry_seconds: memsvc.clients.routes). Imported from memsvc.clients.client as well."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.proto import memsvc_pb2 as pb
from memsvc.proto import memsvc_pb2_grpc as pb_grpc

from .routes import CONNECT_SECONDS, Routes
from .wire import (OPTIONS, GenerateResult, append_request, call_metadata, collect, create_request, credentials,
                   fork_request, generate_request, list_request)

_SETTLED = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN)


class AsyncMemoryClient:
    """asyncio client (grpc.aio); same methods as MemoryClient, awaitable."""

    def __init__(self, address: str, *, timeout: float | None = None, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None,
                 options: Sequence[tuple[str, object]] = (), follow: bool = True, retry_seconds: float = 0.0):
        self._routes = Routes(address, follow=follow, retry_seconds=retry_seconds, gone=self._drop)
        self._creds = credentials(tls, root_certificates)
        self._opts = OPTIONS + list(options)
        self._replicas: dict[str, tuple[grpc.aio.Channel, pb_grpc.MemoryServiceStub]] = {}
        self._channel, self._stub = self._at(address)
        self.timeout = timeout
        self._md = call_metadata(api_key)

    def _at(self, address: str) -> tuple[grpc.aio.Channel, pb_grpc.MemoryServiceStub]:
        got = self._replicas.get(address)  # one event loop: no lock needed
        if got is None:
            channel = grpc.aio.secure_channel(address, self._creds, options=self._opts) if self._creds \
                else grpc.aio.insecure_channel(address, options=self._opts)
            got = self._replicas[address] = (channel, pb_grpc.MemoryServiceStub(channel))
        return got

    def _drop(self, address: str) -> None:
        """Forget the channel of a replica that could not be reached (gRPC closes it once no call uses it)."""
        self._replicas.pop(address, None)

    async def _connects(self, address: str) -> bool:
        """Whether the replica at address connects and answers a health check, each within CONNECT_SECONDS
        (False at once when it refuses)."""
        channel = self._at(address)[0]

        async def settled() -> grpc.ChannelConnectivity:
            state = channel.get_state(try_to_connect=True)
            while state not in _SETTLED:
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
            return state

        try:
            if await asyncio.wait_for(settled(), CONNECT_SECONDS) != grpc.ChannelConnectivity.READY:
                return False
        except asyncio.TimeoutError:
            return False
        try:  # connected is not answering: a stopped process's kernel still accepts the connection
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CONNECT_SECONDS)
        except grpc.RpcError:
            return False
        return True

    def _kw(self) -> dict:
        return {"timeout": self.timeout, "metadata": self._md}

    async def _tried(self, attempt, send: Callable[..., Awaitable]):
        """await send(stub) of the replica the attempt got to, followed and retried as the options say."""
        while True:
            if attempt.following and not await self._connects(attempt.address):
                attempt.unreachable()
                continue
            try:
                result = await send(self._at(attempt.address)[1])
            except grpc.RpcError as err:
                wait = attempt.retry(err)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            attempt.done()
            return result

    async def _call(self, method: str, request, sid: str | None):
        return await self._tried(self._routes.start(method, sid),
                                 lambda stub: getattr(stub, method)(request, **self._kw()))

    async def close(self) -> None:
        for channel, _ in list(self._replicas.values()):
            await channel.close()

    async def __aenter__(self) -> "AsyncMemoryClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def replica(self, session_id: str) -> str:
        """The address this client sends session_id's calls to (its home, unless it followed the session)."""
        return self._routes.replica(session_id)

    async def create_session(self, session_id: str = "", *, policy: str = "",
                             labels: Mapping[str, str] | None = None, ttl_seconds: float = 0.0) -> pb.Session:
        return await self._call("CreateSession", create_request(session_id, policy, labels, ttl_seconds), None)

    async def append(self, session_id: str, *, messages: Iterable | None = None, text: str | None = None,
                     tokens: Sequence[int] | None = None) -> pb.AppendResponse:
        return await self._call("Append", append_request(session_id, messages, text, tokens), session_id)

    async def generate(self, session_id: str, *, max_new_tokens: int = 0, temperature: float = 0.0,
                       top_p: float = 0.0, stop: Sequence[str] = (), seed: int = 0, commit: bool = False,
                       prefix: str = "") -> AsyncIterator[pb.GenerateChunk]:
        """The reply's chunks; followed and retried until the first one, then that one call's stream."""
        req = generate_request(session_id, max_new_tokens, temperature, top_p, stop, seed, commit, prefix)
        async def send(stub):
            chunks = stub.Generate(req, **self._kw()).__aiter__()
            return chunks, await chunks.__anext__()

        try:
            chunks, first = await self._tried(self._routes.start("Generate", session_id), send)
        except StopAsyncIteration:  # a reply of no chunks
            return
        yield first
        async for chunk in chunks:
            yield chunk

    async def generate_text(self, session_id: str, **kwargs) -> GenerateResult:
        result = GenerateResult()
        async for chunk in self.generate(session_id, **kwargs):
            collect(result, chunk)
        return result

    async def resume(self, session_id: str) -> pb.Session:
        return await self._call("Resume", pb.ResumeRequest(session_id=session_id), session_id)

    async def get_session(self, session_id: str) -> pb.Session:
        return await self._call("GetSession", pb.GetSessionRequest(session_id=session_id), session_id)

    async def list_sessions(self, *, page_size: int = 100, labels: Mapping[str, str] | None = None,
                            damaged: list | None = None) -> list[pb.Session]:
        out, token = [], ""
        while True:
            resp = await self._call("ListSessions", list_request(page_size, token, labels), None)
            if damaged is not None:
                damaged.extend(resp.damaged)
            out.extend(resp.sessions)
            token = resp.next_page_token
            if not token:
                return out

    async def fork_session(self, session_id: str, new_session_id: str = "", *,
                           labels: Mapping[str, str] | None = None) -> pb.Session:
        return await self._call("ForkSession", fork_request(session_id, new_session_id, labels), session_id)

    async def delete_session(self, session_id: str) -> bool:
        resp = await self._call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), session_id)
        self._routes.forget(session_id)
        return resp.deleted

    async def stats(self) -> pb.Stats:
        return await self._call("GetStats", pb.GetStatsRequest(), None)
