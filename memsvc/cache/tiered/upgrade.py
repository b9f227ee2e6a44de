"""Tiered layer states stored in older layouts, read into today's (the one place that knows them).

Layouts a stored session may still hold, oldest first:
- a layer's whole state in one safetensors entry at HEAD_INDEX, without parts (`whole_state` writes it; its
  key summaries may be fp32, before they were 8-bit rows);
- a paged state whose warm rows are all in one entry, WARM_INDEX, instead of warm groups;
- a paged state whose summary pages hold the live masks, instead of live pages of their own;
- a head that does not list its parts' digests (they are computed on load).
`load_whole` sets a layer from the first; `current_parts` turns the parts of the others into today's parts.
A session loaded through either is written in today's layout by its next commit (every part is new to it),
or at once by `memsvc sessions upgrade` (memsvc.cache.upgrade).
"""
from __future__ import annotations

import json

import safetensors.torch as st
import torch

from .rows import _q8_rows
from .pages import LIVE_BASE, SUM_BASE, WARM_INDEX, _get, _pages, warm_groups
from .partcodec import Part, digest

_TENSORS = ("sink_k", "sink_v", "hot_k", "hot_v", "hot_pos", "hot_score", "keep_pos", "keep_score", "sum_min",
            "sum_max", "sum_mean_k", "sum_mean_v", "live", "q_window")
_SUMMARIES = {"sum_min": "down", "sum_max": "up", "sum_mean_k": "near", "sum_mean_v": "near"}  # 8-bit rounding
_INTS = ("seen", "evicted", "n_blocks", "H", "D", "Dv")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def whole_state(layer) -> bytes:
    """A layer's whole state as one safetensors entry: the layout before parts (tests store it to check that
    such sessions still load)."""
    if not layer.is_initialized:
        return st.save({}, metadata={"init": "0"})
    tensors = {}
    for name in _TENSORS + ("keep_k", "keep_v"):
        value = getattr(layer, name)
        if isinstance(value, tuple):  # 8-bit rows: codes, scale, base
            for i, t in enumerate(value):
                tensors[f"{name}.{i}"] = t.contiguous()
        elif value is not None:
            tensors[name] = value.contiguous()
    meta = {name: str(getattr(layer, name)) for name in _INTS}
    meta |= {"init": "1", "model_dtype": str(layer.model_dtype).removeprefix("torch.")}
    return st.save(tensors, metadata=meta)


def load_whole(layer, raw: bytes, device: torch.device) -> None:
    """Set a layer from a state stored whole (`whole_state`); an empty one leaves it uninitialized."""
    loaded = {k: v.to(device) for k, v in st.load(raw).items()}
    header_len = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + header_len]).get("__metadata__", {})
    if meta.get("init") != "1":
        return
    for name in _INTS:
        setattr(layer, name, int(meta[name]))
    layer.model_dtype = _DTYPES[meta["model_dtype"]]
    layer.device = device
    for name in _TENSORS + ("keep_k", "keep_v"):
        if f"{name}.0" in loaded:
            setattr(layer, name, tuple(loaded[f"{name}.{i}"] for i in range(3)))
        elif name in _SUMMARIES and name in loaded:  # stored before summaries were 8-bit
            setattr(layer, name, _q8_rows(loaded[name], _SUMMARIES[name]))
        else:
            setattr(layer, name, loaded.get(name))
    layer.is_initialized = True


def current_parts(head: Part, parts: dict[int, Part], sink: int, block: int) -> dict[int, Part]:
    """A paged state's parts in today's layout: warm rows of one WARM_INDEX entry cut into warm groups, live
    masks moved out of the summary pages into live pages. Parts already in today's layout come back as they
    are (the same dict)."""
    sum_pages = [i for i in parts if SUM_BASE <= i < LIVE_BASE]
    old_live = any("live" in parts[i][0] for i in sum_pages)
    if WARM_INDEX not in parts and not old_live:
        return parts
    parts = dict(parts)
    if old_live:
        for i in _pages(parts, SUM_BASE, LIVE_BASE, "sum_min.0"):
            tensors, meta, n = parts[i]
            tensors = dict(tensors)
            live = tensors.pop("live")
            parts[i] = (tensors, meta, n)
            parts[LIVE_BASE + (i - SUM_BASE)] = ({"live": live}, dict(meta), n)
    if WARM_INDEX in parts:
        warm = parts.pop(WARM_INDEX)[0]
        pos = _get(head[0], "keep_pos").long()
        parts |= warm_groups(pos, _get(warm, "keep_k"), _get(warm, "keep_v"), sink, block)
    return parts


def stored_digests(listed: dict[int, bytes] | None, parts: dict[int, Part]) -> dict[int, bytes]:
    """The digest of every stored part: the ones its head lists, else (a head from before it listed them)
    computed now."""
    return listed if listed is not None else {index: digest(part) for index, part in parts.items()}


