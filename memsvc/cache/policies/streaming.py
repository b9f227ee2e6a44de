"""`streaming`: StreamingLLM (Xiao et al., 2023): attention sinks plus a recent window.

The first `sink` tokens and the last `budget - sink` tokens stay; every token
that leaves the window is evicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .plan import LayerPlan, check_budget


@dataclass(frozen=True)
class StreamingPolicy:
    name: str = "streaming"
    cache: ClassVar[str] = "tiered"  # the cache class that holds its sessions (memsvc.cache.factory)
    budget: int = 512  # resident tokens per head
    sink: int = 4
    block_tokens: int = 64
    exact_dtype: str | None = "float16"  # exact tiers; None: the model's dtype

    def __post_init__(self):
        check_budget("sink", self.sink, 0)
        check_budget("budget", self.budget, self.sink + 1)

    def plan(self, layer: int, n_layers: int) -> LayerPlan:
        return LayerPlan(sink=self.sink, hot=self.budget - self.sink, block=self.block_tokens, exact_dtype=self.exact_dtype)
