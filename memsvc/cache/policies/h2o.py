"""`h2o`: Heavy-Hitter Oracle (Zhang et al., 2023).

Half the budget is the recent window, half the heavy hitters: tokens with the
largest attention summed over every query so far. A token leaving the window
competes with the kept heavy hitters; the lowest cumulative score is evicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .plan import LayerPlan, check_budget


@dataclass(frozen=True)
class H2OPolicy:
    name: str = "h2o"
    cache: ClassVar[str] = "tiered"  # the cache class that holds its sessions (memsvc.cache.factory)
    budget: int = 512  # resident tokens per head
    recent_fraction: float = 0.5
    block_tokens: int = 64
    exact_dtype: str | None = "float16"  # exact tiers; None: the model's dtype

    def __post_init__(self):
        check_budget("budget", self.budget, 2)
        if not 0.0 < self.recent_fraction < 1.0:
            raise ValueError(f"recent_fraction must be in (0, 1), got {self.recent_fraction}")

    def plan(self, layer: int, n_layers: int) -> LayerPlan:
        recent = max(1, round(self.budget * self.recent_fraction))
        return LayerPlan(hot=recent, keep=self.budget - recent, keep_by="attention", block=self.block_tokens, exact_dtype=self.exact_dtype)
