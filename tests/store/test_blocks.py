"""Block records: round trip at awkward sizes, every damaged byte detected, field checks."""
from __future__ import annotations

import dataclasses
import os
import struct
import threading
import zlib
from array import array

import pytest
import zstandard

from memsvc.store.blocks import FORMAT_VERSION, HEADER_SIZE, KIND_KV, KIND_TOKENS, BlockHeader, decode_block, \
    encode_block
from memsvc.store.errors import CorruptBlock, CorruptRecord


def payload_of(size: int) -> bytes:
    """Half random, half a repeating pattern: compressible and not."""
    half = size // 2
    return os.urandom(half) + bytes(range(256)) * ((size - half) // 256) + bytes((size - half) % 256)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 17, 255, 4095, 4096, 4097, 65537, (1 << 20) + 3])
def test_round_trip(size):
    payload = payload_of(size)
    assert len(payload) == size
    enc = encode_block(payload, kind=KIND_KV, layer=29, index=123456, n_tokens=64)
    head, raw = decode_block(enc)
    assert raw == payload
    assert head == BlockHeader(FORMAT_VERSION, KIND_KV, 29, 123456, 64, size)
    assert enc[:4] == b"MSBK" and len(enc) >= HEADER_SIZE


def test_extreme_header_values_and_levels():
    for kind, layer, index, n in [(KIND_TOKENS, 0, 0, 0), (KIND_KV, 65535, 2**32 - 1, 2**32 - 1)]:
        for level in (1, 3, 19):
            head, raw = decode_block(encode_block(b"abc" * 100, kind=kind, layer=layer, index=index,
                                                  n_tokens=n, level=level))
            assert (head.kind, head.layer, head.index, head.n_tokens, raw) == (kind, layer, index, n, b"abc" * 100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.layer = 1


def test_bytes_like_payloads_are_taken_by_byte_length():
    ids = array("i", [1, -2, 2**31 - 1, -(2**31)])
    for payload in (ids, memoryview(ids), bytearray(ids.tobytes())):
        head, raw = decode_block(encode_block(payload, kind=KIND_TOKENS, layer=0, index=0, n_tokens=4))
        assert head.raw_len == 16 and raw == ids.tobytes()


@pytest.mark.parametrize("size", [0, 5, 300])
def test_every_flipped_byte_and_bit_is_detected(size):
    enc = encode_block(payload_of(size), kind=KIND_KV, layer=3, index=7, n_tokens=64)
    for i in range(len(enc)):
        for bit in range(8):
            bad = bytearray(enc)
            bad[i] ^= 1 << bit
            with pytest.raises(CorruptBlock):
                decode_block(bytes(bad))


def test_large_block_flips_in_header_and_payload_are_detected():
    enc = encode_block(payload_of(200_000), kind=KIND_KV, layer=1, index=2, n_tokens=64)
    for i in list(range(HEADER_SIZE + 8)) + list(range(HEADER_SIZE, len(enc), 997)) + [len(enc) - 1]:
        bad = bytearray(enc)
        bad[i] ^= 0x10
        with pytest.raises(CorruptBlock):
            decode_block(bytes(bad))


def test_truncated_and_extended_blocks_are_detected():
    enc = encode_block(payload_of(500), kind=KIND_KV, layer=0, index=0, n_tokens=1)
    for n in range(len(enc)):
        with pytest.raises(CorruptBlock):
            decode_block(enc[:n])
    with pytest.raises(CorruptBlock):
        decode_block(enc + b"\0")
    with pytest.raises(CorruptBlock) as e:
        decode_block(enc[:10], key=b"k\0\0\0", db="kv")
    assert e.value.field == "length" and e.value.key == b"k\0\0\0" and e.value.db == "kv"
    assert isinstance(e.value, CorruptRecord) and isinstance(e.value, ValueError)


def forge(fields: tuple, comp: bytes, raw_crc: int) -> bytes:
    """A block whose first checksum is right but whose other fields are whatever we say."""
    head = struct.pack("<4sHBHIIQ", *fields)
    return head + struct.pack("<II", zlib.crc32(comp, zlib.crc32(head)), raw_crc) + comp


def test_each_check_names_its_field():
    raw = b"hello world" * 10
    comp = zstandard.ZstdCompressor().compress(raw)
    ok = (b"MSBK", FORMAT_VERSION, KIND_KV, 1, 2, 3, len(raw))
    assert decode_block(forge(ok, comp, zlib.crc32(raw)))[1] == raw
    cases = {
        "magic": forge((b"MSBX",) + ok[1:], comp, zlib.crc32(raw)),
        "version": forge((b"MSBK", FORMAT_VERSION + 1) + ok[2:], comp, zlib.crc32(raw)),
        "crc": encode_block(raw, kind=KIND_KV, layer=1, index=2, n_tokens=3)[:-1] + b"\0",
        "kind": forge(ok[:2] + (7,) + ok[3:], comp, zlib.crc32(raw)),
        "payload": forge(ok, b"not zstd at all", zlib.crc32(raw)),
        "raw_len": forge(ok[:6] + (len(raw) - 1,), zstandard.ZstdCompressor(write_content_size=False).compress(raw[:-2]),
                         zlib.crc32(raw)),
        "raw_crc": forge(ok, comp, zlib.crc32(raw) ^ 1),
    }
    for fld, buf in cases.items():
        with pytest.raises(CorruptBlock) as e:
            decode_block(buf)
        assert e.value.field == fld, (fld, str(e.value))


@pytest.mark.parametrize("kw", [
    {"kind": 2}, {"kind": -1}, {"layer": 65536}, {"layer": -1}, {"index": 2**32}, {"index": 1.0},
    {"n_tokens": -1}, {"n_tokens": 2**32}, {"level": 99}, {"level": "3"}, {"layer": True},
])
def test_bad_arguments_raise_value_error(kw):
    args = {"kind": KIND_KV, "layer": 0, "index": 0, "n_tokens": 0, **kw}
    with pytest.raises(ValueError):
        encode_block(b"x", **args)


def test_bad_payload_types_raise_value_error():
    for payload in ("text", 12, None, memoryview(bytes(16))[::2]):
        with pytest.raises(ValueError):
            encode_block(payload, kind=KIND_KV, layer=0, index=0, n_tokens=0)


def test_threads_share_nothing_mutable():
    errors = []

    def work(seed: int):
        try:
            for i in range(200):
                payload = bytes([seed]) * (i * 37) + os.urandom(i)
                enc = encode_block(payload, kind=KIND_KV, layer=seed, index=i, n_tokens=i, level=1 + i % 3)
                head, raw = decode_block(enc)
                if raw != payload or (head.layer, head.index) != (seed, i):
                    errors.append((seed, i))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
