"""Compression policies: one small dataclass each, registered by name.

A policy says how a session's KV cache is kept. This slice ships `full` (the
cache at the model's precision, the baseline every other policy is measured
against); the tiered and quantized policies join this registry as they land.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FullPolicy:
    """No compression: every token's keys and values at the model's dtype."""

    name: str = "full"
    block_tokens: int = 64  # tokens per stored KV block

    def __post_init__(self):
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")


POLICIES: dict[str, type] = {
    "full": FullPolicy,
}

DEFAULT_POLICY = "full"


def get_policy(name: str):
    name = name or DEFAULT_POLICY
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()
