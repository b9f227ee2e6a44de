"""Reading a tiered cache back from its stored entries, and what those entries should be.

`load_tiered(cache, source)` sets each layer from its head and the parts the head lists: one read of every
layer's head, one of every listed part (a few round trips from PostgreSQL, whatever the layers); cold blocks are
not read. A layer stored in an older layout goes through
memsvc.cache.tiered.upgrade. The cache remembers each stored part's digest, so its next commit writes only
what changes (and every part, in today's layout, of a layer read from an older one).
`expected_entries` tells from the layer heads which entries a stored session should have (for `verify`);
`same_entry` compares a stored entry with a rebuilt one (for repair).
"""
from __future__ import annotations

import json

import torch

from . import upgrade
from .pages import (HEAD_INDEX, assemble, block_rows, is_cold_block, listed_digests, listed_parts,
                    pages_in_layout)
from .partcodec import decode, digest

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_tiered(cache, source):
    """cache: a new TieredCache of the stored session's policy and shape; source: its EntrySource. Two reads
    of the store whatever the number of layers: every layer's head, then every part the heads list."""
    device = cache.shape.device
    n = len(cache.layers)
    heads = source.read_keys([(i, HEAD_INDEX) for i in range(n)])
    decoded, wanted = [], []
    for i, raw in enumerate(heads):
        if raw is None:
            raise ValueError(f"the state of layer {i} is missing")
        head = decode(raw)
        listed = listed_parts(head[1])
        decoded.append((raw, head, listed))
        wanted += [(i, index) for index in listed or ()]
    stored = dict(zip(wanted, source.read_keys(wanted))) if wanted else {}
    for i, (layer, (raw, head, listed)) in enumerate(zip(cache.layers, decoded)):
        if listed is None:  # stored whole, before parts (or empty): the next commit writes every part
            upgrade.load_whole(layer, raw, device)
            if not layer.is_initialized:
                cache._stored[(i, HEAD_INDEX)] = digest(head)
            continue
        parts = {}
        for index in listed:
            part = stored[(i, index)]
            if part is None:
                raise ValueError(f"part {index:#x} of the state of layer {i} is missing")
            parts[index] = decode(part)
        current = upgrade.current_parts(head, parts, layer.plan.sink, layer.plan.block)
        assemble(layer, head, current, device, _DTYPES)
        if current is parts and pages_in_layout(parts, layer.n_blocks):
            cache._rows[i] = block_rows(layer)
        # what the commit that wrote them hashed, of the parts as stored
        cache._stored |= {(i, index): d for index, d in upgrade.stored_digests(listed_digests(head), parts).items()}
        cache._stored[(i, HEAD_INDEX)] = digest(head)
    return cache


def _state_entries(raw: bytes) -> tuple[int, list[int]] | None:
    """(n_blocks, the state parts it lists) from a layer head's safetensors header ((0, []) for an empty
    layer, no parts for a state stored whole), None if unreadable."""
    try:
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(bytes(raw[8:8 + n])).get("__metadata__", {})
        if meta.get("init") != "1":
            return 0, []
        return int(meta["n_blocks"]), listed_parts(meta) or []
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def expected_entries(source, layout: dict, damaged: dict) -> tuple[set | None, str | None]:
    """Every layer's head, the parts it lists and its cold blocks; (None, why) when a head is damaged, missing
    or unreadable (then only a rebuild knows)."""
    keys: set = set()
    for layer in range(layout.get("layers", 0)):
        keys.add((layer, HEAD_INDEX))
        if (layer, HEAD_INDEX) in damaged:
            return None, f"the state of layer {layer} is damaged"
        raw = source.read(layer, HEAD_INDEX)
        if raw is None:
            return None, f"the state of layer {layer} is missing"
        got = _state_entries(raw)
        if got is None:
            return None, f"the state of layer {layer} does not parse"
        nb, parts = got
        keys.update((layer, i) for i in range(nb))
        keys.update((layer, i) for i in parts)
    return keys, None


def same_entry(key: tuple[int, int], stored: bytes | None, rebuilt: bytes | None) -> bool:
    """Whether a stored entry equals its rebuilt one. Layer states are compared by content: safetensors
    writes its header's keys in no fixed order, so equal states need not be equal bytes."""
    if stored is None or rebuilt is None or stored == rebuilt:
        return stored == rebuilt
    if is_cold_block(key[1]):
        return False
    try:  # the digest the commits use: metadata and every tensor's name, dtype, shape and contents
        return digest(decode(stored)) == digest(decode(rebuilt))
    except ValueError:  # an unreadable state is not the rebuilt one
        return False
