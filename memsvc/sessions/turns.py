"""Append: new tokens through the model on a session's cache, stored in one commit (a mixin of `SessionManager`).

`_extend` is the write path every change of a session takes (an Append, a committed reply): it feeds the
tokens, takes the cache's changes, and commits record, token ids and KV entries in one store transaction;
if anything fails, the cache is restored, so memory and store stay as they were.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from memsvc.cache import DamagedBlock
from memsvc.store.errors import LeaseLost, StoreUnavailable
from memsvc.store.records import SessionRecord

from .. import chat
from ..errors import DataLoss, InvalidArgument
from ..repair import FEEDS, rle
from .generate import REPAIR_TRIES
from .live import Admit, _Live



class Turns:
    def append(self, sid: str, *, messages: list[dict] | None = None, text: str | None = None,
               tokens: Sequence[int] | None = None, admit: Admit | None = None) -> tuple[SessionRecord, list[int]]:
        """admit(record, n): see `Admit`; called once the new tokens are known."""
        for _ in range(REPAIR_TRIES):
            try:
                return self._append(sid, messages, text, tokens, admit)
            except DamagedBlock as exc:  # rolled back: repair, then run the call again on the repaired session
                self._repair_after(sid, exc)
        raise DataLoss(f"session {sid!r} kept failing its checks after {REPAIR_TRIES} repairs")

    def _append(self, sid: str, messages: list[dict] | None, text: str | None, tokens: Sequence[int] | None,
                admit: Admit | None) -> tuple[SessionRecord, list[int]]:
        given = [x for x in (messages, text, tokens) if x is not None]
        if len(given) != 1:
            raise InvalidArgument("append exactly one of: chat messages, text, token ids")
        if messages is not None:  # refused before waiting for the session
            if not messages:
                raise InvalidArgument("empty append: no chat messages given")
            msgs = [{"role": m.get("role"), "content": m.get("content", "")} for m in messages]
            try:
                chat.check_messages(self.model.tokenizer, msgs)
            except chat.TemplateError as exc:
                raise InvalidArgument(str(exc)) from exc
        with self._using(sid, "an append") as live:
            new_messages = live.record.messages
            if messages is not None:
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
            limit = live.kv.max_tokens()
            if limit is not None and total > limit:
                raise InvalidArgument(
                    f"appending {len(ids)} tokens would make session {sid!r} {total} tokens long, past the "
                    f"model's context of {limit}, which a {live.record.policy!r} session attends whole; start a new "
                    f"session or fork a shorter one (sessions of the tiered policies outgrow the context)")
            if admit is not None:
                admit(live.record, len(ids))
            pending = live.tokens[-1:]  # fed now, with all new tokens but the last
            rec = self._extend(live, ids, new_messages, pending + ids[:-1])
            self._count(tokens_appended=len(ids))
            return rec, ids

    def _forward(self, kv, ids: Sequence[int], feeds: list[int] | None = None):
        """Run ids through the model on kv in the scheduler's steps (memsvc.sessions.steps, beside other sessions'
        calls); the last logits [V]. feeds: the session's log of model calls, extended by each chunk (see
        memsvc.repair)."""
        def ran(n: int) -> None:
            if feeds is not None:
                feeds.append(n)
            self._count(model_tokens_processed=n)

        return self.steps.run(kv, ids, self.prefill_chunk, on_chunk=ran)

    def _extend(self, live: _Live, new_ids: list[int], messages: list[dict], feed: list[int]) -> SessionRecord:
        """Feed `feed` (so the cache covers all tokens but the new last one), store, update."""
        snap = live.kv.checkpoint()
        n_feeds = len(live.feeds) if live.feeds is not None else 0
        first_token = live.record.n_tokens
        try:
            if feed:
                self._forward(live.kv, feed, live.feeds)
            ch = live.kv.changes()
            cache = {"resident_bytes": live.kv.resident_bytes(),
                     "tier_tokens": {k: round(float(v), 2) for k, v in live.kv.tier_tokens().items()}}
            extra = {**live.record.extra, "cache": cache}
            if live.feeds is not None:
                extra[FEEDS] = rle(live.feeds)
            else:
                extra.pop(FEEDS, None)
            rec = dataclasses.replace(live.record, messages=messages, updated=time.time(), extra=extra)
            stored = self.store.commit(rec, first_token=first_token, tokens=new_ids, blocks=ch.payloads,
                                       block_tokens=ch.tokens, drop=ch.drop, epoch=live.epoch)
        except BaseException as exc:
            live.kv.restore(snap)
            if live.feeds is not None:
                del live.feeds[n_feeds:]
            if isinstance(exc, (LeaseLost, StoreUnavailable)):  # another owner's now, or the commit may have landed
                self.leases.stale(live.record.id)  # the next call loads it again from the store
            raise
        live.kv.committed()
        self._count(kv_entries_written=len(ch.payloads), kv_bytes_written=sum(len(v) for v in ch.payloads.values()))
        live.record = stored
        live.tokens.extend(new_ids)
        live.measure()
        return stored
