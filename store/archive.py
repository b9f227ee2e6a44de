"""Export files: one session in one portable, versioned, checksummed file.

    magic b"MSEXPORT" | format u16 | header length u32 | header (UTF-8 JSON)
    entries, each: kind u8 | key length u16 | key | value length u64 | value
        kind 1  the session record      key: empty                   value: SessionRecord bytes
        kind 2  a token block           key: index u32 (big-endian)  value: the block as stored
        kind 3  a KV block              key: layer u16, index u32    value: the block as stored
    sha256 of every byte before it (32 bytes)

Integers are little-endian unless said otherwise. The header names the model
(name and fingerprint), the policy, the session id and how many tokens and
entries follow, so a reader can refuse a file before it touches a store. Blocks
travel as stored (header, zstd payload and their own checksums) and are checked
again by the store that imports them. A KV block shared between sessions is
written in full: the file holds one session and needs no other.

`export_header` and `check_import` are what every backend's `export` and
`import_session` share: the header's fields, and the checks an export passes
before any of it is written.

Knows bytes, not models: the caller compares the fingerprint with its model's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import blocks
from .errors import CorruptBlock, CorruptRecord, StoreError
from .records import SessionRecord, check_id
from .turn import check_kv_key

FORMAT_VERSION = 1
MAGIC = b"MSEXPORT"
KIND_RECORD, KIND_TOKENS, KIND_KV = 1, 2, 3
_HEAD = struct.Struct("<8sHI")  # magic, format, header length
_ENTRY = struct.Struct("<BH")  # kind, key length
_LEN = struct.Struct("<Q")
_TOK_KEY = struct.Struct(">I")
_KV_KEY = struct.Struct(">HI")
_DIGEST = 32


class ExportError(StoreError):
    """An export file that cannot be read: not an export, another format, truncated or corrupted."""


@dataclass
class Export:
    """One session as an export file holds it."""

    header: dict
    record: bytes
    tokens: list[tuple[int, bytes]] = field(default_factory=list)  # (index, stored block)
    kv: list[tuple[tuple[int, int], bytes]] = field(default_factory=list)  # ((layer, index), stored block)


def export_header(rec: SessionRecord, token_blocks: int, kv_blocks: int) -> dict:
    """The header of an export of `rec` holding that many token and KV blocks."""
    return {"session": rec.id, "model_name": rec.model_name, "model_fingerprint": rec.model_fingerprint,
            "policy": rec.policy, "n_tokens": rec.n_tokens, "token_blocks": token_blocks, "kv_blocks": kv_blocks,
            "exported_unix": time.time()}


def check_import(export: Export, new_id: str | None = None) -> SessionRecord:
    """The record an import of `export` stores (under new_id when given), once every block has passed its
    checks: token blocks 0, 1, ... whose ids add up to the record's n_tokens, each KV block the (layer, index)
    it is listed as, none twice. CorruptRecord or CorruptBlock otherwise; ValueError for a bad new_id."""
    rec = SessionRecord.from_bytes(export.record)
    if new_id is not None:
        rec = dataclasses.replace(rec, id=check_id(new_id))
    n_ids = 0
    for expected, (index, value) in enumerate(sorted(export.tokens)):
        if index != expected:
            raise CorruptBlock(f"the export has no token block {expected}", db="tokens", field="index")
        n_ids += len(blocks.decode_tokens(value, index, _TOK_KEY.pack(index)))
    if n_ids != rec.n_tokens:
        raise CorruptRecord(f"the export holds {n_ids} token ids, its record says {rec.n_tokens}",
                            db="sessions", field="n_tokens")
    for (layer, index), value in export.kv:
        key = _KV_KEY.pack(*check_kv_key(layer, index))
        head, _ = blocks.decode_block(value, key, "kv")
        if head.kind != blocks.KIND_KV or (head.layer, head.index) != (layer, index):
            raise CorruptBlock(f"the export's KV block ({layer}, {index}) is not that block", key, db="kv",
                               field="index")
    if len({where for where, _ in export.kv}) != len(export.kv):
        raise CorruptBlock("the export holds a KV block twice", db="kv", field="key")
    return rec


def write_export(path: str | os.PathLike, export: Export) -> int:
    """Write `export` to path (through a temporary file and a rename); returns the file's size."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    digest = hashlib.sha256()
    size = 0

    def put(f, data: bytes) -> None:
        nonlocal size
        f.write(data)
        digest.update(data)
        size += len(data)

    head = json.dumps(export.header, sort_keys=True, separators=(",", ":")).encode()
    entries = [(KIND_RECORD, b"", export.record)]
    entries += [(KIND_TOKENS, _TOK_KEY.pack(i), v) for i, v in export.tokens]
    entries += [(KIND_KV, _KV_KEY.pack(layer, i), v) for (layer, i), v in export.kv]
    try:
        with open(tmp, "wb") as f:
            put(f, _HEAD.pack(MAGIC, FORMAT_VERSION, len(head)) + head)
            for kind, key, value in entries:
                put(f, _ENTRY.pack(kind, len(key)) + key + _LEN.pack(len(value)))
                put(f, bytes(value))
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write the export file {path}: {exc}") from exc
    return size + _DIGEST


def read_export(path: str | os.PathLike) -> Export:
    """Read and verify an export file; ExportError says what is wrong with it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read the export file {path}: {exc}") from exc
    if len(data) < _HEAD.size or not data.startswith(MAGIC):
        raise ExportError(f"{path} is not a memsvc session export (no {MAGIC.decode()} magic)")
    _, version, head_len = _HEAD.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ExportError(f"{path} is an export of format {version}; this memsvc reads format {FORMAT_VERSION}")
    if len(data) < _HEAD.size + head_len + _DIGEST:
        raise ExportError(f"{path} is truncated ({len(data)} bytes)")
    body, digest = memoryview(data)[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ExportError(f"{path} is corrupted or truncated: its sha256 checksum does not match")
    try:
        header = json.loads(bytes(body[_HEAD.size:_HEAD.size + head_len]))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as exc:
        raise ExportError(f"{path} has an unreadable header: {exc}") from exc
    out = Export(header=header, record=b"")
    records = 0
    pos = _HEAD.size + head_len
    while pos < len(body):
        if pos + _ENTRY.size > len(body):
            raise ExportError(f"{path} ends inside an entry at byte {pos}")
        kind, key_len = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        key = bytes(body[pos:pos + key_len])
        pos += key_len
        if pos + _LEN.size > len(body):
            raise ExportError(f"{path} ends inside an entry at byte {pos}")
        (value_len,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if pos + value_len > len(body) or len(key) != key_len:
            raise ExportError(f"{path} ends inside an entry at byte {pos}")
        value = bytes(body[pos:pos + value_len])
        pos += value_len
        if kind == KIND_RECORD and key_len == 0:
            out.record = value
            records += 1
        elif kind == KIND_TOKENS and key_len == _TOK_KEY.size:
            out.tokens.append((_TOK_KEY.unpack(key)[0], value))
        elif kind == KIND_KV and key_len == _KV_KEY.size:
            out.kv.append((_KV_KEY.unpack(key), value))
        else:
            raise ExportError(f"{path} holds an entry of unknown kind {kind} (key of {key_len} bytes)")
    if records != 1:
        raise ExportError(f"{path} holds {records} session records, expected 1")
    want = (header.get("token_blocks"), header.get("kv_blocks"))
    if want != (len(out.tokens), len(out.kv)):
        raise ExportError(f"{path} holds {len(out.tokens)} token and {len(out.kv)} KV blocks, its header says "
                          f"{want[0]} and {want[1]}")
    return out
