"""Soft-capped attention logits (Gemma-2: softcap * tanh(logit / softcap)) in both memsvc attention paths.

Plain sessions (no tiered cache active) used to reach SDPA, which refuses a soft cap; the tiered layer used to
ignore it. Both now cap every logit before the mask, as transformers' own eager Gemma-2 attention does.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config
from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, eager_attention_forward

from memsvc.cache.tiered.cold import ColdStore
from memsvc.cache.attention import memsvc_attention
from memsvc.cache.tiered.cold import stack_packed
from memsvc.cache.tiered.layer import TierLayer
from memsvc.cache.policies.plan import LayerPlan

H, G, D = 2, 2, 16
CAP = 2.0
SCALING = 0.3  # not D ** -0.5: Gemma-2 scales by query_pre_attn_scalar, and the scale must come through


def _module() -> Gemma2Attention:
    cfg = Gemma2Config(hidden_size=64, num_attention_heads=H * G, num_key_value_heads=H, head_dim=D,
                       num_hidden_layers=1, attn_logit_softcapping=CAP)
    return Gemma2Attention(cfg, layer_idx=0).eval()


def _reference(q, k, v, allowed, softcap=CAP):
    """transformers' eager Gemma-2 attention; allowed bool [n, T] (True: attend) -> [1, n, Hq, D]."""
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    out, _ = eager_attention_forward(_module(), q, k, v, mask.view(1, 1, *allowed.shape), dropout=0.0,
                                     scaling=SCALING, softcap=softcap)
    return out


def _causal(n: int, T: int) -> torch.Tensor:
    return torch.ones(n, T, dtype=torch.bool).tril(T - n)


def _qkv(n: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H * G, n, D, generator=g) * 3, torch.randn(1, H, T, D, generator=g) * 3,
            torch.randn(1, H, T, D, generator=g))


@pytest.mark.parametrize("n, T, masked", [(9, 9, False), (1, 12, False), (4, 12, False), (4, 12, True)])
def test_plain_attention_caps_the_logits_like_eager_gemma2(n, T, masked):
    """Without a tiered cache: a causal mask the SDPA mask left out (None), or a given boolean mask (here a
    sliding window of 5), as the eager Gemma-2 attention computes them."""
    q, k, v = _qkv(n, T, seed=n + T)
    allowed = _causal(n, T)
    if masked:
        qpos = torch.arange(T - n, T).unsqueeze(1)
        allowed &= torch.arange(T).unsqueeze(0) > qpos - 5
    got, _ = memsvc_attention(_module(), q, k, v, allowed.view(1, 1, n, T) if masked else None,
                              scaling=SCALING, softcap=CAP)
    assert torch.allclose(got, _reference(q, k, v, allowed), atol=1e-5)
    uncapped, _ = memsvc_attention(_module(), q, k, v, allowed.view(1, 1, n, T) if masked else None, scaling=SCALING)
    assert not torch.allclose(got, uncapped, atol=1e-3)  # the cap matters at these logits


def _held(layer: TierLayer):
    """Every token the layer holds, in position order (sink, cold blocks decoded, hot): keys, values [1, H, T, D]."""
    ks, vs = [layer.sink_k.float()], [layer.sink_v.float()]
    if layer.n_blocks:
        blocks = layer.cold.get_many(layer.layer_idx, list(range(layer.n_blocks)))
        for codec, half, out in ((layer.kcodec, 0, ks), (layer.vcodec, 1, vs)):
            x = codec.decode(stack_packed([b[half] for b in blocks])).float()  # [nb, H, B, D]
            out.append(x.permute(1, 0, 2, 3).reshape(H, -1, D))
    ks.append(layer.hot_k.float())
    vs.append(layer.hot_v.float())
    return torch.cat(ks, 1).unsqueeze(0), torch.cat(vs, 1).unsqueeze(0)


@pytest.mark.parametrize("history, n", [(6, 1), (6, 3), (40, 1), (40, 5)])
def test_tiered_layer_caps_every_tier_before_the_mask(history, n):
    """Sink, cold (8-bit blocks, the mask of the chunk's own hot tokens) and hot: the layer's output equals
    the eager capped attention over what it holds; with 6 tokens only the exact tiers exist (no SDPA shortcut
    may skip the cap)."""
    plan = LayerPlan(sink=2, hot=8, block=8, cold_k="k8v8_k", cold_v="k8v8_v")
    layer = TierLayer(plan, 0, ColdStore(), torch.float32)
    q, k, v = _qkv(n, history + n, seed=history * 10 + n)
    layer.update(k[:, :, :history], v[:, :, :history])
    layer.settle()
    assert (layer.n_blocks > 0) == (history > 2 + 8 + 8)
    layer.update(k[:, :, history:], v[:, :, history:])
    got = layer.attend(q, SCALING, softcap=CAP)  # [1, n, Hq, D]
    held_k, held_v = _held(layer)
    assert torch.allclose(got, _reference(q, held_k, held_v, _causal(n, history + n)), atol=1e-5)
    assert not torch.allclose(got, _reference(q, held_k, held_v, _causal(n, history + n), softcap=None), atol=1e-3)
