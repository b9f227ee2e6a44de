"""What one write of KV blocks and token ids holds, checked and encoded before any transaction opens.

Every backend takes a commit's arguments through `prepare_commit` (a repair's
through `encode_kv`), so bad input raises the same ValueError everywhere, before
anything is read or written, and the zstd work happens outside the store's
write lock.

Knows records, block keys and the block format; knows nothing about how a
backend lays them out.
"""
from __future__ import annotations

import operator
from array import array
from dataclasses import dataclass
from typing import Mapping, Sequence

from .blocks import KIND_KV, encode_block
from .records import SessionRecord

KVKey = tuple[int, int]  # (layer, index)
MAX_LAYER, MAX_INDEX = 0xFFFF, 0xFFFFFFFF
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def possible_id(sid) -> bool:
    """Whether sid could name a stored session (a miss needs no error for anything else)."""
    return isinstance(sid, str) and "\0" not in sid


def check_page(after, limit) -> None:
    """ValueError unless (after, limit) ask for a page of a listing: a session id or "", a count >= 0."""
    if not is_int(limit) or limit < 0:
        raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
    if not possible_id(after):
        raise ValueError(f"after must be a session id or empty, got {after!r}")


def check_record(record) -> SessionRecord:
    if not isinstance(record, SessionRecord):
        raise ValueError(f"expected a SessionRecord, got {type(record).__name__}")
    return record


def check_kv_key(layer, index) -> KVKey:
    """(layer, index) if both are in range (layer 0..65535, index 0..2**32-1), else ValueError."""
    for name, v, top in (("layer", layer, MAX_LAYER), ("index", index, MAX_INDEX)):
        if not is_int(v) or not 0 <= v <= top:
            raise ValueError(f"KV block {name} must be an integer in 0..{top}, got {v!r}")
    return layer, index


def token_ids(tokens: Sequence[int]) -> array:
    """The ids as array("i"); ValueError for anything that is not an integer fitting int32."""
    ids = array("i")
    for t in tokens:
        try:
            t = operator.index(t)
        except TypeError:
            raise ValueError(f"token id {t!r} is not an integer") from None
        if not _I32_MIN <= t <= _I32_MAX:
            raise ValueError(f"token id {t} does not fit in int32")
        ids.append(t)
    return ids


def encode_kv(blocks: Mapping[KVKey, bytes], block_tokens: Mapping[KVKey, int] | None = None
              ) -> list[tuple[KVKey, bytes]]:
    """((layer, index), encoded KV block) for each of `blocks`, in its order; block_tokens gives the
    n_tokens of a block's header (default 0)."""
    counts = dict(block_tokens or {})
    out = []
    for where, payload in blocks.items():
        if not isinstance(where, tuple) or len(where) != 2:
            raise ValueError(f"KV block keys must be (layer, index) pairs, got {where!r}")
        layer, index = check_kv_key(*where)
        out.append(((layer, index), encode_block(payload, kind=KIND_KV, layer=layer, index=index,
                                                 n_tokens=counts.get(where, 0))))
    return out


@dataclass(frozen=True)
class Turn:
    """One commit, checked: what `Store.commit` writes in one transaction."""

    record: SessionRecord
    first_token: int  # must equal the tokens stored when the transaction runs
    ids: array  # the new token ids, array("i")
    blocks: list[tuple[KVKey, bytes]]  # (layer, index) -> encoded KV block, each stored as a new blob
    drop: list[KVKey]  # KV entries to remove (absent ones are ignored)


def prepare_commit(record: SessionRecord, *, first_token: int, tokens: Sequence[int],
                   blocks: Mapping[KVKey, bytes], block_tokens: Mapping[KVKey, int] | None = None,
                   drop: Sequence[KVKey] = ()) -> Turn:
    """Check and encode a commit's arguments (see `Store.commit`); ValueError names the first bad one."""
    check_record(record)
    if not is_int(first_token) or first_token < 0:
        raise ValueError(f"first_token must be an integer >= 0, got {first_token!r}")
    ids = token_ids(tokens)
    counts = dict(block_tokens or {})
    unknown = set(counts) - set(blocks.keys())
    if unknown:
        raise ValueError(f"block_tokens names blocks that are not written: {sorted(unknown)[:5]}")
    encoded = encode_kv(blocks, counts)
    both = set(drop) & set(blocks.keys())
    if both:
        raise ValueError(f"blocks both written and dropped: {sorted(both)[:5]}")
    return Turn(record, first_token, ids, encoded, [check_kv_key(layer, index) for layer, index in drop])
