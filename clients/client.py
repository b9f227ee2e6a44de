"""Clients for MemoryService. They import only the generated stubs and grpc.

    with MemoryClient("127.0.0.1:50051") as c:
        s = c.create_session()
        c.append(s.id, messages=[{"role": "user", "content": "Hi!"}])
        for chunk in c.generate(s.id, max_new_tokens=64, commit=True):
            print(chunk.text, end="", flush=True)

Errors surface as `grpc.RpcError` with the service's status code and message.
A server with auth on wants `api_key=`; one serving TLS wants `tls=True` (the
system's roots) or `root_certificates=` (PEM bytes, e.g. a self-signed cert).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable, Iterator, Mapping, Sequence

import grpc

from memsvc.proto import memsvc_pb2 as pb
from memsvc.proto import memsvc_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass
class GenerateResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    session: pb.Session | None = None


def _append_request(session_id: str, messages, text, tokens) -> pb.AppendRequest:
    given = sum(x is not None for x in (messages, text, tokens))
    if given != 1:
        raise ValueError("append takes exactly one of messages=, text=, tokens=")
    req = pb.AppendRequest(session_id=session_id)
    if messages is not None:
        req.messages.SetInParent()
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
            req.messages.messages.add(role=role, content=content)
    elif text is not None:
        req.text = text
    else:
        req.tokens.SetInParent()
        req.tokens.ids.extend(int(t) for t in tokens)
    return req


def _generate_request(session_id: str, max_new_tokens: int, temperature: float, top_p: float,
                      stop: Sequence[str], seed: int, commit: bool, prefix: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(session_id=session_id, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stop=list(stop), seed=seed, commit=commit, prefix=prefix)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _credentials(tls: bool, root_certificates: bytes | None):
    if root_certificates is not None or tls:
        return grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return None


def _collect(result: GenerateResult, chunk: pb.GenerateChunk) -> None:
    result.text += chunk.text
    result.token_ids.extend(chunk.token_ids)
    if chunk.finish_reason:
        result.finish_reason = chunk.finish_reason
    if chunk.HasField("session"):
        result.session = chunk.session


class MemoryClient:
    """Synchronous client."""

    def __init__(self, address: str, *, timeout: float | None = None, channel: grpc.Channel | None = None,
                 api_key: str | None = None, tls: bool = False, root_certificates: bytes | None = None,
                 options: Sequence[tuple[str, object]] = ()):
        creds = _credentials(tls, root_certificates)
        opts = _OPTIONS + list(options)
        self._channel = channel or (grpc.secure_channel(address, creds, options=opts) if creds
                                    else grpc.insecure_channel(address, options=opts))
        self._stub = pb_grpc.MemoryServiceStub(self._channel)
        self.timeout = timeout
        self._md = _metadata(api_key)

    def _kw(self) -> dict:
        return {"timeout": self.timeout, "metadata": self._md}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def create_session(self, session_id: str = "", *, policy: str = "", labels: Mapping[str, str] | None = None,
                       ttl_seconds: float = 0.0) -> pb.Session:
        return self._stub.CreateSession(
            pb.CreateSessionRequest(session_id=session_id, policy=policy, labels=dict(labels or {}),
                                    ttl_seconds=ttl_seconds),
            **self._kw())

    def append(self, session_id: str, *, messages: Iterable | None = None, text: str | None = None,
               tokens: Sequence[int] | None = None) -> pb.AppendResponse:
        return self._stub.Append(_append_request(session_id, messages, text, tokens), **self._kw())

    def generate(self, session_id: str, *, max_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 0.0,
                 stop: Sequence[str] = (), seed: int = 0, commit: bool = False, prefix: str = ""
                 ) -> Iterator[pb.GenerateChunk]:
        req = _generate_request(session_id, max_new_tokens, temperature, top_p, stop, seed, commit, prefix)
        return self._stub.Generate(req, **self._kw())

    def generate_text(self, session_id: str, **kwargs) -> GenerateResult:
        result = GenerateResult()
        for chunk in self.generate(session_id, **kwargs):
            _collect(result, chunk)
        return result

    def resume(self, session_id: str) -> pb.Session:
        return self._stub.Resume(pb.ResumeRequest(session_id=session_id), **self._kw())

    def get_session(self, session_id: str) -> pb.Session:
        return self._stub.GetSession(pb.GetSessionRequest(session_id=session_id), **self._kw())

    def list_sessions(self, *, page_size: int = 100, labels: Mapping[str, str] | None = None,
                      damaged: list | None = None) -> Iterator[pb.Session]:
        """Every session, page by page. damaged: a list that gets the `DamagedSession` (id, reason) of each
        session whose stored record is damaged (those are not in the sessions yielded)."""
        token = ""
        while True:
            resp = self._stub.ListSessions(
                pb.ListSessionsRequest(page_size=page_size, page_token=token, labels=dict(labels or {})),
                **self._kw())
            if damaged is not None:
                damaged.extend(resp.damaged)
            yield from resp.sessions
            token = resp.next_page_token
            if not token:
                return

    def fork_session(self, session_id: str, new_session_id: str = "", *,
                     labels: Mapping[str, str] | None = None) -> pb.Session:
        return self._stub.ForkSession(
            pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id, labels=dict(labels or {})),
            **self._kw())

    def delete_session(self, session_id: str) -> bool:
        return self._stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), **self._kw()).deleted

    def stats(self) -> pb.Stats:
        return self._stub.GetStats(pb.GetStatsRequest(), **self._kw())


class AsyncMemoryClient:
    """asyncio client (grpc.aio); same methods as MemoryClient, awaitable."""

    def __init__(self, address: str, *, timeout: float | None = None, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None,
                 options: Sequence[tuple[str, object]] = ()):
        creds = _credentials(tls, root_certificates)
        opts = _OPTIONS + list(options)
        self._channel = (grpc.aio.secure_channel(address, creds, options=opts) if creds
                         else grpc.aio.insecure_channel(address, options=opts))
        self._stub = pb_grpc.MemoryServiceStub(self._channel)
        self.timeout = timeout
        self._md = _metadata(api_key)

    def _kw(self) -> dict:
        return {"timeout": self.timeout, "metadata": self._md}

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncMemoryClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def create_session(self, session_id: str = "", *, policy: str = "",
                             labels: Mapping[str, str] | None = None, ttl_seconds: float = 0.0) -> pb.Session:
        return await self._stub.CreateSession(
            pb.CreateSessionRequest(session_id=session_id, policy=policy, labels=dict(labels or {}),
                                    ttl_seconds=ttl_seconds),
            **self._kw())

    async def append(self, session_id: str, *, messages: Iterable | None = None, text: str | None = None,
                     tokens: Sequence[int] | None = None) -> pb.AppendResponse:
        return await self._stub.Append(_append_request(session_id, messages, text, tokens), **self._kw())

    async def generate(self, session_id: str, *, max_new_tokens: int = 0, temperature: float = 0.0,
                       top_p: float = 0.0, stop: Sequence[str] = (), seed: int = 0, commit: bool = False,
                       prefix: str = "") -> AsyncIterator[pb.GenerateChunk]:
        req = _generate_request(session_id, max_new_tokens, temperature, top_p, stop, seed, commit, prefix)
        async for chunk in self._stub.Generate(req, **self._kw()):
            yield chunk

    async def generate_text(self, session_id: str, **kwargs) -> GenerateResult:
        result = GenerateResult()
        async for chunk in self.generate(session_id, **kwargs):
            _collect(result, chunk)
        return result

    async def resume(self, session_id: str) -> pb.Session:
        return await self._stub.Resume(pb.ResumeRequest(session_id=session_id), **self._kw())

    async def get_session(self, session_id: str) -> pb.Session:
        return await self._stub.GetSession(pb.GetSessionRequest(session_id=session_id), **self._kw())

    async def list_sessions(self, *, page_size: int = 100, labels: Mapping[str, str] | None = None,
                            damaged: list | None = None) -> list[pb.Session]:
        out, token = [], ""
        while True:
            resp = await self._stub.ListSessions(
                pb.ListSessionsRequest(page_size=page_size, page_token=token, labels=dict(labels or {})),
                **self._kw())
            if damaged is not None:
                damaged.extend(resp.damaged)
            out.extend(resp.sessions)
            token = resp.next_page_token
            if not token:
                return out

    async def fork_session(self, session_id: str, new_session_id: str = "", *,
                           labels: Mapping[str, str] | None = None) -> pb.Session:
        return await self._stub.ForkSession(
            pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id, labels=dict(labels or {})),
            **self._kw())

    async def delete_session(self, session_id: str) -> bool:
        resp = await self._stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), **self._kw())
        return resp.deleted

    async def stats(self) -> pb.Stats:
        return await self._stub.GetStats(pb.GetStatsRequest(), **self._kw())
