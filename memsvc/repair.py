"""Integrity and repair of stored sessions: the token ids are the ground truth.

A session's KV entries (every block of a `full` session; the cold blocks and
per-layer states of a `tiered` one) can all be computed again by running the
model over the session's stored token ids. To get *the same* cache back, and so
the same later generations, the model must see the tokens in the same pieces
as it did when the session was built: a tiered layer's retrieval and scores
depend on how the prompt was cut. The session manager therefore logs every
model call a session's cache took (`feeds`: the number of tokens of each
forward call, 0 for an `end_prompt`), undoes the log with the cache when a call
is rolled back, and stores it run-length encoded in the record's
`extra["feeds"]`. A rebuild replays that log over the token ids through a fresh
cache of the same policy.

`repair_session` checks every entry, rebuilds the whole cache in one pass when
anything is damaged or missing, compares the rebuilt entries with the intact
stored ones and then rewrites:
- only the damaged, missing or stray entries when every intact entry came back
  bit for bit (the replay is exact);
- every entry otherwise (a session stored without a feeds log, or a replay that
  differs): the session is then consistent again, and its log is the schedule
  the rebuild used, though it is not the cache it had before.
A damaged record or damaged token ids cannot be rebuilt: `Unrepairable`.

Knows the model, the cache classes and the store; knows nothing about gRPC.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from memsvc.store.errors import CorruptRecord, StoreError
from memsvc.store.records import SessionRecord

from .cache import use_memsvc_attention
from .cache.cold import ColdStore
from .cache.pages import decode, digest, is_cold_block, listed_parts, part_name
from .cache.session import STATE_INDEX, StoreBlocks, TierKV
from .kvcache import SessionKV
from .policies import record_policy

log = logging.getLogger("memsvc.repair")
FEEDS = "feeds"  # record.extra key: the run-length encoded model calls of the cache
REPAIR = "repair"  # record.extra key: {"count", "last_unix", "last_blocks", "last_exact"}


class Unrepairable(Exception):
    """The session cannot be rebuilt (its record or token ids are damaged)."""


class DamagedBlock(Exception):
    """A KV entry failed its checks while a call was reading it (raised instead of the store's
    CorruptRecord so that the manager can tell it from other errors, repair and retry)."""

    def __init__(self, sid: str, layer: int, index: int, cause: Exception):
        super().__init__(f"session {sid!r}: KV block (layer {layer}, block {index}) is damaged: {cause}")
        self.sid, self.layer, self.index, self.cause = sid, layer, index, cause


class CheckedBlocks(StoreBlocks):
    """`StoreBlocks` whose damaged reads raise `DamagedBlock`."""

    def read(self, layer: int, index: int) -> bytes | None:
        try:
            return super().read(layer, index)
        except CorruptRecord as exc:
            raise DamagedBlock(self.sid, layer, index, exc) from exc

    def read_many(self, layer: int, indices: list[int]) -> list[bytes | None]:
        try:
            return super().read_many(layer, indices)
        except CorruptRecord:  # which one: read them one by one (DamagedBlock names the first)
            return [self.read(layer, index) for index in indices]


# ---- the feeds log ----------------------------------------------------------------------------------

def rle(sizes: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for n in sizes:
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return out


def unrle(pairs) -> list[int] | None:
    """The sizes of a run-length encoded log, or None when it is not one."""
    if not isinstance(pairs, list):
        return None
    out: list[int] = []
    for p in pairs:
        if (not isinstance(p, list) or len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in p) or p[0] < 0 or p[1] < 1):
            return None
        out.extend([p[0]] * p[1])
    return out


def recorded_feeds(rec: SessionRecord) -> list[int] | None:
    """The record's feeds log when it covers exactly the cached tokens (all but the last), else None."""
    feeds = unrle(rec.extra.get(FEEDS))
    if feeds is None or sum(feeds) != max(rec.n_tokens - 1, 0):
        return None
    return feeds


def schedule(rec: SessionRecord, prefill_chunk: int) -> tuple[list[int], bool]:
    """(model calls to rebuild the cache with, exact): the recorded log, or chunks of prefill_chunk."""
    feeds = recorded_feeds(rec)
    if feeds is not None:
        return feeds, True
    n = max(rec.n_tokens - 1, 0)
    return [min(prefill_chunk, n - lo) for lo in range(0, n, prefill_chunk)], False


# ---- rebuilding ------------------------------------------------------------------------------------

class _Nowhere:
    """A cold backend that keeps nothing: new blocks stay pending, where the rebuild collects them."""

    resident = False

    def read(self, layer, index):
        return None

    def write(self, blocks):
        raise RuntimeError("a rebuilt cache is never flushed")

    def nbytes(self):
        return 0


def _fresh_kv(model, policy, layout: dict):
    if policy.name == "full":
        return SessionKV(model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, model.device,
                         layout.get("block_tokens", policy.block_tokens))
    use_memsvc_attention(model.model)
    return TierKV(policy, model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, model.device,
                  ColdStore(_Nowhere()))


@torch.no_grad()
def rebuild(model, rec: SessionRecord, tokens: Sequence[int], feeds: Sequence[int],
            until: set | None = None) -> tuple[dict[tuple[int, int], bytes], dict[tuple[int, int], int], bool]:
    """Every KV entry of the session, computed again: run `feeds` over tokens through a fresh cache of
    the record's policy (as the session manager's forward calls did). Returns (payloads, n_tokens of
    each, complete).

    until: cold blocks of a tiered session; the replay stops once it has made all of them (a cold block
    never changes once made) and returns the cold blocks made so far, no layer states (complete False)."""
    policy = record_policy(rec)
    kv = _fresh_kv(model, policy, rec.layout)
    pos = 0
    early = until is not None and isinstance(kv, TierKV) and all(is_cold_block(k[1]) for k in until)
    for n in feeds:
        if n == 0:
            kv.end_prompt()
            continue
        part = torch.tensor([list(tokens[pos:pos + n])], dtype=torch.long, device=model.device)
        with kv.forward_context():
            model.model(input_ids=part, cache=kv.cache, use_cache=True, logits_to_keep=1)
        pos += n
        if early and until <= kv.cache.cold.pending.keys():
            cold = dict(kv.cache.cold.pending)
            return cold, {k: policy.plan(k[0], kv.num_layers).block for k in cold}, False
    if pos != max(len(tokens) - 1, 0):
        raise ValueError(f"the rebuild fed {pos} tokens, the session caches {max(len(tokens) - 1, 0)}")
    return (*(kv.blocks_since(0) if isinstance(kv, SessionKV) else kv.dirty_blocks()[:2]), True)


def _same(key: tuple[int, int], stored: bytes | None, rebuilt: bytes | None) -> bool:
    """Whether a stored entry equals its rebuilt one. Layer states are compared by content: safetensors
    writes its header's keys in no fixed order, so equal states need not be equal bytes."""
    if stored is None or rebuilt is None or stored == rebuilt:
        return stored == rebuilt
    if is_cold_block(key[1]):
        return False
    try:  # the digest the commits use: metadata and every tensor's name, dtype, shape and contents
        return digest(decode(stored)) == digest(decode(rebuilt))
    except ValueError:  # an unreadable state is not the rebuilt one
        return False


# ---- checking ----------------------------------------------------------------------------------------

def _state_entries(raw: bytes) -> tuple[int, list[int]] | None:
    """(n_blocks, the state parts it lists) from a tiered layer state's safetensors header ((0, []) for an
    empty layer, no parts for a state stored whole), None if unreadable."""
    try:
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(bytes(raw[8:8 + n])).get("__metadata__", {})
        if meta.get("init") != "1":
            return 0, []
        return int(meta["n_blocks"]), listed_parts(meta) or []
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def expected_keys(store, rec: SessionRecord, damaged: dict) -> tuple[set | None, str | None]:
    """The KV entries the session should have, from its record (full) or its layer states (tiered);
    (None, why) when that cannot be told from what is stored (a state is damaged: only a rebuild knows)."""
    kv_len = max(rec.n_tokens - 1, 0)
    lay = rec.layout
    layers = lay.get("layers", 0)
    if not kv_len:
        return set(), None
    if rec.policy == "full":
        b = lay.get("block_tokens") or 1
        return {(layer, i) for layer in range(layers) for i in range((kv_len + b - 1) // b)}, None
    if lay.get("form") != "tiered":
        return None, None  # another policy: its entries are whatever it wrote
    keys: set = set()
    for layer in range(layers):
        keys.add((layer, STATE_INDEX))
        if (layer, STATE_INDEX) in damaged:
            return None, f"the state of layer {layer} is damaged"
        raw = store.kv_block(rec.id, layer, STATE_INDEX)
        if raw is None:
            return None, f"the state of layer {layer} is missing"
        got = _state_entries(raw)
        if got is None:
            return None, f"the state of layer {layer} does not parse"
        nb, parts = got
        keys.update((layer, i) for i in range(nb))
        keys.update((layer, i) for i in parts)
    return keys, None


@dataclass
class Check:
    """What is wrong with one session."""
    sid: str
    record: str | None = None  # the record's damage
    tokens: dict = field(default_factory=dict)  # index -> damage
    kv: dict = field(default_factory=dict)  # (layer, index) -> damage (damaged, missing or stray)
    other: list = field(default_factory=list)
    n_tokens: int = 0
    kv_entries: int = 0
    note: str | None = None  # why the expected entries could not be told (a damaged layer state)

    @property
    def damaged(self) -> bool:
        return bool(self.record or self.tokens or self.kv or self.other)

    @property
    def repairable(self) -> bool:
        return not (self.record or self.tokens)

    def as_dict(self) -> dict:
        return {"id": self.sid, "ok": not self.damaged, "repairable": self.repairable, "n_tokens": self.n_tokens,
                "kv_entries": self.kv_entries, "record": self.record,
                "tokens": {str(k): v for k, v in sorted(self.tokens.items())},
                "kv": {_where(k): v for k, v in sorted(self.kv.items())}, "other": self.other, "note": self.note}


def _where(key: tuple[int, int]) -> str:
    layer, index = key
    return f"{layer}/{part_name(index)}"


def check_session(store, sid: str) -> Check:
    """Check every stored entry of a session (record, token blocks, KV pointers, blobs, reference counts)
    and that no KV entry is missing or stray."""
    raw = store.check_session(sid)
    out = Check(sid, record=raw["record"], tokens=dict(raw["tokens"]), kv=dict(raw["kv"]),
                other=list(raw["bad_keys"]), kv_entries=raw["kv_entries"])
    if out.record:
        return out
    rec = store.get(sid)
    out.n_tokens = rec.n_tokens
    want, out.note = expected_keys(store, rec, out.kv)
    if want is not None:
        have = set(store.kv_keys(sid))
        for key in sorted(want - have):
            out.kv[key] = "missing"
        for key in sorted(have - want):
            out.kv.setdefault(key, "stray: the session's layout has no such entry")
    return out


# ---- repairing ---------------------------------------------------------------------------------------

@dataclass
class Repair:
    sid: str
    rewritten: int  # KV entries written again
    dropped: int  # stray entries removed
    exact: bool  # the intact entries came back bit for bit: only the damaged ones were rewritten
    seconds: float
    rebuild_seconds: float
    tokens: int
    record: SessionRecord | None = None

    def as_dict(self) -> dict:
        return {"id": self.sid, "rewritten": self.rewritten, "dropped": self.dropped, "exact": self.exact,
                "seconds": round(self.seconds, 3), "rebuild_seconds": round(self.rebuild_seconds, 3),
                "tokens": self.tokens}


def repair_session(store, model, sid: str, *, prefill_chunk: int = 512, force: bool = False,
                   check: Check | None = None) -> Repair | None:
    """Rebuild a session's damaged KV entries from its token ids and rewrite them (see the module's
    docstring). None when nothing is damaged (force: rebuild and compare anyway, e.g. after a read failed
    in a way the checks do not see). Unrepairable for a damaged record or token ids, or another model.
    The caller keeps the session from changing meanwhile (the manager holds its lock; offline, nothing
    else writes)."""
    started = time.perf_counter()
    check = check or check_session(store, sid)
    if check.record:
        raise Unrepairable(f"the record of session {sid!r} is damaged ({check.record}): its policy and "
                           f"layout are lost, so it cannot be rebuilt")
    if check.tokens:
        first = next(iter(sorted(check.tokens.items())))
        raise Unrepairable(f"the token ids of session {sid!r} are damaged ({len(check.tokens)} token "
                           f"block(s), first: {first[1]}): the ground truth is lost, so it cannot be rebuilt")
    if not (check.kv or check.other or force):
        return None
    rec = store.get(sid)
    if rec.model_fingerprint != model.fingerprint:
        raise Unrepairable(f"session {sid!r} was built with model {rec.model_name!r} (fingerprint "
                           f"{rec.model_fingerprint[:12]}); rebuilding it needs that model, not "
                           f"{model.name!r} ({model.fingerprint[:12]})")
    try:
        tokens = store.tokens(sid)
    except CorruptRecord as exc:
        raise Unrepairable(f"the token ids of session {sid!r} are damaged: {exc}") from exc
    feeds, known = schedule(rec, prefill_chunk)
    damaged = set(check.kv)
    stored = set(store.kv_keys(sid))
    # Only cold blocks damaged, and the log is known: replay until the last of them is made.
    until = damaged if known and damaged and all(is_cold_block(k[1]) for k in damaged) and not check.other \
        and rec.layout.get("form") == "tiered" and damaged <= stored else None
    t0 = time.perf_counter()
    payloads, counts, complete = rebuild(model, rec, tokens, feeds, until)
    exact = known
    for key in sorted(stored - damaged) if exact else ():
        try:
            same = _same(key, store.kv_block(sid, *key), payloads.get(key))
        except CorruptRecord:
            damaged.add(key)  # damaged since the check
            continue
        if not same and (complete or key in payloads):
            exact = False
            break
    if not complete and (not exact or not damaged <= payloads.keys()):  # rebuild everything after all
        payloads, counts, complete = rebuild(model, rec, tokens, feeds)
    rebuild_s = time.perf_counter() - t0
    if exact:
        write = {k: v for k, v in payloads.items() if k in damaged or k not in stored}
        drop = sorted(k for k in stored if k not in payloads) if complete else []
    else:
        write, drop = payloads, sorted(stored - set(payloads))
    prev = rec.extra.get(REPAIR, {}) if isinstance(rec.extra.get(REPAIR), dict) else {}
    extra = {REPAIR: {"count": int(prev.get("count", 0)) + 1, "last_unix": time.time(),
                      "last_blocks": len(write) + len(drop), "last_exact": exact}, FEEDS: rle(feeds)}
    try:
        new = store.rewrite_kv(sid, n_tokens=rec.n_tokens, blocks=write,
                               block_tokens={k: counts.get(k, 0) for k in write}, drop=drop, extra=extra)
    except (StoreError, ValueError) as exc:  # ValueError: it changed meanwhile (a server wrote to it)
        raise Unrepairable(f"session {sid!r} was rebuilt but could not be written back: {exc}") from exc
    out = Repair(sid, len(write), len(drop), exact, time.perf_counter() - started, rebuild_s, rec.n_tokens, new)
    log.info("repaired session %s: %d KV entries rewritten, %d stray removed (%s), from %d tokens in %.2f s",
             sid, len(write), len(drop), "only the damaged ones" if exact else "every entry: not an exact replay",
             rec.n_tokens, out.seconds)
    return out
