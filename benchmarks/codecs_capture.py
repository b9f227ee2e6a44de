"""The keys, values and queries benchmarks/codecs.py measures on: one forward of the model, captured.

capture() runs one forward over the ids and keeps every layer's keys and values ([3, T, 64]; keys post-RoPE,
as transformers stores them) and, through a pre-hook on each attention module, the queries of the last
N_QUERIES positions (q_proj of the layer's input, RoPE applied with the model's own cos/sin). attend() is
causal GQA softmax attention of those queries, the reference every codec's attention error is taken against.
"""
from __future__ import annotations

import math

import torch

N_QUERIES = 64


def capture(m, ids: list[int]):
    """One forward over ids -> (keys, values: per layer [3, T, 64] fp32; queries: per layer [9, 64, 64]; attn_out check)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = m.model
    layers = model.model.layers
    saved: dict[int, dict] = {}
    hooks = []

    def pre(idx):
        def hook(mod, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            saved.setdefault(idx, {}).update(h=h[:, -N_QUERIES:].detach().clone(),
                                             cos=cos[:, -N_QUERIES:].clone(), sin=sin[:, -N_QUERIES:].clone())
        return hook

    def o_pre(idx):
        def hook(mod, args):
            saved.setdefault(idx, {})["o"] = args[0][:, -N_QUERIES:].detach().clone()  # [1, 64, H_q * D]
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(o_pre(i)))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    cache = out.cache
    keys = [cache.layers[i].keys[0].detach().clone() for i in range(len(layers))]
    values = [cache.layers[i].values[0].detach().clone() for i in range(len(layers))]
    queries, model_out = [], []
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for i, layer in enumerate(layers):
            s = saved[i]
            q = layer.self_attn.q_proj(s["h"]).view(1, N_QUERIES, -1, hd).transpose(1, 2)  # [1, H_q, 64, D]
            q, _ = apply_rotary_pos_emb(q, q, s["cos"], s["sin"])
            queries.append(q[0].contiguous())
            model_out.append(s["o"][0].view(N_QUERIES, -1, hd).transpose(0, 1))  # [H_q, 64, D]
    return keys, values, queries, model_out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last len(q) positions. q: [H_q, n, D]; k, v: [H_kv, T, D] -> [H_q, n, D]."""
    hq, n, d = q.shape
    g = hq // k.shape[0]
    k = k.float().repeat_interleave(g, dim=0)
    v = v.float().repeat_interleave(g, dim=0)
    t = k.shape[1]
    s = (q.float() @ k.transpose(-1, -2)) / math.sqrt(d)  # [H_q, n, T]
    pos = torch.arange(t - n, t).unsqueeze(1)
    s = s.masked_fill(torch.arange(t).unsqueeze(0) > pos, float("-inf"))
    return torch.softmax(s, dim=-1) @ v
