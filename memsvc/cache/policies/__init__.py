"""Policy registry: name -> policy dataclass (each with `plan(layer, n_layers)`).

`get_policy(name, **overrides)`; an unknown name raises a ValueError listing
the valid ones.
"""
from __future__ import annotations

from typing import Callable

from .full import FullPolicy
from .h2o import H2OPolicy
from .plan import LayerPlan
from .pyramidkv import PyramidKVPolicy
from .quantized import QuantizedPolicy, quantized
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tiered import TieredPolicy, tiered_v8

POLICIES: dict[str, Callable] = {
    "full": FullPolicy,
    "k8v8": quantized("k8v8", "k8v8_k", "k8v8_v"),
    "k6v4": quantized("k6v4", "k6v4_k", "k6v4_v"),
    "kivi2": quantized("kivi2", "kivi2_k", "kivi2_v"),
    "kivi4": quantized("kivi4", "kivi4_k", "kivi4_v"),
    "turbo3": quantized("turbo3", "turbo3", "turbo3"),
    "tiered": TieredPolicy,
    "tiered-v8": tiered_v8,
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "snapkv": SnapKVPolicy,
    "pyramidkv": PyramidKVPolicy,
}

DEFAULT_POLICY = "tiered"
EVICTION = ("streaming", "h2o", "snapkv", "pyramidkv")


def get_policy(name: str = "", **overrides):
    name = name or DEFAULT_POLICY
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    try:
        return POLICIES[name](**overrides)
    except TypeError as exc:
        raise ValueError(f"bad settings for policy {name!r}: {exc}") from None


__all__ = ["POLICIES", "DEFAULT_POLICY", "EVICTION", "LayerPlan", "get_policy", "FullPolicy", "QuantizedPolicy",
           "TieredPolicy", "StreamingPolicy", "H2OPolicy", "SnapKVPolicy", "PyramidKVPolicy"]
