"""`TieredCache`: a transformers `Cache` whose layers are `TierLayer`s, built from a policy, with its stored form.

    cache = new_cache(get_policy("tiered"), shape)     # memsvc.cache.factory
    with cache.attending():
        model(input_ids=..., cache=cache)               # attention runs on the tiers (memsvc.cache.attention)
    cache.end_prompt()                                  # SnapKV-style policies compress here

Every policy but `full` makes one: the layer plans say what each tier keeps. `checkpoint()` / `restore()`
undo everything since the checkpoint (an uncommitted Append or Generate); `resident_bytes()` counts every
tensor the cache holds in memory (exact tiers, 8-bit warm rows, summaries, scores, positions, pending and
privately cached cold blocks), `stored_bytes()` what its cold blocks take where they are kept.

Stored form (KV entries (layer, index)):
- (layer, i) for i < PART_BASE: cold block i of the layer, exactly the packed codec bytes the cache attends
  (written once, never rewritten: `is_final`);
- (layer, i) for i >= PART_BASE: the layer's mutable state in parts (`pages`): a small head at HEAD_INDEX, hot
  pages of 16 tokens, warm rows grouped by the cold blocks they came from, summary and live-mask pages of 16
  blocks. A commit writes the new cold blocks and the parts whose content changed, and drops hot pages and
  warm groups that emptied, so an Append writes about what it added, not the whole state.
Loading (memsvc.cache.tiered.load) reads each layer's head and parts; cold blocks stay where they are stored
until retrieval asks for one.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..attention import active
from ..base import Backing, Changes, KVShape
from .cold import ColdStore
from .layer import TierLayer
from .load import expected_entries, load_tiered, same_entry
from .pages import HEAD_INDEX, block_rows, is_cold_block, layer_parts, unchanged_pages, with_head
from .partcodec import encode

STATE_INDEX = HEAD_INDEX  # the layer's state entry (its head), after every possible block index
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _stored_shape(layout: dict, shape: KVShape) -> KVShape:
    """The stored session's shape, attended with the running model's window and RoPE."""
    return KVShape(layout["layers"], layout["kv_heads"], layout["head_dim"], _DTYPES[layout["dtype"]], shape.device,
                   shape.window, shape.rope)


def cold_store(backing: Backing) -> ColdStore:
    """The cold store of a cache over `backing` (see Backing)."""
    if backing.source is None:
        return ColdStore(decoded=backing.decoded_cache)
    if backing.block_cache is not None:
        return ColdStore(backing.source, cache=backing.block_cache, owner=backing.owner,
                         decoded=backing.decoded_cache)
    return ColdStore(backing.source, cache_bytes=backing.private_cache_bytes, owner=backing.owner,
                     decoded=backing.decoded_cache)


class TieredCache(Cache):
    """Every key is stored at its own position. With a model whose RoPE can be moved (shape.rope) the session
    may outgrow the model's window: what lies farther than the window is attended at positions inside it
    (memsvc.cache.tiered.positions); without, the session stays within the window."""

    def __init__(self, policy, shape: KVShape, backing: Backing | None = None):
        self.policy = policy
        self.shape = shape
        moving = shape.rope is not None and shape.window > 0
        self.cold = cold_store(backing or Backing())
        layers = [TierLayer(policy.plan(i, shape.layers), i, self.cold, shape.dtype, shape.rope, shape.window, moving)
                  for i in range(shape.layers)]
        super().__init__(layers=layers)
        self._stored: dict[tuple[int, int], bytes] = {}  # (layer, part index) -> digest of the stored part
        self._pending: dict[tuple[int, int], bytes] | None = None  # the same after the commit in flight
        # layer -> `block_rows` of its stored state (when its pages are in the current layout), and the same
        # after the commit in flight: a commit rebuilds and hashes only the summary and live pages that changed
        self._rows: dict[int, tuple] = {}
        self._rows_pending: dict[int, tuple] | None = None

    @property
    def length(self) -> int:
        return self.get_seq_length()

    # ---- SessionCache ---------------------------------------------------------------------

    def attending(self):
        return active(self)

    def end_prompt(self) -> None:
        for layer in self.layers:
            layer.end_prompt()

    def checkpoint(self) -> list[dict]:
        return [layer.snapshot() for layer in self.layers]

    def restore(self, snap: list[dict]) -> None:
        for layer, s in zip(self.layers, snap):
            layer.restore(s)

    def changes(self) -> Changes:
        """The new cold blocks, the state parts that are new or changed, and the parts the state no longer has
        (emptied hot pages and warm groups)."""
        payloads = dict(self.cold.take_pending())
        counts = {key: self.policy.plan(key[0], self.shape.layers).block for key in payloads}
        now: dict[tuple[int, int], bytes] = {}
        rows: dict[int, tuple] = {}
        for i, layer in enumerate(self.layers):
            if not layer.is_initialized:  # nothing computed yet (a session of one token): no entry, as
                continue                  # `expected_entries` says; such a session loads fresh
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
        return Changes(payloads, counts, sorted(set(self._stored) - set(now)))

    def committed(self) -> None:
        self.cold.flushed()
        if self._pending is not None:
            self._stored, self._pending = self._pending, None
            self._rows, self._rows_pending = self._rows_pending, None

    def final_entries(self) -> Changes:
        pending = dict(self.cold.pending)
        return Changes(pending, {key: self.policy.plan(key[0], self.shape.layers).block for key in pending})

    def flush(self) -> None:
        if self.cold.backend.writable:  # a backend of the cache's own (an evaluation's file)
            self.cold.flush()

    def close(self) -> None:
        self.cold.close()

    def resident_bytes(self) -> int:
        return sum(layer.resident_bytes() for layer in self.layers) + self.cold.resident_bytes()

    def stored_bytes(self) -> int:
        return self.cold.stored_bytes()

    def tier_bytes(self) -> dict[str, int]:
        """Resident bytes by tier over every layer; "cold" is the cold store's own memory (pending blocks,
        a private LRU, an in-memory backend); they sum to resident_bytes()."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for k, v in layer.tier_bytes().items():
                total[k] = total.get(k, 0) + v
        total["cold"] = self.cold.resident_bytes()
        return total

    def tier_tokens(self) -> dict[str, float]:
        """Mean over layers of the tokens (per head) in each tier."""
        total: dict[str, float] = {}
        for layer in self.layers:
            for k, v in layer.tier_tokens().items():
                total[k] = total.get(k, 0) + v / len(self.layers)
        return total

    def stats(self) -> dict[str, int]:
        out = {"cold_hits": self.cold.hits, "cold_misses": self.cold.misses}
        for layer in self.layers:
            for k, v in layer.stats.items():
                out[k] = max(out.get(k, 0), v) if k == "max_distance" else out.get(k, 0) + v
        return out

    def layout(self) -> dict:
        s = self.shape
        return {"layers": s.layers, "kv_heads": s.kv_heads, "head_dim": s.head_dim,
                "dtype": str(s.dtype).removeprefix("torch."), "block_tokens": self.policy.block_tokens,
                "form": "tiered"}

    def max_tokens(self) -> int | None:
        return None if self.layers[0].moving else (self.shape.window or None)

    # ---- stored form -----------------------------------------------------------------------

    @classmethod
    def load(cls, policy, shape: KVShape, layout: dict, n_tokens: int, backing: Backing) -> "TieredCache":
        """From the layer states alone; cold blocks stay where they are stored until retrieval reads them."""
        return load_tiered(cls(policy, _stored_shape(layout, shape), backing), backing.source)

    @staticmethod
    def expected_entries(source, layout: dict, n_cached: int, damaged: dict) -> tuple[set | None, str | None]:
        return expected_entries(source, layout, damaged)

    same_entry = staticmethod(same_entry)

    @staticmethod
    def is_final(key) -> bool:
        return is_cold_block(key[1])
