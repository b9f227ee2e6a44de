"""The store's integrity checks and its repair write: check_session() names every damaged entry of a
session, check_refs() what gc() would fix, rewrite_kv() replaces KV entries in one transaction."""
from __future__ import annotations

import struct

import pytest

from memsvc.store.lmdb_store import Store
from tests.store.test_store import raw_put, rec

K00, K01, K10 = b"s\0\0\0\0\0\0\0", b"s\0\0\0\0\0\0\1", b"s\0\0\1\0\0\0\0"


def _store(tmp_path) -> Store:
    s = Store(tmp_path, token_block=4)
    s.create(rec("s"))
    s.commit(rec("s"), first_token=0, tokens=list(range(10)),
             blocks={(0, 0): b"a" * 64, (0, 1): b"b" * 64, (1, 0): b"c" * 64})
    s.fork("s", rec("t"))
    return s


def test_clean_sessions_check_clean(tmp_path):
    with _store(tmp_path) as s:
        for sid in ("s", "t"):
            out = s.check_session(sid)
            assert out == {"record": None, "tokens": {}, "kv": {}, "bad_keys": [], "token_count": 10,
                           "kv_entries": 3}
        assert not any(s.check_refs().values())
        assert s.session_ids() == ["s", "t"]


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


def test_rewrite_kv_replaces_entries_in_one_transaction(tmp_path):
    with _store(tmp_path) as s:
        good = s.dump()
        raw_put(s, "kv", K01, b"\1\2")  # a damaged pointer: its blob keeps the fork's reference only
        updated = s.get("s").updated
        with pytest.raises(ValueError, match="holds 10 tokens"):
            s.rewrite_kv("s", n_tokens=9, blocks={(0, 1): b"B" * 64})
        new = s.rewrite_kv("s", n_tokens=10, blocks={(0, 0): b"A" * 64, (0, 1): b"B" * 64}, drop=[(1, 0)],
                           block_tokens={(0, 0): 4}, extra={"repair": {"count": 1}})
        assert new.extra["repair"] == {"count": 1} and new.updated == updated
        assert s.kv_blocks("s") == {(0, 0): b"A" * 64, (0, 1): b"B" * 64}
        assert s.kv_blocks("t") == {(0, 0): b"a" * 64, (0, 1): b"b" * 64, (1, 0): b"c" * 64}  # the fork as it was
        assert new.stored_bytes == s.session_keys("s")[1]
        assert s.check_session("s")["kv"] == {}
        assert s.check_refs()["wrong_counts"] == 1  # the unreadable pointer's blob still counts s: gc() settles it
        s.gc()
        assert not any(s.check_refs().values()) and s.kv_blocks("t")[(0, 1)] == b"b" * 64
        assert good[("refs", good[("kv", K00)])] != s.dump()[("refs", good[("kv", K00)])]  # one reference fewer


def test_kv_blocks_at_reads_a_layer_in_one_transaction(tmp_path):
    """What kv_block gives, block by block, in the order asked (None where nothing is stored); a damaged
    block raises as kv_block does."""
    from memsvc.store.errors import CorruptBlock
    with _store(tmp_path) as s:
        assert s.kv_blocks_at("s", 0, [1, 0, 7]) == [b"b" * 64, b"a" * 64, None]
        assert s.kv_blocks_at("t", 1, [0]) == [s.kv_block("t", 1, 0)] and s.kv_blocks_at("s", 0, []) == []
        raw_put(s, "kv", K01, b"\1\2")
        with pytest.raises(CorruptBlock):
            s.kv_blocks_at("s", 0, [0, 1])
