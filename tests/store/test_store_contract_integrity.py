"""The Store contract, over every backend: damage (made by the backend's damage()) is detected and
named by check_session, never served by a read; a damaged session can still be deleted; gc settles
what a damage leaves; rewrite_kv repairs KV entries in one transaction."""
from __future__ import annotations

import pytest

from memsvc.store.base import Store
from memsvc.store.errors import CorruptBlock, CorruptRecord, SessionMissing
from tests.store.backends import rec, snapshot

CLEAN = {"record": None, "tokens": {}, "kv": {}, "bad_keys": [], "token_count": 10, "kv_entries": 3}


def _store(store_factory, name: str = "a"):
    s = store_factory(name, token_block=4)
    s.create(rec("s"))
    s.commit(rec("s"), first_token=0, tokens=list(range(10)),
             blocks={(0, 0): b"a" * 64, (0, 1): b"b" * 64, (1, 0): b"c" * 64})
    s.fork("s", rec("t"))
    s.create(rec("u"))
    s.commit(rec("u"), first_token=0, tokens=[7], blocks={(0, 0): b"u"})
    return s


def test_clean_sessions_check_clean(store_factory):
    s = _store(store_factory)
    assert s.check_session("s") == s.check_session("t") == CLEAN
    assert not any(s.check_refs().values()) and s.session_ids() == ["s", "t", "u"]
    with pytest.raises(SessionMissing):
        s.check_session("nope")


@pytest.mark.parametrize("what, where", [("kv_blob", (0, 1)), ("kv_dangling", (0, 1)), ("kv_count_gone", (1, 0))])
def test_a_damaged_kv_entry_is_named_and_never_served(store_factory, what, where):
    s = _store(store_factory)
    u = snapshot(s)["u"]
    store_factory.damage(s, what, "s", where)
    out = s.check_session("s")
    assert set(out["kv"]) == {where} and out["kv"][where] and out["kv_entries"] == 3 and not out["tokens"]
    if what != "kv_count_gone":  # a missing count does not stop a read; every other damage does
        with pytest.raises(CorruptBlock):
            s.kv_blocks("s")
        with pytest.raises(CorruptBlock):
            s.kv_block("s", *where)
        with pytest.raises(CorruptBlock):
            s.kv_blocks_at("s", where[0], [0, 1])
        with pytest.raises(CorruptBlock):
            s.export("s")
    other = next(k for k in [(0, 0), (0, 1), (1, 0)] if k != where)
    assert s.kv_block("s", *other) is not None  # the rest of the session still reads
    shared = what in ("kv_blob", "kv_count_gone")  # the blob (or its count) is the fork's too
    assert set(s.check_session("t")["kv"]) == ({where} if shared else set())
    refs = s.check_refs()
    assert refs["dangling_pointers"] == (what == "kv_dangling") and refs["wrong_counts"] == (what != "kv_blob")
    assert snapshot(s)["u"] == u  # another session is untouched
    assert s.delete("s") and s.get("s") is None  # a damaged session can still be deleted
    s.gc()
    assert not any(s.check_refs().values()) and snapshot(s)["u"] == u


def test_damaged_token_blocks_and_records_are_named(store_factory):
    s = _store(store_factory)
    store_factory.damage(s, "token_block", "s", 1)
    assert set(s.check_session("s")["tokens"]) == {1}
    with pytest.raises(CorruptBlock):
        s.tokens("s")
    assert s.check_session("t") == CLEAN  # token ids are the fork's own copy
    store_factory.damage(s, "token_block", "t", 2)  # t's last block, partly filled
    before = snapshot(s)
    with pytest.raises(CorruptBlock):  # a damaged partial last block is never silently rewritten
        s.commit(rec("t"), first_token=10, tokens=[1], blocks={})
    assert snapshot(s) == before

    s2 = _store(store_factory, "two")
    store_factory.damage(s2, "token_gone", "s", 2)  # the last block gone: the count disagrees
    assert "10" in s2.check_session("s")["tokens"][-1]
    with pytest.raises(CorruptRecord):
        s2.tokens("s")
    store_factory.damage(s2, "token_gone", "t", 1)  # a gap in the blocks
    assert 2 in s2.check_session("t")["tokens"]
    with pytest.raises(CorruptBlock):
        s2.tokens("t")
    store_factory.damage(s2, "record", "u")
    assert s2.check_session("u")["record"] and s2.session_ids() == ["s", "t", "u"]
    with pytest.raises(CorruptRecord):
        s2.get("u")
    assert s2.expired(now=1e12, default_ttl=1) == ["s", "t"]  # a damaged record never expires
    assert s2.delete("u") and s2.session_ids() == ["s", "t"]


def test_a_damaged_count_fails_fork_and_commit_and_changes_nothing(store_factory):
    s = store_factory()
    s.create(rec("a"))
    s.commit(rec("a"), first_token=0, tokens=[1], blocks={(0, 0): b"x" * 10})
    store_factory.damage(s, "kv_count_gone", "a", (0, 0))
    before = snapshot(s)
    with pytest.raises(CorruptBlock, match="reference count"):
        s.fork("a", rec("b"))
    with pytest.raises(CorruptBlock, match="reference count"):
        s.commit(rec("a"), first_token=1, tokens=[2], blocks={(0, 0): b"new"})
    assert snapshot(s) == before
    assert s.delete("a")  # a damaged session can still be deleted
    assert s.gc()["freed_blobs"] == 1 and s.stats()["blobs"] == 0


def test_rewrite_kv_replaces_entries_in_one_transaction(store_factory):
    s = _store(store_factory)
    store_factory.damage(s, "kv_dangling", "s", (0, 1))  # its blob keeps the fork's reference only
    updated = s.get("s").updated
    with pytest.raises(ValueError, match="holds 10 tokens"):
        s.rewrite_kv("s", n_tokens=9, blocks={(0, 1): b"B" * 64})
    new = s.rewrite_kv("s", n_tokens=10, blocks={(0, 0): b"A" * 64, (0, 1): b"B" * 64}, drop=[(1, 0)],
                       block_tokens={(0, 0): 4}, extra={"repair": {"count": 1}})
    assert new == s.get("s") and new.extra["repair"] == {"count": 1} and new.updated == updated
    assert s.kv_blocks("s") == {(0, 0): b"A" * 64, (0, 1): b"B" * 64} and s.tokens("s") == list(range(10))
    assert s.kv_blocks("t") == {(0, 0): b"a" * 64, (0, 1): b"b" * 64, (1, 0): b"c" * 64}  # the fork as it was
    assert new.stored_bytes == s.session_keys("s")[1] and s.check_session("s")["kv"] == {}
    s.gc()
    assert not any(s.check_refs().values()) and s.kv_blocks("t")[(0, 1)] == b"b" * 64
    assert s.session_blobs("t")["shared"] == 0  # gc set the count s could not drop to the one pointer left


@pytest.mark.parametrize("impl", ["backend", "default"])
def test_list_page_names_a_damaged_record_and_goes_on(store_factory, impl):
    """list() stops at a damaged record; list_page() leaves it out of the records, names it in damaged, and
    lists the others (the backend's own list_page, and the base class's default over list/get/session_ids)."""
    s = store_factory()
    for sid in ("a", "b", "c", "d"):
        s.create(rec(sid, labels={} if sid == "c" else {"team": "x"}))
    store_factory.damage(s, "record", "b")
    list_page = s.list_page if impl == "backend" else (lambda **kw: Store.list_page(s, **kw))
    with pytest.raises(CorruptRecord):
        s.list()
    page = list_page()
    assert [r.id for r in page.records] == ["a", "c", "d"] and [d.id for d in page.damaged] == ["b"]
    assert "checksum" in page.damaged[0].reason and len(page) == 4 and page.last == "d"
    first = list_page(limit=2)  # a damaged record counts in the limit, and paging goes past it
    assert [r.id for r in first.records] == ["a"] and [d.id for d in first.damaged] == ["b"] and first.last == "b"
    rest = list_page(after=first.last, limit=2)
    assert [r.id for r in rest.records] == ["c", "d"] and not rest.damaged
    labelled = list_page(labels={"team": "x"})  # a damaged record's labels cannot be read: it is named anyway
    assert [r.id for r in labelled.records] == ["a", "d"] and [d.id for d in labelled.damaged] == ["b"]
    assert not list_page(after="d").damaged and len(list_page(limit=0)) == 0
    store_factory.damage(s, "record", "d")
    assert [d.id for d in list_page(after="b").damaged] == ["d"]
    with pytest.raises(ValueError):
        list_page(limit=-1)
