"""The `memsvc` attention function, registered with transformers' AttentionInterface.

A model whose `config._attn_implementation` is "memsvc" calls `memsvc_attention`
in every attention layer. While a `TieredCache` is active in this thread
(`with active(cache):`), attention reads that cache's tiers (its layer's
`attend`, then `settle`); otherwise it is exactly SDPA with the SDPA mask, so
one loaded model serves tiered and plain sessions side by side.

Families differ in what their attention layers pass: `scaling` (Gemma-2's
query_pre_attn_scalar), `softcap` (Gemma-2's tanh cap on the logits, which SDPA
cannot apply: such layers get the eager form here, and the tiered layer caps each
tier's logits) and `sliding_window` (Mistral, Gemma-2, Phi-3, Qwen2 with
use_sliding_window): the SDPA mask honours it; the tiered cache attends every
token it holds, so a window narrower than the session is refused, not ignored.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from memsvc.errors import FailedPrecondition

NAME = "memsvc"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("memsvc_active_cache", default=None)
_PACKED: contextvars.ContextVar = contextvars.ContextVar("memsvc_packed_parts", default=None)


@contextlib.contextmanager
def active(cache):
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def packing(parts):
    """parts: [(cache, start, end)] in sequence order, the rows [start, end) of the packed call being the next
    tokens of that cache."""
    token = _PACKED.set(parts)
    try:
        yield parts
    finally:
        _PACKED.reset(token)


def memsvc_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    parts = _PACKED.get()
    if parts is not None:
        return _packed_attention(parts, module, query, key, value, scaling, dropout, kwargs), None
    return _attention(module, query, key, value, attention_mask, scaling, dropout, kwargs), None


def _attention(module, query, key, value, attention_mask, scaling, dropout, kwargs) -> torch.Tensor:
    """One sequence's attention: the active tiered cache's layer, else SDPA; [1, n, Hq, Dv]."""
    cache = _ACTIVE.get()
    softcap = kwargs.get("softcap")
    if cache is None:
        if softcap is not None:
            return _softcapped_attention(query, key, value, attention_mask, scaling, softcap)
        if query.shape[2] == 1 and attention_mask is None and query.shape[0] == 1 and not dropout:
            return _one_query(query, key, value, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)[0]
    layer = cache.layers[module.layer_idx]
    window = kwargs.get("sliding_window")
    if window is not None and layer.seen > window:
        raise FailedPrecondition(
            f"layer {module.layer_idx} of this model attends a sliding window of {window} tokens and the session "
            f"would hold {layer.seen}: the tiered cache attends every token it holds, so it cannot serve this "
            f"model past its window; use the full policy, or a context of at most {window} tokens")
    out = layer.attend(query, scaling if scaling is not None else query.shape[-1] ** -0.5, softcap=softcap)
    layer.settle()
    return out


def _one_query(query, key, value, scaling) -> torch.Tensor:
    """A decode step's attention: query [1, Hq, 1, D] over key / value [1, H, T, D] -> [1, 1, Hq, Dv]. The G query
    heads of each KV head meet its keys in one product, so keys and values are read once and never copied per
    query head (at 4k on SmolLM2: 0.47 ms a layer against SDPA's 0.65, one thread)."""
    _, Hq, _, D = query.shape
    H = key.shape[1]
    q = query[0].reshape(H, Hq // H, D)  # query head h * G + g reads KV head h
    logits = torch.bmm(q, key[0].transpose(1, 2)).mul_(scaling if scaling is not None else D ** -0.5)  # [H, G, T]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.bmm(probs, value[0]).reshape(1, 1, Hq, -1)  # [H, G, Dv] -> [1, 1, Hq, Dv]


def _packed_attention(parts, module, query, key, value, scaling, dropout, kwargs) -> torch.Tensor:
    """query [1, Hq, T, D], key / value [1, H, T, D] of the packed rows (no cache updated yet) -> [1, T, Hq, Dv]:
    each part's rows appended to its cache and attended over it, as a call of that part alone would."""
    outs = []
    for cache, lo, hi in parts:
        k, v = cache.update(key[:, :, lo:hi], value[:, :, lo:hi], module.layer_idx)
        n, T = hi - lo, k.shape[2]
        # a part's own causal mask: its n queries are the last n of the T tokens its cache now holds
        mask = None if n == 1 else torch.ones(1, 1, n, T, dtype=torch.bool, device=query.device).tril(T - n)
        with cache.attending():
            outs.append(_attention(module, query[:, :, lo:hi], k, v, mask, scaling, dropout, kwargs))
    return torch.cat(outs, dim=1)


def _softcapped_attention(query, key, value, attention_mask, scaling, softcap: float) -> torch.Tensor:
    """Attention whose logits are capped to (-softcap, softcap) by softcap * tanh(logit / softcap), before the mask.
    query [B, Hq, n, D]; key, value [B, H, T, D]; attention_mask bool [B, 1, n, >=T] (True: attend), or None for
    a plain causal mask (the SDPA mask skips it) -> [B, n, Hq, Dv]."""
    n, T = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, key.transpose(2, 3)) * scale  # [B, Hq, n, T]
    logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is None:  # causal, the queries being the last n of the T positions
        attention_mask = torch.ones(n, T, dtype=torch.bool, device=query.device).tril(T - n)
    else:
        attention_mask = attention_mask[..., :T]
    if attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, float("-inf"))
    else:  # an additive float mask
        logits = logits + attention_mask
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def memsvc_mask(*args, **kwargs):
    """The SDPA mask, except while a tiered cache is active: its layers mask by position themselves, and a mask
    over a long session's every position (queries x tokens) would cost more than the step."""
    if _ACTIVE.get() is not None or _PACKED.get() is not None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, memsvc_attention)
AttentionMaskInterface.register(NAME, memsvc_mask)


def use_memsvc_attention(model) -> None:
    """Switch a loaded transformers model to the memsvc attention function (once)."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)
