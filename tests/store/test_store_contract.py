"""The Store contract, run over every backend (store_factory): records and paging, commits that append
token ids and write KV blocks, all-or-nothing writes (bad input and failures injected anywhere inside
a transaction change nothing), read-only and closed stores, concurrent use. Only interface calls."""
from __future__ import annotations

import os

import pytest

from memsvc.store.base import Store
from memsvc.store.errors import SessionExists, SessionMissing, StoreError
from tests.store.backends import InjectedFailure, hammer, ids_for, rec, snapshot


def test_every_backend_implements_the_interface(store_factory):
    s = store_factory()
    assert isinstance(s, Store) and not s.closed and s.count() == 0 and s.session_ids() == []
    assert s.list() == [] and s.expired(now=1e12) == [] and s.get("nothing") is None


def test_create_get_and_list_with_paging_and_labels(store_factory):
    s = store_factory()
    ids = [f"s{i:03d}" for i in range(37)] + ["a", "ab", "b", "Z"]
    for i, sid in enumerate(ids):
        created = s.create(rec(sid, n_tokens=99, stored_bytes=7,
                               labels={"team": "x" if i % 3 else "y", "env": "prod" if i % 2 else "dev"}))
        assert created == s.get(sid) and created.n_tokens == 0 and created.stored_bytes == s.session_keys(sid)[1]
    assert s.count() == len(ids) and s.session_ids() == sorted(ids)
    pages, after = [], ""
    while True:
        page = s.list(after=after, limit=5)
        if not page:
            break
        assert len(page) <= 5
        pages += [r.id for r in page]
        after = page[-1].id
    assert pages == sorted(ids)
    assert [r.id for r in s.list(after="a", limit=2)] == ["ab", "b"]
    assert [r.id for r in s.list(after="aa", limit=1)] == ["ab"]  # `after` need not exist
    assert s.list(after="zzz") == [] and s.list(limit=0) == []
    want = {"team": "x", "env": "prod"}
    expected = sorted(sid for sid in ids if all(s.get(sid).labels[k] == v for k, v in want.items()))
    assert [r.id for r in s.list(labels=want, limit=1000)] == expected and expected
    assert [r.id for r in s.list(labels=want, limit=3)] == expected[:3]
    assert s.list(labels={"team": "nobody"}) == []
    with pytest.raises(ValueError):
        s.list(limit=-1)
    with pytest.raises(ValueError):
        s.list(after="a\0")
    assert s.get("no such id") is None and s.get("a\0") is None


def test_commits_append_tokens_and_write_blocks(store_factory):
    s = store_factory(token_block=1024)
    s.create(rec("s", labels={"k": "v"}))
    expected, n = [], 0
    for i, count in enumerate([1, 1023, 1, 2050, 0]):
        ids = ids_for(n, count)
        blocks = {(0, i): bytes([i]) * 100, (1, 0): os.urandom(50 + i)}  # (1, 0) is replaced every time
        out = s.commit(rec("s", messages=[{"role": "user", "content": str(i)}]), first_token=n, tokens=ids,
                       blocks=blocks, block_tokens={(1, 0): 10 + i})
        n += count
        expected += ids
        assert out.n_tokens == n and out == s.get("s") and out.messages[0]["content"] == str(i)
        assert out.labels == {} and s.tokens("s") == expected  # every field but the counts is the caller's
        assert out.stored_bytes == s.session_keys("s")[1]
        assert s.kv_block("s", 1, 0) == blocks[(1, 0)]
    kv = s.kv_blocks("s")
    assert set(kv) == {(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)} and s.kv_keys("s") == sorted(kv)
    assert kv[(0, 2)] == bytes([2]) * 100 and s.kv_block("s", 9, 9) is None
    assert s.session_keys("s")[0] == 1 + 4 + 6  # record, 3075 ids in 4 token blocks, 6 KV entries
    st = s.stats()
    assert st["sessions"] == 1 and st["token_blocks"] == 4 and st["kv_blocks"] == st["blobs"] == 6
    assert st["shared_blobs"] == 0 and st["references"] == 6 and st["blob_bytes"] == st["logical_blob_bytes"]
    assert s.session_blobs("s") == dict(blocks=6, shared=0, shared_bytes=0, own_bytes=st["blob_bytes"])
    assert s.stats()["total_bytes"] >= s.get("s").stored_bytes
    assert s.tokens("nothing") == [] and s.kv_blocks("nothing") == {} and s.kv_keys("nothing") == []


def test_data_survives_reopen_with_another_token_block(store_factory):
    s = store_factory(token_block=4)
    s.create(rec("s"))
    s.commit(rec("s"), first_token=0, tokens=list(range(10)), blocks={(0, 0): b"kv"})
    s.close()
    s = store_factory(token_block=3)
    assert s.tokens("s") == list(range(10)) and s.kv_blocks("s") == {(0, 0): b"kv"}
    s.commit(rec("s"), first_token=10, tokens=list(range(10, 17)), blocks={})
    assert s.tokens("s") == list(range(17)) and s.get("s").stored_bytes == s.session_keys("s")[1]


def test_kv_blocks_at_reads_a_layer_in_one_snapshot(store_factory):
    s = store_factory()
    s.create(rec("s"))
    s.commit(rec("s"), first_token=0, tokens=[1], blocks={(0, 0): b"a" * 64, (0, 1): b"b" * 64, (1, 0): b"c"})
    assert s.kv_blocks_at("s", 0, [1, 0, 7]) == [b"b" * 64, b"a" * 64, None]
    assert s.kv_blocks_at("s", 1, [0]) == [s.kv_block("s", 1, 0)] and s.kv_blocks_at("s", 0, []) == []
    for call in (lambda: s.kv_block("s", -1, 0), lambda: s.kv_block("s", 0, 1 << 32), lambda: s.tokens("a\0"),
                 lambda: s.kv_blocks("a b"), lambda: s.session_keys("")):
        with pytest.raises(ValueError):
            call()


def test_bad_input_and_refused_writes_change_nothing(store_factory):
    s = store_factory(token_block=4)
    s.create(rec("s"))
    s.create(rec("t"))
    s.commit(rec("s"), first_token=0, tokens=[1, 2, 3, 4, 5], blocks={(0, 0): b"x" * 10, (0, 1): b"y" * 10})
    before = snapshot(s)
    with pytest.raises(ValueError, match="holds 5"):
        s.commit(rec("s"), first_token=2, tokens=[4], blocks={})
    with pytest.raises(SessionMissing):
        s.commit(rec("nope"), first_token=0, tokens=[4], blocks={})
    for bad in ([1 << 40], [1.5], ["7"]):
        with pytest.raises(ValueError):
            s.commit(rec("s"), first_token=5, tokens=bad, blocks={})
    for bad_blocks in ({(70000, 0): b"x"}, {(0,): b"x"}, {(0, -1): b"x"}, {(0, 0): "text"}, {"0,0": b"x"}):
        with pytest.raises(ValueError):
            s.commit(rec("s"), first_token=5, tokens=[6], blocks=bad_blocks)
    with pytest.raises(ValueError, match="not written"):
        s.commit(rec("s"), first_token=5, tokens=[6], blocks={(0, 0): b"z"}, block_tokens={(5, 5): 1})
    with pytest.raises(ValueError, match="both written and dropped"):
        s.commit(rec("s"), first_token=5, tokens=[6], blocks={(0, 0): b"z"}, drop=[(0, 0)])
    with pytest.raises(ValueError):
        s.commit(rec("s"), first_token=-1, tokens=[], blocks={})
    with pytest.raises(ValueError):
        s.commit("not a record", first_token=5, tokens=[], blocks={})

    class Exploding(dict):
        def items(self):
            yield (0, 1), b"half"
            raise RuntimeError("injected failure while iterating the blocks")

    with pytest.raises(RuntimeError):
        s.commit(rec("s"), first_token=5, tokens=[6, 7], blocks=Exploding())
    with pytest.raises(SessionExists):
        s.create(rec("s"))
    with pytest.raises(SessionExists):
        s.fork("s", rec("t"))
    with pytest.raises(SessionMissing):
        s.fork("nope", rec("u"))
    with pytest.raises(SessionMissing):
        s.rewrite_kv("nope", n_tokens=0, blocks={})
    with pytest.raises(ValueError, match="holds 5 tokens"):
        s.rewrite_kv("s", n_tokens=4, blocks={(0, 0): b"new"})
    assert s.delete("nope") is False and s.delete("bad id") is False and s.delete("a\0") is False
    with pytest.raises(ValueError):
        s.create("not a record")
    assert snapshot(s) == before
    s.commit(rec("s"), first_token=5, tokens=[6], blocks={})  # and the store still works after all that
    assert s.tokens("s") == [1, 2, 3, 4, 5, 6]


def test_a_failure_anywhere_inside_a_write_changes_nothing(store_factory):
    s = store_factory(token_block=4)
    s.create(rec("s"))
    s.commit(rec("s"), first_token=0, tokens=[1, 2, 3, 4, 5], blocks={(0, 0): b"x" * 10, (0, 1): b"y" * 10})
    exp = s.export("s")
    writes = [  # each runs on what the ones before it left
        ("create", lambda: s.create(rec("c"))),
        ("commit", lambda: s.commit(rec("s"), first_token=5, tokens=list(range(6, 13)),
                                    blocks={(0, 1): b"new" * 9, (2, 0): b"more" * 50}, drop=[(0, 0)])),
        ("fork", lambda: s.fork("s", rec("s2"))),
        ("commit on the fork", lambda: s.commit(rec("s2"), first_token=12, tokens=[1], blocks={(0, 1): b"f"})),
        ("rewrite_kv", lambda: s.rewrite_kv("s", n_tokens=12, blocks={(2, 0): b"R" * 30}, drop=[(0, 1)])),
        ("import", lambda: s.import_session(exp, new_id="s3")),
        ("delete", lambda: s.delete("s")),
        ("delete expired", lambda: s.delete("c", expired_at=1e12, default_ttl=1)),
    ]
    for name, write in writes:
        before = snapshot(s)
        for at in range(1, 200):
            with store_factory.failing_writes(s, at) as calls:
                try:
                    write()
                except InjectedFailure:
                    assert snapshot(s) == before, (name, at)
                    continue
            assert len(calls) < at  # it ran to its end without meeting the failure
            break
        assert at >= 2, name  # each write met at least one failure (one per step it takes) first
        assert snapshot(s) != before, name
    assert s.session_ids() == ["s2", "s3"] and s.tokens("s3") == [1, 2, 3, 4, 5]
    assert s.tokens("s2") == list(range(1, 13)) + [1] and s.kv_blocks("s2") == {(0, 1): b"f", (2, 0): b"more" * 50}
    assert not any(s.check_refs().values()) and s.gc()["freed_blobs"] == 0


def test_readonly_sees_data_and_refuses_writes(store_factory):
    s = store_factory()
    s.create(rec("s"))
    s.commit(rec("s"), first_token=0, tokens=[9], blocks={(0, 0): b"kv"})
    before = snapshot(s)
    s.close()
    ro = store_factory(readonly=True)
    assert ro.readonly and snapshot(ro) == before
    for write in (lambda: ro.create(rec("t")), lambda: ro.delete("s"), lambda: ro.fork("s", rec("t")),
                  lambda: ro.commit(rec("s"), first_token=1, tokens=[1], blocks={}), lambda: ro.gc(),
                  lambda: ro.rewrite_kv("s", n_tokens=1, blocks={}), lambda: ro.import_session(ro.export("s"), "u")):
        with pytest.raises(StoreError, match="read-only"):
            write()
    assert snapshot(ro) == before


def test_closed_store_refuses_calls(store_factory):
    s = store_factory()
    s.create(rec("s"))
    s.close()
    s.close()
    assert s.closed
    for call in (lambda: s.get("s"), lambda: s.create(rec("t")), lambda: s.list(), lambda: s.stats()):
        with pytest.raises(StoreError, match="closed"):
            call()


def test_concurrent_writers_and_readers(store_factory):
    hammer(store_factory(token_block=16))
