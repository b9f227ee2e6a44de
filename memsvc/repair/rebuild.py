"""Integrity and repair of stored sessions: the token ids are the ground truth.

A session's KV entries can all be computed again by running the model over the
session's stored token ids. A rebuild replays the session's feeds log
(memsvc.repair.feeds) over the token ids through a fresh cache of the same
policy, through the same forward path the service uses.

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

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from memsvc.cache import Backing, KVShape, NoEntries, is_final, new_cache, record_policy, run, same_entry
from memsvc.store.errors import CorruptRecord, StoreError
from memsvc.store.records import SessionRecord

from ..progress import Progress
from .check import Check, check_session
from .feeds import FEEDS, rle, schedule

log = logging.getLogger("memsvc.repair")
REPAIR = "repair"  # record.extra key: {"count", "last_unix", "last_blocks", "last_exact"}


class Unrepairable(Exception):
    """The session cannot be rebuilt (its record or token ids are damaged, or it needs another model)."""


@torch.no_grad()
def rebuild(model, rec: SessionRecord, tokens: Sequence[int], feeds: Sequence[int],
            until: set | None = None, on_fed: Callable[[int], None] | None = None
            ) -> tuple[dict[tuple[int, int], bytes], dict[tuple[int, int], int], bool]:
    """Every KV entry of the session, computed again: run `feeds` over tokens through a fresh cache of
    the record's policy (as the session manager's calls did). Returns (payloads, n_tokens of each, complete).

    until: final entries (a tiered session's cold blocks); the replay stops once it has made all of them
    (a final entry never changes once made) and returns the final entries made so far (complete False).
    on_fed(n): told after each model call of n tokens."""
    policy = record_policy(rec)
    kv = new_cache(policy, KVShape.of(model), Backing(NoEntries()))
    pos = 0
    early = until is not None and all(is_final(policy, k) for k in until)
    for n in feeds:
        if n == 0:
            kv.end_prompt()
            continue
        run(model, kv, tokens[pos:pos + n], n)  # one model call of n tokens, as the session's was
        pos += n
        if on_fed is not None:
            on_fed(n)
        if early and until <= kv.final_entries().payloads.keys():
            made = kv.final_entries()
            return made.payloads, made.tokens, False
    if pos != max(len(tokens) - 1, 0):
        raise ValueError(f"the rebuild fed {pos} tokens, the session caches {max(len(tokens) - 1, 0)}")
    ch = kv.changes()
    return ch.payloads, ch.tokens, True


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
                   check: Check | None = None, progress: Callable[[int], Progress] | None = None
                   ) -> Repair | None:
    """Rebuild a session's damaged KV entries from its token ids and rewrite them (see the module's
    docstring). None when nothing is damaged (force: rebuild and compare anyway, e.g. after a read failed
    in a way the checks do not see). Unrepairable for a damaged record or token ids, or another model.
    The caller keeps the session from changing meanwhile (the manager holds the session; offline, nothing
    else writes). progress(n): a Progress over the n tokens the rebuild feeds (made once they are known);
    it is advanced as the model runs and finished here."""
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
    policy = record_policy(rec)
    until = damaged if known and damaged and all(is_final(policy, k) for k in damaged) and not check.other \
        and damaged <= stored else None
    t0 = time.perf_counter()
    bar = progress(sum(feeds)) if progress is not None else None
    on_fed = bar.advance if bar is not None else None
    try:
        payloads, counts, complete, exact = _rebuild(store, model, sid, rec, tokens, feeds, until, damaged, stored,
                                                     known, policy, on_fed, bar)
    except BaseException:
        if bar is not None:
            bar.finish("failed")
        raise
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
        if bar is not None:
            bar.finish("rebuilt, but not written back")
        raise Unrepairable(f"session {sid!r} was rebuilt but could not be written back: {exc}") from exc
    out = Repair(sid, len(write), len(drop), exact, time.perf_counter() - started, rebuild_s, rec.n_tokens, new)
    if bar is not None:
        bar.finish(f"{len(write)} KV entries rewritten" + ("" if exact else " (every entry: not an exact replay)")
                   + ("" if complete else ", the replay stopped once the damaged blocks were made again"))
    log.info("repaired session %s: %d KV entries rewritten, %d stray removed (%s), from %d tokens in %.2f s",
             sid, len(write), len(drop), "only the damaged ones" if exact else "every entry: not an exact replay",
             rec.n_tokens, out.seconds)
    return out


def _rebuild(store, model, sid, rec, tokens, feeds, until, damaged: set, stored: set, known: bool, policy,
             on_fed, bar: Progress | None):
    """The rebuild of repair_session, and whether it is exact: every intact stored entry came back bit for bit
    (damaged gains the entries found damaged since the check). A replay stopped early that turns out not to
    be enough is run again in full."""
    payloads, counts, complete = rebuild(model, rec, tokens, feeds, until, on_fed)
    exact = known
    for key in sorted(stored - damaged) if exact else ():
        try:
            same = same_entry(policy, key, store.kv_block(sid, *key), payloads.get(key))
        except CorruptRecord:
            damaged.add(key)  # damaged since the check
            continue
        if not same and (complete or key in payloads):
            exact = False
            break
    if not complete and (not exact or not damaged <= payloads.keys()):  # rebuild everything after all
        if bar is not None:
            bar.total += sum(feeds)
        payloads, counts, complete = rebuild(model, rec, tokens, feeds, None, on_fed)
    return payloads, counts, complete, exact
