"""`TierCache`: a transformers `Cache` whose layers are `TierLayer`s, built from a policy.

    cache = TierCache(get_policy("tiered"), n_layers, dtype)
    with active(cache):
        model(input_ids=..., cache=cache)   # attention runs on the tiers
    cache.end_prompt()                                # SnapKV-style policies compress here

`snapshot()` / `restore()` undo everything since the snapshot (an uncommitted
Append or Generate); `resident_bytes()` counts every tensor the cache holds in
memory (exact tiers, 8-bit warm rows, summaries, scores, positions, pending
and LRU cold blocks), `stored_bytes()` what its cold blocks take in storage.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .attention import active
from .cold import ColdStore
from .layer import TierLayer


class TierCache(Cache):
    def __init__(self, policy, n_layers: int, dtype: torch.dtype, cold: ColdStore | None = None):
        self.policy = policy
        self.cold = cold if cold is not None else ColdStore()
        layers = [TierLayer(policy.plan(i, n_layers), i, self.cold, dtype) for i in range(n_layers)]
        super().__init__(layers=layers)

    def end_prompt(self) -> None:
        for layer in self.layers:
            layer.end_prompt()

    def snapshot(self) -> list[dict]:
        return [layer.snapshot() for layer in self.layers]

    def restore(self, snap: list[dict]) -> None:
        for layer, s in zip(self.layers, snap):
            layer.restore(s)

    def resident_bytes(self) -> int:
        return sum(layer.resident_bytes() for layer in self.layers) + self.cold.resident_bytes()

    def stored_bytes(self) -> int:
        return self.cold.stored_bytes()

    def tier_bytes(self) -> dict[str, int]:
        """Resident bytes by tier over every layer; "cold" is the cold store's own memory (pending blocks,
        a private LRU, an in-memory backend); they sum to resident_bytes()."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for k, v in layer.tier_bytes().items():
                total[k] = total.get(k, 0) + v
        total["cold"] = self.cold.resident_bytes()
        return total

    def tier_tokens(self) -> dict[str, float]:
        """Mean over layers of the tokens (per head) in each tier."""
        total: dict[str, float] = {}
        for layer in self.layers:
            for k, v in layer.tier_tokens().items():
                total[k] = total.get(k, 0) + v / len(self.layers)
        return total

    def stats(self) -> dict[str, int]:
        out = {"cold_hits": self.cold.hits, "cold_misses": self.cold.misses}
        for layer in self.layers:
            for k, v in layer.stats.items():
                out[k] = out.get(k, 0) + v
        return out


def fp16_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    """What one token's keys and values take at fp16 (the reference for compression ratios)."""
    return n_layers * n_kv_heads * head_dim * 2 * 2


__all__ = ["TierCache", "active", "fp16_bytes_per_token"]
