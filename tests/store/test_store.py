"""The LMDB store on its own: records, blocks, atomic commits, forks, growth."""
from __future__ import annotations

import os
import threading

import pytest

from memsvc.store.blocks import KIND_KV, decode_block, encode_block
from memsvc.store.errors import CorruptBlock, CorruptRecord, SessionExists, SessionMissing, StoreError
from memsvc.store.lmdb_store import Store
from memsvc.store.records import SessionRecord


def rec(sid: str, **kw) -> SessionRecord:
    return SessionRecord(id=sid, model_name="m", model_fingerprint="f" * 64, policy="full", **kw)


def session_bytes(store: Store, sid: str) -> int:
    total = 0
    for (db, key), value in store.dump().items():
        if (db == "sessions" and key == sid.encode()) or (db != "sessions" and key.startswith(sid.encode() + b"\0")):
            total += len(value)
    return total


def test_record_round_trip_and_damage():
    r = rec("a.b:c-1", labels={"k": "v"}, messages=[{"role": "user", "content": "hé"}], layout={"layers": 2})
    raw = r.to_bytes()
    assert SessionRecord.from_bytes(raw) == r
    for i in range(0, len(raw), max(1, len(raw) // 40)):
        bad = bytearray(raw)
        bad[i] ^= 0x5A
        with pytest.raises(CorruptRecord):
            SessionRecord.from_bytes(bytes(bad))
    for bad_id in ("", "a b", "x" * 129, "a\0b", "é"):
        with pytest.raises(ValueError):
            rec(bad_id)


@pytest.mark.parametrize("size", [0, 1, 17, 4099, 100_000])
def test_block_round_trip_and_every_flip_detected(size):
    payload = os.urandom(size // 2) + bytes(size - size // 2)
    enc = encode_block(payload, kind=KIND_KV, layer=3, index=7, n_tokens=64)
    head, raw = decode_block(enc)
    assert raw == payload and (head.layer, head.index, head.n_tokens, head.raw_len) == (3, 7, 64, size)
    positions = range(len(enc)) if len(enc) < 200 else range(0, len(enc), len(enc) // 150)
    for i in positions:
        bad = bytearray(enc)
        bad[i] ^= 0x01
        with pytest.raises(CorruptBlock):
            decode_block(bytes(bad))
    with pytest.raises(CorruptBlock):
        decode_block(enc[:-1] if size else enc[:10])


def test_commits_across_token_blocks_and_block_replacement(tmp_path):
    with Store(tmp_path, token_block=1024) as s:
        s.create(rec("s"))
        expected, n = [], 0
        for i, count in enumerate([1, 1023, 1, 2050]):
            ids = [(n + j) * 7 % 49152 for j in range(count)]
            blocks = {(0, i): bytes([i]) * 100, (1, 0): bytes([i]) * (50 + i)}  # (1, 0) replaced each time
            out = s.commit(rec("s"), first_token=n, tokens=ids, blocks=blocks)
            n += count
            expected += ids
            assert out.n_tokens == n
            assert s.tokens("s") == expected
            assert out.stored_bytes == session_bytes(s, "s") == s.get("s").stored_bytes
        kv = s.kv_blocks("s")
        assert kv[(1, 0)] == bytes([3]) * 53 and kv[(0, 2)] == bytes([2]) * 100 and len(kv) == 5
        assert s.kv_block("s", 0, 1) == bytes([1]) * 100 and s.kv_block("s", 9, 9) is None


def test_failed_commits_change_nothing(tmp_path):
    with Store(tmp_path) as s:
        s.create(rec("s"))
        s.commit(rec("s"), first_token=0, tokens=[1, 2, 3], blocks={(0, 0): b"x" * 10})
        before = s.dump()
        with pytest.raises(ValueError):
            s.commit(rec("s"), first_token=2, tokens=[4], blocks={})
        with pytest.raises(SessionMissing):
            s.commit(rec("nope"), first_token=0, tokens=[4], blocks={})
        with pytest.raises(ValueError):
            s.commit(rec("s"), first_token=3, tokens=[1 << 40], blocks={})

        class Exploding(dict):
            def items(self):
                yield (0, 1), b"half"
                raise RuntimeError("injected failure mid-write")

        with pytest.raises(RuntimeError):
            s.commit(rec("s"), first_token=3, tokens=[4, 5], blocks=Exploding())
        with pytest.raises(SessionExists):
            s.create(rec("s"))
        assert s.dump() == before


def test_list_paging_labels_fork_delete(tmp_path):
    with Store(tmp_path) as s:
        for sid in ["a", "ab", "b", "c"]:
            s.create(rec(sid, labels={"team": "x" if sid != "b" else "y"}))
            s.commit(s.get(sid), first_token=0, tokens=[1, 2], blocks={(0, 0): sid.encode() * 5})
        assert [r.id for r in s.list(limit=2)] == ["a", "ab"]
        assert [r.id for r in s.list(after="ab", limit=2)] == ["b", "c"]
        assert [r.id for r in s.list(labels={"team": "x"})] == ["a", "ab", "c"]
        assert s.count() == 4
        f = s.fork("a", rec("a2", labels={"fork": "1"}))
        assert f.n_tokens == 2 and s.tokens("a2") == [1, 2] and f.stored_bytes == session_bytes(s, "a2")
        s.commit(s.get("a"), first_token=2, tokens=[3], blocks={(0, 0): b"changed"})
        assert s.tokens("a2") == [1, 2] and s.kv_blocks("a2") == {(0, 0): b"aaaaa"}
        with pytest.raises(SessionExists):
            s.fork("a", rec("b"))
        with pytest.raises(SessionMissing):
            s.fork("zz", rec("zz2"))
        assert s.delete("a") and not s.delete("a")
        assert s.get("ab") is not None and s.tokens("ab") == [1, 2] and s.kv_blocks("ab")
        assert not any(k.startswith(b"a\0") for (_, k) in s.dump())
        assert s.tokens("a2") == [1, 2]


def test_map_grows_instead_of_failing(tmp_path):
    with Store(tmp_path, map_size=64 << 10) as s:
        s.create(rec("big"))
        blob = {(l, 0): os.urandom(1 << 20) for l in range(6)}  # 6 MiB of incompressible data
        out = s.commit(rec("big"), first_token=0, tokens=list(range(5000)), blocks=blob)
        assert out.n_tokens == 5000 and s.kv_blocks("big") == blob
        assert s.stats()["map_size"] > 6 << 20


def test_readonly_sees_data_and_refuses_writes(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "absent", readonly=True)
    with Store(tmp_path) as s:
        s.create(rec("s"))
        s.commit(rec("s"), first_token=0, tokens=[9], blocks={})
    with Store(tmp_path, readonly=True) as ro:
        assert ro.tokens("s") == [9]
        with pytest.raises(StoreError):
            ro.create(rec("t"))
        with pytest.raises(StoreError):
            ro.delete("s")


def test_concurrent_writers_and_reader(tmp_path):
    with Store(tmp_path, map_size=128 << 10) as s:
        errors = []

        def writer(sid):
            try:
                s.create(rec(sid))
                for i in range(20):
                    s.commit(rec(sid), first_token=i * 10, tokens=list(range(10)), blocks={(0, i): os.urandom(3000)})
            except Exception as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        def reader():
            try:
                for _ in range(50):
                    for r in s.list():
                        assert len(s.tokens(r.id)) >= 0
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)] + [threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for i in range(4):
            assert s.tokens(f"w{i}") == list(range(10)) * 20
            assert s.get(f"w{i}").stored_bytes == session_bytes(s, f"w{i}")
