"""The block cache shared by every session's ColdStore: bound, LRU order, counters, owners kept apart."""
from __future__ import annotations

import threading

import pytest
import torch

from memsvc.cache.tiered.blockcache import BlockCache
from memsvc.cache.tiered.cold import ColdStore, FileBlocks, block_bytes
from memsvc.kernels.registry import get_codec


def _blocks(n: int, seed: int):
    codec = get_codec("turbo3")
    g = torch.Generator().manual_seed(seed)
    return [(codec.encode(torch.randn(3, 64, 64, generator=g)), codec.encode(torch.randn(3, 64, 64, generator=g)))
            for _ in range(n)]


def _size(kv) -> int:
    return len(block_bytes(*kv))


def test_bound_lru_order_and_counters():
    blocks = _blocks(6, 0)
    size = _size(blocks[0])
    cache = BlockCache(3 * size)
    raws = [block_bytes(*kv) for kv in blocks]
    for i in range(3):
        cache.put(("a", 0, i), raws[i])
    assert len(cache) == 3 and cache.nbytes == 3 * size
    assert cache.get(("a", 0, 0)) is not None  # 0 is now the most recently used
    cache.put(("a", 0, 3), raws[3])  # evicts 1, the least recently used
    assert cache.get(("a", 0, 1)) is None
    assert cache.get(("a", 0, 0)) is raws[0]
    assert cache.nbytes <= cache.capacity and len(cache) == 3
    assert (cache.hits, cache.misses, cache.evictions) == (2, 1, 1)
    cache.put(("a", 0, 9), raws[4] * 4)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(("a", 0, 9)) is None and len(cache) == 3
    with pytest.raises(ValueError):
        BlockCache(-1)


def test_stores_sharing_a_cache_never_see_each_others_blocks():
    a_blocks, b_blocks = _blocks(4, 1), _blocks(4, 2)
    cache = BlockCache(1 << 20)
    a = ColdStore(FileBlocks(), cache=cache, owner=("s", 0))
    b = ColdStore(FileBlocks(), cache=cache, owner=("s", 1))  # same session id, another load
    for i in range(4):  # the same (layer, index) keys in both
        a.put(2, i, *a_blocks[i])
        b.put(2, i, *b_blocks[i])
    assert cache.nbytes == 0  # pending blocks are the stores' own
    a.flush()
    b.flush()
    assert len(cache) == 8  # flushed blocks move to the cache
    assert a.resident_bytes() == b.resident_bytes() == 0  # a shared cache is not a session's bytes
    for i in range(4):
        assert a.get(2, i)[0].to_bytes() == a_blocks[i][0].to_bytes()
        assert b.get(2, i)[1].to_bytes() == b_blocks[i][1].to_bytes()
    assert cache.hits == 8 and cache.misses == 0
    assert cache.drop(("s", 0)) == 4  # a's session left memory
    assert cache.owner_bytes(("s", 0)) == 0 and cache.owner_bytes(("s", 1)) > 0
    assert a.get(2, 3)[0].to_bytes() == a_blocks[3][0].to_bytes()  # read back from its backend: a miss
    assert cache.misses == 1 and a.misses == 1
    b.close()
    assert cache.owner_bytes(("s", 1)) == 0 and len(cache) == 1


def test_a_small_shared_cache_stays_correct_and_bounded():
    blocks = _blocks(12, 3)
    size = _size(blocks[0])
    cache = BlockCache(2 * size)
    stores = [ColdStore(FileBlocks(), cache=cache, owner=i) for i in range(3)]
    for j, s in enumerate(stores):
        for i in range(4):
            s.put(0, i, *blocks[4 * j + i])
        s.flush()
    for rnd in range(3):
        for j, s in enumerate(stores):
            for i in (0, 3, 1, 2):
                assert s.get(0, i)[0].to_bytes() == blocks[4 * j + i][0].to_bytes()
                assert cache.nbytes <= 2 * size
    assert cache.misses > 0 and cache.evictions > 0
    none = ColdStore(FileBlocks(), cache=BlockCache(0), owner="x")  # no cache at all: every read parses again
    none.put(0, 0, *blocks[0])
    none.flush()
    assert none.get(0, 0)[0].to_bytes() == blocks[0][0].to_bytes() and none.cache.nbytes == 0


def test_uncommitted_blocks_are_discarded_not_cached():
    blocks = _blocks(3, 4)
    cache = BlockCache(1 << 20)
    s = ColdStore(FileBlocks(), cache=cache, owner="s")
    s.put(0, 0, *blocks[0])
    s.flush()
    s.put(0, 1, *blocks[1])  # an uncommitted step's block
    assert s.get(0, 1)[0].to_bytes() == blocks[1][0].to_bytes() and s.resident_bytes() == _size(blocks[1])
    s.discard_from(0, 1)
    with pytest.raises(KeyError):
        s.get(0, 1)
    s.put(0, 1, *blocks[2])  # another block at the same index, committed this time
    s.flush()
    assert s.get(0, 1)[0].to_bytes() == blocks[2][0].to_bytes()
    assert s.get(0, 0)[0].to_bytes() == blocks[0][0].to_bytes()


def test_threads_share_a_cache_within_its_bound():
    blocks = _blocks(8, 5)
    size = _size(blocks[0])
    cache = BlockCache(5 * size)
    stores = [ColdStore(FileBlocks(), cache=cache, owner=t) for t in range(4)]
    for s in stores:
        for i, kv in enumerate(blocks):
            s.put(1, i, *kv)
        s.flush()
    errors = []

    def work(s):
        try:
            for r in range(50):
                i = (r * 5) % 8
                assert s.get(1, i)[1].to_bytes() == blocks[i][1].to_bytes()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.nbytes <= 5 * size and cache.hits + cache.misses == 200


def _cycle(cache: BlockCache, owners: list[str], keys: int, size: int, steps: int) -> dict[str, int]:
    """Each step, each owner re-reads and re-puts its `keys` entries in order (a session's layers at each decode
    step, as the decoded cache sees them); hits per owner over the last half of the steps."""
    hits = dict.fromkeys(owners, 0)
    for step in range(steps):
        for owner in owners:
            for k in range(keys):
                if cache.get((owner, k, 0)) is not None and step >= steps // 2:
                    hits[owner] += 1
                cache.put((owner, k, 0), object(), size)
    return hits


def test_fair_sharing_keeps_a_stable_part_where_lru_thrashes():
    # two owners cycling through 10 entries of 8 bytes each (160 bytes) over a capacity of 100
    plain = _cycle(BlockCache(100), ["a", "b"], 10, 8, 20)
    assert plain == {"a": 0, "b": 0}  # LRU evicts every entry just before its next use
    fair = BlockCache(100, fair=True)
    hits = _cycle(fair, ["a", "b"], 10, 8, 20)
    # each owner keeps what fits in its share (50 bytes: 6 entries), and hits them on every later step
    assert hits == {"a": 6 * 10, "b": 6 * 10}
    assert fair.owner_bytes("a") == fair.owner_bytes("b") == 48 and fair.nbytes <= fair.capacity
    assert fair.skipped > 0 and fair.stats()["skipped"] == fair.skipped


def test_fair_sharing_gives_one_owner_everything_and_makes_room_for_a_newcomer():
    cache = BlockCache(100, fair=True)
    assert _cycle(cache, ["a"], 12, 8, 4) == {"a": 12 * 2}  # 96 bytes: alone, an owner may fill the cache
    assert cache.owner_bytes("a") == 96
    cache.put(("b", 0, 0), object(), 40)  # b's share is 50: a's least recently used entries go
    assert cache.owner_bytes("b") == 40 and cache.owner_bytes("a") == 56 and cache.nbytes == 96
    assert cache.get(("a", 0, 0)) is None and cache.get(("a", 11, 0)) is not None  # the oldest went first
    cache.put(("b", 1, 0), object(), 16)  # would take b past its share: not kept, a keeps its entries
    assert cache.get(("b", 1, 0)) is None and cache.owner_bytes("a") == 56
    cache.put(("b", 2, 0), object(), 4)  # fits in the free room: kept whatever the shares
    assert cache.owner_bytes("b") == 44 and cache.nbytes == 100
    cache.drop("b")
    assert cache.owner_bytes("b") == 0 and cache.nbytes == 56
    with pytest.raises(ValueError):
        BlockCache(-1, fair=True)
