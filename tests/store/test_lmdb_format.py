"""The LMDB store's format: stamped, another refused, format 1 upgraded in place, a store written by
the code before the Store interface (tests/store/fixtures/format2-0268ddf) read and extended identically;
gc on raw leaks (blobs, counts and entries nothing else could leave)."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import lmdb
import pytest

from memsvc.store.errors import StoreError
from memsvc.store.lmdb import STORE_FORMAT, LmdbStore as Store, upgrade_store
from memsvc.store.records import SessionRecord
from tests.store import format_fixture
from tests.store.lmdb_raw import raw_put, session_bytes, session_values

FIXTURE = Path(__file__).parent / "fixtures" / "format2-0268ddf"


def rec(sid: str, **kw) -> SessionRecord:
    return SessionRecord(id=sid, model_name="m", model_fingerprint="f" * 64, policy="tiered", **kw)


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

def _reads(s: Store) -> dict:
    """Everything the interface reads back, stored_bytes aside (it counts compressed bytes, which a
    later zstd may lay out differently)."""
    out = {"ids": s.session_ids(), "refs": s.check_refs(), "expired": s.expired(2000.0, 100.0)}
    for sid in out["ids"]:
        rec = s.get(sid)
        assert rec.stored_bytes == s.session_keys(sid)[1] == session_bytes(s, sid)
        out[sid] = dict(rec=dataclasses.replace(rec, stored_bytes=0),
                        tokens=s.tokens(sid), kv=s.kv_blocks(sid), check=s.check_session(sid),
                        entries=s.session_keys(sid)[0], shared=s.session_blobs(sid)["shared"])
    st = s.stats()
    out["stats"] = {k: st[k] for k in ("sessions", "token_blocks", "kv_blocks", "blobs", "shared_blobs",
                                       "references")}
    return out


def test_a_store_written_before_the_interface_reads_and_grows_identically(tmp_path):
    """The fixture was written by the code of 0268ddf (format_fixture.py says how): today's code reads
    every record, token id and KV payload of it as a fresh run of the same operations stores them, under
    the same keys, and the same further writes leave both stores alike."""
    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)
    fresh = format_fixture.build(Store, tmp_path / "fresh")
    with Store(old, readonly=True) as ro:
        assert ro.session_ids() == ["a", "a2", "a3", "b2", "b3"] and _reads(ro) == _reads(fresh)
        assert set(ro.dump()) == set(fresh.dump())
        assert ro.tokens("b2") == list(range(33)) and ro.kv_block("a3", 0, 3) == b"R" * 333
    with Store(old) as s:
        for st in (s, fresh):
            a2 = st.get("a2")
            st.commit(a2, first_token=a2.n_tokens, tokens=[5, 6], blocks={(7, 1): b"q" * 99}, drop=[(1, 0)])
            st.fork("b2", format_fixture.rec("b4"))
            assert st.delete("a")
        assert _reads(s) == _reads(fresh) and set(s.dump()) == set(fresh.dump())
    fresh.close()
