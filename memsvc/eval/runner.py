"""Run token ids through the real model on any policy's cache (the eval harness's engine).

`PolicyRun(loaded, "tiered", **overrides)` builds a fresh cache per prompt:
`full` is transformers' DynamicCache (SDPA), every other policy a `TierCache`
whose cold blocks go to a temporary file when it retrieves (so they are not
resident) and stay in memory when every query reads them all. Blocks read back
from the file go through one `BlockCache` shared by the run's caches, as the
service shares one between sessions (`block_cache` bytes, the service's default;
not counted in a cache's resident bytes, as in the service; 0: a private 1 MiB LRU that is), and each
layer's last decoded keys and values through one decoded cache (`decoded_cache` bytes, the service's
default; 0: none).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from memsvc.cache import ColdStore, FileBlocks, TierCache, active, fp16_bytes_per_token, get_policy, use_memsvc_attention
from memsvc.cache.cold import BlockCache
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
        self.block_cache = BlockCache(block_cache) if block_cache else None
        self.decoded_cache = BlockCache(decoded_cache, fair=True) if decoded_cache else None  # as `memsvc serve` has them
        self.name = policy
        self.policy = get_policy(policy, **overrides)
        self.chunk = chunk
        use_memsvc_attention(loaded.model)

    def new_cache(self):
        if self.name == "full":
            return DynamicCache()
        retrieves = any(self.policy.plan(i, self.m.num_layers).retrieve for i in range(self.m.num_layers))
        if not retrieves:
            cold = ColdStore()
        elif self.block_cache is not None:
            cold = ColdStore(FileBlocks(), cache=self.block_cache, decoded=self.decoded_cache)
        else:
            cold = ColdStore(FileBlocks(), cache_bytes=PRIVATE_CACHE_BYTES, decoded=self.decoded_cache)
        return TierCache(self.policy, self.m.num_layers, self.m.dtype, cold)

    @torch.no_grad()
    def forward(self, cache, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Feed ids in chunks; returns logits [n, V] (all_logits) or [V] for the last token."""
        outs = []
        with active(cache if isinstance(cache, TierCache) else None):
            for lo in range(0, len(ids), self.chunk):
                part = torch.tensor([ids[lo:lo + self.chunk]], device=self.m.device)
                out = self.m.model(input_ids=part, cache=cache, use_cache=True,
                                   logits_to_keep=0 if all_logits else 1)
                outs.append(out.logits[0].float())
        return torch.cat(outs) if all_logits else outs[-1][-1]

    def end_prompt(self, cache) -> None:
        if isinstance(cache, TierCache):
            cache.end_prompt()
            if isinstance(cache.cold.backend, FileBlocks):
                cache.cold.flush()

    def flush(self, cache) -> None:
        if isinstance(cache, TierCache) and isinstance(cache.cold.backend, FileBlocks):
            cache.cold.flush()

    def measure(self, cache) -> RunResult:
        if isinstance(cache, TierCache):
            return RunResult(cache.resident_bytes(), cache.stored_bytes(), cache.get_seq_length(), cache.tier_tokens())
        n = cache.get_seq_length()
        b = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                for l in cache.layers)
        return RunResult(b, b, n, {"hot": n})

    def fp16_per_token(self) -> int:
        return fp16_bytes_per_token(self.m.num_layers, self.m.num_kv_heads, self.m.head_dim)

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


def snapshot(cache):
    return cache.snapshot() if isinstance(cache, TierCache) else cache.get_seq_length()


def restore(cache, snap) -> None:
    if isinstance(cache, TierCache):
        cache.restore(snap)
    elif cache.get_seq_length() > snap:
        cache.crop(snap - cache.get_seq_length())
