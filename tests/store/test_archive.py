"""Export files: round trip between stores, every damaged byte refused, inconsistent
exports refused by import with nothing written."""
from __future__ import annotations

import dataclasses
import os

import pytest

from memsvc.store.archive import ExportError, read_export, write_export
from memsvc.store.errors import CorruptRecord, SessionExists, SessionMissing
from memsvc.store.lmdb_store import Store
from memsvc.store.records import SessionRecord
from tests.store.test_store import session_values


def rec(sid: str, **kw) -> SessionRecord:
    return SessionRecord(id=sid, model_name="m", model_fingerprint="ab" * 32, policy="tiered", **kw)


def _filled(path) -> Store:
    s = Store(path, token_block=16)
    s.create(rec("s", labels={"k": "v"}, ttl=30))
    s.commit(rec("s", labels={"k": "v"}, ttl=30), first_token=0, tokens=list(range(40)),
             blocks={(0, 0): os.urandom(500), (1, 7): b"z" * 900, (2, 0xFFFFFFFF): os.urandom(64)},
             block_tokens={(0, 0): 64})
    s.fork("s", rec("other"))  # shared blobs are exported in full
    return s


def test_round_trip_into_a_fresh_store(tmp_path):
    with _filled(tmp_path / "a") as src:
        exp = src.export("s")
        assert exp.header["model_fingerprint"] == "ab" * 32 and exp.header["n_tokens"] == 40
        size = write_export(tmp_path / "s.msx", exp)
        assert size == (tmp_path / "s.msx").stat().st_size
        back = read_export(tmp_path / "s.msx")
        assert back == exp
        with Store(tmp_path / "b") as dst:
            out = dst.import_session(back)
            assert out == src.get("s") and session_values(dst, "s") == session_values(src, "s")
            copy = dst.import_session(back, new_id="t")
            assert dst.tokens("t") == src.tokens("s") and dst.kv_blocks("t") == src.kv_blocks("s")
            assert copy.labels == {"k": "v"} and copy.ttl == 30
            before = dst.dump()
            with pytest.raises(SessionExists):
                dst.import_session(back)
            assert dst.dump() == before
        with pytest.raises(SessionMissing):
            src.export("nope")


def test_every_damage_is_refused(tmp_path):
    with _filled(tmp_path / "a") as src:
        write_export(tmp_path / "s.msx", src.export("s"))
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


def test_inconsistent_exports_are_refused_on_import(tmp_path):
    with _filled(tmp_path / "a") as src:
        exp = src.export("s")
    with Store(tmp_path / "b") as dst:
        before = dst.dump()
        for bad in (dataclasses.replace(exp, tokens=exp.tokens[1:]),  # a token block missing
                    dataclasses.replace(exp, kv=exp.kv + exp.kv[:1]),  # a KV block twice
                    dataclasses.replace(exp, kv=[((9, 9), exp.kv[0][1])] + exp.kv[1:]),  # under another key
                    dataclasses.replace(exp, record=exp.record[:-1] + b"x")):  # a damaged record
            with pytest.raises(CorruptRecord):
                dst.import_session(bad)
        with pytest.raises(ValueError, match="session id"):
            dst.import_session(exp, new_id="bad id")
        assert dst.dump() == before
