"""Generate: stream a reply from a session's cache, and commit it to the session when asked.

A mixin of `SessionManager` (memsvc.sessions.manager). The reply's tokens are sampled one at a time (greedy
at temperature 0); stop strings are held back until they can no longer start a match; a cancelled or failed
generation restores the cache, and a committed one joins the session through the manager's `_extend`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from memsvc.cache import DamagedBlock
from memsvc.store.records import SessionRecord

from .. import chat
from ..errors import Cancelled, DataLoss, FailedPrecondition, InvalidArgument
from .live import Admit, _Live

MAX_STOP_STRINGS = 16
REPAIR_TRIES = 3  # a call that meets damaged blocks is repaired and run again at most this often


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


class Generation:
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
        for _ in range(REPAIR_TRIES):
            try:
                with self._using(sid, "a generate") as live:  # held until the stream ends or is cancelled
                    gen = self._generate_locked(live, p, budget, cancelled, admit)
                    try:  # closed here, while held, however this generator ends
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
        raise DataLoss(f"session {sid!r} kept failing its checks after {REPAIR_TRIES} repairs")

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
            limit = kv.max_tokens()  # None: only the store bounds the session
            room = budget if limit is None else \
                limit - live.record.n_tokens - len(lead) - len(self.chat_format.end_of_turn)
            at_context = room < budget  # the reply stops at the context: finish_reason "context"
            budget = min(budget, room)
            if budget < 1:
                raise FailedPrecondition(
                    f"session {live.record.id!r} ({live.record.policy}) has reached the model's context of {limit} "
                    f"tokens, which its cache attends whole: start a new session or fork a shorter one")
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
                if finish == "length" and at_context and len(generated) >= budget:
                    finish = "context"
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
