"""MemoryService over a SessionManager: one method per RPC, each turning a request into manager calls and
the result into a reply (the plumbing around them: memsvc.server.calls)."""
from __future__ import annotations

import contextlib
import time
import uuid

from memsvc.proto import memsvc_pb2 as pb

from ..auth import KeyRing, Tenant
from ..errors import DataLoss, InvalidArgument
from ..limits import LimitExceeded, Limits, Quotas
from ..metrics import Metrics
from ..sessions import GenerateParams, SessionManager
from .calls import Plumbing, _Call, _session_pb


class _TokenClock:
    """A Generate's time to first token and its gaps between tokens, into the metrics' histograms."""

    def __init__(self, metrics: Metrics | None):
        self.metrics = metrics
        self.last = time.perf_counter()  # the call's start, then the last token's time
        self.first = True

    def tokens(self, n: int) -> None:
        if self.metrics is None or n == 0:
            return
        now = time.perf_counter()
        if self.first:
            self.metrics.first_token.observe(now - self.last)
            self.first = False
        else:
            self.metrics.inter_token.observe((now - self.last) / n)
        self.last = now


class MemoryServicer(Plumbing):
    """MemoryService over a SessionManager. `handler()` is what the gRPC server registers."""

    def __init__(self, manager: SessionManager, *, keys: KeyRing | None = None, limits: Limits | None = None,
                 metrics: Metrics | None = None):
        self.m = manager
        self.keys = keys  # None: auth off
        self.limits = limits or Limits()
        self.metrics = metrics
        self.quotas = Quotas(self.limits, self._scan)
        manager.on_expire = lambda rec: self.quotas.forget(rec.id.split(":", 1)[0] if keys is not None else "")

    # ---- MemoryService -----------------------------------------------------------------

    def _view(self, tenant: Tenant, inner_id: str) -> pb.Session:
        return _session_pb(self.m.view(inner_id), tenant)

    def CreateSession(self, request, context, call: _Call):
        t = call.tenant
        call.session = request.session_id or uuid.uuid4().hex
        inner = t.inner(call.session)
        with self.quotas.hold(t.name, sessions=1):
            rec = self.m.create(inner, request.policy, dict(request.labels), request.ttl_seconds)
            call.landed = True
            self.quotas.settle(t.name, sessions=1, nbytes=rec.stored_bytes)
        return self._view(t, rec.id)

    def Append(self, request, context, call: _Call):
        t = call.tenant
        call.session = request.session_id
        inner = t.inner(request.session_id)
        kind = request.WhichOneof("content")
        lim = self.limits.max_append_tokens
        if kind == "tokens" and lim and len(request.tokens.ids) > lim:
            raise LimitExceeded("max_append_tokens",
                                f"this Append has {len(request.tokens.ids)} tokens, over the limit of {lim} "
                                f"tokens per Append (max_append_tokens); split it into smaller Appends")
        before: dict = {}
        with contextlib.ExitStack() as stack:
            admit = self._admitter(call, context, stack, before, generate=False)
            if kind == "messages":
                content = {"messages": [{"role": m.role, "content": m.content} for m in request.messages.messages]}
            elif kind == "text":
                content = {"text": request.text}
            elif kind == "tokens":
                content = {"tokens": list(request.tokens.ids)}
            else:
                raise InvalidArgument("empty append: set one of messages, text or tokens")
            rec, ids = self.m.append(inner, admit=admit, **content)
            call.landed = True
            self.quotas.settle(t.name, nbytes=rec.stored_bytes - before.get("bytes", rec.stored_bytes))
        call.tokens_in = len(ids)
        return pb.AppendResponse(session=self._view(t, rec.id), token_ids=ids)

    def Generate(self, request, context, call: _Call):
        t = call.tenant
        call.session = request.session_id
        inner = t.inner(request.session_id)
        params = GenerateParams(
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=tuple(request.stop),
            seed=request.seed,
            commit=request.commit,
            prefix=request.prefix,
        )
        call.tokens_out = 0
        before: dict = {}
        clock = _TokenClock(self.metrics)
        with contextlib.ExitStack() as stack:
            admit = self._admitter(call, context, stack, before, generate=True)
            for chunk in self.m.generate(inner, params, cancelled=lambda: not context.is_active(), admit=admit):
                call.tokens_out += len(chunk.token_ids)
                clock.tokens(len(chunk.token_ids))
                msg = pb.GenerateChunk(text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason)
                if chunk.record is not None:
                    call.landed = params.commit  # the reply is stored by now
                    call.finish = chunk.finish_reason
                    if "bytes" in before:
                        self.quotas.settle(t.name, nbytes=chunk.record.stored_bytes - before["bytes"])
                    msg.session.CopyFrom(self._view(t, chunk.record.id))
                yield msg

    def Resume(self, request, context, call: _Call):
        call.session = request.session_id
        return _session_pb(self.m.resume(call.tenant.inner(request.session_id)), call.tenant)

    def GetSession(self, request, context, call: _Call):
        call.session = request.session_id
        return self._view(call.tenant, call.tenant.inner(request.session_id))

    def ListSessions(self, request, context, call: _Call):
        t = call.tenant
        if not t.name:
            after = request.page_token
        elif request.page_token:
            after = t.inner(request.page_token, "page_token")
        else:
            after = t.prefix  # every id of the tenant sorts after its bare prefix
        views, damaged, token = self.m.list(after=after, limit=request.page_size, labels=dict(request.labels))
        own, bad = views, damaged
        if t.name:  # a tenant's ids are contiguous in id order: anything not its own comes after them all
            own = [v for v in views if t.owns(v.record.id)]
            bad = [d for d in damaged if t.owns(d.id)]
            if len(own) < len(views) or len(bad) < len(damaged):
                token = ""
        return pb.ListSessionsResponse(
            sessions=[_session_pb(v, t) for v in own], next_page_token=t.outer(token) if token else "",
            damaged=[pb.DamagedSession(id=t.outer(d.id), reason=t.scrub(d.reason)) for d in bad])

    def ForkSession(self, request, context, call: _Call):
        t = call.tenant
        call.session = request.session_id
        src = t.inner(request.session_id)
        dst = t.inner(request.new_session_id or uuid.uuid4().hex, "new session id")
        size = self.m.view(src).record.stored_bytes if self.limits.has_quotas else 0
        with self.quotas.hold(t.name, sessions=1, nbytes=size):
            rec = self.m.fork(src, dst, dict(request.labels))
            call.landed = True
            self.quotas.settle(t.name, sessions=1, nbytes=rec.stored_bytes)
        return self._view(t, rec.id)

    def DeleteSession(self, request, context, call: _Call):
        t = call.tenant
        call.session = request.session_id
        inner = t.inner(request.session_id)
        size = 0
        if self.limits.has_quotas:
            try:
                size = self.m.view(inner).record.stored_bytes
            except DataLoss:  # a damaged record can still be deleted; the quota scan counted it as 0 bytes
                size = 0
        self.m.delete(inner)
        call.landed = True
        self.quotas.settle(t.name, sessions=-1, nbytes=-size)
        return pb.DeleteSessionResponse(deleted=True)

    def GetStats(self, request, context, call: _Call):
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
            session_loads=c.loads,
            sessions_unloaded=c.unloads,
            resident_budget=self.m.resident_budget,
            repairs=c.repairs,
            blocks_repaired=c.blocks_repaired,
            kv_entries_written=c.kv_entries_written,
            kv_bytes_written=c.kv_bytes_written,
        )


