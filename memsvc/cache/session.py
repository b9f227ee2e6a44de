"""`TierKV`: a session's tiered cache as the session manager sees it, with its stored form.

Stored form (LMDB kv namespace, keys (layer, index)):
- (layer, i) for i < PART_BASE: cold block i of the layer, exactly the packed
  codec bytes the cache attends (written once, never rewritten);
- (layer, i) for i >= PART_BASE: the layer's mutable state in parts (`pages`):
  a small head at STATE_INDEX, hot pages of 16 tokens, warm rows grouped by the
  cold blocks they came from, summary and live-mask pages of 16 blocks. A commit
  writes the new cold blocks and the parts whose content changed, and drops hot
  pages and warm groups that emptied, so an Append writes about what it added,
  not the whole state.

Resume reads the record, the token ids and each layer's head and parts; cold
blocks stay in LMDB until retrieval asks for one (`StoreBlocks`), so resume
does not read the cold tier at all. A layer state stored whole (before parts)
still loads; its next commit writes it in parts.
"""
from __future__ import annotations

import json

import safetensors.torch as st
import torch

from .attention import active
from .cache import TierCache
from .cold import ColdStore
from .layer import TierLayer, _q8_rows
from .pages import (HEAD_INDEX, assemble, block_rows, decode, digest, encode, layer_parts, listed_digests, listed_parts,
                    pages_in_layout, unchanged_pages, with_head)

STATE_INDEX = HEAD_INDEX  # the layer's state entry (its head), after every possible block index
_TENSORS = ("sink_k", "sink_v", "hot_k", "hot_v", "hot_pos", "hot_score", "keep_pos", "keep_score", "sum_min",
            "sum_max", "sum_mean_k", "sum_mean_v", "live", "q_window")
_SUMMARIES = {"sum_min": "down", "sum_max": "up", "sum_mean_k": "near", "sum_mean_v": "near"}  # 8-bit rounding
_INTS = ("seen", "evicted", "n_blocks", "H", "D", "Dv")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StoreBlocks:
    """Cold blocks read from a session's entries in the LMDB store (one, or many in one transaction)."""

    resident = False

    def __init__(self, store, sid: str):
        self.store, self.sid = store, sid

    def read(self, layer: int, index: int) -> bytes | None:
        return self.store.kv_block(self.sid, layer, index)

    def read_many(self, layer: int, indices: list[int]) -> list[bytes | None]:
        return self.store.kv_blocks_at(self.sid, layer, indices)

    def write(self, blocks) -> None:
        raise RuntimeError("a session's blocks are written by its commit, not by the cache")

    def nbytes(self) -> int:
        return 0  # counted by the store (stored_bytes of the record)


def layer_state(layer: TierLayer) -> bytes:
    """The layer's whole state as one safetensors entry: the stored form before parts, still loaded."""
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


def load_layer_state(layer: TierLayer, raw: bytes, device: torch.device) -> None:
    """Load a state stored whole (`layer_state`)."""
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


class TierKV:
    """The session manager's view of a tiered cache (same surface as `SessionKV`)."""

    def __init__(self, policy, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, cold: ColdStore | None = None):
        self.policy = policy
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.cache = TierCache(policy, num_layers, dtype, cold)
        self._stored: dict[tuple[int, int], bytes] = {}  # (layer, part index) -> digest of the stored part
        self._pending: dict[tuple[int, int], bytes] | None = None  # the same after the commit in flight
        # layer -> `block_rows` of its stored state (when its pages are in the current layout), and the same
        # after the commit in flight: a commit rebuilds and hashes only the summary and live pages that changed
        self._rows: dict[int, tuple] = {}
        self._rows_pending: dict[int, tuple] | None = None

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def forward_context(self):
        return active(self.cache)

    def checkpoint(self):
        return self.cache.snapshot()

    def restore(self, snap) -> None:
        self.cache.restore(snap)

    def end_prompt(self) -> None:
        self.cache.end_prompt()

    def dirty_blocks(self) -> tuple[dict[tuple[int, int], bytes], dict[tuple[int, int], int], list]:
        """What the next commit writes: (payloads, token counts, entries to drop): the new cold blocks,
        the state parts that are new or changed, and the parts the state no longer has (emptied hot pages and
        warm groups)."""
        payloads = dict(self.cache.cold.take_pending())
        counts = {key: self.policy.plan(key[0], self.num_layers).block for key in payloads}
        now: dict[tuple[int, int], bytes] = {}
        rows: dict[int, tuple] = {}
        for i, layer in enumerate(self.cache.layers):
            if not layer.is_initialized:  # nothing computed yet (a session of one token): no entry, as
                continue                  # `repair.expected_keys` says; such a session loads fresh
            before = self._rows.get(i)
            same = {} if before is None else unchanged_pages(layer, before, lambda index: self._stored.get((i, index)))
            parts, digests = with_head(layer, layer_parts(layer, skip=set(same)), same)
            rows[i] = block_rows(layer)
            now |= {(i, index): d for index, d in digests.items()}  # the unchanged pages' too
            for index, part in parts.items():
                key = (i, index)
                if self._stored.get(key) != now[key]:
                    payloads[key] = encode(part)
                    counts[key] = part[2]
        self._pending, self._rows_pending = now, rows
        return payloads, counts, sorted(set(self._stored) - set(now))

    def mark_clean(self) -> None:
        """The last `dirty_blocks` are stored."""
        self.cache.cold.flushed()
        if self._pending is not None:
            self._stored, self._pending = self._pending, None
            self._rows, self._rows_pending = self._rows_pending, None

    def resident_bytes(self) -> int:
        return self.cache.resident_bytes()

    def tier_tokens(self) -> dict[str, float]:
        return self.cache.tier_tokens()

    def tier_bytes(self) -> dict[str, int]:
        return self.cache.tier_bytes()

    def layout(self) -> dict:
        return {"layers": self.num_layers, "kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "dtype": str(self.dtype).removeprefix("torch."), "block_tokens": self.policy.block_tokens,
                "form": "tiered"}

    @classmethod
    def load(cls, policy, store, sid: str, layout: dict, device: torch.device, cache_bytes: int = 1 << 20,
             cold: ColdStore | None = None) -> "TierKV":
        """Rebuild from the layer states alone; cold blocks stay in the store until retrieval reads them
        (through `cold`, a ColdStore over StoreBlocks(store, sid); default: one with its own cache_bytes LRU)."""
        kv = cls(policy, layout["layers"], layout["kv_heads"], layout["head_dim"], _DTYPES[layout["dtype"]], device,
                 cold if cold is not None else ColdStore(StoreBlocks(store, sid), cache_bytes=cache_bytes))
        for i, layer in enumerate(kv.cache.layers):
            raw = store.kv_block(sid, i, STATE_INDEX)
            if raw is None:
                raise ValueError(f"the state of layer {i} is missing")
            head = decode(raw)
            listed = listed_parts(head[1])
            if listed is None:  # stored whole, before parts (or empty): the next commit writes every part
                load_layer_state(layer, raw, device)
                if not layer.is_initialized:
                    kv._stored[(i, STATE_INDEX)] = digest(head)
                continue
            parts = {}
            for index, part in zip(listed, store.kv_blocks_at(sid, i, listed)):  # one read transaction
                if part is None:
                    raise ValueError(f"part {index:#x} of the state of layer {i} is missing")
                parts[index] = decode(part)
            assemble(layer, head, parts, device, _DTYPES)
            if pages_in_layout(parts, layer.n_blocks):
                kv._rows[i] = block_rows(layer)
            known = listed_digests(head)  # what the commit that wrote them hashed; else hash them now
            kv._stored |= {(i, index): known[index] if known else digest(part) for index, part in parts.items()}
            kv._stored[(i, STATE_INDEX)] = digest(head)
        return kv


def restate(store, sid: str, policy, layout: dict) -> int:
    """Rewrite a tiered session's layer states in the current part layout (states stored whole, or in parts
    of another size), in one store transaction; the cache they load into does not change. Returns the
    state entries written."""
    rec = store.get(sid)
    kv = TierKV.load(policy, store, sid, layout, torch.device("cpu"))
    payloads, counts, drop = kv.dirty_blocks()
    if payloads or drop:
        store.rewrite_kv(sid, n_tokens=rec.n_tokens, blocks=payloads, block_tokens=counts, drop=drop)
    return len(payloads)
