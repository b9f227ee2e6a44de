"""Clients for MemoryService. They import only the generated stubs, grpc and its health stubs.

    with MemoryClient("127.0.0.1:50051") as c:
        s = c.create_session()
        c.append(s.id, messages=[{"role": "user", "content": "Hi!"}])
        for chunk in c.generate(s.id, max_new_tokens=64, commit=True):
            print(chunk.text, end="", flush=True)

Errors surface as `grpc.RpcError` with the service's status code and message.
A server with auth on wants `api_key=`; one serving TLS wants `tls=True` (the
system's roots) or `root_certificates=` (PEM bytes, e.g. a self-signed cert).

Several replicas over one database (memsvc.clients.routes): `follow=True` (the default) sends a call that
reaches a replica not serving its session to the replica that does, and remembers it for the session's next
calls (channels kept per address, with the same credentials and key); `retry_seconds=S` (default 0: off) tries
a call that failed with ABORTED or UNAVAILABLE again, with backoff, for up to S seconds, but only a read or a
call the server says changed nothing. A streaming Generate is followed or retried only before its first chunk.
`timeout` bounds each try. AsyncMemoryClient (memsvc.clients.aio) has the same methods, awaitable.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memsvc.proto import memsvc_pb2 as pb
from memsvc.proto import memsvc_pb2_grpc as pb_grpc

from .aio import AsyncMemoryClient
from .routes import CONNECT_SECONDS, Routes
from .wire import (OPTIONS, GenerateResult, append_request, call_metadata, collect, create_request, credentials,
                   fork_request, generate_request, list_request)

__all__ = ["AsyncMemoryClient", "GenerateResult", "MemoryClient"]
_SETTLED = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN)


class MemoryClient:
    """Synchronous client. address: the home replica; follow, retry_seconds: see the module's docstring."""

    def __init__(self, address: str, *, timeout: float | None = None, channel: grpc.Channel | None = None,
                 api_key: str | None = None, tls: bool = False, root_certificates: bytes | None = None,
                 options: Sequence[tuple[str, object]] = (), follow: bool = True, retry_seconds: float = 0.0):
        self._routes = Routes(address, follow=follow, retry_seconds=retry_seconds, gone=self._drop)
        self._creds = credentials(tls, root_certificates)
        self._opts = OPTIONS + list(options)
        self._channel = channel or self._new_channel(address)
        self._stub = pb_grpc.MemoryServiceStub(self._channel)
        # address -> (channel, stub): the home replica's, and those of the replicas calls were sent to
        self._replicas = {address: (self._channel, self._stub)}
        self._lock = threading.Lock()
        self.timeout = timeout
        self._md = call_metadata(api_key)

    def _new_channel(self, address: str) -> grpc.Channel:
        return grpc.secure_channel(address, self._creds, options=self._opts) if self._creds \
            else grpc.insecure_channel(address, options=self._opts)

    def _at(self, address: str) -> tuple[grpc.Channel, pb_grpc.MemoryServiceStub]:
        with self._lock:
            got = self._replicas.get(address)
            if got is None:
                channel = self._new_channel(address)
                got = self._replicas[address] = (channel, pb_grpc.MemoryServiceStub(channel))
            return got

    def _drop(self, address: str) -> None:
        """Forget the channel of a replica that could not be reached (a new one connects afresh; gRPC closes the
        old one once no call uses it)."""
        with self._lock:
            self._replicas.pop(address, None)

    def _connects(self, address: str) -> bool:
        """Whether the replica at address connects and answers a health check, each within CONNECT_SECONDS
        (False at once when it refuses)."""
        channel, seen = self._at(address)[0], []
        settled = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state in _SETTLED and not seen:
                seen.append(state)
                settled.set()

        channel.subscribe(watch, try_to_connect=True)
        try:
            settled.wait(CONNECT_SECONDS)
        finally:
            channel.unsubscribe(watch)
        if seen[:1] != [grpc.ChannelConnectivity.READY]:
            return False
        try:  # connected is not answering: a stopped process's kernel still accepts the connection
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CONNECT_SECONDS)
        except grpc.RpcError:
            return False
        return True

    def _kw(self) -> dict:
        return {"timeout": self.timeout, "metadata": self._md}

    def _tried(self, attempt, send: Callable, go_on: Callable[[], bool] = lambda: True) -> tuple[bool, object]:
        """(True, send(stub)) of the replica the attempt got to, followed and retried as the options say while
        go_on(); (False, None) once it says stop."""
        while go_on():
            if attempt.following and not self._connects(attempt.address):
                attempt.unreachable()
                continue
            try:
                result = send(self._at(attempt.address)[1])
            except grpc.RpcError as err:
                wait = attempt.retry(err)
                if wait is None:
                    raise
                time.sleep(wait)
                continue
            attempt.done()
            return True, result
        return False, None

    def _call(self, method: str, request, sid: str | None):
        """One unary call, followed and retried as the options say."""
        return self._tried(self._routes.start(method, sid),
                           lambda stub: getattr(stub, method)(request, **self._kw()))[1]

    def close(self) -> None:
        with self._lock:
            channels = [channel for channel, _ in self._replicas.values()]
        for channel in channels:
            channel.close()

    def __enter__(self) -> "MemoryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def replica(self, session_id: str) -> str:
        """The address this client sends session_id's calls to (its home, unless it followed the session)."""
        return self._routes.replica(session_id)

    def create_session(self, session_id: str = "", *, policy: str = "", labels: Mapping[str, str] | None = None,
                       ttl_seconds: float = 0.0) -> pb.Session:
        return self._call("CreateSession", create_request(session_id, policy, labels, ttl_seconds), None)

    def append(self, session_id: str, *, messages: Iterable | None = None, text: str | None = None,
               tokens: Sequence[int] | None = None) -> pb.AppendResponse:
        return self._call("Append", append_request(session_id, messages, text, tokens), session_id)

    def generate(self, session_id: str, *, max_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 0.0,
                 stop: Sequence[str] = (), seed: int = 0, commit: bool = False, prefix: str = ""
                 ) -> "Stream":
        req = generate_request(session_id, max_new_tokens, temperature, top_p, stop, seed, commit, prefix)
        return Stream(self, req)

    def generate_text(self, session_id: str, **kwargs) -> GenerateResult:
        result = GenerateResult()
        for chunk in self.generate(session_id, **kwargs):
            collect(result, chunk)
        return result

    def resume(self, session_id: str) -> pb.Session:
        return self._call("Resume", pb.ResumeRequest(session_id=session_id), session_id)

    def get_session(self, session_id: str) -> pb.Session:
        return self._call("GetSession", pb.GetSessionRequest(session_id=session_id), session_id)

    def list_sessions(self, *, page_size: int = 100, labels: Mapping[str, str] | None = None,
                      damaged: list | None = None) -> Iterator[pb.Session]:
        """Every session, page by page. damaged: a list that gets the `DamagedSession` (id, reason) of each
        session whose stored record is damaged (those are not in the sessions yielded)."""
        token = ""
        while True:
            resp = self._call("ListSessions", list_request(page_size, token, labels), None)
            if damaged is not None:
                damaged.extend(resp.damaged)
            yield from resp.sessions
            token = resp.next_page_token
            if not token:
                return

    def fork_session(self, session_id: str, new_session_id: str = "", *,
                     labels: Mapping[str, str] | None = None) -> pb.Session:
        return self._call("ForkSession", fork_request(session_id, new_session_id, labels), session_id)

    def delete_session(self, session_id: str) -> bool:
        deleted = self._call("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), session_id).deleted
        self._routes.forget(session_id)
        return deleted

    def stats(self) -> pb.Stats:
        return self._call("GetStats", pb.GetStatsRequest(), None)


class Stream:
    """A Generate's chunks, iterated; cancel() stops it. The call starts at the first next(): until its first
    chunk it is followed and retried like a unary call, then it is that one call's stream."""

    def __init__(self, client: MemoryClient, request: pb.GenerateRequest):
        self._client, self._request = client, request
        self._call = None  # the gRPC stream of the current try
        self._started = self._cancelled = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> pb.GenerateChunk:
        if self._started:
            return next(self._call)
        c = self._client

        def send(stub) -> pb.GenerateChunk:
            self._call = stub.Generate(self._request, **c._kw())
            return next(self._call)

        sent, chunk = c._tried(c._routes.start("Generate", self._request.session_id), send,
                               lambda: not self._cancelled)
        if not sent:
            raise StopIteration
        self._started = True
        return chunk

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()
