"""`full`: no compression; every token's keys and values at the model's dtype."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .plan import LayerPlan, check_budget


@dataclass(frozen=True)
class FullPolicy:
    name: str = "full"
    cache: ClassVar[str] = "full"  # the cache class that holds its sessions (memsvc.cache.factory)
    block_tokens: int = 64  # tokens per stored KV block

    def __post_init__(self):
        check_budget("block_tokens", self.block_tokens)

    def plan(self, layer: int, n_layers: int) -> LayerPlan:
        return LayerPlan(hot=None, block=self.block_tokens)
