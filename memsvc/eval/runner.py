"""Run token ids through the real model on any policy's cache (the eval harness's engine).

`PolicyRun(loaded, "tiered", **overrides)` builds a fresh cache per prompt with the service's factory and feeds
it through the service's forward path (memsvc.cache.run), so what is measured is what is served. Cold blocks
of a policy that retrieves go to a temporary file (so they are not resident) and stay in memory when every
query reads them all. Blocks read back from the file go through one block cache shared by the run's caches,
as the service shares one between sessions (`block_cache` bytes, the service's default; not counted in a
cache's resident bytes, as in the service; 0: a private 1 MiB LRU that is), and each layer's last decoded
keys and values through one decoded cache (`decoded_cache` bytes, the service's default; 0: none).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from memsvc.cache import Backing, KVShape, get_policy, new_cache, run
from memsvc.cache.tiered.blockcache import BlockCache
from memsvc.cache.tiered.cold import FileBlocks
from memsvc.sessions import DEFAULT_BLOCK_CACHE, DEFAULT_DECODED_CACHE


@dataclass
class RunResult:
    resident_bytes: int = 0
    stored_bytes: int = 0
    tokens: int = 0
    tiers: dict = field(default_factory=dict)
    seconds: float = 0.0


PRIVATE_CACHE_BYTES = 1 << 20


class PolicyRun:
    def __init__(self, loaded, policy: str, chunk: int = 512, block_cache: int = DEFAULT_BLOCK_CACHE,
                 decoded_cache: int = DEFAULT_DECODED_CACHE, **overrides):
        self.m = loaded
        self.shape = KVShape.of(loaded)
        self.block_cache = BlockCache(block_cache) if block_cache else None
        self.decoded_cache = BlockCache(decoded_cache, fair=True) if decoded_cache else None  # as `memsvc serve` has them
        self.name = policy
        self.policy = get_policy(policy, **overrides)
        self.chunk = chunk
        self.retrieves = any(self.policy.plan(i, self.shape.layers).retrieve for i in range(self.shape.layers))

    def new_cache(self):
        if not self.retrieves:  # every query reads every block: they stay in memory
            return new_cache(self.policy, self.shape)
        return new_cache(self.policy, self.shape, Backing(FileBlocks(), block_cache=self.block_cache,
                                                          decoded_cache=self.decoded_cache,
                                                          private_cache_bytes=PRIVATE_CACHE_BYTES))

    def forward(self, cache, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Feed ids in chunks; returns logits [n, V] (all_logits) or [V] for the last token."""
        return run(self.m, cache, ids, self.chunk, all_logits=all_logits)

    def end_prompt(self, cache) -> None:
        cache.end_prompt()
        cache.flush()

    def flush(self, cache) -> None:
        cache.flush()

    def measure(self, cache) -> RunResult:
        return RunResult(cache.resident_bytes(), cache.stored_bytes(), cache.length, cache.tier_tokens())

    def fp16_per_token(self) -> int:
        return self.shape.fp16_bytes_per_token

    @torch.no_grad()
    def decode_greedy(self, cache, logits: torch.Tensor, n_new: int) -> tuple[list[int], float]:
        """Greedy tokens from the prompt's last logits [V]; returns (tokens, decode tokens/s after the first)."""
        out = [int(logits.argmax())]
        t0 = time.perf_counter()
        while len(out) < n_new:
            out.append(int(self.forward(cache, out[-1:]).argmax()))
        dt = time.perf_counter() - t0
        return out, (len(out) - 1) / dt if len(out) > 1 and dt > 0 else 0.0

    @torch.no_grad()
    def teacher_logprob(self, cache, logits: torch.Tensor, answer: list[int]) -> float:
        """Sum of log p(answer) teacher-forced, from the prompt's last logits [V]."""
        total = 0.0
        for i, t in enumerate(answer):
            total += float(torch.log_softmax(logits, -1)[t])
            if i + 1 < len(answer):
                logits = self.forward(cache, [t])
        return total
