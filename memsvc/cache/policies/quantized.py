"""Dense quantized policies: a short exact window, everything older in packed blocks.

`k8v8`, `k6v4`, `kivi2`, `kivi4` and `turbo3`: tokens that leave the hot window
(KIVI's residual, 128 tokens) are encoded a block at a time with the named
codecs and attention reads every block (no retrieval, nothing evicted). The
first `sink` tokens stay exact (set sink=0 for the plain codec).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .plan import LayerPlan, check_budget


@dataclass(frozen=True)
class QuantizedPolicy:
    name: str = "k6v4"
    cache: ClassVar[str] = "tiered"  # the cache class that holds its sessions (memsvc.cache.factory)
    key_codec: str = "k6v4_k"
    value_codec: str = "k6v4_v"
    hot: int = 128
    sink: int = 4  # first tokens kept exact: attention sinks take the most weight, so their error counts most
    block_tokens: int = 64
    exact_dtype: str | None = "float16"  # exact tiers; None: the model's dtype

    def __post_init__(self):
        check_budget("hot", self.hot)
        check_budget("sink", self.sink, 0)
        check_budget("block_tokens", self.block_tokens)
        from memsvc.kernels.registry import CODECS
        for c in (self.key_codec, self.value_codec):
            if c not in CODECS:
                raise ValueError(f"unknown codec {c!r}; valid codecs: {', '.join(sorted(CODECS))}")

    def plan(self, layer: int, n_layers: int) -> LayerPlan:
        return LayerPlan(sink=self.sink, hot=self.hot, block=self.block_tokens, cold_k=self.key_codec, cold_v=self.value_codec, exact_dtype=self.exact_dtype)


def quantized(name: str, key_codec: str, value_codec: str):
    def make(**overrides):
        return QuantizedPolicy(**{"name": name, "key_codec": key_codec, "value_codec": value_codec, **overrides})
    return make
