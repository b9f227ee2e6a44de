"""Policy registry: name -> policy dataclass (each with `plan(layer, n_layers)`).

`get_policy(name, **overrides)`; an unknown name raises a ValueError listing
the valid ones. A session's record keeps its policy's settings (`policy_config`),
and `stored_policy` builds the policy a stored session is read with.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .full import FullPolicy
from .h2o import H2OPolicy
from .plan import LayerPlan
from .pyramidkv import PyramidKVPolicy
from .quantized import QuantizedPolicy, quantized
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tiered import TieredPolicy, tiered_k6, tiered_v8

POLICIES: dict[str, Callable] = {
    "full": FullPolicy,
    "k8v8": quantized("k8v8", "k8v8_k", "k8v8_v"),
    "k6v4": quantized("k6v4", "k6v4_k", "k6v4_v"),
    "kivi2": quantized("kivi2", "kivi2_k", "kivi2_v"),
    "kivi4": quantized("kivi4", "kivi4_k", "kivi4_v"),
    "turbo3": quantized("turbo3", "turbo3", "turbo3"),
    "tiered": TieredPolicy,
    "tiered-v8": tiered_v8,
    "tiered-k6": tiered_k6,
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "snapkv": SnapKVPolicy,
    "pyramidkv": PyramidKVPolicy,
}

DEFAULT_POLICY = "tiered"
POLICY_CONFIG = "policy_config"  # the record's layout key for its policy's settings
EVICTION = ("streaming", "h2o", "snapkv", "pyramidkv")


def get_policy(name: str = "", **overrides):
    name = name or DEFAULT_POLICY
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    try:
        return POLICIES[name](**overrides)
    except TypeError as exc:
        raise ValueError(f"bad settings for policy {name!r}: {exc}") from None


def policy_config(policy) -> dict:
    """A policy's settings in JSON types (tuples as lists), as a session's record keeps them."""
    out = {}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def stored_policy(name: str, config: dict | None = None):
    """The policy a stored session is read with: `name`'s policy with the session's own settings (`config`, as
    `policy_config` wrote them when it was created), so that a default changed since cannot misread what it
    stored. Settings the policy lists as READ_SIDE (how attention reads the cache, not what is stored: retrieval
    budgets, say) follow this server's defaults, and so do settings the config lacks (a session created before
    they existed, or before records kept settings), except those the policy lists in STORED_BEFORE: what every
    session stored before the setting existed (or changed its default) was written with. Settings this memsvc
    no longer has are ignored. ValueError for an unknown name or settings the policy refuses."""
    policy = get_policy(name)
    config = config or {}
    fields = {f.name for f in dataclasses.fields(policy)} - {"name"} - set(getattr(policy, "READ_SIDE", ()))
    pinned = {k: v for k, v in getattr(policy, "STORED_BEFORE", {}).items() if k not in config}
    if not config and not pinned:
        return policy
    for key, value in config.items():
        if key in fields:
            pinned[key] = tuple(value) if isinstance(value, list) and isinstance(getattr(policy, key), tuple) \
                else value
    return get_policy(name, **pinned)


def fit_policy(policy, rope_movable: bool):
    """A new session's policy with the settings its model cannot use turned off: cold keys stored before RoPE
    need a RoPE that can be moved (memsvc.cache.rope)."""
    if not rope_movable and getattr(policy, "pre_rope_keys", False):
        return dataclasses.replace(policy, pre_rope_keys=False)
    return policy


def record_policy(rec):
    """The policy a stored session (its SessionRecord) is read with: its own settings where its record keeps them
    (see `stored_policy`). ValueError for a policy or settings this memsvc cannot use."""
    return stored_policy(rec.policy, rec.layout.get(POLICY_CONFIG))


__all__ = ["POLICY_CONFIG", "fit_policy", "record_policy", "POLICIES", "DEFAULT_POLICY", "EVICTION", "LayerPlan", "get_policy", "policy_config", "stored_policy",
           "FullPolicy", "QuantizedPolicy", "TieredPolicy", "StreamingPolicy", "H2OPolicy", "SnapKVPolicy", "PyramidKVPolicy"]
