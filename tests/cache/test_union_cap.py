"""A prompt chunk of n queries attends at most k_sel * max(union_floor, ceil(n / B)) cold blocks of the union of
its picks, every (head, query)'s best blocks first.

One synthetic layer (2 KV heads, 2 query heads each, head dim 16, blocks of 8,
retrieve 16 = 2 blocks per query) with 24 cold blocks of random keys: a short
chunk's union is far larger than its cap.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from memsvc.cache.tiered.cold import ColdStore
from memsvc.cache.tiered.layer import TierLayer
from memsvc.cache.tiered.rows import _dq8
from memsvc.cache.policies.plan import LayerPlan

H, G, D, B, NB, RETRIEVE = 2, 2, 16, 8, 24, 16
K_SEL = RETRIEVE // B


def _layer(seed: int = 0, union_floor: int = 1) -> TierLayer:
    plan = LayerPlan(sink=0, hot=B, block=B, cold_k="k8v8_k", cold_v="k8v8_v", retrieve=RETRIEVE,
                     union_floor=union_floor)
    layer = TierLayer(plan, 0, ColdStore(), torch.float32)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, H, (NB + 1) * B, D, generator=g)
    v = torch.randn(1, H, (NB + 1) * B, D, generator=g)
    layer.update(k, v)
    layer.settle()
    assert layer.n_blocks == NB
    return layer


def _queries(n: int, seed: int) -> torch.Tensor:
    return torch.randn(H, G, n, D, generator=torch.Generator().manual_seed(seed))


def _picks(layer: TierLayer, q: torch.Tensor) -> tuple[Counter, torch.Tensor]:
    """Each (head, query)'s top-K_SEL blocks by Quest bound, counted per block; and each block's best bound."""
    ub = _bounds(layer, q)
    return Counter(ub.topk(K_SEL, dim=-1).indices.flatten().tolist()), ub.amax(dim=(0, 1))


def _bounds(layer: TierLayer, q: torch.Tensor) -> torch.Tensor:
    mn, mx = _dq8(layer.sum_min), _dq8(layer.sum_max)  # [nb, H, D]
    return torch.einsum("hgnd,bhd->hnb", q.clamp(min=0), mx) + torch.einsum("hgnd,bhd->hnb", q.clamp(max=0), mn)


def _best_rank(layer: TierLayer, q: torch.Tensor) -> dict[int, int]:
    """Each block's best rank over the (head, query) pairs (0: some pair's top block), in plain Python."""
    ub = _bounds(layer, q)
    best: dict[int, int] = {}
    for h in range(ub.shape[0]):
        for i in range(ub.shape[1]):
            for r, b in enumerate(sorted(range(NB), key=lambda b: -float(ub[h, i, b]))):
                best[b] = min(best.get(b, NB), r)
    return best


def test_short_chunk_reads_at_most_the_cap_and_keeps_every_querys_best_blocks_first():
    layer = _layer()
    n = 5
    q = _queries(n, seed=1)
    votes, best = _picks(layer, q)
    cap = K_SEL * math.ceil(n / B)
    assert len(votes) > 3 * cap  # the uncapped union: many more blocks than the cap
    ids, k_cold, visible, chosen = layer._cold_keys(q)
    assert layer.stats["cold_blocks_read"] == ids.numel() == cap
    rank = _best_rank(layer, q)
    expect = sorted(votes, key=lambda b: (rank[b], -float(best[b])))[:cap]
    assert sorted(ids.tolist()) == sorted(expect)
    top1 = set(_bounds(layer, q).argmax(dim=-1).flatten().tolist())
    assert top1 <= set(ids.tolist()) or len(top1) > cap  # every (head, query)'s best block, when they fit
    assert max(rank[b] for b in ids.tolist()) <= min(rank[b] for b in range(NB) if b not in ids.tolist())
    # every query of the chunk sees every kept block, and only those
    assert k_cold.shape == (H, cap * B, D) and bool(visible.all())
    assert bool(chosen[:, :, ids].all()) and int(chosen.sum()) == H * n * cap


def test_short_chunk_through_attend_reads_the_cap_and_its_output_is_finite():
    layer = _layer(seed=2)
    n = 9  # two blocks' worth of queries: cap 2 * K_SEL
    g = torch.Generator().manual_seed(3)
    layer.update(torch.randn(1, H, n, D, generator=g), torch.randn(1, H, n, D, generator=g))
    out = layer.attend(torch.randn(1, H * G, n, D, generator=g), D ** -0.5)
    assert layer.stats["cold_blocks_read"] == K_SEL * math.ceil(n / B) == 4
    assert out.shape == (1, n, H * G, D) and bool(torch.isfinite(out).all())


def test_long_chunk_under_its_cap_reads_the_whole_union():
    layer = _layer(seed=4)
    n = 96  # cap 12 * K_SEL = 24 blocks: every cold block fits
    q = _queries(n, seed=5)
    votes, _ = _picks(layer, q)
    assert K_SEL * math.ceil(5 / B) < len(votes) <= K_SEL * math.ceil(n / B)
    ids, _, visible, chosen = layer._cold_keys(q)
    assert sorted(ids.tolist()) == sorted(votes)  # the union, uncapped
    assert layer.stats["cold_blocks_read"] == len(votes)
    assert bool(visible.all()) and int(chosen.sum()) == H * n * len(votes)


def test_decode_step_reads_each_heads_own_top_k():
    layer = _layer(seed=6)
    q = _queries(1, seed=7)
    mn, mx = _dq8(layer.sum_min), _dq8(layer.sum_max)
    ub = torch.einsum("hgnd,bhd->hnb", q.clamp(min=0), mx) + torch.einsum("hgnd,bhd->hnb", q.clamp(max=0), mn)
    top = ub.topk(K_SEL, dim=-1).indices  # [H, 1, K_SEL]
    ids, _, _, chosen = layer._cold_keys(q)
    assert sorted(ids.tolist()) == sorted(set(top.flatten().tolist()))
    for h in range(H):  # per head: its own picks, not the union
        assert sorted(chosen[h, 0].nonzero().flatten().tolist()) == sorted(top[h, 0].tolist())


def test_the_floor_keeps_short_chunks_at_floor_times_k_sel_blocks():
    q = _queries(5, seed=1)
    votes, best = _picks(_layer(), q)
    for floor in (1, 3, 6):
        layer = _layer(union_floor=floor)
        ids, _, _, _ = layer._cold_keys(q)
        cap = K_SEL * max(floor, math.ceil(5 / B))
        assert ids.numel() == min(cap, len(votes)) == layer.stats["cold_blocks_read"]
        rank = _best_rank(layer, q)
        expect = sorted(votes, key=lambda b: (rank[b], -float(best[b])))[:cap]
        assert sorted(ids.tolist()) == sorted(expect)
    layer = _layer(union_floor=NB)  # a floor above the union: the whole union
    assert sorted(layer._cold_keys(q)[0].tolist()) == sorted(votes)


def test_union_floor_is_validated():
    import pytest

    from memsvc.cache.policies.tiered import TieredPolicy

    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="union_floor"):
            TieredPolicy(union_floor=bad)
    with pytest.raises(ValueError, match="union_floor"):
        LayerPlan(union_floor=0)
    assert TieredPolicy().plan(3, 30).union_floor == 4
