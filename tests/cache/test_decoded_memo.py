"""Each tiered layer's last decoded cold keys and values (ColdStore's decoded cache): the next read decodes only the
blocks they lack and returns exactly what decoding everything returns; an undone step, another session and the
cache's bound never let a stale decode through."""
from __future__ import annotations

import torch

from memsvc.cache.tiered.cold import ColdStore
from memsvc.cache.tiered.blockcache import BlockCache
from memsvc.cache.tiered.cold import FileBlocks
from memsvc.cache.tiered.layer import TierLayer
from memsvc.cache.policies.plan import LayerPlan

H, D, B, NB = 2, 16, 8, 6


def _layer(decoded: BlockCache | None, seed: int = 0, owner="s") -> TierLayer:
    plan = LayerPlan(sink=0, hot=B, block=B, cold_k="k6v4_k", cold_v="turbo3")
    cold = ColdStore(FileBlocks(), cache=BlockCache(1 << 20), owner=owner, decoded=decoded)
    layer = TierLayer(plan, 3, cold, torch.float32)
    g = torch.Generator().manual_seed(seed)
    layer.update(torch.randn(1, H, (NB + 1) * B, D, generator=g), torch.randn(1, H, (NB + 1) * B, D, generator=g))
    layer.settle()
    cold.flush()
    return layer


def test_reads_equal_decoding_everything_and_decode_only_new_blocks():
    plain, memo = _layer(None), _layer(BlockCache(1 << 20))
    reads = [[0, 1, 2, 3], [2, 3, 4], [4, 3, 2], [4, 3, 2], [5, 0], [1, 2, 3, 4, 5, 0]]
    decoded = []
    stacked = memo.cold.get_stacked
    memo.cold.get_stacked = lambda layer, ids, half: decoded.append((half, len(ids))) or stacked(layer, ids, half)
    for ids in reads:
        for half, codec in ((0, memo.kcodec), (1, memo.vcodec)):
            want = plain._cold_tensor(half, ids, codec, torch.bfloat16)
            got = memo._cold_tensor(half, ids, codec, torch.bfloat16)
            assert got.shape == (H, len(ids) * B, D) and torch.equal(got, want)
    # only the blocks the layer's earlier reads of that half did not decode are read and decoded (they are held
    # in room for twice the first read's 4 blocks: every one of the 6 fits)
    assert [n for half, n in decoded if half == 0] == [4, 1, 1] == [n for half, n in decoded if half == 1]
    assert memo.stats["cold_blocks_reused"] == 2 * (0 + 2 + 3 + 3 + 1 + 6)
    assert plain.stats["cold_blocks_reused"] == 0


def test_an_undone_step_drops_the_decode_and_another_session_never_sees_it():
    cache = BlockCache(1 << 20)
    a = _layer(cache, seed=1, owner="a")
    a._cold_tensor(0, [0, 1, 2], a.kcodec, torch.float32)
    snap = a.snapshot()
    g = torch.Generator().manual_seed(7)
    a.update(torch.randn(1, H, B, D, generator=g), torch.randn(1, H, B, D, generator=g))
    a.settle()  # block NB, pending
    a._cold_tensor(0, [NB, 0], a.kcodec, torch.float32)
    assert a.cold.last_decoded(3, 0) is not None
    a.restore(snap)  # the step is undone: block NB goes, and so does the decode that holds it
    assert a.cold.last_decoded(3, 0) is None
    a.update(torch.randn(1, H, B, D, generator=g) * 3, torch.randn(1, H, B, D, generator=g))
    a.settle()  # another block NB
    fresh = ColdStore(a.cold.backend, cache=BlockCache(1 << 20), owner="a2")
    fresh.pending = dict(a.cold.pending)
    want = a._decode(a.kcodec, fresh.get_stacked(3, [NB, 0], 0), torch.float32)
    assert torch.equal(a._cold_tensor(0, [NB, 0], a.kcodec, torch.float32), want)
    b = _layer(cache, seed=2, owner="b")  # same layer and block indices, another session
    assert b.cold.last_decoded(3, 0) is None
    other = b._cold_tensor(0, [0, 1, 2], b.kcodec, torch.float32)
    assert not torch.equal(other, a._cold_tensor(0, [0, 1, 2], a.kcodec, torch.float32))
    a.cold.close()  # a's session leaves memory
    assert a.cold.last_decoded(3, 0) is None and b.cold.last_decoded(3, 0) is not None


def test_the_decoded_cache_stays_within_its_bound():
    one = H * 6 * B * D * 4  # six blocks of fp32 keys: a read of three, held in room for twice as many
    cache = BlockCache(one)
    layer = _layer(cache)
    layer._cold_tensor(0, [0, 1, 2], layer.kcodec, torch.float32)
    assert cache.nbytes == one
    layer._cold_tensor(0, [3, 4, 5], layer.kcodec, torch.float32)  # joins the held blocks: no more bytes
    assert cache.nbytes == one and layer.cold.last_decoded(3, 0)[0] == (0, 1, 2, 3, 4, 5)
    layer._cold_tensor(1, [0, 1, 2], layer.vcodec, torch.float32)  # the values push the keys out
    assert cache.nbytes == one and layer.cold.last_decoded(3, 0) is None
    layer._cold_tensor(0, [0, 1, 2, 3], layer.kcodec, torch.float32)  # larger than the bound: not kept
    assert cache.nbytes <= one and layer.cold.last_decoded(3, 0) is None
