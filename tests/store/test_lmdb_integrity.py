"""The LMDB store's integrity checks on raw damage (the contract is test_store_contract_integrity.py):
check_session() names every damaged entry of a session at once, check_refs() what gc() would fix,
including the store's metadata; a damaged next blob id never reuses a blob."""
from __future__ import annotations

import struct

from memsvc.store.lmdb import LmdbStore as Store
from tests.store.backends import rec
from tests.store.lmdb_raw import raw_put

K00, K01, K10 = b"s\0\0\0\0\0\0\0", b"s\0\0\0\0\0\0\1", b"s\0\0\1\0\0\0\0"


def _store(tmp_path) -> Store:
    s = Store(tmp_path, token_block=4)
    s.create(rec("s"))
    s.commit(rec("s"), first_token=0, tokens=list(range(10)),
             blocks={(0, 0): b"a" * 64, (0, 1): b"b" * 64, (1, 0): b"c" * 64})
    s.fork("s", rec("t"))
    return s


def test_every_kind_of_damage_is_named(tmp_path):
    with _store(tmp_path) as s:
        good = s.dump()
        b00 = good[("kv", K00)]
        bad = bytearray(good[("blobs", b00)])
        bad[30] ^= 8
        raw_put(s, "blobs", b00, bytes(bad))  # shared by the fork: both sessions see it
        raw_put(s, "kv", K01, b"\1\2")  # not a blob id
        raw_put(s, "refs", good[("kv", K10)], b"\0")  # a malformed count
        raw_put(s, "tokens", b"s\0\0\0\0\1", None)  # a gap in the token blocks
        out = s.check_session("s")
        assert set(out["kv"]) == {(0, 0), (0, 1), (1, 0)}
        assert "checksum" in out["kv"][(0, 0)] and "pointer" in out["kv"][(0, 1)] and "count" in out["kv"][(1, 0)]
        assert set(out["tokens"]) == {2} and "missing" in out["tokens"][2]
        assert set(s.check_session("t")["kv"]) == {(0, 0), (1, 0)} and not s.check_session("t")["tokens"]
        refs = s.check_refs()
        assert refs["dangling_pointers"] == 1 and refs["wrong_counts"] == 2  # (0, 1)'s blob counts s still

        raw_put(s, "tokens", b"s\0\0\0\0\1", good[("tokens", b"s\0\0\0\0\1")])
        raw_put(s, "tokens", b"s\0\0\0\0\2", None)  # the last block gone: the count disagrees
        assert "record says 10" in s.check_session("s")["tokens"][-1]
        bad = bytearray(good[("sessions", b"s")])
        bad[-5] ^= 1
        raw_put(s, "sessions", b"s", bytes(bad))
        assert "checksum" in s.check_session("s")["record"]
        assert s.session_ids() == ["s", "t"]


def test_check_refs_sees_what_gc_fixes(tmp_path):
    with _store(tmp_path) as s:
        good = s.dump()
        bid = good[("kv", K00)]
        count, size = struct.unpack("<IQ", good[("refs", bid)])
        raw_put(s, "refs", bid, struct.pack("<IQ", count + 3, size))
        raw_put(s, "blobs", b"\0" * 7 + b"\x63", b"x")  # an unreferenced blob
        raw_put(s, "kv", b"gone\0\0\0\0\0\0\0", bid)  # an orphan entry
        refs = s.check_refs()
        assert refs["wrong_counts"] == 1 and refs["unreferenced_blobs"] == 1 and refs["orphan_entries"] == 1
        assert refs["bad_meta"] == 1  # blob 99 is past the next blob id
        s.gc()
        refs = s.check_refs()
        assert refs["bad_meta"] == 0 and not any(refs.values())


def test_a_damaged_next_blob_id_never_reuses_a_blob(tmp_path):
    with _store(tmp_path) as s:
        raw_put(s, "meta", b"next_blob", struct.pack("<Q", 1))
        assert s.check_refs()["bad_meta"] == 1
        before = s.kv_blocks("t")
        s.commit(rec("s"), first_token=10, tokens=[1], blocks={(0, 0): b"z" * 64})
        assert s.kv_blocks("t") == before and s.kv_block("s", 0, 0) == b"z" * 64
        assert not any(s.check_refs().values())