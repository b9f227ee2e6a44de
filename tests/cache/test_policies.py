"""Contract tests over every policy, on a tiny random Llama (2 layers, GQA 4/2, head dim 16).

Small budgets make every tier engage within a few hundred tokens: token counts,
tier invariants (each token of each head in exactly one tier, or evicted by an
eviction baseline), budgets, snapshot/restore, and `tiered` with budgets larger
than the context equal to `full`.
"""
from __future__ import annotations

import pytest
import torch

from memsvc.cache.growing import MIN_ROOM, ROOM
from memsvc.cache.tiered.rows import _dq8
from memsvc.errors import FailedPrecondition
from memsvc.cache import EVICTION, POLICIES, Backing, KVShape, get_policy, new_cache
from memsvc.cache.attention import use_memsvc_attention
from memsvc.cache.tiered.cold import FileBlocks

SMALL = {
    "full": {},
    "k8v8": {"hot": 16, "block_tokens": 8},
    "k6v4": {"hot": 16, "block_tokens": 8},
    "kivi2": {"hot": 16, "block_tokens": 32},
    "kivi4": {"hot": 16, "block_tokens": 32},
    "turbo3": {"hot": 16, "block_tokens": 8},
    "tiered": {"sink": 2, "hot": 16, "warm": 8, "retrieve": 24, "block_tokens": 8},
    "tiered-v8": {"sink": 2, "hot": 16, "warm": 8, "retrieve": 24, "block_tokens": 8},
    "tiered-k6": {"sink": 2, "hot": 16, "warm": 8, "retrieve": 24, "block_tokens": 8},
    "streaming": {"budget": 40, "sink": 2},
    "h2o": {"budget": 40},
    "snapkv": {"budget": 40, "window": 8},
    "pyramidkv": {"budget": 40, "window": 8},
}


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2000, (n,), generator=g).tolist()


@torch.no_grad()
def _run(model, cache, ids, chunk=37):
    """Feed ids in chunks; return logits of the last token [V]."""
    out = None
    with cache.attending():
        for lo in range(0, len(ids), chunk):
            part = torch.tensor([ids[lo:lo + chunk]])
            out = model(input_ids=part, cache=cache, use_cache=True).logits[0, -1]
    return out


def _shape(tiny) -> KVShape:
    return KVShape.of(tiny)


def _cache(tiny, name, backing=None, **over):
    return new_cache(get_policy(name, **{**SMALL[name], **over}), _shape(tiny), backing)


def _positions(layer) -> list[list[int]]:
    """Per head: every position the layer can attend (sink, kept, hot, live cold)."""
    out = []
    B, S = layer.plan.block, layer.sink_k.shape[1]
    for h in range(layer.H):
        pos = list(range(S)) + layer.keep_pos[h].tolist() + layer.hot_pos.tolist()
        for b in range(layer.n_blocks):
            start = layer.plan.sink + b * B
            pos += [start + t for t in range(B) if bool(layer.live[b, h, t])]
        out.append(pos)
    return out


def test_registry_lists_valid_names_and_rejects_bad_settings():
    with pytest.raises(ValueError, match="valid policies: .*tiered"):
        get_policy("nope")
    for name in POLICIES:
        assert get_policy(name).name == name
    for bad in ({"hot": 0}, {"retrieve": 10}, {"key_codec": "nope"}, {"warm": -1}):
        with pytest.raises(ValueError):
            get_policy("tiered", **bad)
    with pytest.raises(ValueError):
        get_policy("snapkv", budget=8, window=32)
    with pytest.raises(ValueError, match="bad settings"):
        get_policy("h2o", hot=3)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    use_memsvc_attention(tiny_model.model)
    return tiny_model


def test_full_keeps_every_token_of_every_layer(tiny):
    cache = _cache(tiny, "full")
    ids = _ids(230)
    _run(tiny.model, cache, ids[:200])
    cache.end_prompt()
    for t in ids[200:]:
        _run(tiny.model, cache, [t])
    assert cache.length == 230 and cache.tier_tokens() == {"hot": 230.0}
    for layer in cache.layers:
        assert layer.keys.shape[2] == layer.values.shape[2] == 230
    # fp32 rows, in buffers that grow in place with room for at most max(MIN_ROOM, rows / ROOM) more
    per_token = _shape(tiny).fp16_bytes_per_token * 2
    assert sum(cache.tier_bytes().values()) == cache.resident_bytes()
    assert 230 * per_token <= cache.resident_bytes() <= (230 + max(MIN_ROOM, 230 // ROOM)) * per_token


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"full"}))
def test_tier_invariants_and_budgets(tiny, name):
    cache = _cache(tiny, name)
    ids = _ids(230)
    _run(tiny.model, cache, ids[:200])
    cache.end_prompt()
    for t in ids[200:]:  # decode steps, one token at a time
        _run(tiny.model, cache, [t])
    n = len(ids)
    assert cache.get_seq_length() == n
    for layer in cache.layers:
        plan = layer.plan
        per_head = _positions(layer)
        for pos in per_head:
            assert len(pos) == len(set(pos)), "a token is in two tiers"
            assert min(pos) >= 0 and max(pos) == n - 1 and len(pos) >= 1
        attended = len(per_head[0])
        if name not in EVICTION:
            assert all(sorted(p) == list(range(n)) for p in per_head), "a non-eviction policy lost a token"
            assert layer.evicted == 0
        else:
            assert layer.evicted == layer.H * (n - attended)
            assert all(len(p) == attended for p in per_head)
        if plan.hot is not None:
            step = plan.block if plan.cold_k else 1
            assert layer.hot_k.shape[1] < plan.hot + step
        assert layer._keep_len() <= plan.keep
        if name in ("streaming", "h2o"):
            assert attended <= SMALL[name]["budget"]
        if name in ("snapkv", "pyramidkv"):  # budget after the prompt, plus the 30 decoded tokens
            assert attended <= layer.plan.keep + layer.plan.window + 30
    tiers = cache.tier_tokens()
    if name.startswith("tiered"):
        assert tiers["sink"] == 2 and tiers["warm"] == 8 and tiers["cold"] > 150
        assert cache.stats()["cold_blocks_read"] > 0
    by_tier = cache.tier_bytes()  # every resident byte belongs to one tier
    assert sum(by_tier.values()) == cache.resident_bytes() > 0
    if name.startswith("tiered"):
        assert min(by_tier[t] for t in ("sink", "hot", "warm", "summaries")) > 0


def test_pyramid_budgets_shrink_with_depth():
    p = get_policy("pyramidkv", budget=100, window=8)
    budgets = [p.layer_budget(i, 10) for i in range(10)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 100 > budgets[-1]
    assert abs(sum(budgets) / 10 - 100) <= 1


@torch.no_grad()
def test_tiered_with_huge_budgets_equals_full(tiny):
    ids = _ids(150, seed=3)
    ref = new_cache(get_policy("full"), _shape(tiny))
    big = new_cache(get_policy("tiered", hot=4096, exact_dtype=None), _shape(tiny))
    a, b = _run(tiny.model, ref, ids), _run(tiny.model, big, ids)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert big.tier_tokens()["cold"] == 0 and big.tier_tokens()["hot"] + big.tier_tokens()["sink"] == 150
    for _ in range(20):  # greedy continuation: identical tokens
        ta, tb = int(a.argmax()), int(b.argmax())
        assert ta == tb
        a, b = _run(tiny.model, ref, [ta]), _run(tiny.model, big, [tb])
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiered", "h2o", "snapkv", "turbo3"])
def test_restore_undoes_everything_since_the_snapshot(tiny, name):
    ids = _ids(180, seed=4)
    cache = _cache(tiny, name, Backing(FileBlocks()) if name == "tiered" else None)
    _run(tiny.model, cache, ids[:120])
    cache.end_prompt()
    snap = cache.checkpoint()
    _run(tiny.model, cache, _ids(60, seed=5))  # a detour: more tokens, aging, evictions, new cold blocks
    cache.end_prompt()
    cache.restore(snap)
    twin = _cache(tiny, name, Backing(FileBlocks()) if name == "tiered" else None)
    _run(tiny.model, twin, ids[:120])
    twin.end_prompt()
    assert torch.equal(_run(tiny.model, cache, ids[120:]), _run(tiny.model, twin, ids[120:]))
    assert cache.get_seq_length() == twin.get_seq_length() == 180


def test_quest_summary_bounds_every_key_score():
    """The retrieval score of a block is an upper bound of q·k over its keys (Quest's bound)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(50, 3, 64, 16, generator=g)  # blocks, heads, tokens, dim
    q = torch.randn(3, 16, generator=g)
    mn, mx = k.amin(2), k.amax(2)  # [50, 3, 16]
    ub = (q.clamp(min=0) * mx).sum(-1) + (q.clamp(max=0) * mn).sum(-1)  # [50, 3]
    best = torch.einsum("hd,bhtd->bht", q, k).amax(-1)
    assert bool((ub >= best - 1e-5).all())


def test_cold_blocks_on_disk_are_not_resident(tiny):
    ids = _ids(300, seed=6)
    mem = _cache(tiny, "tiered")
    disk = _cache(tiny, "tiered", Backing(FileBlocks(), private_cache_bytes=0))
    _run(tiny.model, mem, ids)
    _run(tiny.model, disk, ids)
    disk.flush()
    assert disk.stored_bytes() == mem.stored_bytes() > 0
    assert mem.resident_bytes() - disk.resident_bytes() == mem.cold.backend.nbytes()
    # same answers wherever the blocks live
    assert torch.equal(_run(tiny.model, mem, [5]), _run(tiny.model, disk, [5]))


@torch.no_grad()
def test_block_summaries_describe_every_token_of_the_block(tiny):
    """Layer 0's keys do not depend on attention, so its summaries can be checked against a full run:
    min/max bound every key and the mean pseudo-token is the mean of all B tokens, even of a block
    whose tokens all went to the warm tier when it was made (and may come back later)."""
    ids = _ids(200, seed=8)
    ref = new_cache(get_policy("full"), _shape(tiny))
    _run(tiny.model, ref, ids)
    cache = _cache(tiny, "tiered", warm=8, exact_dtype=None)
    _run(tiny.model, cache, ids)
    layer = cache.layers[0]
    B, S = layer.plan.block, layer.plan.sink
    keys = ref.layers[0].keys[0].float()  # [H, T, D]
    for b in range(layer.n_blocks):
        blk = keys[:, S + b * B:S + (b + 1) * B]
        mean_k, mn, mx = (_dq8(t)[b] for t in (layer.sum_mean_k, layer.sum_min, layer.sum_max))
        step = (blk.mean(1).amax(-1) - blk.mean(1).amin(-1)).max() / 255
        assert bool(((mean_k - blk.mean(1)).abs() <= step + 1e-3).all())
        assert bool((mn <= blk.amin(1) + 1e-5).all())  # Quest's bound stays a bound after 8 bits
        assert bool((mx >= blk.amax(1) - 1e-5).all())


@torch.no_grad()
def test_layer_state_from_before_8bit_summaries_loads(tiny):
    """A layer state saved with fp16 summaries (older stores) loads as 8-bit rows that still bound the keys."""
    import safetensors.torch as st

    from memsvc.cache.tiered.layer import TierLayer
    from memsvc.cache.tiered.upgrade import load_whole as load_layer_state, whole_state as layer_state

    cache = _cache(tiny, "tiered", warm=8, exact_dtype=None)
    _run(tiny.model, cache, _ids(200, seed=3))
    layer = cache.layers[1]
    raw = layer_state(layer)
    tensors = st.load(raw)
    for name in ("sum_min", "sum_max", "sum_mean_k", "sum_mean_v"):
        tensors[name] = _dq8(tuple(tensors.pop(f"{name}.{i}") for i in range(3))).to(torch.float16)
    header = raw[8:8 + int.from_bytes(raw[:8], "little")]
    import json
    old = st.save(tensors, metadata=json.loads(header)["__metadata__"])
    fresh = TierLayer(layer.plan, 1, layer.cold, torch.float32)
    load_layer_state(fresh, old, torch.device("cpu"))
    assert fresh.n_blocks == layer.n_blocks > 0
    assert bool((_dq8(fresh.sum_min) <= _dq8(layer.sum_min).half().float() + 1e-5).all())
    assert bool((_dq8(fresh.sum_max) >= _dq8(layer.sum_max).half().float() - 1e-5).all())
    assert torch.allclose(_dq8(fresh.sum_mean_k), _dq8(layer.sum_mean_k), atol=0.05)


def test_tiered_v8_is_tiered_with_8bit_cold_values_a_wider_retrieve_and_128_token_windows():
    p, base = get_policy("tiered-v8"), get_policy("tiered")
    assert (p.name, p.hot, p.warm, p.retrieve, p.value_codec) == ("tiered-v8", 128, 128, 3072, "k8v8_v")
    assert (p.block_tokens, p.sink) == (base.block_tokens, base.sink)
    assert (p.key_codec, p.pre_rope_keys) == ("k6v4_k", False)  # the keys its recall was measured with
    assert p.plan(5, 30).cold_v == "k8v8_v" and p.plan(5, 30).retrieve == 3072
    assert get_policy("tiered-v8", hot=64).hot == 64
    with pytest.raises(ValueError, match="hot"):
        get_policy("tiered-v8", hot=0)


def test_cold_blocks_another_codec_wrote_are_refused_not_misread(tiny):
    """A stored session names its policy, not the policy's codecs: if what a name means ever changed, its
    cold blocks would be decoded by the wrong codec. The layer refuses them, naming both codecs."""
    from memsvc.kernels.registry import get_codec
    cache = _cache(tiny, "tiered", Backing(FileBlocks()))
    _run(tiny.model, cache, _ids(200, seed=8))
    layer = cache.layers[1]  # the last layer, K8V8 cold blocks
    assert layer.n_blocks and layer.vcodec.name == "k8v8_v"
    layer.vcodec = get_codec("turbo3", layer=1)
    with pytest.raises(FailedPrecondition, match="holds 'k8v8_v' codes; the policy decodes 'turbo3'"):
        _run(tiny.model, cache, _ids(3, seed=9))
