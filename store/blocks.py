"""Block records: a payload (token ids or KV bytes), zstd-compressed, behind a
versioned header with checksums of both the compressed and the raw bytes.

    magic "MSBK" | version u16 | kind u8 | layer u16 | index u32 | n_tokens u32 |
    raw length u64 | crc32(header fields + compressed) u32 | crc32(raw) u32 | zstd payload

Knows bytes only. zstd contexts are not thread-safe: one per thread.
"""
from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass

import zstandard

from .errors import CorruptBlock

FORMAT_VERSION = 1
KIND_TOKENS = 0
KIND_KV = 1
_MAGIC = b"MSBK"
_FIELDS = struct.Struct("<4sHBHIIQ")
_CRCS = struct.Struct("<II")
_HEAD_SIZE = _FIELDS.size + _CRCS.size
_local = threading.local()


@dataclass(frozen=True)
class BlockHeader:
    version: int
    kind: int
    layer: int
    index: int
    n_tokens: int
    raw_len: int


def _ctx(level: int):
    key = f"c{level}"
    c = getattr(_local, key, None)
    if c is None:
        c = zstandard.ZstdCompressor(level=level)
        setattr(_local, key, c)
    return c


def _dctx():
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def encode_block(payload: bytes, *, kind: int, layer: int, index: int, n_tokens: int, level: int = 3) -> bytes:
    if kind not in (KIND_TOKENS, KIND_KV):
        raise ValueError(f"unknown block kind {kind}")
    comp = _ctx(level).compress(payload)
    fields = _FIELDS.pack(_MAGIC, FORMAT_VERSION, kind, layer, index, n_tokens, len(payload))
    return fields + _CRCS.pack(zlib.crc32(comp, zlib.crc32(fields)), zlib.crc32(payload)) + comp


def decode_block(buf: bytes, key: bytes | None = None) -> tuple[BlockHeader, bytes]:
    buf = memoryview(buf)
    if len(buf) < _HEAD_SIZE:
        raise CorruptBlock("block is truncated (no header)", key)
    magic, version, kind, layer, index, n_tokens, raw_len = _FIELDS.unpack_from(buf)
    crc_all, crc_raw = _CRCS.unpack_from(buf, _FIELDS.size)
    if magic != _MAGIC:
        raise CorruptBlock("block has a bad magic number", key)
    if version != FORMAT_VERSION:
        raise CorruptBlock(f"block format {version} is not supported (expected {FORMAT_VERSION})", key)
    comp = buf[_HEAD_SIZE:]
    if zlib.crc32(comp, zlib.crc32(buf[:_FIELDS.size])) != crc_all:
        raise CorruptBlock("block fails its checksum (header fields and compressed bytes)", key)
    try:
        raw = _dctx().decompress(comp, max_output_size=raw_len) if raw_len else b""
    except zstandard.ZstdError as exc:
        raise CorruptBlock(f"block payload does not decompress: {exc}", key) from exc
    if len(raw) != raw_len:
        raise CorruptBlock(f"block payload is {len(raw)} bytes, header says {raw_len}", key)
    if zlib.crc32(raw) != crc_raw:
        raise CorruptBlock("block payload fails its checksum (raw bytes)", key)
    return BlockHeader(version, kind, layer, index, n_tokens, raw_len), raw
