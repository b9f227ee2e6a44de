"""Session records: round trip, every damaged byte detected, validation."""
from __future__ import annotations

import json
import struct
import zlib

import pytest

from memsvc.store.errors import CorruptRecord, StoreError
from memsvc.store.records import FORMAT_VERSION, SessionRecord


def full_record() -> SessionRecord:
    return SessionRecord(
        id="agent-7:run_3.b", model_name="SmolLM2-135M-Instruct", model_fingerprint="ab" * 32, policy="full",
        n_tokens=3075, created=1_700_000_000.25, updated=1_700_000_100.5,
        labels={"team": "x", "ünï": "cödé"},
        messages=[{"role": "user", "content": "hé, 你好 \"quoted\"\n"}, {"role": "assistant", "content": ""}],
        layout={"layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "float32", "block_tokens": 64},
        stored_bytes=123456, extra={"tokens_processed": 17, "nested": {"a": [1, 2.5, None, True]}},
    )


def test_round_trip_keeps_every_field():
    r = full_record()
    back = SessionRecord.from_bytes(r.to_bytes())
    assert back == r and back.format_version == FORMAT_VERSION
    assert SessionRecord.from_bytes(bytearray(r.to_bytes())) == r
    minimal = SessionRecord(id="a", model_name="m", model_fingerprint="f", policy="p")
    assert SessionRecord.from_bytes(minimal.to_bytes()) == minimal


def test_every_flipped_byte_is_detected():
    raw = full_record().to_bytes()
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[i] ^= bit
            with pytest.raises(CorruptRecord):
                SessionRecord.from_bytes(bytes(bad))


def test_truncated_extended_and_wrong_header_are_named():
    raw = full_record().to_bytes()
    for n in (0, 3, 9, len(raw) - 1):
        with pytest.raises(CorruptRecord):
            SessionRecord.from_bytes(raw[:n])
    with pytest.raises(CorruptRecord) as e:
        SessionRecord.from_bytes(raw + b" ")
    assert e.value.field == "crc"
    with pytest.raises(CorruptRecord) as e:
        SessionRecord.from_bytes(b"XXXX" + raw[4:], key=b"sid")
    assert e.value.field == "magic" and e.value.key == b"sid" and "sid" in str(e.value)
    with pytest.raises(CorruptRecord) as e:
        SessionRecord.from_bytes(raw[:4] + struct.pack("<H", FORMAT_VERSION + 1) + raw[6:])
    assert e.value.field == "version"
    # a well-formed envelope around a body that is not a valid record
    for body in (b"[1, 2]", b'{"id": "a"}', json.dumps({**json.loads(raw[10:]), "n_tokens": -1}).encode()):
        forged = b"MSRC" + struct.pack("<HI", FORMAT_VERSION, zlib.crc32(body)) + body
        with pytest.raises(CorruptRecord) as e:
            SessionRecord.from_bytes(forged)
        assert e.value.field == "body"
    with pytest.raises(CorruptRecord) as e:  # a valid record under another id's key
        SessionRecord.from_bytes(raw, key=b"other")
    assert e.value.field == "id"


def test_corrupt_record_is_a_value_error_and_a_store_error():
    assert issubclass(CorruptRecord, ValueError) and issubclass(CorruptRecord, StoreError)


@pytest.mark.parametrize("bad", [
    {"id": ""}, {"id": "a b"}, {"id": "x" * 129}, {"id": "a\0b"}, {"id": "é"}, {"id": "a/b"}, {"id": 7},
    {"model_name": None}, {"policy": 3},
    {"n_tokens": -1}, {"n_tokens": "3"}, {"n_tokens": True}, {"n_tokens": 1.5}, {"stored_bytes": -5},
    {"created": float("nan")}, {"updated": float("inf")}, {"created": -1.0}, {"created": "now"},
    {"labels": None}, {"labels": {"": "v"}}, {"labels": {"k": 1}},
    {"messages": "hi"}, {"messages": [{"role": "user"}]}, {"messages": [["user", "hi"]]},
    {"layout": []}, {"extra": None}, {"format_version": FORMAT_VERSION + 1},
])
def test_bad_fields_raise_value_error(bad):
    kw = {"id": "a", "model_name": "m", "model_fingerprint": "f", "policy": "p", **bad}
    with pytest.raises(ValueError):
        SessionRecord(**kw)


def test_good_edge_ids_and_non_json_values():
    for sid in ("a", "x" * 128, "A.Z_0:9-", "..."):
        assert SessionRecord(id=sid, model_name="m", model_fingerprint="f", policy="p").id == sid
    r = SessionRecord(id="a", model_name="m", model_fingerprint="f", policy="p", extra={"x": object()})
    with pytest.raises(ValueError):
        r.to_bytes()
    r = SessionRecord(id="a", model_name="m", model_fingerprint="f", policy="p", extra={"x": float("nan")})
    with pytest.raises(ValueError):
        r.to_bytes()
