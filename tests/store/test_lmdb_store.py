"""The LMDB backend on its own (the contract is test_store_contract*.py): what a commit writes where, the
order of a transaction's writes, raw damage named by key and field, map growth (also while another
process reads), read-only data dirs, constructor arguments, open_store."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import lmdb
import pytest

from memsvc.store.blocks import KIND_KV, KIND_TOKENS, decode_block
from memsvc.store.errors import CorruptBlock, CorruptRecord, StoreError
from memsvc.store.lmdb import LmdbStore as Store
from memsvc.store.open import open_store
from tests.store.backends import LmdbBackend, hammer, ids_for, rec
from tests.store.lmdb_raw import raw_put, session_bytes, session_values, session_values_from


def test_where_a_commit_writes_its_blocks(tmp_path):
    with Store(tmp_path, token_block=1024) as s:
        s.create(rec("s"))
        n = 0
        for i, count in enumerate([1, 1023, 1, 2050, 0]):
            s.commit(rec("s"), first_token=n, tokens=ids_for(n, count),
                     blocks={(0, i): bytes([i]) * 100, (1, 0): os.urandom(50 + i)}, block_tokens={(1, 0): 10 + i})
            n += count
            assert s.get("s").stored_bytes == session_bytes(s, "s")
        # token blocks: 3075 ids in full blocks of 1024 and one of 3, each with its own header
        dumped = session_values(s, "s")
        tok = sorted((k, v) for (db, k), v in dumped.items() if db == "tokens")
        heads = [decode_block(v)[0] for _, v in tok]
        assert [(h.kind, h.index, h.n_tokens) for h in heads] == [(KIND_TOKENS, i, c) for i, c in
                                                                  enumerate([1024, 1024, 1024, 3])]
        assert [k for k, _ in tok] == [b"s\0" + i.to_bytes(4, "big") for i in range(4)]
        kv_head = decode_block(dumped[("kv", b"s\0" + b"\0\1" + b"\0\0\0\0")])[0]
        assert (kv_head.kind, kv_head.layer, kv_head.index, kv_head.n_tokens) == (KIND_KV, 1, 0, 14)
        assert s.session_keys("s")[0] == len(dumped) == 1 + 4 + 6
        st = s.stats()
        assert st["blob_bytes"] == sum(len(v) for (db, _), v in dumped.items() if db == "kv")
        assert st["total_bytes"] == sum(len(v) for v in s.dump().values())
        assert st["pointer_bytes"] == 8 * 6
        assert st["used_pages"] * st["page_size"] == st["used_bytes"] <= st["map_size"]


def test_the_writes_of_one_transaction_in_order(tmp_path):
    """What a commit and a fork put and delete, in order (the record last); the contract makes each of
    these steps fail in turn and finds nothing changed."""
    with Store(tmp_path, token_block=4) as s:
        s.create(rec("s"))
        s.commit(rec("s"), first_token=0, tokens=[1, 2, 3, 4, 5], blocks={(0, 0): b"x" * 10, (0, 1): b"y" * 10})
        backend = LmdbBackend()
        with backend.failing_writes(s, at=0) as calls:  # never fails: records the writes
            s.commit(rec("s"), first_token=5, tokens=list(range(6, 13)), blocks={(0, 1): b"new" * 9, (2, 0): b"m"})
        # the partial token block rewritten and one more; (0, 1)'s old blob had one reference: deleted;
        # a new blob + count + pointer for each block; the blob counter; the record
        assert calls == ["put tokens"] * 2 + ["delete refs", "delete blobs"] + ["put blobs", "put refs", "put kv"] * 2 \
            + ["put meta", "put sessions"]
        with backend.failing_writes(s, at=0) as calls:
            s.fork("s", rec("s2"))
        assert calls == ["put tokens"] * 3 + ["put refs", "put kv"] * 3 + ["put sessions"]
        with backend.failing_writes(s, at=0) as calls:
            s.delete("s")
        assert calls == ["delete sessions"] + ["delete tokens"] * 3 + ["delete kv", "put refs"] * 3


def test_damage_is_detected_not_served(tmp_path):
    with Store(tmp_path, token_block=4) as s:
        s.create(rec("s"))
        s.commit(rec("s"), first_token=0, tokens=list(range(10)), blocks={(0, 0): b"a" * 64, (0, 1): b"b" * 64})
        good = s.dump()
        k00, k01 = b"s\0\0\0\0\0\0\0", b"s\0\0\0\0\0\0\1"

        b00, b01 = good[("kv", k00)], good[("kv", k01)]  # the blob ids they point to
        bad = bytearray(good[("blobs", b00)])
        bad[-1] ^= 1
        raw_put(s, "blobs", b00, bytes(bad))
        with pytest.raises(CorruptBlock) as e:
            s.kv_blocks("s")
        assert e.value.key == k00 and e.value.db == "kv" and e.value.field == "crc"
        with pytest.raises(CorruptBlock):
            s.kv_block("s", 0, 0)
        assert s.kv_block("s", 0, 1) == b"b" * 64

        raw_put(s, "blobs", b00, good[("blobs", b01)])  # a valid block under the wrong key
        with pytest.raises(CorruptBlock) as e:
            s.kv_blocks("s")
        assert e.value.field == "index"
        raw_put(s, "blobs", b00, good[("blobs", b00)])
        for ptr, field in ((b"\1\2\3", "pointer"), ((999).to_bytes(8, "big"), "blob"), (b01, "index")):
            raw_put(s, "kv", k00, ptr)
            with pytest.raises(CorruptBlock) as e:
                s.kv_block("s", 0, 0)
            assert e.value.key == k00 and e.value.field == field
        raw_put(s, "kv", k00, b00)
        assert s.dump() == good

        last = b"s\0\0\0\0\2"
        raw_put(s, "tokens", last, good[("tokens", last)][:-3])
        with pytest.raises(CorruptBlock):
            s.tokens("s")
        before = s.dump()
        with pytest.raises(CorruptBlock):  # the damaged partial block is not silently rewritten
            s.commit(rec("s"), first_token=10, tokens=[1], blocks={})
        assert s.dump() == before

        raw_put(s, "tokens", last, None)  # a missing block: count no longer matches the record
        with pytest.raises(CorruptRecord):
            s.tokens("s")
        raw_put(s, "tokens", b"s\0\0\0\0\1", None)  # a gap in the block indexes
        raw_put(s, "tokens", last, good[("tokens", last)])
        with pytest.raises(CorruptBlock, match="missing"):
            s.tokens("s")

        bad = bytearray(good[("sessions", b"s")])
        bad[20] ^= 4
        raw_put(s, "sessions", b"s", bytes(bad))
        with pytest.raises(CorruptRecord):
            s.get("s")
        assert s.delete("s")  # a damaged session can still be removed, and its blobs go with it
        assert {db for db, _ in s.dump()} == {"meta"}






def test_delete_removes_exactly_one_session(tmp_path):
    with Store(tmp_path, token_block=2) as s:
        for sid in ["a", "ab", "a.b", "b"]:
            s.create(rec(sid))
            s.commit(rec(sid), first_token=0, tokens=[1, 2, 3], blocks={(0, 0): sid.encode() * 5, (1, 2): b"k"})
        before = s.dump()
        assert s.delete("a") and not s.delete("a")
        after = s.dump()
        removed = {k for k in before if k not in after}
        own = session_values_from(before, "a", resolve=False)
        blobs = {(db, ptr) for (kind, _), ptr in own.items() if kind == "kv" for db in ("blobs", "refs")}
        assert removed == set(own) | blobs and len(removed) == 1 + 2 + 2 + 2 * 2
        assert all(after[k] == before[k] for k in after)
        assert s.get("a") is None and s.tokens("a") == [] and s.kv_blocks("a") == {}
        assert s.tokens("ab") == [1, 2, 3] and s.kv_block("ab", 0, 0) == b"ababababab"


def test_map_grows_instead_of_failing(tmp_path):
    with Store(tmp_path, map_size=64 << 10) as s:
        s.create(rec("big"))
        blob = {(layer, 0): os.urandom(1 << 20) for layer in range(6)}  # 6 MiB that zstd cannot shrink
        out = s.commit(rec("big"), first_token=0, tokens=list(range(5000)), blocks=blob)
        assert out.n_tokens == 5000 and s.kv_blocks("big") == blob
        assert s.stats()["map_size"] >= 6 << 20
        assert out.stored_bytes == session_bytes(s, "big")
        s.fork("big", rec("big2"))  # another 6 MiB: grows again
    with Store(tmp_path, map_size=64 << 10) as s:  # reopening with a small map_size keeps the data
        assert s.kv_blocks("big2") == blob and s.tokens("big") == list(range(5000))


def test_readonly_needs_an_existing_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "absent", readonly=True)
    assert not (tmp_path / "absent").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "empty", readonly=True)


def test_reader_process_follows_a_map_grown_by_the_writer(tmp_path):
    """Another process (the CLI) keeps a read-only store open while the server's map grows."""
    with Store(tmp_path, map_size=64 << 10) as s:
        s.create(rec("s"))
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from memsvc.store.open import open_store
            ro = open_store({str(tmp_path)!r}, readonly=True)
            print(ro.get("s").n_tokens, flush=True)
            sys.stdin.readline()
            print(len(ro.tokens("s")), sum(map(len, ro.kv_blocks("s").values())), flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().split() == ["0"]
            s.commit(rec("s"), first_token=0, tokens=list(range(3000)),
                     blocks={(i, 0): os.urandom(1 << 19) for i in range(4)})
            assert s.stats()["map_size"] > 64 << 10
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().split() == ["3000", str(4 << 19)]
        finally:
            child.stdin.close()
            assert child.wait(timeout=30) == 0


def test_map_grows_while_threads_write_and_read(tmp_path):
    with Store(tmp_path, map_size=128 << 10, token_block=16) as s:  # small map: it grows while threads run
        hammer(s)
        assert s.stats()["map_size"] > 128 << 10
        for i in range(4):
            assert s.tokens(f"w{i}") == [j for j in range(15) for _ in range(10)]
            assert s.get(f"w{i}").stored_bytes == session_bytes(s, f"w{i}")
            assert len(s.kv_blocks(f"w{i}")) == 16


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        Store(tmp_path, token_block=0)
    with pytest.raises(ValueError):
        Store(tmp_path, map_size=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError):
        Store(tmp_path / "file")
    with Store(tmp_path / "ok") as s:
        assert s.get("no such id") is None and s.get("a\0") is None
        for call in (lambda: s.tokens("a\0"), lambda: s.kv_blocks("a b"), lambda: s.kv_block("a", -1, 0),
                     lambda: s.session_keys("")):
            with pytest.raises(ValueError):
                call()
    assert isinstance(lmdb.version(), tuple)


def test_open_store_from_a_spec(tmp_path):
    for spec in (tmp_path / "p", str(tmp_path / "s"), f"lmdb://{tmp_path / 'u'}", f"LMDB://{tmp_path / 'v'}"):
        with open_store(spec) as s:
            assert isinstance(s, Store) and not s.readonly
            s.create(rec("x"))
    with open_store(f"lmdb://{tmp_path / 'u'}", readonly=True) as s:
        assert s.readonly and s.session_ids() == ["x"] and s.path == tmp_path / "u"
    for bad, match in (("redis://host/0", "unknown store scheme 'redis'.*lmdb://.*postgresql://"),
                       ("s3://bucket", "valid are lmdb://"), ("lmdb://", "needs a path"), ("", "path or a URL"),
                       (None, "path or a URL")):
        with pytest.raises(ValueError, match=match):
            open_store(bad)
    with pytest.raises(StoreError):
        open_store(tmp_path / "absent", readonly=True)
