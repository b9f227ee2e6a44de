"""Export and import of one session in the LMDB store (the file format is ../archive.py's).

An export carries the record, the token blocks and the KV blocks as stored
(shared blobs in full); an import stores its KV blocks as new blobs, each with
one reference. Functions over one open transaction.
"""
from __future__ import annotations

from ..archive import Export, export_header
from ..blocks import decode_tokens
from ..errors import SessionExists, SessionMissing
from ..records import SessionRecord
from .blobs import blob, payload, put_blobs
from .env import Txn
from .layout import KV_KEY, TOK_KEY, kv_key, prefix, token_key
from .sessions import exists, put_record, read_record


def export(tx: Txn, sid: str) -> Export:
    pfx = prefix(sid)
    plen = len(pfx)
    rec, raw = read_record(tx, sid)
    if rec is None:
        raise SessionMissing(f"no session {sid!r}")
    out = Export(header={}, record=bytes(raw))
    for key, value in tx.scan("tokens", pfx):
        index = TOK_KEY.unpack(key[plen:])[0]
        decode_tokens(value, index, key)
        out.tokens.append((index, bytes(value)))
    for key, ptr in tx.scan("kv", pfx):
        layer, index = KV_KEY.unpack(key[plen:])
        payload(tx, key, ptr, layer, index)
        out.kv.append(((layer, index), bytes(blob(tx, key, ptr))))
    out.header = export_header(rec, len(out.tokens), len(out.kv))
    return out


def import_checked(tx: Txn, rec: SessionRecord, export: Export) -> SessionRecord:
    """Store rec with the export's blocks (archive.check_import has passed them)."""
    if exists(tx, rec.id):
        raise SessionExists(f"session {rec.id!r} already exists")
    pfx = prefix(rec.id)
    nbytes = 0
    for index, value in export.tokens:
        tx.put("tokens", token_key(pfx, index), value)
        nbytes += len(value)
    nbytes += put_blobs(tx, [(kv_key(pfx, layer, index), bytes(value)) for (layer, index), value in export.kv])
    return put_record(tx, rec, nbytes)
