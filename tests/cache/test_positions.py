"""Positions inside the window: RoPE moves, and a tiered layer past the window attends what the scheme says.

The reference here applies transformers' own RoPE (`apply_rotary_pos_emb` of the Llama module) at the positions
the scheme assigns (near tokens at their own, far exact tokens at distance `far`, the tokens of a far cold block
at far - 0 .. far - (B-1), in their order) to raw keys and queries, and attends naively; the layer must give the
same output, and no assigned distance may reach the window.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import rotate_half

from memsvc.cache.policies.plan import LayerPlan
from memsvc.cache.rope import Rope
from memsvc.cache.tiered.cold import ColdStore
from memsvc.cache.tiered.layer import TierLayer

D = 16
FREQ = tuple(1.0 / (10000 ** (i / (D // 2))) for i in range(D // 2))


def _hf(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE (the Llama module's rotate_half form) of x [..., T, D] at positions [T] (or [..., T])."""
    freq = torch.tensor(FREQ, dtype=torch.float64)
    angle = positions.double().unsqueeze(-1) * freq
    emb = torch.cat([angle, angle], -1)
    cos, sin = emb.cos().float(), emb.sin().float()  # broadcast over x's leading dims
    return x * cos + rotate_half(x) * sin  # transformers' apply_rotary_pos_emb


def test_rotate_is_transformers_rope_and_composes():
    rope = Rope(FREQ)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, D, generator=g)
    pos = torch.tensor([0, 3, 17, 1000, 123456])
    assert torch.allclose(rope.rotate(x, pos), _hf(x, pos), atol=1e-5)
    assert torch.allclose(rope.rotate(rope.rotate(x, pos), -pos), x, atol=1e-5)
    q, k = torch.randn(D, generator=g), torch.randn(D, generator=g)
    # a score depends only on the distance: q at 900 . k at 100 == q at 810 . k at 10
    a = rope.rotate(q.view(1, D), 900) @ rope.rotate(k.view(1, D), 100).T
    b = rope.rotate(q.view(1, D), 810) @ rope.rotate(k.view(1, D), 10).T
    assert torch.allclose(a, b, atol=1e-4)
    partial = Rope(FREQ[:4])  # 8 of 16 dims rotate, the rest pass through
    y = partial.rotate(x, pos)
    assert torch.equal(y[..., 8:], x[..., 8:]) and not torch.allclose(y[..., :8], x[..., :8])


def _layer(window: int, plan: LayerPlan) -> TierLayer:
    return TierLayer(plan, 0, ColdStore(), torch.float32, Rope(FREQ), window, moving=True)


def _feed(layer: TierLayer, n: int, g: torch.Generator, H: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """n tokens through the layer one chunk at a time, keys rotated at their positions (as the model does);
    returns the raw (unrotated) keys and values [H, n, D]."""
    k_raw, v = torch.randn(H, n, D, generator=g), torch.randn(H, n, D, generator=g)
    for lo in range(0, n, 37):
        hi = min(n, lo + 37)
        k = _hf(k_raw[:, lo:hi], torch.arange(lo, hi))
        layer.update(k.unsqueeze(0), v[:, lo:hi].unsqueeze(0))
        q = _hf(torch.randn(2 * H, hi - lo, D, generator=g), torch.arange(lo, hi))
        layer.attend(q.unsqueeze(0), D ** -0.5)
        layer.settle()
    return k_raw, v


@pytest.mark.parametrize("window,layout,pre_rope", [(96, "shared", False), (160, "shared", False),
                                                    (96, "point", False), (96, "ordered", False),
                                                    (160, "ordered", False), (96, "shared", True),
                                                    (96, "ordered", True), (160, "point", True)])
def test_a_layer_past_its_window_attends_at_the_assigned_positions(window, layout, pre_rope):
    """Every block and token retrieved (retrieve 0), 8-bit cold and warm rows: the layer's output equals naive
    attention over the same (dequantized) keys placed as the scheme says, in each far layout ("ordered" with
    near at half the window: more far blocks than slots, so the oldest share the last), with cold keys stored
    at their positions or before RoPE (pre_rope: the stored codes are of the raw keys)."""
    plan = LayerPlan(sink=2, hot=16, block=8, cold_k="k8v8_k", cold_v="k8v8_v", keep=6, keep_by="attention",
                     keep_bits=8, far_layout=layout, near=window // 2 if layout == "ordered" else 0,
                     pre_rope_keys=pre_rope)
    g = torch.Generator().manual_seed(1)
    layer = _layer(window, plan)
    n = 4 * window
    _, v = _feed(layer, n, g)
    t = layer.seen  # the next query's position
    assert t == n > window and layer.n_blocks * plan.block > window
    assert 0 < layer.far_blocks(t) < layer.n_blocks  # far and near blocks, and far sinks (t > near)
    H = layer.H
    q_raw = torch.randn(2 * H, 1, D, generator=g)
    k_new, v_new = torch.randn(H, 1, D, generator=g), torch.randn(H, 1, D, generator=g)
    # what the layer holds, as positions and raw keys per head, before this step
    rows = []  # per head: (assigned positions [T], raw keys [T, D], values [T, D])
    cold = layer.cold.get_stacked(0, list(range(layer.n_blocks)), 0)
    k_abs = layer.kcodec.decode(cold).float()  # [nb, H, B, D], at their positions (raw with pre_rope)
    v_cold = layer.vcodec.decode(layer.cold.get_stacked(0, list(range(layer.n_blocks)), 1)).float()
    B = plan.block
    for h in range(H):
        pos, keys, vals = [], [], []
        for i in range(layer.sink_k.shape[1]):  # sinks: stored at their positions
            pos.append(i)
            keys.append(_hf(layer.sink_k[h, i].float().view(1, 1, D), torch.tensor([-i])).view(D))
            vals.append(layer.sink_v[h, i].float())
        warm_k, warm_v = layer._keep_float(layer.keep_k)[h], layer._keep_float(layer.keep_v)[h]
        for j, p in enumerate(layer.keep_pos[h].tolist()):
            pos.append(p)
            keys.append(_hf(warm_k[j].view(1, 1, D), torch.tensor([-p])).view(D))
            vals.append(warm_v[j])
        for b in range(layer.n_blocks):
            start = plan.sink + b * B
            for j in range(B):
                if layer.live[b, h, j]:
                    pos.append(start + j)
                    keys.append(k_abs[b, h, j] if pre_rope else
                                _hf(k_abs[b, h, j].view(1, 1, D), torch.tensor([-(start + j)])).view(D))
                    vals.append(v_cold[b, h, j])
        for j, p in enumerate(layer.hot_pos.tolist()):
            pos.append(p)
            keys.append(_hf(layer.hot_k[h, j].float().view(1, 1, D), torch.tensor([-p])).view(D))
            vals.append(layer.hot_v[h, j].float())
        pos.append(t)
        keys.append(k_new[h, 0])
        vals.append(v_new[h, 0])
        rows.append((torch.tensor(pos), torch.stack(keys), torch.stack(vals)))
    # the scheme: a token within `near` of the query keeps its distance; a far exact token sits at `far`; a far
    # cold block's tokens at far - offset (its start at `far`)
    want = []
    for h in range(H):
        pos, keys, vals = rows[h]
        assigned = pos.clone()
        far = (t - pos) >= layer.near
        starts = plan.sink + ((pos - plan.sink) // B) * B
        in_cold = torch.tensor([any(int(p) == plan.sink + b * B + j for b in range(layer.n_blocks) for j in range(B)
                                    if layer.live[b, h, j]) for p in pos])
        block_far = in_cold & ((t - starts) >= layer.near)
        assigned[far & ~in_cold] = t - layer.far
        if layout == "shared":  # a far block's tokens at far - offset (its start at `far`)
            assigned[block_far] = t - layer.far + (pos - starts)[block_far]
        elif layout == "point":  # every far token at `far`
            assigned[block_far] = t - layer.far
        else:  # block b's slot: how many far blocks are newer than it, the oldest sharing the last slot
            nf, slots = layer.far_blocks(t), (layer.far - layer.near) // B
            slot = (nf - 1 - (starts - plan.sink) // B).clamp(max=slots - 1)
            assigned[block_far] = (t - layer.near - (slot + 1) * B + 1 + (pos - starts))[block_far]
            assert slots < nf
        assert int((t - assigned).max()) < window  # no attended distance reaches the window
        k_at = _hf(keys.unsqueeze(0), assigned).squeeze(0)
        for g_ in range(2):
            qh = _hf(q_raw[2 * h + g_].view(1, 1, D), torch.tensor([t])).view(D)
            w = torch.softmax((k_at @ qh) * D ** -0.5, 0)
            want.append(w @ vals)
    k_t = _hf(k_new, torch.tensor([t]))
    q_t = _hf(q_raw, torch.tensor([t]))
    layer.update(k_t.unsqueeze(0), v_new.unsqueeze(0))
    got = layer.attend(q_t.unsqueeze(0), D ** -0.5)[0, 0]  # [Hq, D]
    assert torch.allclose(got, torch.stack(want), atol=2e-4), (got - torch.stack(want)).abs().max()


def test_within_the_window_a_moving_layer_attends_bit_for_bit_as_before():
    """A session shorter than `near`: a layer that can move positions gives exactly the outputs of one that
    cannot (the code before unbounded sessions), retrieval included."""
    plan = LayerPlan(sink=2, hot=16, block=8, cold_k="k8v8_k", cold_v="k8v8_v", retrieve=32, keep=6,
                     keep_by="attention", keep_bits=8)
    outs = []
    for moving in (True, False):
        g = torch.Generator().manual_seed(2)
        layer = TierLayer(plan, 0, ColdStore(), torch.float32, Rope(FREQ), 512, moving=moving)
        _feed(layer, 300, g)
        assert layer.far_blocks(layer.seen) == 0 and layer.n_blocks * plan.block > plan.retrieve
        q = _hf(torch.randn(2 * layer.H, 5, D, generator=g), torch.arange(300, 305))
        k, v = torch.randn(layer.H, 5, D, generator=g), torch.randn(layer.H, 5, D, generator=g)
        layer.update(_hf(k, torch.arange(300, 305)).unsqueeze(0), v.unsqueeze(0))
        outs.append(layer.attend(q.unsqueeze(0), D ** -0.5))
    assert torch.equal(outs[0], outs[1])
    assert math.isclose(layer.far, layer.near - 1)


def test_pre_rope_cold_keys_hold_the_raw_keys_within_the_codes_step():
    """pre_rope_keys: a cold block's key codes decode to the keys before RoPE (the model's keys rotated back by
    their positions), each within half a step of its row's 8-bit codes; the Quest boxes still bound the keys
    at their positions; and within the window the layer attends as one storing them rotated does, up to the
    codes' error."""
    outs, layers = [], []
    for pre in (True, False):
        plan = LayerPlan(sink=2, hot=16, block=8, cold_k="k8v8_k", cold_v="k8v8_v", retrieve=32, pre_rope_keys=pre)
        g = torch.Generator().manual_seed(2)
        layer = TierLayer(plan, 0, ColdStore(), torch.float32, Rope(FREQ), 512, moving=True)
        k_raw, _ = _feed(layer, 300, g)
        q = _hf(torch.randn(2 * layer.H, 1, D, generator=g), torch.tensor([300]))
        layer.update(_hf(torch.randn(layer.H, 1, D, generator=g), torch.tensor([300])).unsqueeze(0),
                     torch.randn(layer.H, 1, D, generator=g).unsqueeze(0))
        outs.append(layer.attend(q.unsqueeze(0), D ** -0.5))
        layers.append((layer, k_raw))
    layer, k_raw = layers[0]
    nb, B, s = layer.n_blocks, 8, 2
    stored = layer.kcodec.decode(layer.cold.get_stacked(0, list(range(nb)), 0)).float()  # [nb, H, B, D]
    want = k_raw[:, s:s + nb * B].reshape(layer.H, nb, B, D).transpose(0, 1)  # raw keys of the cold positions
    step = (want.amax(-1, keepdim=True) - want.amin(-1, keepdim=True)) / 255  # per token row
    assert bool(((stored - want).abs() <= step / 2 + 1e-3).all())
    from memsvc.cache.tiered.rows import _dq8
    at_pos = layer._cold_tensor(0, list(range(nb)), layer.kcodec, torch.float32).view(layer.H, nb, B, D)
    mn, mx = _dq8(layer.sum_min), _dq8(layer.sum_max)  # [nb, H, D] boxes of the keys at their positions
    slack = 2 * step.transpose(0, 1).amax() + 1e-3
    assert bool((at_pos.transpose(0, 1) >= mn.unsqueeze(2) - slack).all())
    assert bool((at_pos.transpose(0, 1) <= mx.unsqueeze(2) + slack).all())
    assert torch.allclose(outs[0], outs[1], atol=2e-2) and not torch.equal(outs[0], outs[1])


def test_far_bounds_bound_the_moved_keys():
    """The Quest bound of a far block, taken on its stored box with the query moved by its start, is at
    least every logit of the block's keys moved to 0..B-1 against the query at `far`."""
    plan = LayerPlan(sink=2, hot=16, block=8, cold_k="k8v8_k", cold_v="k8v8_v")
    g = torch.Generator().manual_seed(3)
    layer = _layer(96, plan)
    _feed(layer, 400, g)
    t = layer.seen
    nf = layer.far_blocks(t)
    assert nf > 5
    from memsvc.cache.tiered.rows import _dq8
    q = _hf(torch.randn(layer.H, 2, 3, D, generator=g), torch.tensor([t - 2, t - 1, t]))
    q_far = layer.far_query(q, torch.tensor([t - 2, t - 1, t]))
    ub = layer.far_bounds(q_far, _dq8(layer.sum_min)[:nf], _dq8(layer.sum_max)[:nf])  # [H, 3, nf]
    keys = layer.far_keys(layer._cold_tensor(0, list(range(nf)), layer.kcodec, torch.float32), torch.arange(nf))
    logits = torch.einsum("hgnd,hkd->hnk", q_far, keys).view(layer.H, 3, nf, plan.block)  # summed over g
    # the bound sums over the group's queries of each query row; the moved keys' logits never exceed it
    assert bool((logits.amax(-1) <= ub + 1e-3).all())


def test_a_far_budget_caps_the_far_blocks_each_query_retrieves():
    """far_retrieve: a decode query retrieves at most far_retrieve // B far blocks, and its other picks are near
    blocks (the budget of `retrieve` is still spent); without it the same queries pick more far blocks."""
    got = {}
    for far_retrieve in (0, 16):
        plan = LayerPlan(sink=2, hot=16, block=8, cold_k="k8v8_k", cold_v="k8v8_v", retrieve=64,
                         far_retrieve=far_retrieve)
        g = torch.Generator().manual_seed(4)
        layer = _layer(96, plan)
        _feed(layer, 600, g)
        t = layer.seen
        nf = layer.far_blocks(t)
        assert 8 < nf < layer.n_blocks - 8
        q = _hf(torch.randn(layer.H, 2, 1, D, generator=g), torch.tensor([t]))
        _, _, _, chosen = layer._cold_keys(q, layer.far_query(q, torch.tensor([t])), nf)  # [H, 1, nb]
        assert bool((chosen.sum(-1) == 8).all())  # retrieve // B blocks each
        got[far_retrieve] = chosen[..., :nf].sum(-1)
    assert bool((got[16] <= 2).all()) and int(got[0].max()) > 2
