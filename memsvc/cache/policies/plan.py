"""`LayerPlan`: what one layer's cache keeps, in the terms `TierLayer` understands.

Every policy is a small dataclass whose `plan(layer, n_layers)` returns one of
these per layer; the layer class knows nothing about policy names.

    sink     first tokens kept exact forever (StreamingLLM's attention sinks)
    hot      exact recent window in tokens; None = unbounded (nothing ages)
    block    tokens per cold block (aged tokens leave the hot window B at a time)
    cold_k / cold_v
             codec names for aged tokens; None = aged tokens not kept are evicted
    retrieve cold tokens each query attends (top blocks by summary score);
             0 = every cold block (dense attention over packed blocks)
    keep     tokens per head in the kept set (warm tier / heavy hitters / SnapKV picks)
    keep_by  "attention": cumulative attention decides as tokens age (H2O);
             "window": the last `window` prompt queries decide at end of prompt (SnapKV)
    keep_bits  16 = kept tokens exact; 8 = per-token 8-bit (the warm tier)
    window, pool  SnapKV's observation window and pooling kernel
    rest     cold blocks a query did not retrieve: "drop" them, or attend each as one
             "mean" pseudo-token (mean key/value of its live tokens, weighted by their count)
    union_floor  a prompt chunk of n queries attends the union of its queries' retrieved
             blocks, at most retrieve * max(union_floor, ceil(n / block)) tokens of it
    v_skip   sparse-V: cold value blocks whose every weight is below this are not decoded
    near, far  with moving positions (a session past the model's window): tokens within `near` positions of
             the query keep their distance, the others are attended at distance `far` (0: the model's
             window and window - 1)
    far_layout  where far cold blocks sit: "shared" (each block's keys at 0..B-1, the query at `far`),
             "point" (every far key at 0, InfLLM's), "ordered" (the retrieved far blocks end to end in their
             order between distances `near` and `far`, the newest nearest; far > near here, 0: window - 1)
    far_retrieve  far cold tokens a query retrieves at most (0: no separate budget)
    exact_dtype  dtype of the exact tiers (None: the model's)
    pre_rope_keys  cold keys are stored before RoPE (rotated back by their positions; per-channel codes then
             see each channel's own range, not one spun by the position) and rotated forward when read
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KEEP_BY = ("none", "attention", "window")
FAR_LAYOUTS = ("shared", "point", "ordered")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LayerPlan:
    sink: int = 0
    hot: int | None = None
    block: int = 64
    cold_k: str | None = None
    cold_v: str | None = None
    retrieve: int = 0
    keep: int = 0
    keep_by: str = "none"
    keep_bits: int = 16
    window: int = 32
    pool: int = 7
    v_skip: float = 0.0
    exact_dtype: str | None = None
    rest: str = "drop"
    union_floor: int = 4
    near: int = 0
    far: int = 0
    far_layout: str = "shared"
    far_retrieve: int = 0
    pre_rope_keys: bool = False

    def __post_init__(self):
        if self.sink < 0 or self.block < 1 or self.keep < 0 or self.retrieve < 0:
            raise ValueError("sink, keep and retrieve must be >= 0 and block >= 1")
        if self.hot is not None and self.hot < 1:
            raise ValueError(f"hot window must be >= 1 token (never empty a head), got {self.hot}")
        if (self.cold_k is None) != (self.cold_v is None):
            raise ValueError("name both cold codecs (keys and values) or neither")
        if self.keep_by not in KEEP_BY:
            raise ValueError(f"keep_by must be one of {KEEP_BY}, got {self.keep_by!r}")
        if self.keep_bits not in (8, 16):
            raise ValueError(f"keep_bits must be 8 or 16, got {self.keep_bits}")
        if self.keep and self.keep_by == "none":
            raise ValueError("a kept set needs keep_by 'attention' or 'window'")
        if self.retrieve and self.cold_k is None:
            raise ValueError("retrieval needs cold blocks (cold_k/cold_v)")
        if self.retrieve and self.retrieve < self.block:
            raise ValueError(f"retrieve ({self.retrieve}) must cover at least one block ({self.block})")
        if self.window < 1 or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError("window must be >= 1 and pool an odd number >= 1")
        if self.rest not in ("drop", "mean"):
            raise ValueError(f"rest must be 'drop' or 'mean', got {self.rest!r}")
        if self.far_layout not in FAR_LAYOUTS:
            raise ValueError(f"far_layout must be one of {FAR_LAYOUTS}, got {self.far_layout!r}")
        ordered = self.far_layout == "ordered"
        if self.near < 0 or self.far < 0 or (self.near and self.far and (self.far <= self.near) == ordered):
            rel = "far > near" if ordered else "far < near"
            raise ValueError(f"near and far must be >= 0 (0 = the window) with {rel}, got {self.near}, {self.far}")
        if self.far_retrieve < 0 or (self.far_retrieve and self.far_retrieve < self.block):
            raise ValueError(f"far_retrieve must be 0 or at least one block ({self.block}), got {self.far_retrieve}")
        if self.union_floor < 1:
            raise ValueError(f"union_floor must be >= 1, got {self.union_floor}")
        if not 0.0 <= self.v_skip < 1.0:
            raise ValueError(f"v_skip must be in [0, 1), got {self.v_skip}")
        if self.exact_dtype is not None and self.exact_dtype not in _DTYPES:
            raise ValueError(f"exact_dtype must be one of {sorted(_DTYPES)} or None")

    def dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return _DTYPES[self.exact_dtype] if self.exact_dtype else model_dtype


def check_budget(name: str, value: int, least: int = 1) -> None:
    if not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
