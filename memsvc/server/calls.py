"""The plumbing around every MemoryService call: authentication, request parsing, status codes, the metric
sample and the log line (a mixin of `MemoryServicer`), and what one call did (`_Call`).

The servicer is the only place that turns domain errors into gRPC status codes: a ServiceError names its
code; a ValueError is bad input (INVALID_ARGUMENT); the store unreachable is UNAVAILABLE; a session another
replica serves (a lease held or lost) ABORTED; anything else is INTERNAL and logged. An ABORTED or UNAVAILABLE
status also carries trailing metadata for clients (memsvc.proto.trailers): the replica that serves the session
and its address, and whether the call changed nothing stored (retry-safe). A call is retry-safe when it failed
with nothing written: refused before any write (a lease held elsewhere, the session busy, the database
unreachable), or its commit rolled back (a lost lease); not when its write landed (`_Call.landed`, set once the
manager's write returned) or may have (the database lost at COMMIT: OutcomeUnknown).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from memsvc.proto import memsvc_pb2 as pb
from memsvc.proto import trailers
from memsvc.store.errors import CorruptRecord, LeaseHeld, LeaseLost, OutcomeUnknown, StoreUnavailable

from ..auth import Tenant, bearer_key
from ..errors import Aborted, Cancelled, InvalidArgument, ServiceError, Unavailable
from ..limits import LimitExceeded
from ..logs import log_rpc
from ..sessions import SessionView

log = logging.getLogger("memsvc.server")
SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]
SERVICE_NAME = SERVICE.full_name
SCAN_PAGE = 1000
WIRE_SLACK = 64 << 20  # bytes past --max-request-bytes that gRPC still receives, for the check in _parse to answer


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


@dataclass
class _Call:
    """What one RPC did, for its metric sample and log line."""

    method: str
    tenant: Tenant = field(default_factory=Tenant)
    session: str = ""
    tokens_in: int | None = None
    tokens_out: int | None = None
    finish: str = ""
    limit: str = ""
    landed: bool = False  # its write is stored: a failure after it must not be called retry-safe


def _session_pb(view: SessionView, tenant: Tenant) -> pb.Session:
    rec = view.record
    return pb.Session(
        id=tenant.outer(rec.id),
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
        resident_bytes_per_token=view.resident_bytes / rec.n_tokens if rec.n_tokens else 0.0,
        stored_bytes_per_token=rec.stored_bytes / rec.n_tokens if rec.n_tokens else 0.0,
        fp16_bytes_per_token=view.fp16_bytes_per_token,
        tier_tokens=view.tier_tokens,
        ttl_seconds=view.ttl,
        expires_unix=view.expires if math.isfinite(view.expires) else 0.0,
    )


def _metadata_value(value: str | None) -> str:
    """value if gRPC can carry it as a metadata value (printable ASCII), else ""."""
    return value if value and all(" " <= ch <= "~" for ch in value) else ""


def _trailers(exc: BaseException, call: _Call, code: grpc.StatusCode, me: str) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a failed call (memsvc.proto.trailers); me: this replica's lease owner name."""
    if code not in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE):
        return ()
    out = []
    owner = getattr(exc, "owner", None) if isinstance(exc, (Aborted, LeaseHeld, LeaseLost)) else None
    owner = _metadata_value(owner)
    if owner and owner != me:
        out.append((trailers.OWNER, owner))
        address = _metadata_value(getattr(exc, "address", ""))
        if address:
            out.append((trailers.OWNER_ADDRESS, address))
    nothing_written = isinstance(exc, (StoreUnavailable, LeaseHeld, LeaseLost, Aborted, Unavailable)) \
        and not isinstance(exc, OutcomeUnknown)
    if nothing_written and not call.landed:
        out.append((trailers.RETRY_SAFE, "1"))
    return tuple(out)


def _stopped(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The code of a call that stopped early: DEADLINE_EXCEEDED once its deadline passed, else CANCELLED."""
    try:
        remaining = context.time_remaining()
    except Exception:
        remaining = None
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0.001 \
        else grpc.StatusCode.CANCELLED


class Plumbing:
    # ---- plumbing ------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        table = {}
        for method in SERVICE.methods:
            req_cls = getattr(pb, method.input_type.name)
            resp_cls = getattr(pb, method.output_type.name)
            impl = getattr(self, method.name)
            if method.server_streaming:
                table[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._streaming(method.name, req_cls, impl), response_serializer=resp_cls.SerializeToString)
            else:
                table[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(method.name, req_cls, impl), response_serializer=resp_cls.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, table)

    def _authenticate(self, context: grpc.ServicerContext) -> Tenant:
        if self.keys is None:
            return Tenant()
        key = bearer_key(context.invocation_metadata())
        tenant = self.keys.tenant_for(key) if key else None
        if tenant is None:
            if self.metrics:
                self.metrics.auth_failures.inc()
            if key is None:
                raise Unauthenticated("this server needs an API key: send the metadata 'authorization: Bearer <key>'")
            raise Unauthenticated("the API key is not valid")
        return Tenant(tenant)

    def _parse(self, req_cls, raw: bytes, context: grpc.ServicerContext):
        limit = self.limits.max_request_bytes
        if len(raw) > limit:  # gRPC lets WIRE_SLACK more through, so that this message, not its own, answers
            raise LimitExceeded(
                "max_request_bytes",
                f"this {req_cls.__name__} is {len(raw)} bytes, over the limit of {limit} bytes per request message "
                f"(the server's --max-request-bytes); split it into smaller calls, e.g. Appends of fewer messages "
                f"or tokens")
        try:
            request = req_cls.FromString(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise InvalidArgument(f"malformed {req_cls.__name__}: {exc}") from None
        if not context.is_active():
            raise Cancelled("the call was cancelled or its deadline passed before it started")
        return request

    def _status(self, exc: BaseException, call: _Call, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, LimitExceeded):
            call.limit = exc.limit
            if self.metrics:
                self.metrics.quota_refusals.labels(exc.limit).inc()
        if isinstance(exc, Cancelled):
            code = _stopped(context)
        elif isinstance(exc, CorruptRecord):  # damage met on a path that did not say so itself (a ValueError too)
            code = grpc.StatusCode.DATA_LOSS
        elif isinstance(exc, ServiceError):
            code = getattr(grpc.StatusCode, exc.code)
        elif isinstance(exc, StoreUnavailable):  # the database is down: nothing changed, a retry may succeed
            code = grpc.StatusCode.UNAVAILABLE
        elif isinstance(exc, (LeaseLost, LeaseHeld)):  # another replica serves the session (named in the message)
            code = grpc.StatusCode.ABORTED
        elif isinstance(exc, ValueError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        else:
            log.error("internal error in %s", call.method, exc_info=exc)
            code = grpc.StatusCode.INTERNAL
        return code, call.tenant.scrub(str(exc) or type(exc).__name__)

    def _finish(self, call: _Call, code: grpc.StatusCode, started: float, context, message: str) -> None:
        seconds = time.perf_counter() - started
        if self.metrics:
            self.metrics.observe(call.method, code.name, seconds)
            if call.method == "Generate" and code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.metrics.generate_cancelled.inc()
        try:
            peer = context.peer()
        except Exception:
            peer = None
        quiet = code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
        log_rpc(method=call.method, code=code.name, ms=round(seconds * 1000, 3), tenant=call.tenant.name,
                session=call.session, peer=peer, tokens_in=call.tokens_in, tokens_out=call.tokens_out,
                finish=call.finish, limit=call.limit, error=None if quiet else message[:500])

    def _unary(self, name: str, req_cls, impl):
        def run(raw: bytes, context: grpc.ServicerContext):
            call, started = _Call(name), time.perf_counter()
            try:
                call.tenant = self._authenticate(context)
                response = impl(self._parse(req_cls, raw, context), context, call)
            except Exception as exc:
                code, message = self._status(exc, call, context)
                failure = exc
            else:
                self._finish(call, grpc.StatusCode.OK, started, context, "")
                return response
            self._finish(call, code, started, context, message)
            context.set_trailing_metadata(_trailers(failure, call, code, self.m.leases.owner))
            context.abort(code, message)

        return run

    def _streaming(self, name: str, req_cls, impl):
        def run(raw: bytes, context: grpc.ServicerContext):
            call, started = _Call(name), time.perf_counter()
            code, message, failure = grpc.StatusCode.OK, "", None
            try:
                call.tenant = self._authenticate(context)
                yield from impl(self._parse(req_cls, raw, context), context, call)
            except GeneratorExit:  # gRPC dropped the stream: the client went away or the deadline passed
                code = _stopped(context)
                message = "the call was cancelled" if code == grpc.StatusCode.CANCELLED else "the deadline passed"
                self._finish(call, code, started, context, message)
                raise
            except Exception as exc:
                code, message = self._status(exc, call, context)
                failure = exc
            self._finish(call, code, started, context, message)
            if code != grpc.StatusCode.OK:
                context.set_trailing_metadata(_trailers(failure, call, code, self.m.leases.owner))
                context.abort(code, message)

        return run

    # ---- limits ----------------------------------------------------------------------

    def _scan(self, tenant: str) -> tuple[int, int]:
        """(sessions, stored bytes) of a tenant, read from the store; a damaged record counts as a session of
        0 bytes (deleting it frees that much of the quota)."""
        prefix = Tenant(tenant).prefix
        after, n, nbytes = prefix, 0, 0
        while True:
            views, damaged, token = self.m.list(after=after, limit=SCAN_PAGE)
            for sid, size in sorted([(v.record.id, v.record.stored_bytes) for v in views]
                                    + [(d.id, 0) for d in damaged]):
                if not sid.startswith(prefix):
                    return n, nbytes
                n += 1
                nbytes += size
            if not token:
                return n, nbytes
            after = token

    def _bytes_per_token(self, rec) -> int:
        if rec.n_tokens >= 64:  # this session's own figure
            return math.ceil(rec.stored_bytes / rec.n_tokens)
        m = self.m.model  # keys and values at the model's precision, plus the token id
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.dtype.itemsize + 4

    def _admitter(self, call: _Call, context, stack: contextlib.ExitStack, before: dict, *, generate: bool):
        """The admit(record, n) hook of one Append or committing Generate."""
        lim = self.limits

        def admit(rec, n: int) -> None:
            if not context.is_active():  # it may have waited for the session's lock: don't start late work
                raise Cancelled("the call was cancelled or its deadline passed before the model ran")
            sid = call.tenant.outer(rec.id)
            if not generate and lim.max_append_tokens and n > lim.max_append_tokens:
                raise LimitExceeded("max_append_tokens",
                                    f"this Append has {n} tokens, over the limit of {lim.max_append_tokens} "
                                    f"tokens per Append (max_append_tokens); split it into smaller Appends")
            if lim.max_session_tokens and rec.n_tokens + n > lim.max_session_tokens:
                what = (f"a committed reply may add up to {n} tokens" if generate
                        else f"this Append adds {n} tokens")
                hint = ("ask for fewer max_new_tokens or generate without commit" if generate
                        else "start a new session or fork a shorter one")
                raise LimitExceeded("max_session_tokens",
                                    f"session {sid!r} holds {rec.n_tokens} tokens and {what}, over the limit of "
                                    f"{lim.max_session_tokens} tokens per session (max_session_tokens); {hint}")
            before["bytes"] = rec.stored_bytes
            stack.enter_context(self.quotas.hold(call.tenant.name, nbytes=n * self._bytes_per_token(rec)))

        return admit

