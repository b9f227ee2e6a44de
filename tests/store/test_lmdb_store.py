"""The LMDB store on its own: round trips, atomic commits, forks, deletes, growth,
read-only access, corruption detection and concurrency, on real files."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import lmdb
import pytest

from memsvc.store.blocks import KIND_KV, KIND_TOKENS, decode_block
from memsvc.store.errors import CorruptBlock, CorruptRecord, SessionExists, SessionMissing, StoreError
from memsvc.store.lmdb_store import Store
from memsvc.store.records import SessionRecord


def rec(sid: str, **kw) -> SessionRecord:
    return SessionRecord(id=sid, model_name="m", model_fingerprint="f" * 64, policy="full", **kw)


def session_values(store: Store, sid: str) -> dict[tuple[str, bytes], bytes]:
    """This session's entries, picked out of dump() independently of the store's own scans,
    with each KV pointer replaced by the blob it names."""
    return session_values_from(store.dump(), sid)


def session_values_from(dump: dict, sid: str, *, resolve: bool = True) -> dict:
    prefix = sid.encode() + b"\0"
    out = {}
    for (db, key), value in dump.items():
        if (db == "sessions" and key == sid.encode()) or (db == "tokens" and key.startswith(prefix)):
            out[(db, key)] = value
        elif db == "kv" and key.startswith(prefix):
            out[(db, key)] = dump[("blobs", value)] if resolve else value
    return out


def session_bytes(store: Store, sid: str) -> int:
    return sum(len(v) for v in session_values(store, sid).values())


def raw_put(store: Store, db: str, key: bytes, value: bytes | None) -> None:
    """Damage the store behind its back (value None deletes)."""
    with store.env.begin(write=True) as txn:
        if value is None:
            txn.delete(key, db=store._db[db])
        else:
            txn.put(key, value, db=store._db[db])


def ids_for(start: int, count: int) -> list[int]:
    return [(start + j) * 7919 % 49152 - (j % 3 == 0) * 5 for j in range(count)]  # includes negatives


def test_commits_across_token_blocks_and_block_replacement(tmp_path):
    with Store(tmp_path, token_block=1024) as s:
        created = s.create(rec("s", n_tokens=99, stored_bytes=7, labels={"k": "v"}))
        assert created.n_tokens == 0 and created.stored_bytes == session_bytes(s, "s") == s.get("s").stored_bytes
        expected, n = [], 0
        for i, count in enumerate([1, 1023, 1, 2050, 0]):
            ids = ids_for(n, count)
            blocks = {(0, i): bytes([i]) * 100, (1, 0): os.urandom(50 + i)}  # (1, 0) is replaced every time
            out = s.commit(rec("s", messages=[{"role": "user", "content": str(i)}]), first_token=n, tokens=ids,
                           blocks=blocks, block_tokens={(1, 0): 10 + i})
            n += count
            expected += ids
            assert out.n_tokens == n and out == s.get("s") and out.messages[0]["content"] == str(i)
            assert s.tokens("s") == expected
            assert out.stored_bytes == session_bytes(s, "s") == s.session_keys("s")[1]
            assert s.kv_block("s", 1, 0) == blocks[(1, 0)]
        kv = s.kv_blocks("s")
        assert set(kv) == {(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)}
        assert kv[(0, 2)] == bytes([2]) * 100 and s.kv_block("s", 9, 9) is None
        # token blocks: 3075 ids in full blocks of 1024 and one of 3, each with its own header
        dumped = session_values(s, "s")
        tok = sorted((k, v) for (db, k), v in dumped.items() if db == "tokens")
        heads = [decode_block(v)[0] for _, v in tok]
        assert [(h.kind, h.index, h.n_tokens) for h in heads] == [(KIND_TOKENS, i, c) for i, c in
                                                                  enumerate([1024, 1024, 1024, 3])]
        kv_head = decode_block(dumped[("kv", b"s\0" + b"\0\1" + b"\0\0\0\0")])[0]
        assert (kv_head.kind, kv_head.layer, kv_head.index, kv_head.n_tokens) == (KIND_KV, 1, 0, 14)
        assert s.session_keys("s")[0] == len(dumped) == 1 + 4 + 6
        st = s.stats()
        assert st["sessions"] == 1 and st["token_blocks"] == 4 and st["kv_blocks"] == st["blobs"] == 6
        assert st["shared_blobs"] == 0 and st["references"] == 6
        assert st["blob_bytes"] == st["logical_blob_bytes"] == sum(len(v) for (db, _), v in dumped.items()
                                                                   if db == "kv")
        assert st["total_bytes"] == sum(len(v) for v in s.dump().values())
        assert st["used_pages"] * st["page_size"] == st["used_bytes"] <= st["map_size"]


def test_data_survives_reopen_with_another_token_block(tmp_path):
    with Store(tmp_path, token_block=4) as s:
        s.create(rec("s"))
        s.commit(rec("s"), first_token=0, tokens=list(range(10)), blocks={})
    with Store(tmp_path, token_block=3) as s:
        assert s.tokens("s") == list(range(10))
        s.commit(rec("s"), first_token=10, tokens=list(range(10, 17)), blocks={})
        assert s.tokens("s") == list(range(17))
        assert s.get("s").stored_bytes == session_bytes(s, "s")


def test_failed_writes_change_nothing(tmp_path, monkeypatch):
    with Store(tmp_path, token_block=4) as s:
        s.create(rec("s"))
        s.create(rec("t"))
        s.commit(rec("s"), first_token=0, tokens=[1, 2, 3, 4, 5], blocks={(0, 0): b"x" * 10, (0, 1): b"y" * 10})
        before = s.dump()
        with pytest.raises(ValueError, match="holds 5"):
            s.commit(rec("s"), first_token=2, tokens=[4], blocks={})
        with pytest.raises(SessionMissing):
            s.commit(rec("nope"), first_token=0, tokens=[4], blocks={})
        for bad in ([1 << 40], [1.5], ["7"]):
            with pytest.raises(ValueError):
                s.commit(rec("s"), first_token=5, tokens=bad, blocks={})
        for bad_blocks in ({(70000, 0): b"x"}, {(0,): b"x"}, {(0, -1): b"x"}, {(0, 0): "text"}):
            with pytest.raises(ValueError):
                s.commit(rec("s"), first_token=5, tokens=[6], blocks=bad_blocks)
        with pytest.raises(ValueError):
            s.commit(rec("s"), first_token=5, tokens=[6], blocks={(0, 0): b"z"}, block_tokens={(5, 5): 1})

        class Exploding(dict):
            def items(self):
                yield (0, 1), b"half"
                raise RuntimeError("injected failure while iterating the blocks")

        with pytest.raises(RuntimeError):
            s.commit(rec("s"), first_token=5, tokens=[6, 7], blocks=Exploding())

        # a failure after any number of the puts inside the write transaction, up to the record's (the last)
        real_put = s._put
        writes = {"commit": lambda: s.commit(rec("s"), first_token=5, tokens=list(range(6, 13)),
                                             blocks={(0, 1): b"new" * 9, (2, 0): b"more" * 50}),
                  "fork": lambda: s.fork("s", rec("s2"))}
        for name, write in writes.items():
            for fail_at in range(1, 100):
                calls = []

                def failing_put(txn, db, key, value, fail_at=fail_at, calls=calls):
                    calls.append(db)
                    if len(calls) == fail_at:
                        raise RuntimeError(f"injected failure at put {fail_at}")
                    real_put(txn, db, key, value)

                monkeypatch.setattr(s, "_put", failing_put)
                with pytest.raises(RuntimeError, match="injected"):
                    write()
                monkeypatch.undo()
                assert len(calls) == fail_at  # every put before the failing one did run
                assert s.dump() == before, (name, fail_at)
                if calls[-1] == "sessions":
                    break
            # commit: 2 token blocks, a new blob + count + pointer for each KV block (the replaced block's
            # blob had one reference: it is deleted, no put), the blob counter, the record;
            # fork: its token blocks, a count + pointer for each KV block, the record
            assert fail_at == {"commit": 2 + 3 * 2 + 1 + 1, "fork": 2 + 2 * 2 + 1}[name]

        with pytest.raises(SessionExists):
            s.create(rec("s"))
        with pytest.raises(SessionExists):
            s.fork("s", rec("t"))
        with pytest.raises(SessionMissing):
            s.fork("nope", rec("u"))
        assert s.delete("nope") is False and s.delete("bad id") is False
        with pytest.raises(ValueError):
            s.create("not a record")
        assert s.dump() == before
        # and the store still works after all that
        s.commit(rec("s"), first_token=5, tokens=[6], blocks={})
        assert s.tokens("s") == [1, 2, 3, 4, 5, 6]


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


def test_list_paging_and_labels(tmp_path):
    with Store(tmp_path) as s:
        ids = [f"s{i:03d}" for i in range(37)] + ["a", "ab", "b", "Z"]
        for i, sid in enumerate(ids):
            s.create(rec(sid, labels={"team": "x" if i % 3 else "y", "env": "prod" if i % 2 else "dev"}))
        assert s.count() == len(ids)
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


def test_fork_copies_and_is_independent(tmp_path):
    with Store(tmp_path, token_block=4) as s:
        s.create(rec("a"))
        s.commit(rec("a"), first_token=0, tokens=[1, 2, 3, 4, 5, 6], blocks={(0, 0): b"aaaaa", (3, 1): b"q" * 999})
        f = s.fork("a", rec("a2", labels={"fork": "1"}, n_tokens=1, stored_bytes=1))
        assert f == s.get("a2") and f.n_tokens == 6 and f.labels == {"fork": "1"}
        assert f.stored_bytes == session_bytes(s, "a2")
        assert s.tokens("a2") == s.tokens("a") and s.kv_blocks("a2") == s.kv_blocks("a")
        s.commit(rec("a"), first_token=6, tokens=[7], blocks={(0, 0): b"changed"})
        s.commit(rec("a2"), first_token=6, tokens=[70, 80], blocks={(5, 5): b"fork only"})
        assert s.tokens("a") == [1, 2, 3, 4, 5, 6, 7] and s.tokens("a2") == [1, 2, 3, 4, 5, 6, 70, 80]
        assert s.kv_block("a2", 0, 0) == b"aaaaa" and s.kv_block("a", 5, 5) is None
        assert s.delete("a")
        assert s.tokens("a2") == [1, 2, 3, 4, 5, 6, 70, 80] and len(s.kv_blocks("a2")) == 3
        assert s.get("a2").stored_bytes == session_bytes(s, "a2")


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


def test_readonly_sees_data_and_refuses_writes(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "absent", readonly=True)
    assert not (tmp_path / "absent").exists()
    with Store(tmp_path) as s:
        s.create(rec("s"))
        s.commit(rec("s"), first_token=0, tokens=[9], blocks={(0, 0): b"kv"})
        before = s.dump()
    with Store(tmp_path, readonly=True) as ro:
        assert ro.tokens("s") == [9] and ro.kv_blocks("s") == {(0, 0): b"kv"} and ro.get("s").n_tokens == 1
        assert [r.id for r in ro.list()] == ["s"] and ro.count() == 1 and ro.stats()["sessions"] == 1
        for write in (lambda: ro.create(rec("t")), lambda: ro.delete("s"), lambda: ro.fork("s", rec("t")),
                      lambda: ro.commit(rec("s"), first_token=1, tokens=[1], blocks={})):
            with pytest.raises(StoreError, match="read-only"):
                write()
        assert ro.dump() == before


def test_closed_store_refuses_calls(tmp_path):
    s = Store(tmp_path)
    s.create(rec("s"))
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get("s")
    with pytest.raises(StoreError, match="closed"):
        s.create(rec("t"))


def test_reader_process_follows_a_map_grown_by_the_writer(tmp_path):
    """Another process (the CLI) keeps a read-only store open while the server's map grows."""
    with Store(tmp_path, map_size=64 << 10) as s:
        s.create(rec("s"))
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from memsvc.store.lmdb_store import Store
            ro = Store({str(tmp_path)!r}, readonly=True)
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


def test_concurrent_writers_and_readers(tmp_path):
    with Store(tmp_path, map_size=128 << 10, token_block=16) as s:  # small map: it grows while threads run
        errors: list[BaseException] = []
        done = threading.Event()

        def writer(sid):
            try:
                s.create(rec(sid))
                for i in range(15):
                    s.commit(rec(sid), first_token=i * 10, tokens=[i] * 10,
                             blocks={(0, i): os.urandom(3000), (1, 0): os.urandom(2000 + i)})
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        def reader():
            try:
                while not done.is_set():
                    for r in s.list():
                        toks = s.tokens(r.id)  # checks its count against the record in the same txn
                        assert toks == [j for j in range(len(toks) // 10) for _ in range(10)]
                        kv = s.kv_blocks(r.id)  # a later snapshot: at least as far along
                        assert (len(toks) // 10 + 1 if toks else 0) <= len(kv) <= 16
                    s.stats()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        writers = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join()
        done.set()
        for t in readers:
            t.join()
        assert not errors, errors
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
