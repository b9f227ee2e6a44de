"""`TierLayer`: one layer's tiered KV cache, a transformers cache layer.

State (H = KV heads, D = head dim; batch 1):
    sink_k/v  [H, s, D]   first tokens, exact
    hot_k/v   [H, h, D]   recent tokens, exact; hot_pos [h]; hot_score [H, h]
    keep      [H, m, D]   per-head kept tokens (exact, or 8-bit codes + fp16 scale/min);
                          keep_pos [H, m]; keep_score [H, m]
    cold      blocks of B tokens in a `ColdStore`, packed by the plan's codecs;
              sum_min/sum_max [nb, H, D] key summaries (Quest), sum_mean_k/v the block means, each
              8-bit per row (codes uint8 [nb, H, D], scale and base fp16 [nb, H, 1]); live [nb, H, B]
              (False where the token's head holds it in `keep`: each token is
              attended exactly once per head)

`update()` (called by the model before attention) appends the new tokens to
the hot window. The registered attention function then calls `attend()`,
which reads every tier — cold blocks dequantized by the codec kernels, only the
blocks retrieval picks — and afterwards `settle()` moves tokens between tiers:
sink fill, hot overflow a block at a time into cold (or eviction), the kept set
competing by score. State tensors are replaced, never written in place, so a
snapshot is a shallow copy of the attributes.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from memsvc.kernels.registry import get_codec

from ..policies.plan import LayerPlan
from ..rope import Rope
from .attend import Attend
from .cold import ColdStore
from .positions import Positions
from .rows import _dq8, _q8, _q8_rows
from .settle import Settle

_STATE = ("sink_k", "sink_v", "hot_k", "hot_v", "hot_pos", "hot_score", "keep_k", "keep_v", "keep_pos",
          "keep_score", "sum_min", "sum_max", "sum_mean_k", "sum_mean_v", "live", "n_blocks", "seen", "evicted", "q_window")


def _codec(name: str, layer: int):
    try:
        return get_codec(name, layer=layer)
    except TypeError:
        return get_codec(name)



class TierLayer(Attend, Settle, Positions, CacheLayerMixin):
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan, layer_idx: int, cold: ColdStore, dtype: torch.dtype,
                 rope: Rope | None = None, window: int = 0, moving: bool = False):
        """moving: what lies farther than `near` (default the model's window) is attended at positions inside
        it (memsvc.cache.tiered.positions, with the model's `rope`); False: every key at its own position (such
        a session stays within the window)."""
        super().__init__()
        self.plan = plan
        self.rope = rope
        self.moving = moving
        self.window = window
        self.near = plan.near or window
        self.far = plan.far or (window - 1 if plan.far_layout == "ordered" else self.near - 1)
        self.layer_idx = layer_idx
        self.cold = cold
        self.exact_dtype = plan.dtype(dtype)
        self.kcodec = _codec(plan.cold_k, layer_idx) if plan.cold_k else None
        self.vcodec = _codec(plan.cold_v, layer_idx) if plan.cold_v else None
        self.is_initialized = False
        self.seen = 0  # tokens this layer has been given (the logical length)
        self.evicted = 0  # token-heads dropped by an eviction policy
        self.n_blocks = 0
        self.q_window = None  # [Hq, w, D] last prompt queries (SnapKV)
        self.stats = {"cold_blocks_read": 0, "cold_blocks_reused": 0, "v_blocks_skipped": 0, "attend_calls": 0,
                      "max_distance": 0}  # the farthest query-key distance attended (positions)

    # ---- transformers Cache API --------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] != 1:
            raise ValueError(f"the tiered cache holds one sequence, got batch {key_states.shape[0]}")
        _, H, _, D = key_states.shape
        self.H, self.D, self.Dv = H, D, value_states.shape[-1]
        self.device = key_states.device
        self.model_dtype = key_states.dtype
        e, dev = self.exact_dtype, self.device
        self.sink_k = torch.empty(H, 0, D, dtype=e, device=dev)
        self.sink_v = torch.empty(H, 0, self.Dv, dtype=e, device=dev)
        self.hot_k, self.hot_v = self.sink_k, self.sink_v
        self.hot_pos = torch.empty(0, dtype=torch.long, device=dev)
        self.hot_score = torch.empty(H, 0, device=dev)
        self.keep_k = self._keep_store(torch.empty(H, 0, D, device=dev))
        self.keep_v = self._keep_store(torch.empty(H, 0, self.Dv, device=dev))
        self.keep_pos = torch.empty(H, 0, dtype=torch.long, device=dev)
        self.keep_score = torch.empty(H, 0, device=dev)
        self.sum_min = _q8_rows(torch.empty(0, H, D, device=dev), "down")  # 8-bit rows: codes, scale, base
        self.sum_max = self.sum_mean_k = self.sum_min
        self.sum_mean_v = _q8_rows(torch.empty(0, H, self.Dv, device=dev), "near")
        self.live = torch.empty(0, H, self.plan.block, dtype=torch.bool, device=dev)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens to the hot window; returns the hot window as [1, H, h, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError(f"the tiered cache holds one sequence, got batch {key_states.shape[0]}")
        n = key_states.shape[2]
        e = self.exact_dtype
        self.hot_k = torch.cat([self.hot_k, key_states[0].to(e)], dim=1)
        self.hot_v = torch.cat([self.hot_v, value_states[0].to(e)], dim=1)
        self.hot_pos = torch.cat([self.hot_pos, torch.arange(self.seen, self.seen + n, device=self.device)])
        self.hot_score = torch.cat([self.hot_score, torch.zeros(self.H, n, device=self.device)], dim=1)
        self.seen += n
        return self.hot_k.unsqueeze(0), self.hot_v.unsqueeze(0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    # ---- snapshot ----------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {name: getattr(self, name) for name in _STATE if hasattr(self, name)} | {"init": self.is_initialized}

    def restore(self, snap: dict) -> None:
        for name, value in snap.items():
            if name != "init":
                setattr(self, name, value)
        self.is_initialized = snap["init"]
        self.cold.discard_from(self.layer_idx, self.n_blocks)

    # ---- kept set ----------------------------------------------------------------------

    def _keep_store(self, x: torch.Tensor):
        """x [H, m, D] float -> the kept-set representation (exact tensor or 8-bit triple)."""
        return _q8(x) if self.plan.keep_bits == 8 else x.to(self.exact_dtype)

    def _keep_float(self, store) -> torch.Tensor:
        return _dq8(store) if self.plan.keep_bits == 8 else store.float()

    def _keep_len(self) -> int:
        return self.keep_pos.shape[1]

    def _keep_gather(self, store, idx: torch.Tensor):
        """Rows idx [H, m'] of a kept store."""
        def g(t):
            return torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return tuple(g(t) for t in store) if self.plan.keep_bits == 8 else g(store)

    # ---- accounting --------------------------------------------------------------------

    def tier_bytes(self) -> dict[str, int]:
        """Resident bytes by tier: sink, hot (with positions and scores), warm (kept rows, their scales,
        positions, scores), summaries (the cold blocks' resident part: 8-bit summaries and live masks),
        window (SnapKV's remembered queries)."""
        if not self.is_initialized:
            return {}
        scored = self.plan.keep_by == "attention"
        tiers = {
            "sink": [self.sink_k, self.sink_v],
            "hot": [self.hot_k, self.hot_v, self.hot_pos] + ([self.hot_score] if scored else []),
            "warm": [self.keep_pos] + ([self.keep_score] if scored else []),
            "summaries": [self.live],
            "window": [self.q_window] if self.q_window is not None else [],
        }
        for store in (self.keep_k, self.keep_v):
            tiers["warm"] += list(store) if isinstance(store, tuple) else [store]
        for summary in (self.sum_min, self.sum_max, self.sum_mean_k, self.sum_mean_v):
            tiers["summaries"] += list(summary)
        return {name: sum(t.numel() * t.element_size() for t in ts) for name, ts in tiers.items()}

    def resident_bytes(self) -> int:
        return sum(self.tier_bytes().values())

    def tier_tokens(self) -> dict[str, int]:
        """Token-heads per tier, divided by H (so a full head set counts one token)."""
        if not self.is_initialized:
            return {"sink": 0, "hot": 0, "warm": 0, "cold": 0, "evicted": 0}
        H = self.H
        return {"sink": self.sink_k.shape[1], "hot": self.hot_k.shape[1], "warm": self._keep_len(),
                "cold": int(self.live.sum()) / H if self.n_blocks else 0, "evicted": self.evicted / H}
