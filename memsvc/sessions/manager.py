"""The session manager: one model, many sessions, each a KV cache kept in the store.

A session is its token ids (the ground truth), its chat messages, and the KV
cache of every token but the last: the last token is *pending* and is fed to
the model with the next call (an Append's first chunk or a Generate's prompt),
so no token is ever run through the model twice and no logits need storing.

Every call that changes a session computes in memory first, then writes the
new token ids, the touched KV blocks and the record in one store transaction;
if anything fails the in-memory cache is cropped back, so a failed call leaves
both memory and disk as they were. Calls on one session take turns in arrival order
(memsvc.sessions.hold: one holds the session, a call that would wait past `hold_wait`
seconds is refused with ABORTED); different sessions run concurrently over the shared model.

Sessions stay in memory between calls, within a byte budget: once the resident
sessions hold more than `resident_budget` bytes, the least recently used idle
ones (no call holds them) are dropped. Their state is already in the
store, so nothing is lost; the next call on such a session loads it again.
Each session's resident bytes and tier tokens are measured by the call that
holds it (after a load, a commit and at the end of every call); the
budget, views and metrics read those figures, never a cache another call is
changing.

Over a store shared by replicas (PostgreSQL), a session in memory is leased (memsvc.sessions.leases): the call
that loads it takes its lease (ABORTED while another replica holds one), commits carry the lease's fencing
epoch, and the lease is given up when the session leaves memory. An embedded store needs none.

Sessions expire after `ttl` seconds without a change (memsvc.sessions.expiry).
The write path of an Append is memsvc.sessions.turns, of a Generate memsvc.sessions.generate; what the manager
reports for metrics is memsvc.sessions.measures.

Knows the model, the cache and the store; knows nothing about gRPC.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from typing import Callable, Iterator

from safetensors import SafetensorError

from memsvc.cache import (Backing, CheckedEntries, DamagedBlock, KVShape, fit_policy, get_policy, load_cache, new_cache,
                          policy_config, record_policy, POLICY_CONFIG)
from memsvc.cache.tiered.blockcache import BlockCache
from memsvc.store.errors import CorruptRecord, SessionExists, SessionMissing
from memsvc.store.base import Damaged, Store
from memsvc.store.records import SessionRecord

from .. import chat
from ..errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from ..model import LoadedModel
from ..progress import Progress
from ..repair import Unrepairable, recorded_feeds, repair_session
from .expiry import Expiry
from .generate import Generation
from .hold import DEFAULT_HOLD_WAIT, Holds, SessionBusy
from .leases import Leases
from .steps import StepConfig, Steps
from .live import Counters, SessionView, _Live
from .measures import Measures
from .turns import Turns

log = logging.getLogger("memsvc.sessions")

DEFAULT_RESIDENT_BUDGET = 512 << 20
DEFAULT_BLOCK_CACHE = 256 << 20
DEFAULT_DECODED_CACHE = 256 << 20


class SessionManager(Turns, Generation, Expiry, Measures):
    """resident_budget: bytes of KV cache that idle sessions may keep in memory (0 = no limit).
    block_cache_bytes: bound of the one LRU of cold blocks read back from the store, shared by every
    tiered session (0 = none; blocks are then parsed again at each read).
    decoded_cache_bytes: bound of the one LRU of each tiered layer's recently decoded cold keys and values, shared
    by every session (0 = none: each read decodes every block it picks; with it, a call decodes only the blocks
    the layer's recent calls did not, such as a question's answer after the question, or a decode step after
    the one before). lease_seconds, lease_renew: leases on sessions in memory (memsvc.sessions.leases).
    steps: how the model's steps batch the calls of many sessions (memsvc.sessions.steps)."""

    def __init__(self, store: Store, model: LoadedModel, *, default_new_tokens: int = 256,
                 max_new_tokens: int = 4096, prefill_chunk: int = 512, block_cache_bytes: int = DEFAULT_BLOCK_CACHE,
                 resident_budget: int = DEFAULT_RESIDENT_BUDGET, ttl: float = 0.0, sweep_every: float = 60.0,
                 decoded_cache_bytes: int = DEFAULT_DECODED_CACHE, hold_wait: float = DEFAULT_HOLD_WAIT,
                 lease_seconds: float = 30.0, lease_renew: bool = True, steps: StepConfig | None = None):
        if prefill_chunk < 1 or max_new_tokens < 1 or default_new_tokens < 1:
            raise ValueError("prefill_chunk, max_new_tokens and default_new_tokens must be >= 1")
        for name, v in (("ttl", ttl), ("sweep_every", sweep_every)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0 (0 = off), got {v!r}")
        if not isinstance(resident_budget, int) or isinstance(resident_budget, bool) or resident_budget < 0:
            raise ValueError(f"resident_budget must be an integer >= 0 (bytes; 0 = no limit), got {resident_budget!r}")
        for name, v in (("block_cache_bytes", block_cache_bytes), ("decoded_cache_bytes", decoded_cache_bytes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (bytes; 0 = none), got {v!r}")
        self.store = store
        self.model = model
        self.default_new_tokens = min(default_new_tokens, max_new_tokens)
        self.max_new_tokens = max_new_tokens
        self.prefill_chunk = prefill_chunk
        self.steps = Steps(model, steps)  # every model call of a request runs in its steps, beside other sessions'
        # Cold blocks read back from the store, shared by all sessions. A session's blocks are keyed by
        # (session id, n), n new each time it is created or loaded, and dropped when it leaves memory:
        # a deleted, expired, recreated or offline-changed session can never meet stale blocks.
        self.block_cache = BlockCache(block_cache_bytes)
        self.decoded_cache = BlockCache(decoded_cache_bytes, fair=True) if decoded_cache_bytes else None  # keyed alike
        self._generation = itertools.count()
        self.resident_budget = resident_budget
        self.shape = KVShape.of(model)
        self.chat_format = chat.ChatFormat.of(model.tokenizer)
        self.counters = Counters()
        self._counter_lock = threading.Lock()
        self._live: OrderedDict[str, _Live] = OrderedDict()  # least recently used first
        self.holds = Holds(hold_wait)  # one call per session at a time
        self._global = threading.Lock()
        self.ttl = float(ttl)
        self.on_expire: Callable[[SessionRecord], None] | None = None  # told of each expired session deleted
        self.leases = Leases(store, lease_seconds, renew=lease_renew, resident=lambda: list(self._live))
        self._stop = threading.Event()
        if sweep_every:
            threading.Thread(target=self._sweep_loop, args=(float(sweep_every),), name="memsvc-ttl-sweep",
                             daemon=True).start()

    # ---- bookkeeping -------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        with self._counter_lock:
            for name, d in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + d)

    def _backing(self, sid: str) -> Backing:
        """Where sid's cache reads its stored entries; the shared caches, keyed by (sid, n), n new at each
        create or load: a deleted, expired, recreated or offline-changed session never meets stale entries."""
        return Backing(CheckedEntries(self.store, sid), block_cache=self.block_cache,
                       decoded_cache=self.decoded_cache, owner=(sid, next(self._generation)))

    def _check_model(self, rec: SessionRecord) -> None:
        if rec.model_fingerprint != self.model.fingerprint:
            raise FailedPrecondition(
                f"session {rec.id!r} was built for model {rec.model_name!r} (fingerprint "
                f"{rec.model_fingerprint[:12]}), but this server runs {self.model.name!r} (fingerprint "
                f"{self.model.short_fingerprint}); serve it with that model (memsvc serve --model ...)"
            )

    def _stored(self, sid: str) -> SessionRecord:
        try:
            rec = self.store.get(sid)
        except CorruptRecord as exc:
            raise DataLoss(f"the stored record of session {sid!r} is damaged: {exc}") from exc
        if rec is None:
            raise NotFound(f"no session {sid!r}")
        return rec

    def close(self) -> None:
        """Stop the ttl sweep, give the leases up (the store is the caller's)."""
        self._stop.set()
        self.leases.close()
        self.steps.close()

    def _load(self, sid: str) -> _Live:
        """The resident session, loading it from the store if needed (the caller holds it)."""
        with self._global:
            live = self._live.get(sid)
            if live is not None:
                self._live.move_to_end(sid)
        if live is not None and not self.leases.keep(sid):  # lost to another replica, or an unsure commit
            self._forget(sid)
            live = None
        rec = live.record if live is not None else self._stored(sid)
        if self._expired(rec) and self._try_expire(sid, locked=True):
            raise self._gone(sid)
        if live is not None:
            return live
        self._check_model(rec)
        epoch = self.leases.take(sid)  # Aborted, naming the owner, while another replica serves it
        rec = rec if epoch is None else self._stored(sid)  # read again under the lease: the last owner's turns
        try:
            policy = record_policy(rec)
        except ValueError as exc:
            raise DataLoss(f"session {sid!r} cannot be read back: {exc}") from exc
        try:
            tokens = self.store.tokens(sid)
        except CorruptRecord as exc:
            raise DataLoss(f"the token ids of session {sid!r} are damaged, and they are the ground truth its KV "
                           f"cache would be rebuilt from: the session cannot be repaired ({exc})") from exc
        kv_len = max(rec.n_tokens - 1, 0)
        try:
            kv = self._read_kv(policy, rec, kv_len)
        except (CorruptRecord, DamagedBlock, ValueError, KeyError, SafetensorError) as exc:
            # a damaged KV entry: rebuild it from the token ids, then read the session again
            rec = self._repair(sid, exc)
            try:
                kv = self._read_kv(policy, rec, kv_len)
            except (CorruptRecord, DamagedBlock, ValueError, KeyError, SafetensorError) as exc2:
                raise DataLoss(f"session {sid!r} cannot be read back, even after a repair: {exc2}") from exc2
        if len(tokens) != rec.n_tokens or kv.length != kv_len:
            raise DataLoss(
                f"session {sid!r} is inconsistent: record says {rec.n_tokens} tokens, "
                f"{len(tokens)} token ids and {kv.length} cached positions are stored"
            )
        live = _Live(rec, tokens, kv, recorded_feeds(rec) if kv_len else [], epoch=epoch)
        live.measure()
        with self._global:
            self._live[sid] = live
        self._count(loads=1)
        self._fit_budget()  # this session is held: room is made among the others
        return live

    def _read_kv(self, policy, rec: SessionRecord, kv_len: int):
        return load_cache(policy, self.shape, rec.layout, kv_len, self._backing(rec.id))

    def _repair(self, sid: str, seen: BaseException | None = None) -> SessionRecord:
        """Rebuild sid's damaged KV entries from its token ids and store them (the caller holds it; the
        session is not in memory). seen: the failure that sent us here. Returns the stored record;
        DataLoss when the session cannot be rebuilt."""
        log.warning("session %s: %s; rebuilding its KV cache from its token ids", sid, seen or "damaged KV entries")

        def progress(n: int) -> Progress:  # a line in the log every 10 s and at the end, with the time taken
            return Progress(f"session {sid}: repair", n, "tokens", line=log.info, every=10.0)

        try:
            done = repair_session(self.store, self.model, sid, prefill_chunk=self.prefill_chunk, force=True,
                                  progress=progress)
        except Unrepairable as exc:
            raise DataLoss(f"session {sid!r} is damaged and cannot be repaired: {exc}") from exc
        except CorruptRecord as exc:
            raise DataLoss(f"session {sid!r} is damaged and cannot be repaired: {exc}") from exc
        self._count(repairs=1, blocks_repaired=done.rewritten + done.dropped)
        log.warning("session %s: %s; rebuilt from its %d token ids in %.2f s, %d KV entries rewritten%s",
                    sid, seen or "damaged KV entries", done.tokens, done.seconds, done.rewritten,
                    "" if done.exact else " (every entry: the replay was not exact)")
        return done.record

    def _repair_after(self, sid: str, exc: DamagedBlock) -> None:
        """A call met a damaged block and was rolled back: drop the session from memory and repair it."""
        with self.holds.hold(sid, "a repair"):
            self._forget(sid)
            self._repair(sid, exc)

    @contextlib.contextmanager
    def _using(self, sid: str, what: str) -> Iterator[_Live]:
        """The session in memory, held by this call (what: e.g. "an append"); afterwards it is measured and the
        budget enforced."""
        with self.holds.hold(sid, what):
            live = self._load(sid)
            try:
                yield live
            finally:
                live.measure()
        self._fit_budget()

    def _forget(self, sid: str) -> _Live | None:
        """Drop a session from memory, and its blocks from the block cache (the caller holds it)."""
        with self._global:
            live = self._live.pop(sid, None)
        if live is not None:
            live.kv.close()
        self.leases.drop(sid)
        return live

    def _fit_budget(self) -> None:
        """Drop least recently used idle sessions until the resident ones fit the budget."""
        if not self.resident_budget:
            return
        with self._global:
            total = sum(live.resident_bytes for live in self._live.values())
            if total <= self.resident_budget:
                return
            order = list(self._live)
        for sid in order:
            if total <= self.resident_budget:
                return
            try:
                with self.holds.hold(sid, "an unload", wait=0):
                    live = self._forget(sid)
            except SessionBusy:
                continue  # a call is using it
            if live is not None:
                total -= live.resident_bytes
                self._count(unloads=1)

    # ---- API ---------------------------------------------------------------------

    def create(self, sid: str = "", policy: str = "", labels: dict[str, str] | None = None,
               ttl: float = 0.0) -> SessionRecord:
        """ttl: seconds without a change after which this session expires (0: the manager's ttl)."""
        try:
            pol = fit_policy(get_policy(policy), self.shape.rope is not None)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl >= 0):
            raise InvalidArgument(f"ttl_seconds must be a finite number >= 0 (0 = the server's --ttl), got {ttl!r}")
        sid = sid or uuid.uuid4().hex
        now = time.time()
        kv = new_cache(pol, self.shape)
        try:
            rec = SessionRecord(
                id=sid, model_name=self.model.name, model_fingerprint=self.model.fingerprint, policy=pol.name,
                created=now, updated=now, labels=dict(labels or {}), messages=[], ttl=ttl,
                layout={**kv.layout(), POLICY_CONFIG: policy_config(pol)},
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        with self.holds.hold(sid, "a create"):
            try:
                return self.store.create(rec)
            except SessionExists as exc:
                raise AlreadyExists(f"session {sid!r} already exists") from exc

    def view(self, sid: str) -> SessionView:
        live = self._live.get(sid)
        rec = live.record if live is not None else self._stored(sid)
        if self._expired(rec) and self._try_expire(sid):
            raise self._gone(sid)
        return self._view(rec, live)

    def _view(self, rec: SessionRecord, live: _Live | None) -> SessionView:
        if live is not None:
            return SessionView(live.record, True, live.resident_bytes, live.tier_tokens, self.ttl)
        return SessionView(rec, False, default_ttl=self.ttl)

    def list(self, *, after: str = "", limit: int = 100, labels: dict[str, str] | None = None
             ) -> tuple[list[SessionView], list[Damaged], str]:
        """(views, damaged, next page's `after` or ""): a session whose record is damaged does not fail the
        listing; it is named in `damaged` (id, what failed), in id order, and counts in `limit`."""
        if not 0 <= limit <= 1000:
            raise InvalidArgument(f"page_size must be between 0 and 1000, got {limit}")
        limit = limit or 100
        while True:  # expired sessions go first, so that pages stay full
            page = self.store.list_page(after=after, limit=limit + 1, labels=labels or None)
            if not sum(self._try_expire(rec.id) for rec in page.records if self._expired(rec)):
                break
        ids = sorted([r.id for r in page.records] + [d.id for d in page.damaged])
        cut = ids[limit - 1] if len(ids) > limit else None  # more to come: this page ends at cut
        views = [self._view(rec, self._live.get(rec.id)) for rec in page.records if cut is None or rec.id <= cut]
        damaged = [d for d in page.damaged if cut is None or d.id <= cut]
        return views, damaged, cut or ""

    def resume(self, sid: str) -> SessionView:
        with self._using(sid, "a resume") as live:
            self._count(resumes=1)
        return self._view(live.record, live)

    def fork(self, sid: str, new_sid: str = "", labels: dict[str, str] | None = None) -> SessionRecord:
        new_sid = new_sid or uuid.uuid4().hex
        with self.holds.hold(sid, "a fork"):
            src = self._stored(sid)
            if self._expired(src) and self._try_expire(sid, locked=True):
                raise self._gone(sid)
            now = time.time()
            try:
                rec = dataclasses.replace(src, id=new_sid, created=now, updated=now,
                                          labels=dict(labels) if labels else dict(src.labels))
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc
            try:
                return self.store.fork(sid, rec)
            except CorruptRecord as exc:
                raise DataLoss(f"session {sid!r} cannot be forked: {exc}") from exc
            except SessionExists as exc:
                raise AlreadyExists(f"session {new_sid!r} already exists") from exc
            except SessionMissing as exc:
                raise NotFound(f"no session {sid!r}") from exc

    def delete(self, sid: str) -> None:
        with self.holds.hold(sid, "a delete"):
            if not self.store.delete(sid):
                raise NotFound(f"no session {sid!r}")
            self._forget(sid)
