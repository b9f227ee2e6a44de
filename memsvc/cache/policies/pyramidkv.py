"""`pyramidkv`: PyramidKV (Cai et al., 2024): SnapKV selection with a budget per layer
that shrinks linearly from the first layer to the last (a pyramid), the mean
budget over layers equal to `budget`.

As in the paper, the top layer gets budget / beta (beta = 20 by default) and
the bottom layer 2·budget − budget / beta, in arithmetic progression; no layer
keeps fewer than window + 1 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from .snapkv import SnapKVPolicy


@dataclass(frozen=True)
class PyramidKVPolicy(SnapKVPolicy):
    name: str = "pyramidkv"
    beta: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def layer_budget(self, layer: int, n_layers: int) -> int:
        lo = self.budget / self.beta
        hi = 2 * self.budget - lo
        b = hi - (hi - lo) * layer / max(n_layers - 1, 1)
        return max(self.window + 1, round(b))
