"""Copy-on-write KV blocks: forks share blobs by reference count, deletes free them, gc
reclaims what nothing points to, the store format is stamped; expiry by ttl."""
from __future__ import annotations

import os

import lmdb
import pytest

from memsvc.store.blocks import KIND_KV, encode_block
from memsvc.store.errors import CorruptBlock, StoreError
from memsvc.store.lmdb_store import STORE_FORMAT, Store, upgrade_store
from memsvc.store.records import SessionRecord

from tests.store.test_store import raw_put, session_bytes, session_values


def rec(sid: str, **kw) -> SessionRecord:
    return SessionRecord(id=sid, model_name="m", model_fingerprint="f" * 64, policy="tiered", **kw)


def physical(s: Store) -> int:
    return s.stats()["blob_bytes"]


def test_ten_forks_share_blocks_and_grow_by_their_new_blocks_only(tmp_path):
    with Store(tmp_path, token_block=64) as s:
        s.create(rec("orig"))
        base = {(layer, i): os.urandom(3000) for layer in range(3) for i in range(8)}  # incompressible
        base.update({(layer, 0xFFFFFFFF): os.urandom(5000) for layer in range(3)})  # per-layer state
        s.commit(rec("orig"), first_token=0, tokens=list(range(500)), blocks=base)
        st0 = s.stats()
        orig_bytes = s.get("orig").stored_bytes
        assert st0["blobs"] == len(base) and st0["shared_blobs"] == 0

        for f in range(10):
            fork = s.fork("orig", rec(f"f{f}"))
            assert fork.stored_bytes == orig_bytes + (len(fork.to_bytes()) - len(s.get("orig").to_bytes()))
        st = s.stats()
        assert st["blobs"] == st0["blobs"] and st["blob_bytes"] == st0["blob_bytes"]
        assert st["shared_blobs"] == len(base) and st["references"] == 11 * len(base)
        assert st["logical_blob_bytes"] == 11 * st0["blob_bytes"]
        # a fork costs its record, token blocks and 8-byte pointers, nothing of the KV blocks themselves
        records = sum(len(s.get(f"f{f}").to_bytes()) for f in range(10))
        assert st["total_bytes"] - st0["total_bytes"] == records + 10 * (st0["token_bytes"] + 8 * len(base))

        expected = {}
        for f in range(10):
            sid = f"f{f}"
            new = {(0, 8 + f): os.urandom(2000 + f),  # a new cold block
                   **{(layer, 0xFFFFFFFF): os.urandom(4000 + f) for layer in range(3)}}  # replaces shared states
            if f % 2:
                new[(1, 3)] = os.urandom(1000)  # replaces a shared cold block
            before = physical(s)
            s.commit(rec(sid), first_token=500, tokens=[f] * 7, blocks=new)
            grew = physical(s) - before
            assert grew == sum(len(encode_block(p, kind=KIND_KV, layer=k[0], index=k[1], n_tokens=0))
                               for k, p in new.items())  # exactly the new blocks (zstd cannot shrink random)
            assert s.get(sid).stored_bytes == session_bytes(s, sid)
            expected[sid] = {**base, **new}
        assert s.kv_blocks("orig") == base  # the shared blobs were never changed

        assert s.delete("orig")
        for sid, blocks in expected.items():
            assert s.kv_blocks(sid) == blocks and s.tokens(sid) == list(range(500)) + [int(sid[1:])] * 7
        st = s.stats()
        # the original's states were replaced in every fork: its 3 state blobs are gone
        assert st["blobs"] == len(base) - 3 + 10 * 3 + 10 + 5
        assert s.gc()["freed_blobs"] == 0  # clean deletes leave nothing for gc

        for sid in expected:
            assert s.delete(sid)
        assert s.stats()["blobs"] == 0 and {db for db, _ in s.dump()} == {"meta"}


def test_gc_reclaims_exactly_the_unreferenced_blobs(tmp_path):
    with Store(tmp_path) as s:
        s.create(rec("a"))
        s.commit(rec("a"), first_token=0, tokens=[1, 2], blocks={(0, 0): b"x" * 100, (0, 1): b"y" * 100})
        s.fork("a", rec("b"))
        s.commit(rec("b"), first_token=2, tokens=[3], blocks={(0, 1): b"z" * 100})
        clean = s.dump()
        assert s.gc() == dict(orphan_entries=0, freed_blobs=0, freed_bytes=0, fixed_counts=0, dangling_pointers=0,
                              blobs=3, blob_bytes=s.stats()["blob_bytes"])
        assert s.dump() == clean  # nothing to do: no write

        leaked = {(5000).to_bytes(8, "big"): os.urandom(333),  # a blob with a count but no pointer
                  (5001).to_bytes(8, "big"): os.urandom(77)}  # a blob without even a count
        raw_put(s, "blobs", (5000).to_bytes(8, "big"), leaked[(5000).to_bytes(8, "big")])
        raw_put(s, "refs", (5000).to_bytes(8, "big"), (1).to_bytes(4, "little") + (333).to_bytes(8, "little"))
        raw_put(s, "blobs", (5001).to_bytes(8, "big"), leaked[(5001).to_bytes(8, "big")])
        shared = clean[("kv", b"a\0" + b"\0\0" + b"\0\0\0\0")]
        good_count = clean[("refs", shared)]
        raw_put(s, "refs", shared, (7).to_bytes(4, "little") + good_count[4:])  # a wrong count
        raw_put(s, "tokens", b"ghost\0\0\0\0\0", b"whatever")  # entries of a session without a record
        raw_put(s, "kv", b"ghost\0\0\0\0\0\0\0", shared)

        out = s.gc()
        assert out["freed_blobs"] == 2 and out["freed_bytes"] == 333 + 77
        assert out["fixed_counts"] == 1 and out["orphan_entries"] == 2 and out["dangling_pointers"] == 0
        assert s.dump() == clean
        assert s.gc()["freed_blobs"] == 0

        raw_put(s, "kv", b"a\0" + b"\0\0" + b"\0\0\0\7", (4242).to_bytes(8, "big"))  # points nowhere
        assert s.gc()["dangling_pointers"] == 1


def test_failed_fork_and_commit_change_nothing_on_a_damaged_count(tmp_path):
    with Store(tmp_path) as s:
        s.create(rec("a"))
        s.commit(rec("a"), first_token=0, tokens=[1], blocks={(0, 0): b"x" * 10})
        ptr = s.dump()[("kv", b"a\0" + b"\0" * 6)]
        raw_put(s, "refs", ptr, None)
        before = s.dump()
        with pytest.raises(CorruptBlock, match="reference count"):
            s.fork("a", rec("b"))
        with pytest.raises(CorruptBlock, match="reference count"):
            s.commit(rec("a"), first_token=1, tokens=[2], blocks={(0, 0): b"new"})
        assert s.dump() == before
        assert s.delete("a")  # a damaged session can still be deleted
        assert s.gc()["freed_blobs"] == 1 and s.stats()["blobs"] == 0


def test_format_is_stamped_and_an_old_store_is_refused(tmp_path):
    with Store(tmp_path / "new") as s:
        assert s.dump()[("meta", b"format")] == STORE_FORMAT.to_bytes(4, "little")
    with Store(tmp_path / "new", readonly=True) as s:
        assert s.count() == 0

    old = tmp_path / "old"  # what memsvc wrote before blobs were shared: no meta database
    env = lmdb.open(str(old), max_dbs=3)
    db = env.open_db(b"sessions")
    with env.begin(write=True) as txn:
        txn.put(b"s", b"a format-1 record", db=db)
    env.close()
    for readonly in (False, True):
        with pytest.raises(StoreError, match="format 1.*fresh data dir"):
            Store(old, readonly=readonly)
    env = lmdb.open(str(old), max_dbs=3, readonly=True)
    assert env.open_db(b"sessions", create=False) is not None  # refused without changing it
    with pytest.raises(lmdb.NotFoundError):
        env.open_db(b"meta", create=False)
    env.close()

    empty = tmp_path / "empty"  # old databases, nothing in them: stamped and used
    env = lmdb.open(str(empty), max_dbs=3)
    env.open_db(b"sessions")
    env.close()
    with Store(empty) as s:
        s.create(rec("a"))
        raw_put(s, "meta", b"format", (9).to_bytes(4, "little"))
    with pytest.raises(StoreError, match="format 9"):
        Store(empty)


def test_expiry_by_ttl(tmp_path):
    with Store(tmp_path) as s:
        s.create(rec("default", updated=1000.0))
        s.create(rec("own", updated=1000.0, ttl=50))
        s.commit(rec("own", updated=1000.0, ttl=50), first_token=0, tokens=[1], blocks={(0, 0): b"kv"})
        assert s.get("own").expires() == 1050 and s.get("default").expires() == float("inf")
        assert s.get("default").expires(default_ttl=100) == 1100
        assert s.expired(now=1049) == [] and s.expired(now=1050) == ["own"]
        assert s.expired(now=1100, default_ttl=100) == ["default", "own"]
        assert not s.delete("own", expired_at=1049)  # not yet
        assert not s.delete("default", expired_at=1099, default_ttl=100)
        assert s.delete("own", expired_at=1050)
        assert s.get("own") is None and s.stats()["blobs"] == 0
        assert s.delete("default", expired_at=1e9, default_ttl=100)
        with pytest.raises(ValueError, match="ttl"):
            rec("x", ttl=-1)


def test_upgrade_converts_a_format_1_store_in_place(tmp_path):
    with Store(tmp_path, token_block=4) as s:
        for sid in ("a", "b"):
            s.create(rec(sid))
            s.commit(rec(sid), first_token=0, tokens=list(range(9)), blocks={(0, 0): sid.encode() * 50,
                                                                          (1, 0xFFFFFFFF): os.urandom(300)})
        want = {sid: session_values(s, sid) for sid in ("a", "b")}
        records = {sid: s.get(sid) for sid in ("a", "b")}
    env = lmdb.open(str(tmp_path), max_dbs=6)  # rewrite it as format 1 wrote it: blocks in kv, no blobs or meta
    dbs = {name: env.open_db(name.encode()) for name in ("kv", "blobs", "refs", "meta")}
    with env.begin(write=True) as txn:
        for key, ptr in list(txn.cursor(db=dbs["kv"])):
            txn.put(key, txn.get(ptr, db=dbs["blobs"]), db=dbs["kv"])
        for name in ("blobs", "refs", "meta"):
            txn.drop(dbs[name], delete=True)
    env.close()
    with pytest.raises(StoreError, match="memsvc sessions upgrade"):
        Store(tmp_path)

    assert upgrade_store(tmp_path) == 4
    with Store(tmp_path) as s:
        for sid in ("a", "b"):
            assert session_values(s, sid) == want[sid] and s.get(sid) == records[sid]
            assert s.get(sid).stored_bytes == session_bytes(s, sid)
        s.fork("a", rec("c"))
        s.commit(rec("c"), first_token=9, tokens=[1], blocks={(0, 0): b"new"})
        assert s.gc()["freed_blobs"] == 0 and s.kv_block("a", 0, 0) == b"a" * 50
    with pytest.raises(StoreError, match="nothing to upgrade"):
        upgrade_store(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        upgrade_store(tmp_path / "absent")


def test_commit_drops_entries_and_a_shared_blob_stays_for_the_fork(tmp_path):
    with Store(tmp_path, token_block=64) as s:
        s.create(rec("a"))
        blocks = {(0, 0xC0000000 + p): os.urandom(2000) for p in range(4)}  # e.g. hot pages
        s.commit(rec("a"), first_token=0, tokens=[1, 2], blocks=blocks)
        s.fork("a", rec("b"))
        before = physical(s)
        hdr = before // 4 - 2000  # each blob: the payload and its block header
        a_bytes = s.get("a").stored_bytes
        new = {(0, 0xC0000004): os.urandom(1500)}
        with pytest.raises(ValueError, match="both written and dropped"):
            s.commit(rec("a"), first_token=2, tokens=[3], blocks=new, drop=[(0, 0xC0000004)])
        assert s.get("a").n_tokens == 2 and set(s.kv_keys("a")) == set(blocks)  # nothing changed
        got = s.commit(rec("a"), first_token=2, tokens=[3], blocks=new,
                       drop=[(0, 0xC0000000), (0, 0xC0000001), (7, 7)])  # (7, 7): absent, ignored
        assert set(s.kv_keys("a")) == {(0, 0xC0000002), (0, 0xC0000003), (0, 0xC0000004)}
        assert set(s.kv_keys("b")) == set(blocks)  # the fork keeps what a dropped
        assert physical(s) == before + 1500 + hdr  # the dropped blobs are shared with b: nothing freed
        assert got.stored_bytes < a_bytes  # but a no longer counts them
        s.delete("b")
        s.commit(rec("a"), first_token=3, tokens=[4], blocks={}, drop=[(0, 0xC0000002)])
        assert physical(s) == 2000 + 1500 + 2 * hdr  # b is gone: page 2 is freed, pages 3 and 4 stay
