"""The `memsvc` attention function, registered with transformers' AttentionInterface.

A model whose `config._attn_implementation` is "memsvc" calls `memsvc_attention`
in every attention layer. While a `TieredCache` is active in this thread
(`with active(cache):`), attention reads that cache's tiers (its layer's
`attend`, then `settle`); otherwise it is exactly SDPA with the SDPA mask, so
one loaded model serves tiered and plain sessions side by side.
"""
from __future__ import annotations

import contextlib
import contextvars

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "memsvc"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("memsvc_active_cache", default=None)


@contextlib.contextmanager
def active(cache):
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def memsvc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cache = _ACTIVE.get()
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = cache.layers[module.layer_idx]
    out = layer.attend(query, scaling if scaling is not None else query.shape[-1] ** -0.5)
    layer.settle()
    return out, None


AttentionInterface.register(NAME, memsvc_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_memsvc_attention(model) -> None:
    """Switch a loaded transformers model to the memsvc attention function (once)."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
