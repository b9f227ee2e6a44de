"""Export files, over every backend (store_factory): round trip between stores, every damaged
byte refused, inconsistent exports refused by import with nothing written."""
from __future__ import annotations

import dataclasses
import os

import pytest

from memsvc.store.archive import ExportError, read_export, write_export
from memsvc.store.base import Store
from memsvc.store.errors import CorruptRecord, SessionExists, SessionMissing
from memsvc.store.records import SessionRecord
from tests.store.backends import snapshot


def rec(sid: str, **kw) -> SessionRecord:
    return SessionRecord(id=sid, model_name="m", model_fingerprint="ab" * 32, policy="tiered", **kw)


def _filled(store_factory) -> Store:
    s = store_factory("a", token_block=16)
    s.create(rec("s", labels={"k": "v"}, ttl=30))
    s.commit(rec("s", labels={"k": "v"}, ttl=30), first_token=0, tokens=list(range(40)),
             blocks={(0, 0): os.urandom(500), (1, 7): b"z" * 900, (2, 0xFFFFFFFF): os.urandom(64)},
             block_tokens={(0, 0): 64})
    s.fork("s", rec("other"))  # shared blobs are exported in full
    return s


def test_round_trip_into_a_fresh_store(store_factory, tmp_path):
    src = _filled(store_factory)
    exp = src.export("s")
    assert exp.header["model_fingerprint"] == "ab" * 32 and exp.header["n_tokens"] == 40
    assert (exp.header["token_blocks"], exp.header["kv_blocks"]) == (3, 3) and exp.header["session"] == "s"
    size = write_export(tmp_path / "s.msx", exp)
    assert size == (tmp_path / "s.msx").stat().st_size
    back = read_export(tmp_path / "s.msx")
    assert back == exp
    dst = store_factory("b", token_block=4)  # blocks travel as stored, whatever the block size
    out = dst.import_session(back)
    mine, theirs = snapshot(dst)["s"], snapshot(src)["s"]
    assert out == src.get("s") and mine.pop("blobs") != theirs.pop("blobs")  # src shares its blobs, dst not
    assert mine == theirs  # record, token ids, KV payloads, bytes referenced, check report
    copy = dst.import_session(back, new_id="t")
    assert dst.tokens("t") == src.tokens("s") and dst.kv_blocks("t") == src.kv_blocks("s")
    assert copy.labels == {"k": "v"} and copy.ttl == 30 and copy.stored_bytes == dst.session_keys("t")[1]
    assert dst.stats()["shared_blobs"] == 0  # an import shares nothing
    dst.commit(copy, first_token=40, tokens=[1, 2, 3, 4, 5], blocks={(0, 0): b"t's own"})
    assert dst.tokens("t") == list(range(40)) + [1, 2, 3, 4, 5] and dst.kv_blocks("s") == src.kv_blocks("s")
    before = snapshot(dst)
    with pytest.raises(SessionExists):
        dst.import_session(back)
    assert snapshot(dst) == before
    with pytest.raises(SessionMissing):
        src.export("nope")


def test_every_damage_is_refused(store_factory, tmp_path):
    write_export(tmp_path / "s.msx", _filled(store_factory).export("s"))
    raw = (tmp_path / "s.msx").read_bytes()
    for i in sorted({*range(0, 40), *range(0, len(raw), max(1, len(raw) // 200)), len(raw) - 1}):
        bad = bytearray(raw)
        bad[i] ^= 0x10
        (tmp_path / "bad").write_bytes(bytes(bad))
        with pytest.raises(ExportError):
            read_export(tmp_path / "bad")
    for cut in (0, 5, 20, len(raw) // 2, len(raw) - 1):
        (tmp_path / "bad").write_bytes(raw[:cut])
        with pytest.raises(ExportError):
            read_export(tmp_path / "bad")
    with pytest.raises(ExportError, match="cannot read"):
        read_export(tmp_path / "absent")


def test_inconsistent_exports_are_refused_on_import(store_factory):
    exp = _filled(store_factory).export("s")
    dst = store_factory("b")
    before = snapshot(dst)
    for bad in (dataclasses.replace(exp, tokens=exp.tokens[1:]),  # a token block missing
                dataclasses.replace(exp, tokens=exp.tokens[:-1]),  # the last one missing: too few ids
                dataclasses.replace(exp, kv=exp.kv + exp.kv[:1]),  # a KV block twice
                dataclasses.replace(exp, kv=[((9, 9), exp.kv[0][1])] + exp.kv[1:]),  # under another key
                dataclasses.replace(exp, kv=[(exp.kv[0][0], exp.kv[0][1][:-1])] + exp.kv[1:]),  # truncated
                dataclasses.replace(exp, record=exp.record[:-1] + b"x")):  # a damaged record
        with pytest.raises(CorruptRecord):
            dst.import_session(bad)
    with pytest.raises(ValueError, match="session id"):
        dst.import_session(exp, new_id="bad id")
    assert snapshot(dst) == before
