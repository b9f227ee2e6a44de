"""The Store contract, over every backend: forks share KV blobs copy-on-write, later writes to one
session never change another, deletes free exactly the blobs nothing else references, expiry is
re-checked inside the delete, gc finds nothing after clean writes. Only interface calls (and the
backend's damage() to leak a blob)."""
from __future__ import annotations

import os

from memsvc.store.blocks import KIND_KV, encode_block
from tests.store.backends import rec, snapshot


def _physical(s) -> int:
    return s.stats()["blob_bytes"]


def _encoded(blocks: dict) -> int:
    return sum(len(encode_block(p, kind=KIND_KV, layer=k[0], index=k[1], n_tokens=0)) for k, p in blocks.items())


def test_fork_shares_blocks_and_later_writes_stay_apart(store_factory):
    s = store_factory(token_block=4)
    s.create(rec("a"))
    s.commit(rec("a"), first_token=0, tokens=[1, 2, 3, 4, 5, 6], blocks={(0, 0): b"aaaaa", (3, 1): b"q" * 999})
    physical = _physical(s)
    f = s.fork("a", rec("a2", labels={"fork": "1"}, n_tokens=1, stored_bytes=1))
    assert f == s.get("a2") and f.n_tokens == 6 and f.labels == {"fork": "1"}
    assert f.stored_bytes == s.session_keys("a2")[1]
    assert s.tokens("a2") == s.tokens("a") and s.kv_blocks("a2") == s.kv_blocks("a")
    assert _physical(s) == physical and s.stats()["shared_blobs"] == 2 and s.stats()["references"] == 4
    assert s.session_blobs("a2") == dict(blocks=2, shared=2, shared_bytes=physical, own_bytes=0)
    s.commit(rec("a"), first_token=6, tokens=[7], blocks={(0, 0): b"changed"})
    s.commit(rec("a2"), first_token=6, tokens=[70, 80], blocks={(5, 5): b"fork only"})
    assert s.tokens("a") == [1, 2, 3, 4, 5, 6, 7] and s.tokens("a2") == [1, 2, 3, 4, 5, 6, 70, 80]
    assert s.kv_block("a2", 0, 0) == b"aaaaa" and s.kv_block("a", 0, 0) == b"changed"
    assert s.kv_block("a", 5, 5) is None
    assert s.session_blobs("a")["shared"] == 1 and s.session_blobs("a2")["shared"] == 1
    assert s.delete("a")
    assert s.tokens("a2") == [1, 2, 3, 4, 5, 6, 70, 80] and len(s.kv_blocks("a2")) == 3
    assert s.get("a2").stored_bytes == s.session_keys("a2")[1] and s.stats()["shared_blobs"] == 0
    assert s.session_blobs("a2")["own_bytes"] == _physical(s)


def test_ten_forks_grow_by_their_new_blocks_only(store_factory):
    s = store_factory(token_block=64)
    s.create(rec("orig"))
    base = {(layer, i): os.urandom(3000) for layer in range(3) for i in range(8)}  # incompressible
    base.update({(layer, 0xFFFFFFFF): os.urandom(5000) for layer in range(3)})  # per-layer state
    s.commit(rec("orig"), first_token=0, tokens=list(range(500)), blocks=base)
    st0 = s.stats()
    assert st0["blobs"] == len(base) and st0["shared_blobs"] == 0 and st0["blob_bytes"] == _encoded(base)
    for f in range(10):
        fork = s.fork("orig", rec(f"f{f}"))
        assert fork.stored_bytes == s.get("orig").stored_bytes + len(fork.to_bytes()) - len(s.get("orig").to_bytes())
    st = s.stats()
    assert st["blobs"] == st0["blobs"] and st["blob_bytes"] == st0["blob_bytes"]
    assert st["shared_blobs"] == len(base) and st["references"] == 11 * len(base)
    assert st["logical_blob_bytes"] == 11 * st0["blob_bytes"] and st["shared_blob_bytes"] == st0["blob_bytes"]

    expected = {}
    for f in range(10):
        sid = f"f{f}"
        new = {(0, 8 + f): os.urandom(2000 + f),  # a new cold block
               **{(layer, 0xFFFFFFFF): os.urandom(4000 + f) for layer in range(3)}}  # replaces shared states
        if f % 2:
            new[(1, 3)] = os.urandom(1000)  # replaces a shared cold block
        before = _physical(s)
        s.commit(rec(sid), first_token=500, tokens=[f] * 7, blocks=new)
        assert _physical(s) - before == _encoded(new)  # exactly the new blocks (zstd cannot shrink random)
        assert s.get(sid).stored_bytes == s.session_keys(sid)[1]
        expected[sid] = {**base, **new}
    assert s.kv_blocks("orig") == base  # the shared blobs were never changed

    assert s.delete("orig")
    for sid, blocks in expected.items():
        assert s.kv_blocks(sid) == blocks and s.tokens(sid) == list(range(500)) + [int(sid[1:])] * 7
    # the original's states were replaced in every fork: its 3 state blobs are gone
    assert s.stats()["blobs"] == len(base) - 3 + 10 * 3 + 10 + 5
    assert s.gc()["freed_blobs"] == 0  # clean deletes leave nothing for gc
    for sid in expected:
        assert s.delete(sid)
    st = s.stats()
    assert st["blobs"] == st["sessions"] == st["token_blocks"] == st["kv_blocks"] == st["blob_bytes"] == 0


def test_commit_drops_entries_and_a_shared_blob_stays_for_the_fork(store_factory):
    s = store_factory(token_block=64)
    s.create(rec("a"))
    blocks = {(0, 0xC0000000 + p): os.urandom(2000) for p in range(4)}  # e.g. hot pages
    s.commit(rec("a"), first_token=0, tokens=[1, 2], blocks=blocks)
    s.fork("a", rec("b"))
    before = _physical(s)
    a_bytes = s.get("a").stored_bytes
    new = {(0, 0xC0000004): os.urandom(1500)}
    got = s.commit(rec("a"), first_token=2, tokens=[3], blocks=new,
                   drop=[(0, 0xC0000000), (0, 0xC0000001), (7, 7)])  # (7, 7): absent, ignored
    assert set(s.kv_keys("a")) == {(0, 0xC0000002), (0, 0xC0000003), (0, 0xC0000004)}
    assert set(s.kv_keys("b")) == set(blocks) and s.kv_blocks("b") == blocks  # the fork keeps what a dropped
    assert _physical(s) == before + _encoded(new)  # the dropped blobs are shared with b: nothing freed
    assert got.stored_bytes < a_bytes and got.stored_bytes == s.session_keys("a")[1]
    s.delete("b")
    s.commit(rec("a"), first_token=3, tokens=[4], blocks={}, drop=[(0, 0xC0000002)])
    kept = {k: blocks[k] for k in [(0, 0xC0000003)]} | new
    assert s.kv_blocks("a") == kept and _physical(s) == _encoded(kept)  # b is gone: page 2 is freed


def test_delete_removes_exactly_one_session(store_factory):
    s = store_factory(token_block=2)
    for sid in ["a", "ab", "a.b", "b"]:
        s.create(rec(sid))
        s.commit(rec(sid), first_token=0, tokens=[1, 2, 3], blocks={(0, 0): sid.encode() * 5, (1, 2): b"k"})
    s.fork("b", rec("a0"))
    before = snapshot(s)
    own = s.session_blobs("a")["own_bytes"]
    assert s.delete("a") and not s.delete("a")
    after = snapshot(s)
    assert after["_ids"] == ["a.b", "a0", "ab", "b"] and "a" not in after
    assert all(after[sid] == before[sid] for sid in after["_ids"])
    assert after["_stats"]["blob_bytes"] == before["_stats"]["blob_bytes"] - own
    assert after["_stats"]["blobs"] == before["_stats"]["blobs"] - 2
    assert s.get("a") is None and s.tokens("a") == [] and s.kv_blocks("a") == {}
    assert s.tokens("ab") == [1, 2, 3] and s.kv_block("ab", 0, 0) == b"ababababab"
    assert s.delete("b") and s.kv_blocks("a0") == {(0, 0): b"bbbbb", (1, 2): b"k"}  # shared blobs stay


def test_expiry_is_checked_again_inside_the_delete(store_factory):
    s = store_factory()
    s.create(rec("default", updated=1000.0))
    s.create(rec("own", updated=1000.0, ttl=50))
    s.commit(rec("own", updated=1000.0, ttl=50), first_token=0, tokens=[1], blocks={(0, 0): b"kv"})
    assert s.get("own").expires() == 1050 and s.get("default").expires() == float("inf")
    assert s.expired(now=1049) == [] and s.expired(now=1050) == ["own"]
    assert s.expired(now=1100, default_ttl=100) == ["default", "own"]
    assert not s.delete("own", expired_at=1049)  # not yet
    assert not s.delete("default", expired_at=1099, default_ttl=100)
    assert not s.delete("absent", expired_at=1e9)
    # a commit refreshes the session after expired() listed it: the delete's own check lets it live
    assert "own" in s.expired(now=1060)
    s.commit(rec("own", updated=1055.0, ttl=50), first_token=1, tokens=[2], blocks={})
    assert not s.delete("own", expired_at=1060) and s.tokens("own") == [1, 2]
    assert s.delete("own", expired_at=1105)
    assert s.get("own") is None and s.stats()["blobs"] == 0
    assert s.delete("default", expired_at=1e9, default_ttl=100) and s.count() == 0


def test_gc_after_clean_writes_finds_nothing_and_frees_a_leaked_blob(store_factory):
    s = store_factory()
    s.create(rec("a"))
    s.commit(rec("a"), first_token=0, tokens=[1, 2], blocks={(0, 0): b"x" * 100, (0, 1): b"y" * 100})
    s.fork("a", rec("b"))
    s.commit(rec("b"), first_token=2, tokens=[3], blocks={(0, 1): b"z" * 100})
    clean = snapshot(s)
    assert not any(clean["_refs"].values())
    assert s.gc() == dict(orphan_entries=0, freed_blobs=0, freed_bytes=0, fixed_counts=0, dangling_pointers=0,
                          blobs=3, blob_bytes=clean["_stats"]["blob_bytes"])
    assert snapshot(s) == clean
    store_factory.damage(s, "leaked_blob")
    assert s.check_refs()["unreferenced_blobs"] == 1
    out = s.gc()
    assert out["freed_blobs"] == 1 and out["freed_bytes"] > 0 and out["blobs"] == 3
    assert snapshot(s) == clean and s.gc()["freed_blobs"] == 0
    store_factory.damage(s, "kv_count_wrong", "b", (0, 0))  # the blob a and b share
    assert s.check_refs()["wrong_counts"] == 1
    assert s.gc()["fixed_counts"] == 1 and snapshot(s) == clean
