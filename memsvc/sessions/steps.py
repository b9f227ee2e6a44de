"""The step scheduler: one model step at a time for every session that has tokens to run (continuous batching).

Calls still run in their own threads (an Append feeds its tokens, a Generate samples and streams its reply); each
hands the tokens it needs run to `Steps.run` and waits. One scheduler thread runs the model: each step takes the
next piece of every waiting request (a decode token, or the next `chunk` tokens of a prefill), at most
`max_batch` sessions and `step_tokens` tokens, and runs them as one packed call (memsvc.cache.packed), so a
stream's next token shares the weights' read with every other stream's. Requests join and leave between steps.

- Decode pieces (one token) go first, in arrival order; prefill chunks fill the rest of the step's token budget,
  least recently served first, and at least one runs per step: a long Append cannot stall the streams for more
  than one chunk per step, and is never starved by them.
- A request's chunks are the same whether it runs alone or beside others (`chunk` tokens each, at most
  `step_tokens`, as `forward.run` cuts them), so a session's cache sees the same calls either way; a step of
  one piece is exactly `forward.run`.
- After a step, the scheduler waits up to `gather_s` for the streams it just served to hand in their next token,
  so a stream does not miss a step while it samples.
- A packed step that fails (a damaged cold block, a model that refuses a session) is undone on every session in
  it, and its pieces run again one at a time: the piece at fault gets its error, the others their logits.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from memsvc.cache.forward import run
from memsvc.cache.packed import Part, can_pack, run_packed

log = logging.getLogger("memsvc.steps")


@dataclass(frozen=True)
class StepConfig:
    """max_batch: sessions per step (1: one piece per step, no batching); step_tokens: tokens per step (decode
    tokens and prefill chunks; one chunk runs even where it alone is larger); gather_s: how long a step waits for
    the streams of the last one."""

    max_batch: int = 16
    step_tokens: int = 512
    gather_s: float = 0.005

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {self.step_tokens}")
        if not (0 <= self.gather_s <= 1):
            raise ValueError(f"gather_s must be between 0 and 1 s, got {self.gather_s}")


class _Request:
    def __init__(self, cache, ids: Sequence[int], chunk: int, on_chunk):
        self.cache, self.ids, self.chunk, self.on_chunk = cache, list(ids), chunk, on_chunk
        self.at = 0  # tokens run so far
        self.logits: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.queued = time.monotonic()  # since when it waits for its next step
        self.served = 0.0  # when a step last ran one of its pieces

    def piece(self) -> list[int]:
        return self.ids[self.at:self.at + self.chunk]


class Steps:
    """observe(sessions, tokens, waits): told after each step how many sessions and tokens it ran and how long
    each of its pieces waited for it (s); memsvc.metrics records them."""

    def __init__(self, model, config: StepConfig | None = None,
                 observe: Callable[[int, int, list[float]], None] | None = None):
        self.model = model
        self.config = config or StepConfig()
        self.observe = observe
        self.packs = can_pack(model)
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._last: set[int] = set()  # ids of the caches served by the last step that have not come back
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counts = {"steps": 0, "packed_steps": 0, "pieces": 0, "fallbacks": 0}

    def run(self, cache, ids: Sequence[int], chunk: int, on_chunk: Callable[[int], None] | None = None
            ) -> torch.Tensor:
        """What `forward.run(model, cache, ids, min(chunk, step_tokens), on_chunk=on_chunk)` returns (the last
        token's logits [V]), run in the scheduler's steps beside other sessions' pieces. Blocks until every chunk
        ran; the chunks do not depend on what else runs."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if not len(ids):
            raise ValueError("nothing to run through the model")
        req = _Request(cache, ids, min(chunk, self.config.step_tokens), on_chunk)
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="memsvc-steps", daemon=True)
                self._thread.start()
            self._waiting.append(req)
            self._cv.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.logits

    def close(self) -> None:
        """Stop the scheduler thread (the requests still waiting get an error); a later `run` starts another."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=60)
        with self._cv:
            self._closed = False

    # ---- the scheduler thread -----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                step = self._next_step()
                if step is None:
                    return
            try:
                self._run_step(step)
            except BaseException as exc:  # not a piece's own error (those go to their request): fail the step's
                log.exception("a model step failed outside its pieces")  # requests, and keep serving the others
                for r in step:
                    if not r.done.is_set():
                        r.error = r.error or exc
                        r.done.set()

    def _next_step(self) -> list[_Request] | None:
        """Under the lock: wait for work (and briefly for the last step's streams), then take a step's pieces."""
        deadline = time.monotonic() + self.config.gather_s
        while True:
            if self._closed:
                for req in self._waiting:
                    req.error = RuntimeError("the step scheduler is closed")
                    req.done.set()
                self._waiting.clear()
                return None
            back = {id(r.cache) for r in self._waiting}
            missing = self._last - back
            now = time.monotonic()
            if self._waiting and (not missing or now >= deadline):
                break
            if not self._waiting:
                self._cv.wait()
                deadline = time.monotonic() + self.config.gather_s
            else:
                self._cv.wait(timeout=max(deadline - now, 0.0))
        return self._take()

    def _take(self) -> list[_Request]:
        """The step's requests: decode pieces first (arrival order), then prefill chunks least recently served
        first, within max_batch sessions and step_tokens tokens; one chunk runs whenever one waits. Without
        packing, one piece: the least recently served."""
        if not self.packs or self.config.max_batch == 1:
            step = [min(self._waiting, key=lambda r: r.served)]
        else:
            limit, budget = self.config.max_batch, self.config.step_tokens
            decode = [r for r in self._waiting if len(r.piece()) == 1]
            prefill = sorted((r for r in self._waiting if len(r.piece()) > 1), key=lambda r: r.served)
            step = decode[:limit - 1 if prefill else limit]  # room for a chunk: a prefill is never starved
            tokens, chunks = len(step), 0
            for r in prefill:
                n = len(r.piece())
                if len(step) >= limit or (chunks and tokens + n > budget):
                    break
                step.append(r)
                tokens, chunks = tokens + n, chunks + 1
        for r in step:
            self._waiting.remove(r)
        return step

    def _run_step(self, step: list[_Request]) -> None:
        now = time.monotonic()
        waits = [now - r.queued for r in step]
        pieces = [r.piece() for r in step]
        if len(step) == 1:
            self._alone(step[0], pieces[0])
        else:
            self._packed(step, pieces)
        self.counts["steps"] += 1
        self.counts["pieces"] += len(step)
        if self.observe is not None:
            self.observe(len(step), sum(len(p) for p in pieces), waits)
        served = time.monotonic()
        with self._cv:
            self._last = set()
            for r, p in zip(step, pieces):
                r.served = served
                if r.error is None and r.at < len(r.ids):
                    r.queued = served
                    self._waiting.append(r)  # its next chunk
                    continue
                if r.error is None:
                    self._last.add(id(r.cache))  # a stream hands in its next token soon
                r.done.set()
            self._cv.notify_all()

    def _advance(self, req: _Request, piece: list[int], logits: torch.Tensor) -> None:
        req.at += len(piece)
        req.logits = logits
        if req.on_chunk is not None:
            try:
                req.on_chunk(len(piece))
            except Exception as exc:  # the caller's bookkeeping failed: its call fails, and restores its cache
                req.error = exc

    def _alone(self, req: _Request, piece: list[int]) -> None:
        try:
            logits = run(self.model, req.cache, piece, len(piece))
        except BaseException as exc:  # the request's own error: its caller restores its cache
            req.error = exc
            return
        self._advance(req, piece, logits)

    def _packed(self, step: list[_Request], pieces: list[list[int]]) -> None:
        snaps = [r.cache.checkpoint() for r in step]
        try:
            out = run_packed(self.model, [Part(r.cache, p) for r, p in zip(step, pieces)])
        except BaseException:
            # some layers of some caches took this step's tokens: undo all, then each piece alone
            for r, snap in zip(step, snaps):
                r.cache.restore(snap)
            self.counts["fallbacks"] += 1
            for r, p in zip(step, pieces):
                self._alone(r, p)
            return
        self.counts["packed_steps"] += 1
        for r, p, logits in zip(step, pieces, out):
            self._advance(req=r, piece=p, logits=logits)
