"""Cold block storage: byte round trips, batched decode equal to per-block decode, LRU bounds."""
from __future__ import annotations

import pytest
import torch

from memsvc.cache.tiered.cold import ColdStore, FileBlocks, MemoryBlocks, block_bytes, block_from_bytes, stack_packed
from memsvc.kernels.registry import get_codec

POLICY_CODECS = ["turbo3", "turbo4", "k8v8_k", "k8v8_v", "k6v4_k", "k6v4_v", "kivi2_k", "kivi2_v", "kivi4_k",
                 "kivi4_v", "ch3_k", "kvq3_k"]


@pytest.mark.parametrize("name", POLICY_CODECS)
@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 32, 16), (1, 64, 96)])
def test_stacked_decode_equals_each_block(name, shape):
    codec = get_codec(name)
    g = torch.Generator().manual_seed(len(shape) + shape[-1])
    packs = [codec.encode(torch.randn(*shape, generator=g)) for _ in range(5)]
    together = codec.decode(stack_packed(packs))
    assert torch.equal(together, torch.stack([codec.decode(p) for p in packs]))
    assert torch.equal(codec.decode(stack_packed(packs[:1]))[0], codec.decode(packs[0]))


def test_stack_refuses_mixed_blocks():
    a = get_codec("turbo3").encode(torch.randn(2, 8, 16))
    b = get_codec("turbo4").encode(torch.randn(2, 8, 16))
    with pytest.raises(ValueError):
        stack_packed([a, b])


def test_block_bytes_round_trip_and_truncation():
    k = get_codec("turbo4").encode(torch.randn(3, 64, 64))
    v = get_codec("turbo3").encode(torch.randn(3, 64, 64))
    raw = block_bytes(k, v)
    k2, v2 = block_from_bytes(raw)
    assert k2.to_bytes() == k.to_bytes() and v2.to_bytes() == v.to_bytes()
    with pytest.raises(ValueError):
        block_from_bytes(raw[:-3])
    with pytest.raises(ValueError):
        block_from_bytes(raw[:2])


def test_file_backend_lru_and_discard():
    codec = get_codec("turbo3")
    store = ColdStore(FileBlocks(), cache_bytes=25_000)
    blocks = {i: (codec.encode(torch.randn(3, 64, 64)), codec.encode(torch.randn(3, 64, 64))) for i in range(6)}
    for i, (k, v) in blocks.items():
        store.put(0, i, k, v)
    assert store.resident_bytes() >= store.stored_bytes() > 0  # pending: in memory
    store.flush()
    assert store.stored_bytes() == store.backend.nbytes()
    assert store.resident_bytes() <= 25_000  # only the LRU stays
    for i in (0, 1, 0, 5):
        k, v = store.get(0, i)
        assert k.to_bytes() == blocks[i][0].to_bytes()
    assert store.resident_bytes() <= 25_000
    store.put(0, 6, *blocks[0])
    store.discard_from(0, 6)
    with pytest.raises(KeyError):
        store.get(0, 6)
    with pytest.raises(ValueError):
        ColdStore(cache_bytes=-1)


def test_memory_backend_counts_everything_resident():
    codec = get_codec("k8v8_k")
    store = ColdStore(MemoryBlocks())
    k = codec.encode(torch.randn(2, 8, 16))
    store.put(1, 0, k, k)
    assert store.resident_bytes() == store.stored_bytes() == len(block_bytes(k, k))
    assert store.get(1, 0)[0] is k


def test_get_many_equals_get_one_by_one():
    """Batched reads: the same blocks as get(), in order, hits and misses counted alike, misses read from the
    backend in one read_many call when it has one; a block never stored raises KeyError."""
    codec = get_codec("turbo3")
    blocks = {i: (codec.encode(torch.randn(3, 64, 64)), codec.encode(torch.randn(3, 64, 64))) for i in range(5)}

    class Counted(FileBlocks):
        batches: list = []

        def read_many(self, layer, indices):
            self.batches.append(list(indices))
            return [self.read(layer, i) for i in indices]

    store = ColdStore(Counted(), cache_bytes=1 << 20)
    for i, (k, v) in blocks.items():
        store.put(2, i, k, v)
    store.flush()
    store.cache.drop(store.owner)  # nothing cached: every block comes from the backend
    got = store.get_many(2, [3, 0, 4])
    assert [(k.to_bytes(), v.to_bytes()) for k, v in got] == \
        [(blocks[i][0].to_bytes(), blocks[i][1].to_bytes()) for i in (3, 0, 4)]
    assert store.backend.batches == [[3, 0, 4]] and (store.hits, store.misses) == (0, 3)
    again = store.get_many(2, [0, 1])  # 0 is cached now, 1 is read
    assert store.backend.batches[-1] == [1] and (store.hits, store.misses) == (1, 4)
    assert again[0][0].to_bytes() == store.get(2, 0)[0].to_bytes() and store.get_many(2, []) == []
    with pytest.raises(KeyError):
        store.get_many(2, [1, 9])
    mem = ColdStore(MemoryBlocks())  # a backend without read_many, blocks kept as objects
    mem.put(0, 0, *blocks[0])
    assert mem.get_many(0, [0])[0][0] is blocks[0][0]


@pytest.mark.parametrize("name", POLICY_CODECS)
@pytest.mark.parametrize("count", [1, 3, 7])
def test_stack_from_bytes_equals_stacking_each_record(name, count):
    """The one-pass parse of many records gives stack_packed's tensors, shape and metadata exactly."""
    from memsvc.kernels.codec import Packed

    codec = get_codec(name)
    g = torch.Generator().manual_seed(count)
    packs = [codec.encode(torch.randn(3, 64, 64, generator=g)) for _ in range(count)]
    ref = stack_packed([Packed.from_bytes(p.to_bytes()) for p in packs])
    got = Packed.stack_from_bytes([p.to_bytes() for p in packs])
    assert (got.codec, got.shape, got.dtype, got.meta) == (ref.codec, ref.shape, ref.dtype, ref.meta)
    assert got.tensors.keys() == ref.tensors.keys()
    for key, t in ref.tensors.items():
        assert got.tensors[key].dtype == t.dtype and torch.equal(got.tensors[key], t), key
    assert torch.equal(codec.decode(got), codec.decode(ref))


def test_stack_from_bytes_refuses_records_of_another_layout():
    from memsvc.kernels.codec import Packed

    g = torch.Generator().manual_seed(0)
    a = get_codec("k6v4_k").encode(torch.randn(3, 64, 64, generator=g)).to_bytes()
    shorter = get_codec("k6v4_k").encode(torch.randn(3, 32, 64, generator=g)).to_bytes()
    other = get_codec("k8v8_k").encode(torch.randn(3, 64, 64, generator=g)).to_bytes()
    flipped = bytearray(a)
    flipped[20] ^= 0xFF  # inside the JSON header: same length, another layout
    for bad in (shorter, other, bytes(flipped), a + b"\0", a[:-1]):
        with pytest.raises(ValueError):
            Packed.stack_from_bytes([a, bad])
    with pytest.raises(ValueError):
        Packed.stack_from_bytes([])


def test_get_stacked_equals_stacking_get_many():
    """Blocks from the backend, the cache and pending (uncommitted) ones, and a memory backend: the keys' and
    values' stacked records equal stack_packed of get_many's, in the order asked."""
    codec = get_codec("turbo3")
    g = torch.Generator().manual_seed(9)
    blocks = {i: (codec.encode(torch.randn(3, 64, 64, generator=g)), codec.encode(torch.randn(3, 64, 64, generator=g)))
              for i in range(6)}
    for store in (ColdStore(FileBlocks(), cache_bytes=1 << 20), ColdStore(MemoryBlocks())):
        for i in range(4):
            store.put(2, i, *blocks[i])
        if not isinstance(store.backend, MemoryBlocks):
            store.flush()
            store.cache.drop(store.owner)
            store.get(2, 1)  # cached
        for i in (4, 5):
            store.put(2, i, *blocks[i])  # pending
        order = [5, 0, 1, 4, 3]
        for half in (0, 1):
            got = store.get_stacked(2, order, half)
            ref = stack_packed([blocks[i][half] for i in order])
            assert got.shape == ref.shape == (5, 3, 64, 64)
            assert all(torch.equal(got.tensors[k], ref.tensors[k]) for k in ref.tensors)
        with pytest.raises(KeyError):
            store.get_stacked(2, [0, 9], 0)
        with pytest.raises(ValueError):
            store.get_stacked(2, [0], 2)
