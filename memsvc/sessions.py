"""The session manager: one model, many sessions, each a KV cache kept in the store.

A session is its token ids (the ground truth), its chat messages, and the KV
cache of every token but the last: the last token is *pending* and is fed to
the model with the next call (an Append's first chunk or a Generate's prompt),
so no token is ever run through the model twice and no logits need storing.

Every call that changes a session computes in memory first, then writes the
new token ids, the touched KV blocks and the record in one store transaction;
if anything fails the in-memory cache is cropped back, so a failed call leaves
both memory and disk as they were. Calls on one session are serialized by a
per-session lock; different sessions run concurrently over the shared model.

Sessions stay in memory between calls, within a byte budget: once the resident
sessions hold more than `resident_budget` bytes, the least recently used idle
ones (no call holds their lock) are dropped. Their state is already in the
store, so nothing is lost; the next call on such a session loads it again.
Each session's resident bytes and tier tokens are measured by the thread that
holds its lock (after a load, a commit and at the end of every call); the
budget, views and metrics read those figures, never a cache another call is
changing.

Sessions expire after `ttl` seconds without a change (`updated`; a session's
own ttl, set at create, overrides the manager's; 0 = never). An expired session
is deleted when a call, a view or a listing meets it, and by a sweep every
`sweep_every` seconds; the store checks the expiry again inside its delete
transaction, so a commit that just refreshed the session wins. A session a call
is using is left for later.

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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError

from memsvc.store.errors import CorruptRecord, SessionExists, SessionMissing, StoreError
from memsvc.store.base import Store
from memsvc.store.records import SessionRecord

from . import chat
from .errors import AlreadyExists, Cancelled, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from .cache import use_memsvc_attention
from .cache.cold import BlockCache, ColdStore
from .cache.session import TierKV
from .kvcache import SessionKV, dtype_name
from .model import LoadedModel
from .policies import POLICY_CONFIG, get_policy, policy_config, record_policy
from .repair import FEEDS, CheckedBlocks, DamagedBlock, Unrepairable, recorded_feeds, repair_session, rle

MAX_STOP_STRINGS = 16
_REPAIR_TRIES = 3  # a call that meets damaged blocks is repaired and run again at most this often
log = logging.getLogger("memsvc.sessions")

# A caller's admission check: admit(record, n) runs under the session's lock before
# the model reads anything, with n the most tokens the call can add to the session;
# it raises (e.g. ResourceExhausted) to refuse, and then nothing has changed.
Admit = Callable[[SessionRecord, int], None]


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int = 0  # 0 = the manager's default
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.0  # 0 or 1 = no nucleus truncation
    stop: tuple[str, ...] = ()
    seed: int = 0
    commit: bool = False
    prefix: str = ""  # text the reply starts with (fed, not generated); part of a committed reply


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    record: SessionRecord | None = None


@dataclass
class Counters:
    model_tokens_processed: int = 0
    tokens_appended: int = 0
    tokens_generated: int = 0
    resumes: int = 0  # Resume calls
    loads: int = 0  # sessions read back from the store into memory (by any call)
    unloads: int = 0  # idle sessions dropped from memory to keep within the resident budget
    expired: int = 0  # sessions deleted because their ttl passed
    repairs: int = 0  # sessions rebuilt from their token ids because stored KV entries were damaged
    blocks_repaired: int = 0  # KV entries those repairs wrote again
    kv_entries_written: int = 0  # KV entries commits wrote (new cold blocks, changed layer state parts)
    kv_bytes_written: int = 0  # their payload bytes, before compression


@dataclass
class _Live:
    record: SessionRecord
    tokens: list[int]
    kv: SessionKV | TierKV  # holds every token but the last (the pending one)
    feeds: list[int] | None = None  # the model calls kv took (tokens each, 0 = end_prompt); None: not known
    resident_bytes: int = 0  # kv's, as last measured under the session's lock
    tier_tokens: dict[str, float] = field(default_factory=dict)
    tier_bytes: dict[str, int] = field(default_factory=dict)

    def measure(self) -> None:
        """Caller holds the session's lock."""
        self.resident_bytes = self.kv.resident_bytes()
        self.tier_tokens = self.kv.tier_tokens()
        self.tier_bytes = self.kv.tier_bytes()


def _close_cold(kv) -> None:
    """Drop a tiered session's blocks from the shared block cache (it left memory or is gone)."""
    if isinstance(kv, TierKV):
        kv.cache.cold.close()


@dataclass
class SessionView:
    record: SessionRecord
    resident: bool
    resident_bytes: int = 0
    tier_tokens: dict[str, float] = field(default_factory=dict)
    default_ttl: float = 0.0  # the manager's ttl, for sessions without their own

    @property
    def ttl(self) -> float:
        """Seconds without a change after which the session expires (0 = never)."""
        return self.record.ttl or self.default_ttl

    @property
    def expires(self) -> float:
        """Unix time at which the session expires (infinity = never)."""
        return self.record.expires(self.default_ttl)

    @property
    def fp16_bytes_per_token(self) -> int:
        lay = self.record.layout
        return 2 * 2 * lay.get("layers", 0) * lay.get("kv_heads", 0) * lay.get("head_dim", 0)


DEFAULT_RESIDENT_BUDGET = 512 << 20
DEFAULT_BLOCK_CACHE = 256 << 20
DEFAULT_DECODED_CACHE = 256 << 20


class SessionManager:
    """resident_budget: bytes of KV cache that idle sessions may keep in memory (0 = no limit).
    block_cache_bytes: bound of the one LRU of cold blocks read back from the store, shared by every
    tiered session (0 = none; blocks are then parsed again at each read).
    decoded_cache_bytes: bound of the one LRU of each tiered layer's last decoded cold keys and values, shared
    by every session (0 = none: each read decodes every block it picks; with it, a call decodes only the blocks
    the layer's previous call did not, such as a question's answer after the question, or a decode step after
    the one before)."""

    def __init__(self, store: Store, model: LoadedModel, *, default_new_tokens: int = 256,
                 max_new_tokens: int = 4096, prefill_chunk: int = 512, block_cache_bytes: int = DEFAULT_BLOCK_CACHE,
                 resident_budget: int = DEFAULT_RESIDENT_BUDGET, ttl: float = 0.0, sweep_every: float = 60.0,
                 decoded_cache_bytes: int = DEFAULT_DECODED_CACHE):
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
        # Cold blocks read back from the store, shared by all sessions. A session's blocks are keyed by
        # (session id, n), n new each time it is created or loaded, and dropped when it leaves memory:
        # a deleted, expired, recreated or offline-changed session can never meet stale blocks.
        self.block_cache = BlockCache(block_cache_bytes)
        self.decoded_cache = BlockCache(decoded_cache_bytes, fair=True) if decoded_cache_bytes else None  # keyed alike
        self._generation = itertools.count()
        self.resident_budget = resident_budget
        use_memsvc_attention(model.model)  # tiered sessions attend through it; plain ones get SDPA unchanged
        self.chat_format = chat.ChatFormat.of(model.tokenizer)
        self.counters = Counters()
        self._counter_lock = threading.Lock()
        self._live: OrderedDict[str, _Live] = OrderedDict()  # least recently used first
        self._locks: dict[str, threading.Lock] = {}
        self._global = threading.Lock()
        self.ttl = float(ttl)
        self.on_expire: Callable[[SessionRecord], None] | None = None  # told of each expired session deleted
        self._stop = threading.Event()
        if sweep_every:
            threading.Thread(target=self._sweep_loop, args=(float(sweep_every),), name="memsvc-ttl-sweep",
                             daemon=True).start()

    # ---- bookkeeping -------------------------------------------------------------

    def _lock(self, sid: str) -> threading.Lock:
        with self._global:
            return self._locks.setdefault(sid, threading.Lock())

    def _count(self, **deltas: int) -> None:
        with self._counter_lock:
            for name, d in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + d)

    def _new_kv(self, policy, sid: str):
        m = self.model
        if policy.name == "full":
            return SessionKV(m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, m.device, policy.block_tokens)
        return TierKV(policy, m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, m.device, self._cold(sid))

    def _cold(self, sid: str) -> ColdStore:
        return ColdStore(CheckedBlocks(self.store, sid), cache=self.block_cache, owner=(sid, next(self._generation)),
                         decoded=self.decoded_cache)

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

    # ---- expiry ------------------------------------------------------------------

    def _expired(self, rec: SessionRecord) -> bool:
        return rec.expires(self.ttl) <= time.time()

    def _try_expire(self, sid: str, *, locked: bool = False) -> bool:
        """Delete sid if it has expired; True when it was. Without `locked` (the caller holds sid's
        lock) a session that a call is using is left alone."""
        lock = self._lock(sid)
        if not locked and not lock.acquire(blocking=False):
            return False
        try:
            try:
                rec = self.store.get(sid)
            except CorruptRecord:
                return False
            if rec is None or not self.store.delete(sid, expired_at=time.time(), default_ttl=self.ttl):
                return False
            self._forget(sid)
        finally:
            if not locked:
                lock.release()
        self._count(expired=1)
        if self.on_expire is not None:
            self.on_expire(rec)
        return True

    def _gone(self, sid: str) -> NotFound:
        return NotFound(f"no session {sid!r} (it expired and was deleted)")

    def sweep(self) -> int:
        """Delete every expired session that no call is using; returns how many went."""
        return sum(self._try_expire(sid) for sid in self.store.expired(time.time(), self.ttl))

    def _sweep_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.sweep()
            except StoreError as exc:
                if self.store.closed:
                    return  # the server stopped
                log.warning("ttl sweep failed: %s", exc)
            except Exception:
                log.exception("ttl sweep failed")

    def close(self) -> None:
        """Stop the ttl sweep (the store is the caller's)."""
        self._stop.set()

    def _load(self, sid: str) -> _Live:
        """The resident session, loading it from the store if needed (caller holds its lock)."""
        with self._global:
            live = self._live.get(sid)
            if live is not None:
                self._live.move_to_end(sid)
        rec = live.record if live is not None else self._stored(sid)
        if self._expired(rec) and self._try_expire(sid, locked=True):
            raise self._gone(sid)
        if live is not None:
            return live
        self._check_model(rec)
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
        live = _Live(rec, tokens, kv, recorded_feeds(rec) if kv_len else [])
        live.measure()
        with self._global:
            self._live[sid] = live
        self._count(loads=1)
        self._fit_budget()  # this session is locked: room is made among the others
        return live

    def _read_kv(self, policy, rec: SessionRecord, kv_len: int):
        if not kv_len:
            return self._new_kv(policy, rec.id)
        if policy.name == "full":
            return SessionKV.from_blocks(self.store.kv_blocks(rec.id), kv_len, rec.layout, self.model.device)
        # layer states only: cold blocks stay in the store until retrieval reads them
        return TierKV.load(policy, self.store, rec.id, rec.layout, self.model.device, cold=self._cold(rec.id))

    def _repair(self, sid: str, seen: BaseException | None = None) -> SessionRecord:
        """Rebuild sid's damaged KV entries from its token ids and store them (caller holds its lock; the
        session is not in memory). seen: the failure that sent us here. Returns the stored record;
        DataLoss when the session cannot be rebuilt."""
        try:
            done = repair_session(self.store, self.model, sid, prefill_chunk=self.prefill_chunk, force=True)
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
        with self._lock(sid):
            self._forget(sid)
            self._repair(sid, exc)

    @contextlib.contextmanager
    def _using(self, sid: str) -> Iterator[_Live]:
        """The session in memory under its lock; afterwards it is measured and the budget enforced."""
        with self._lock(sid):
            live = self._load(sid)
            try:
                yield live
            finally:
                live.measure()
        self._fit_budget()

    def _forget(self, sid: str) -> _Live | None:
        """Drop a session from memory, and its blocks from the block cache (caller holds its lock)."""
        with self._global:
            live = self._live.pop(sid, None)
        if live is not None:
            _close_cold(live.kv)
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
            lock = self._lock(sid)
            if not lock.acquire(blocking=False):
                continue  # a call is using it
            try:
                live = self._forget(sid)
            finally:
                lock.release()
            if live is not None:
                total -= live.resident_bytes
                self._count(unloads=1)

    # ---- model -------------------------------------------------------------------

    @torch.no_grad()
    def _forward(self, kv: SessionKV, ids: Sequence[int], feeds: list[int] | None = None) -> torch.Tensor:
        """Run ids through the model on top of kv (in chunks); return the last logits [V].
        feeds: the session's log of model calls, extended by each chunk (see memsvc.repair)."""
        logits = None
        for lo in range(0, len(ids), self.prefill_chunk):
            part = torch.tensor([list(ids[lo:lo + self.prefill_chunk])], dtype=torch.long, device=self.model.device)
            with kv.forward_context():
                out = self.model.model(input_ids=part, cache=kv.cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[0, -1]
            if feeds is not None:
                feeds.append(part.shape[1])
            self._count(model_tokens_processed=part.shape[1])
        if logits is None:
            raise ValueError("nothing to run through the model")
        return logits.float()

    def _extend(self, live: _Live, new_ids: list[int], messages: list[dict], feed: list[int]) -> SessionRecord:
        """Feed `feed` (so the cache covers all tokens but the new last one), store, update."""
        snap = live.kv.checkpoint()
        n_feeds = len(live.feeds) if live.feeds is not None else 0
        first_token = live.record.n_tokens
        try:
            if feed:
                self._forward(live.kv, feed, live.feeds)
            payloads, counts, drop = live.kv.dirty_blocks()
            cache = {"resident_bytes": live.kv.resident_bytes(),
                     "tier_tokens": {k: round(float(v), 2) for k, v in live.kv.tier_tokens().items()}}
            extra = {**live.record.extra, "cache": cache}
            if live.feeds is not None:
                extra[FEEDS] = rle(live.feeds)
            else:
                extra.pop(FEEDS, None)
            rec = dataclasses.replace(live.record, messages=messages, updated=time.time(), extra=extra)
            stored = self.store.commit(rec, first_token=first_token, tokens=new_ids, blocks=payloads,
                                       block_tokens=counts, drop=drop)
        except BaseException:
            live.kv.restore(snap)
            if live.feeds is not None:
                del live.feeds[n_feeds:]
            raise
        live.kv.mark_clean()
        self._count(kv_entries_written=len(payloads), kv_bytes_written=sum(len(v) for v in payloads.values()))
        live.record = stored
        live.tokens.extend(new_ids)
        live.measure()
        return stored

    # ---- API ---------------------------------------------------------------------

    def create(self, sid: str = "", policy: str = "", labels: dict[str, str] | None = None,
               ttl: float = 0.0) -> SessionRecord:
        """ttl: seconds without a change after which this session expires (0: the manager's ttl)."""
        try:
            pol = get_policy(policy)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl >= 0):
            raise InvalidArgument(f"ttl_seconds must be a finite number >= 0 (0 = the server's --ttl), got {ttl!r}")
        sid = sid or uuid.uuid4().hex
        now = time.time()
        kv = self._new_kv(pol, sid)
        try:
            rec = SessionRecord(
                id=sid, model_name=self.model.name, model_fingerprint=self.model.fingerprint, policy=pol.name,
                created=now, updated=now, labels=dict(labels or {}), messages=[], ttl=ttl,
                layout={**kv.layout(), POLICY_CONFIG: policy_config(pol)},
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from exc
        with self._lock(sid):
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
             ) -> tuple[list[SessionView], str]:
        if not 0 <= limit <= 1000:
            raise InvalidArgument(f"page_size must be between 0 and 1000, got {limit}")
        limit = limit or 100
        while True:  # expired sessions go first, so that pages stay full
            recs = self.store.list(after=after, limit=limit + 1, labels=labels or None)
            if not sum(self._try_expire(rec.id) for rec in recs if self._expired(rec)):
                break
        more = len(recs) > limit
        recs = recs[:limit]
        views = []
        for rec in recs:
            views.append(self._view(rec, self._live.get(rec.id)))
        return views, (recs[-1].id if more else "")

    def resume(self, sid: str) -> SessionView:
        with self._using(sid) as live:
            self._count(resumes=1)
        return self._view(live.record, live)

    def append(self, sid: str, *, messages: list[dict] | None = None, text: str | None = None,
               tokens: Sequence[int] | None = None, admit: Admit | None = None) -> tuple[SessionRecord, list[int]]:
        """admit(record, n): see `Admit`; called once the new tokens are known."""
        for _ in range(_REPAIR_TRIES):
            try:
                return self._append(sid, messages, text, tokens, admit)
            except DamagedBlock as exc:  # rolled back: repair, then run the call again on the repaired session
                self._repair_after(sid, exc)
        raise DataLoss(f"session {sid!r} kept failing its checks after {_REPAIR_TRIES} repairs")

    def _append(self, sid: str, messages: list[dict] | None, text: str | None, tokens: Sequence[int] | None,
                admit: Admit | None) -> tuple[SessionRecord, list[int]]:
        given = [x for x in (messages, text, tokens) if x is not None]
        if len(given) != 1:
            raise InvalidArgument("append exactly one of: chat messages, text, token ids")
        with self._using(sid) as live:
            new_messages = live.record.messages
            if messages is not None:
                if not messages:
                    raise InvalidArgument("empty append: no chat messages given")
                msgs = [{"role": m["role"], "content": m.get("content", "")} for m in messages]
                try:
                    ids = chat.continuation_ids(self.model.tokenizer, live.record.messages, msgs)
                except chat.TemplateError as exc:
                    raise InvalidArgument(str(exc)) from exc
                new_messages = live.record.messages + msgs
            elif text is not None:
                if not text:
                    raise InvalidArgument("empty append: the text is empty")
                ids = chat.encode_text(self.model.tokenizer, text)
            else:
                ids = [int(t) for t in tokens]
                if not ids:
                    raise InvalidArgument("empty append: no token ids given")
                bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
                if bad:
                    raise InvalidArgument(
                        f"token id {bad[0]} is outside the model's vocabulary [0, {self.model.vocab_size})"
                        + (f" ({len(bad)} such ids)" if len(bad) > 1 else "")
                    )
            if not ids:
                raise InvalidArgument("empty append: the content tokenizes to no tokens")
            total = live.record.n_tokens + len(ids)
            if total > self.model.max_positions:
                raise InvalidArgument(
                    f"appending {len(ids)} tokens would make session {sid!r} {total} tokens long, past the "
                    f"model's context of {self.model.max_positions}; start a new session or fork a shorter one"
                )
            if admit is not None:
                admit(live.record, len(ids))
            pending = live.tokens[-1:]  # fed now, with all new tokens but the last
            rec = self._extend(live, ids, new_messages, pending + ids[:-1])
            self._count(tokens_appended=len(ids))
            return rec, ids

    def _check_params(self, p: GenerateParams) -> int:
        n = p.max_new_tokens or self.default_new_tokens
        if p.max_new_tokens < 0 or n > self.max_new_tokens:
            raise InvalidArgument(
                f"max_new_tokens must be between 1 and {self.max_new_tokens} (0 picks {self.default_new_tokens}), "
                f"got {p.max_new_tokens}"
            )
        if not (p.temperature >= 0 and p.temperature <= 100):
            raise InvalidArgument(f"temperature must be between 0 and 100, got {p.temperature}")
        if not (0 <= p.top_p <= 1):
            raise InvalidArgument(f"top_p must be between 0 and 1, got {p.top_p}")
        if len(p.stop) > MAX_STOP_STRINGS or any(not s for s in p.stop):
            raise InvalidArgument(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        return n

    def generate(self, sid: str, params: GenerateParams, cancelled: Callable[[], bool] = lambda: False,
                 admit: Admit | None = None) -> Iterator[Chunk]:
        """Stream a reply. Bad parameters raise here, before any chunk.
        admit(record, n): see `Admit`; called for a committing generation only."""
        budget = self._check_params(params)
        return self._generate(sid, params, budget, cancelled, admit)

    def _generate(self, sid: str, p: GenerateParams, budget: int,
                  cancelled: Callable[[], bool], admit: Admit | None = None) -> Iterator[Chunk]:
        sent: list[list[int]] = []  # token ids of the chunks already streamed
        for _ in range(_REPAIR_TRIES):
            try:
                with self._using(sid) as live:
                    gen = self._generate_locked(live, p, budget, cancelled, admit)
                    try:  # closed here, under the lock, however this generator ends
                        for i, chunk in enumerate(gen):
                            if i < len(sent):  # streamed before a repair: the same reply must come again
                                if chunk.token_ids != sent[i]:
                                    raise DataLoss(
                                        f"session {sid!r} was repaired in the middle of this reply, and the "
                                        f"repaired cache does not give the same reply; nothing was committed: "
                                        f"generate again")
                                continue
                            sent.append(chunk.token_ids)
                            yield chunk
                    finally:
                        gen.close()
                return
            except DamagedBlock as exc:  # rolled back: repair, then generate again (streamed chunks skipped)
                self._repair_after(sid, exc)
        raise DataLoss(f"session {sid!r} kept failing its checks after {_REPAIR_TRIES} repairs")

    def _generate_locked(self, live: _Live, p: GenerateParams, budget: int,
                         cancelled: Callable[[], bool], admit: Admit | None = None) -> Iterator[Chunk]:
        tok = self.model.tokenizer
        kv = live.kv
        snap = kv.checkpoint()
        n_feeds = len(live.feeds) if live.feeds is not None else 0
        committed = False
        try:
            prompt = chat.generation_prompt_ids(tok, live.record.messages)
            chat_turn = bool(prompt)
            lead = prompt + (chat.encode_text(tok, p.prefix) if p.prefix else [])
            feed = live.tokens[-1:] + lead
            if not feed:
                raise FailedPrecondition(f"session {live.record.id!r} is empty: append something before generating")
            room = self.model.max_positions - live.record.n_tokens - len(lead) - len(self.chat_format.end_of_turn)
            budget = min(budget, room)
            if budget < 1:
                raise FailedPrecondition(
                    f"session {live.record.id!r} has reached the model's context of {self.model.max_positions} tokens"
                )
            if p.commit and admit is not None:
                admit(live.record, len(lead) + budget + len(self.chat_format.end_of_turn))
            gen = torch.Generator().manual_seed(int(p.seed))
            logits = self._forward(kv, feed, live.feeds)
            kv.end_prompt()  # SnapKV-style policies compress the prompt here, before decoding
            if live.feeds is not None:
                live.feeds.append(0)
            generated: list[int] = []
            emitted = ""
            hold = max((len(s) for s in p.stop), default=1) - 1
            finish = "length"
            text = ""
            while True:
                nxt = _sample(logits, p.temperature, p.top_p, gen)
                generated.append(nxt)
                if nxt in self.model.eos_ids:
                    finish = "stop"
                text = tok.decode(generated, skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop_string"
                done = finish != "length" or len(generated) >= budget
                safe = len(text) if done else max(len(text) - hold, len(emitted))
                delta = text[len(emitted):safe]
                if delta.endswith("\ufffd") and not done:
                    delta = ""
                emitted += delta
                if done:
                    break
                yield Chunk(delta, [nxt])
                if cancelled():
                    raise Cancelled("the client cancelled the generation")
                logits = self._forward(kv, [nxt], live.feeds)
            self._count(tokens_generated=len(generated))
            if p.commit:
                rec = self._commit_reply(live, chat_turn, lead, generated, finish, p.prefix + text)
                committed = True
            else:
                rec = live.record
            yield Chunk(delta, [nxt], finish, rec)
        finally:
            if not committed:
                kv.restore(snap)
                if live.feeds is not None:
                    del live.feeds[n_feeds:]

    def _commit_reply(self, live: _Live, chat_turn: bool, lead: list[int], generated: list[int], finish: str,
                      text: str) -> SessionRecord:
        """lead: the generation prompt and the caller's prefix, fed before the generated tokens."""
        eot = list(self.chat_format.end_of_turn) if chat_turn else []
        reply = list(generated)
        if chat_turn and finish == "stop" and eot and eot[0] == reply[-1]:
            eot = eot[1:]  # the model emitted the template's end-of-turn token itself
        elif chat_turn and finish == "stop" and eot:
            reply.pop()  # another end token: the template's end of turn replaces it
        new_ids = lead + reply + eot
        # The cache now covers pending + lead + generated[:-1]; after the commit it
        # must cover every token of the session but the new last one.
        covered = lead + generated[:-1]
        if len(new_ids) <= len(covered) or new_ids[: len(covered)] != covered:
            raise RuntimeError("internal error: the committed reply does not extend the generated tokens")
        messages = live.record.messages + ([{"role": "assistant", "content": text}] if chat_turn else [])
        return self._extend(live, new_ids, messages, new_ids[len(covered):-1])

    def fork(self, sid: str, new_sid: str = "", labels: dict[str, str] | None = None) -> SessionRecord:
        new_sid = new_sid or uuid.uuid4().hex
        with self._lock(sid):
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
        with self._lock(sid):
            if not self.store.delete(sid):
                raise NotFound(f"no session {sid!r}")
            self._forget(sid)

    def resident(self) -> tuple[int, int]:
        """(sessions in memory, bytes of KV cache they hold)."""
        with self._global:
            return len(self._live), sum(live.resident_bytes for live in self._live.values())

    def resident_tier_tokens(self) -> dict[str, float]:
        """Tokens per tier, summed over the sessions in memory."""
        return self._sum_tiers("tier_tokens")

    def resident_tier_bytes(self) -> dict[str, int]:
        """Resident bytes per tier, summed over the sessions in memory (they sum to resident()'s bytes)."""
        return self._sum_tiers("tier_bytes")

    def _sum_tiers(self, measure: str) -> dict:
        with self._global:
            lives = list(self._live.values())
        total: dict = {}
        for live in lives:
            for tier, n in getattr(live, measure).items():
                total[tier] = total.get(tier, 0) + n
        return total

    def stored_tier_tokens(self) -> dict[str, float]:
        """Tokens per tier, summed over every stored session as of its last commit (walks every record)."""
        total: dict[str, float] = {}
        after = ""
        while True:
            recs = self.store.list(after=after, limit=1000)
            for rec in recs:
                for tier, n in rec.extra.get("cache", {}).get("tier_tokens", {}).items():
                    total[tier] = total.get(tier, 0) + n
            if len(recs) < 1000:
                return total
            after = recs[-1].id

    def cold_cache(self) -> tuple[int, int]:
        """(hits, misses) of the shared cold block cache since the server started."""
        return self.block_cache.hits, self.block_cache.misses


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """logits: [V] -> one token id (greedy when temperature is 0)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
