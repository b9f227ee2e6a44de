"""The gRPC face of memsvc: MemoryService, health and reflection.

The servicer is the only place that turns domain errors into gRPC status
codes. `create_server(address, ...) -> (server, port)` lets tests bind port 0;
`serve()` runs until SIGTERM/SIGINT and shuts down gracefully.

Knows gRPC and the session manager; knows nothing about tensors or LMDB.
"""
from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memsvc.proto import memsvc_pb2 as pb
from memsvc.proto import memsvc_pb2_grpc as pb_grpc
from memsvc.store.lmdb_store import Store

from .errors import ServiceError
from .model import LoadedModel, load_model
from .sessions import GenerateParams, SessionManager, SessionView

log = logging.getLogger("memsvc.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name
MAX_MESSAGE_BYTES = 64 << 20


def _session_pb(view: SessionView) -> pb.Session:
    rec = view.record
    return pb.Session(
        id=rec.id,
        model=rec.model_name,
        model_fingerprint=rec.model_fingerprint,
        policy=rec.policy,
        tokens=rec.n_tokens,
        bytes_stored=rec.stored_bytes,
        bytes_resident=view.resident_bytes,
        created_unix=rec.created,
        updated_unix=rec.updated,
        labels=rec.labels,
        resident=view.resident,
        messages=len(rec.messages),
    )


def _abort(context: grpc.ServicerContext, exc: Exception):
    if isinstance(exc, ServiceError):
        code = getattr(grpc.StatusCode, exc.code)
    elif isinstance(exc, ValueError):
        code = grpc.StatusCode.INVALID_ARGUMENT
    else:
        log.exception("internal error")
        code = grpc.StatusCode.INTERNAL
    context.abort(code, str(exc) or type(exc).__name__)


def _unary(method):
    """Wrap a unary handler so every domain error becomes its status code."""

    @functools.wraps(method)
    def handler(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            _abort(context, exc)

    return handler


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(self, manager: SessionManager):
        self.m = manager

    def _view(self, sid: str) -> pb.Session:
        return _session_pb(self.m.view(sid))

    @_unary
    def CreateSession(self, request, context):
        rec = self.m.create(request.session_id, request.policy, dict(request.labels))
        return self._view(rec.id)

    @_unary
    def Append(self, request, context):
        kind = request.WhichOneof("content")
        if kind == "messages":
            msgs = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            rec, ids = self.m.append(request.session_id, messages=msgs)
        elif kind == "text":
            rec, ids = self.m.append(request.session_id, text=request.text)
        elif kind == "tokens":
            rec, ids = self.m.append(request.session_id, tokens=list(request.tokens.ids))
        else:
            raise ValueError("empty append: set one of messages, text or tokens")
        return pb.AppendResponse(session=self._view(rec.id), token_ids=ids)

    def Generate(self, request, context):
        params = GenerateParams(
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=tuple(request.stop),
            seed=request.seed,
            commit=request.commit,
            prefix=request.prefix,
        )
        try:
            for chunk in self.m.generate(request.session_id, params, cancelled=lambda: not context.is_active()):
                msg = pb.GenerateChunk(text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason)
                if chunk.record is not None:
                    msg.session.CopyFrom(self._view(chunk.record.id))
                yield msg
        except Exception as exc:
            _abort(context, exc)

    @_unary
    def Resume(self, request, context):
        return _session_pb(self.m.resume(request.session_id))

    @_unary
    def GetSession(self, request, context):
        return self._view(request.session_id)

    @_unary
    def ListSessions(self, request, context):
        views, token = self.m.list(after=request.page_token, limit=request.page_size,
                                   labels=dict(request.labels))
        return pb.ListSessionsResponse(sessions=[_session_pb(v) for v in views], next_page_token=token)

    @_unary
    def ForkSession(self, request, context):
        rec = self.m.fork(request.session_id, request.new_session_id, dict(request.labels))
        return self._view(rec.id)

    @_unary
    def DeleteSession(self, request, context):
        self.m.delete(request.session_id)
        return pb.DeleteSessionResponse(deleted=True)

    @_unary
    def GetStats(self, request, context):
        c = self.m.counters
        n, nbytes = self.m.resident()
        return pb.Stats(
            model=self.m.model.name,
            model_fingerprint=self.m.model.fingerprint,
            model_tokens_processed=c.model_tokens_processed,
            tokens_appended=c.tokens_appended,
            tokens_generated=c.tokens_generated,
            resumes=c.resumes,
            sessions_resident=n,
            bytes_resident=nbytes,
        )


def create_server(address: str, *, data_dir: str | Path, model: LoadedModel | str | None = None,
                  device: str = "cpu", max_workers: int = 8, **manager_options) -> tuple[grpc.Server, int]:
    """Build (not start) a server bound to `address` ('host:port', port 0 picks one).

    Returns (server, port). The server carries `.memsvc_manager` and
    `.memsvc_store` for the caller that owns it (close the store after stop).
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    store = Store(data_dir)
    manager = SessionManager(store, loaded, **manager_options)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memsvc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    pb_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(manager), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        store.close()
        raise OSError(f"could not bind {address}")
    server.memsvc_port = port
    server.memsvc_manager = manager
    server.memsvc_store = store
    server.memsvc_health = health_servicer
    return server, port


def serve(host: str, port: int, *, data_dir: str | Path, model: str | None = None, device: str = "cpu",
          **manager_options) -> None:
    """Serve until SIGTERM or SIGINT; in-flight calls get a grace period, then the store closes."""
    server, bound = create_server(f"{host}:{port}", data_dir=data_dir, model=model, device=device,
                                  **manager_options)
    stop = threading.Event()

    def _on_signal(signum, _frame):
        log.info("signal %s: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    m = server.memsvc_manager.model
    print(f"memsvc: serving {m.name} ({m.short_fingerprint}) on {host}:{bound}, data dir {data_dir}",
          file=sys.stdout, flush=True)
    stop.wait()
    server.memsvc_health.enter_graceful_shutdown()
    server.stop(grace=5).wait()
    server.memsvc_store.close()
    print("memsvc: stopped", flush=True)
