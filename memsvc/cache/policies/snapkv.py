"""`snapkv`: SnapKV (Li et al., 2024).

At the end of each prompt the last `window` prompt queries vote: their
attention over the earlier tokens, summed over the window (and the query heads
of a KV group), smoothed by average pooling of width `pool`, picks the top
`budget - window` tokens per head; those and the window stay, the rest is
evicted. Generated tokens are appended until the next prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .plan import LayerPlan, check_budget


@dataclass(frozen=True)
class SnapKVPolicy:
    name: str = "snapkv"
    cache: ClassVar[str] = "tiered"  # the cache class that holds its sessions (memsvc.cache.factory)
    budget: int = 512  # resident tokens per head after each prompt
    window: int = 32
    pool: int = 7
    block_tokens: int = 64
    exact_dtype: str | None = "float16"  # exact tiers; None: the model's dtype

    def __post_init__(self):
        check_budget("window", self.window)
        check_budget("budget", self.budget, self.window + 1)
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd number >= 1, got {self.pool}")

    def layer_budget(self, layer: int, n_layers: int) -> int:
        return self.budget

    def plan(self, layer: int, n_layers: int) -> LayerPlan:
        b = self.layer_budget(layer, n_layers)
        return LayerPlan(hot=None, keep=b - self.window, keep_by="window", window=self.window, pool=self.pool,
                         block=self.block_tokens, exact_dtype=self.exact_dtype)
