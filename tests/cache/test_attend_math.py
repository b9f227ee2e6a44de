"""The tiered layer's attention arithmetic: softmax over parts laid end to end, cold p.v in bf16."""
import math

import pytest
import torch

from memsvc.cache.tiered.attend import _LOW_DTYPE, _softmax_parts


@pytest.mark.parametrize("sizes", [(5,), (7, 130), (3, 64, 9), (1, 1, 1)])
def test_softmax_parts_equal_the_softmax_of_their_concatenation(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    parts = [torch.randn(2, 3, 4, n, generator=g) * 6 for n in sizes]
    parts[-1][..., 0] = float("-inf")  # masked entries get weight 0
    if len(parts) > 1:
        parts[1][1] = float("-inf")  # a part masked whole in some rows: the others carry them
    ref = torch.softmax(torch.cat(parts, -1), -1)
    got = _softmax_parts([p.clone() for p in parts])
    assert [p.shape for p in got] == [p.shape for p in parts]
    assert torch.allclose(torch.cat(got, -1), ref, atol=1e-6, rtol=1e-5)
    assert bool((torch.cat(got, -1)[..., sum(sizes) - sizes[-1]] == 0).all())


def test_softmax_parts_work_in_place():
    x = torch.randn(3, 10)
    out = _softmax_parts([x])
    assert out[0] is x and torch.allclose(x.sum(-1), torch.ones(3))


def test_cold_pv_in_its_dtype_stays_within_the_bf16_rounding_bound():
    # weights over 8,192 tokens (a 128-block union) and 3-bit-like values: the bf16 operands' error is bounded by
    # 2^-8 relative per operand, far below what 3-bit values lose
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 123, 8192, generator=g) * 3, -1)
    v = torch.randn(3, 8192, 64, generator=g)
    ref = torch.bmm(p.double(), v.double())
    got = torch.bmm(p.to(_LOW_DTYPE), v.to(_LOW_DTYPE)).double()
    bound = 2 * 2 ** -8 * torch.bmm(p.double(), v.double().abs())  # |Σ p v| error <= Σ p |v| (δp + δv)
    assert bool(((got - ref).abs() <= bound + 1e-6).all())
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.01 and math.isfinite(rel)


@pytest.mark.parametrize("cold_v", ["k8v8_v", "turbo3"])
def test_cold_values_keep_fp32_for_8bit_values_and_stay_within_bf16_rounding_for_3bit(cold_v):
    from memsvc.cache.tiered.cold import ColdStore
    from memsvc.cache.tiered.cold import stack_packed
    from memsvc.cache.tiered.layer import TierLayer
    from memsvc.cache.policies.plan import LayerPlan

    H, D, B, NB = 2, 16, 8, 6
    plan = LayerPlan(sink=0, hot=B, block=B, cold_k="k8v8_k", cold_v=cold_v)
    layer = TierLayer(plan, 3, ColdStore(), torch.float32)
    g = torch.Generator().manual_seed(5)
    layer.update(torch.randn(1, H, (NB + 1) * B, D, generator=g), torch.randn(1, H, (NB + 1) * B, D, generator=g))
    layer.settle()
    assert layer.n_blocks == NB
    ids = torch.arange(NB)
    probs = torch.softmax(torch.randn(H, 2, 3, NB * B, generator=g), -1)  # [H, G, n, U*B]
    got = layer._cold_values(ids, probs)  # [H, G*n, D]
    v = layer.vcodec.decode(stack_packed([kv[1] for kv in layer.cold.get_many(3, ids.tolist())])).float()
    v = v.permute(1, 0, 2, 3).reshape(H, NB * B, D)  # [H, U*B, D] fp32
    ref = torch.bmm(probs.reshape(H, 6, NB * B), v)
    if cold_v == "k8v8_v" or _LOW_DTYPE == torch.float32:
        assert torch.equal(got, ref)  # 8-bit values: bf16 rounding would be as large as their own step
    else:
        bound = 2 * 2 ** -8 * torch.bmm(probs.reshape(H, 6, NB * B), v.abs())
        assert bool(((got - ref).abs() <= bound + 1e-6).all()) and not torch.equal(got, ref)


@pytest.mark.parametrize("cold_k", ["k8v8_k", "k6v4_k"])
def test_cold_logits_keep_fp32_for_8bit_keys_and_stay_within_bf16_rounding_for_6bit(cold_k, monkeypatch):
    """6-bit keys: q.k with bf16 operands and logits; each of q, k and the logit rounds at most 2^-9 relative, so
    every logit moves by at most d = 3 * 2^-9 * scaling * sum|q||k|, every weight by a factor within e^(+-2d), and
    the output by at most (e^(2d) - 1) * max|v|. 8-bit keys keep fp32: the same output bit for bit."""
    from memsvc.cache.tiered.cold import ColdStore
    from memsvc.cache.tiered import attend as layer_mod
    from memsvc.cache.tiered.layer import TierLayer
    from memsvc.cache.policies.plan import LayerPlan

    H, G, D, B, NB, n, scaling = 2, 3, 16, 8, 6, 5, 0.25
    plan = LayerPlan(sink=0, hot=B, block=B, cold_k=cold_k, cold_v="k8v8_v")  # values fp32: only keys differ
    layer = TierLayer(plan, 3, ColdStore(), torch.float32)
    g = torch.Generator().manual_seed(11)
    layer.update(torch.randn(1, H, (NB + 1) * B, D, generator=g) * 2, torch.randn(1, H, (NB + 1) * B, D, generator=g))
    layer.settle()
    q = torch.randn(1, H * G, n, D, generator=g) * 2
    got = layer.attend(q, scaling)
    bf16 = layer_mod._LOW_DTYPE == torch.bfloat16
    monkeypatch.setattr(layer_mod, "_LOW_DTYPE", torch.float32)
    ref = layer.attend(q, scaling)
    if cold_k == "k8v8_k" or not bf16:
        assert torch.equal(got, ref)
        return
    k = torch.cat([layer.hot_k.float()] + [layer._decode(layer.kcodec, layer.cold.get_stacked(3, list(range(NB)), 0))], 1)
    qq = q[0].float().reshape(H, G * n, D)
    d = 3 * 2 ** -9 * scaling * torch.bmm(qq.abs(), k.abs().transpose(1, 2)).max().item()
    v = torch.cat([layer.hot_v.float()] + [layer._decode(layer.vcodec, layer.cold.get_stacked(3, list(range(NB)), 1))], 1)
    v_max = v.abs().max().item()
    bound = (math.exp(2 * d) - 1) * v_max
    assert not torch.equal(got, ref)
    assert (got - ref).abs().max().item() <= bound
    assert ((got - ref).norm() / ref.norm()).item() < 0.01  # in practice far inside the bound


def test_values_of_blocks_below_v_skip_are_left_out_only_where_that_saves_work():
    """One query (G*n = 2 weight rows per head): a block under v_skip is not decoded. A chunk of 40 queries: copying
    its kept weights would cost more than decoding the block, so every block is weighted, the same as v_skip 0."""
    from memsvc.cache.tiered.cold import ColdStore
    from memsvc.cache.tiered.layer import TierLayer
    from memsvc.cache.policies.plan import LayerPlan

    H, D, B, NB = 2, 16, 8, 6
    out = {}
    for v_skip in (1e-4, 0.0):
        plan = LayerPlan(sink=0, hot=B, block=B, cold_k="k8v8_k", cold_v="k8v8_v", v_skip=v_skip)
        layer = TierLayer(plan, 3, ColdStore(), torch.float32)
        g = torch.Generator().manual_seed(2)
        layer.update(torch.randn(1, H, (NB + 1) * B, D, generator=g), torch.randn(1, H, (NB + 1) * B, D, generator=g))
        layer.settle()
        for n in (1, 40):
            probs = torch.softmax(torch.randn(H, 2, n, NB * B, generator=g), -1)  # [H, G, n, U*B]
            probs[..., 2 * B:3 * B] = 1e-6  # block 2: below v_skip everywhere
            before = layer.stats["v_blocks_skipped"]
            out[v_skip, n] = (layer._cold_values(torch.arange(NB), probs), layer.stats["v_blocks_skipped"] - before)
    assert out[1e-4, 1][1] == 1 and not torch.equal(out[1e-4, 1][0], out[0.0, 1][0])
    assert out[1e-4, 40][1] == 0 and torch.equal(out[1e-4, 40][0], out[0.0, 40][0])
