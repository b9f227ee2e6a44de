"""Block records: a payload (token ids or KV bytes), zstd-compressed, behind a
fixed versioned header with checksums of both the compressed and the raw bytes.

    magic "MSBK" | version u16 | kind u8 | layer u16 | index u32 | n_tokens u32 |
    raw length u64 | crc32(header fields + compressed) u32 | crc32(raw) u32 | zstd payload

All little-endian. The first checksum also covers the header fields, so a flip
of any byte of an encoded block (layer, n_tokens, ...) is detected.

A token block's payload is its ids as little-endian int32 (`encode_tokens`,
`decode_tokens`); a KV block's is the caller's bytes (`decode_kv` checks that a
block is the (layer, index) it is stored as). Every backend stores blocks in
this form, so an export carries them as stored.

Knows bytes only: what a KV payload means is the caller's business. zstd
contexts are not thread-safe, so each thread keeps its own.
"""
from __future__ import annotations

import struct
import sys
import threading
import zlib
from array import array
from dataclasses import dataclass

import zstandard

from .errors import CorruptBlock

FORMAT_VERSION = 1
KIND_TOKENS = 0
KIND_KV = 1
_MAGIC = b"MSBK"
_FIELDS = struct.Struct("<4sHBHIIQ")
_CRCS = struct.Struct("<II")
HEADER_SIZE = _FIELDS.size + _CRCS.size
_U16, _U32 = (1 << 16) - 1, (1 << 32) - 1
_local = threading.local()
_BIG_ENDIAN = sys.byteorder == "big"
if array("i").itemsize != 4:  # pragma: no cover - every platform we run on
    raise ImportError("memsvc.store needs a 4-byte C int for token ids")


@dataclass(frozen=True)
class BlockHeader:
    version: int
    kind: int
    layer: int
    index: int
    n_tokens: int
    raw_len: int

    def __post_init__(self):
        if self.kind not in (KIND_TOKENS, KIND_KV):
            raise ValueError(f"unknown block kind {self.kind!r} (0 = token ids, 1 = KV)")
        for name, top in (("layer", _U16), ("index", _U32), ("n_tokens", _U32), ("raw_len", (1 << 64) - 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top:
                raise ValueError(f"block {name} must be an integer in 0..{top}, got {v!r}")


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def _as_bytes_view(payload) -> memoryview:
    try:
        view = memoryview(payload)
    except TypeError as exc:
        raise ValueError(f"block payload must be bytes-like, got {type(payload).__name__}") from exc
    if not view.c_contiguous:
        raise ValueError("block payload must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def encode_block(payload: bytes, *, kind: int, layer: int, index: int, n_tokens: int, level: int = 3) -> bytes:
    """Header + zstd(payload). Raises ValueError for out-of-range fields."""
    view = _as_bytes_view(payload)
    BlockHeader(FORMAT_VERSION, kind, layer, index, n_tokens, view.nbytes)  # validates the fields
    if not isinstance(level, int) or isinstance(level, bool):
        raise ValueError(f"zstd level must be an integer, got {level!r}")
    comp = _cctx(level).compress(view)
    fields = _FIELDS.pack(_MAGIC, FORMAT_VERSION, kind, layer, index, n_tokens, view.nbytes)
    return fields + _CRCS.pack(zlib.crc32(comp, zlib.crc32(fields)), zlib.crc32(view)) + comp


def decode_block(buf: bytes, key: bytes | None = None, db: str | None = None) -> tuple[BlockHeader, bytes]:
    """Verify and decompress one block; any mismatch raises CorruptBlock naming the field."""
    buf = memoryview(buf)

    def bad(msg: str, fld: str) -> CorruptBlock:
        return CorruptBlock(msg, key, db=db, field=fld)

    if len(buf) < HEADER_SIZE:
        raise bad(f"block is truncated: {len(buf)} bytes, the header alone is {HEADER_SIZE}", "length")
    magic, version, kind, layer, index, n_tokens, raw_len = _FIELDS.unpack_from(buf)
    crc_all, crc_raw = _CRCS.unpack_from(buf, _FIELDS.size)
    if magic != _MAGIC:
        raise bad("block has a bad magic number", "magic")
    if version != FORMAT_VERSION:
        raise bad(f"block format {version} is not supported (expected {FORMAT_VERSION})", "version")
    comp = buf[HEADER_SIZE:]
    if zlib.crc32(comp, zlib.crc32(buf[:_FIELDS.size])) != crc_all:
        raise bad("block fails its checksum (header fields and compressed bytes)", "crc")
    if kind not in (KIND_TOKENS, KIND_KV):
        raise bad(f"block has unknown kind {kind}", "kind")
    try:
        raw = _dctx().decompress(comp, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise bad(f"block payload does not decompress: {exc}", "payload") from exc
    if len(raw) != raw_len:
        raise bad(f"block payload is {len(raw)} bytes, header says {raw_len}", "raw_len")
    if zlib.crc32(raw) != crc_raw:
        raise bad("block payload fails its checksum (raw bytes)", "raw_crc")
    return BlockHeader(version, kind, layer, index, n_tokens, raw_len), raw


def encode_tokens(ids: array, index: int) -> bytes:
    """Token block `index` holding `ids` (an array("i") of int32 token ids)."""
    if _BIG_ENDIAN:  # pragma: no cover
        ids = array("i", ids)
        ids.byteswap()
    return encode_block(ids.tobytes(), kind=KIND_TOKENS, layer=0, index=index, n_tokens=len(ids))


def decode_tokens(buf: bytes, index: int, key: bytes | None = None, db: str | None = "tokens") -> array:
    """The ids of token block `index` (array("i")); CorruptBlock if it is damaged or another block."""
    head, raw = decode_block(buf, key, db)
    if head.kind != KIND_TOKENS:
        raise CorruptBlock(f"token block holds kind {head.kind}", key, db=db, field="kind")
    if head.index != index:
        raise CorruptBlock(f"token block {index} says it is block {head.index}", key, db=db, field="index")
    if head.raw_len != 4 * head.n_tokens:
        raise CorruptBlock(f"token block holds {head.raw_len} bytes for {head.n_tokens} ids", key, db=db,
                           field="n_tokens")
    ids = array("i", raw)
    if _BIG_ENDIAN:  # pragma: no cover
        ids.byteswap()
    return ids


def decode_kv(buf: bytes, layer: int, index: int, key: bytes | None = None, db: str | None = "kv") -> bytes:
    """The payload of KV block (layer, index); CorruptBlock if it is damaged or another block."""
    head, raw = decode_block(buf, key, db)
    if head.kind != KIND_KV:
        raise CorruptBlock(f"KV block holds kind {head.kind}", key, db=db, field="kind")
    if (head.layer, head.index) != (layer, index):
        raise CorruptBlock(f"KV block ({layer}, {index}) says it is ({head.layer}, {head.index})", key, db=db,
                           field="index")
    return raw
