"""`tiered` (the default): sink + hot exact, warm 8-bit, cold packed blocks with retrieval.

Per layer and KV head:
- sink: the first `sink` tokens, exact;
- hot: the last `hot` tokens (plus a partial block), exact;
- warm: up to `warm` tokens per head whose cumulative attention (H2O-style,
  summed while they were hot or warm) is highest, at 8 bits per value;
- cold: everything else, `block_tokens` at a time, keys stored before RoPE
  (`pre_rope_keys`) as `kvq3_k` (1% largest exact, the rest 3-bit per channel
  per block: 4.0 bits, where the 6-bit per-token keys before it took 6.6;
  benchmarks/cold_keys.py) and values TurboQuant 3-bit, each block with a resident 8-bit key
  summary (per-channel min/max, Quest); every decode query attends the
  `retrieve` cold tokens whose blocks score highest for it (a prompt chunk's
  queries all attend the union of their picks, at most `retrieve` tokens per
  `block_tokens` queries: the most-picked blocks).
Nothing is evicted. `boundary` layers (default the first and the last) keep
their cold tier at `boundary_codec` precision, as public TurboQuant ports found
they need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .plan import LayerPlan, check_budget


@dataclass(frozen=True)
class TieredPolicy:
    name: str = "tiered"
    cache: ClassVar[str] = "tiered"  # the cache class that holds its sessions (memsvc.cache.factory)
    sink: int = 4
    hot: int = 256
    warm: int = 256
    retrieve: int = 2048
    block_tokens: int = 64
    key_codec: str = "kvq3_k"
    value_codec: str = "turbo3"
    boundary: tuple[int, ...] = (0, -1)
    boundary_key_codec: str = "k8v8_k"
    boundary_value_codec: str = "k8v8_v"
    v_skip: float = 1e-4
    exact_dtype: str | None = "float16"
    rest: str = "mean"  # blocks not retrieved: one mean pseudo-token each ("drop": ignore them, as Quest does)
    dense: tuple[int, ...] = ()  # layers that attend every cold block (no retrieval)
    union_floor: int = 4  # a prompt chunk attends at most retrieve * max(union_floor, ceil(n / block)) cold tokens
    near: int = 0  # past the model's window: tokens within `near` positions keep their distance (0: the window)
    far: int = 0  # ... and the others are attended at distance `far` (0: near - 1; "ordered": window - 1)
    far_layout: str = "shared"  # far cold blocks: "shared" positions 0..B-1, "point" (all at 0), "ordered"
    far_retrieve: int = 0  # far cold tokens a query retrieves at most (0: no separate budget)
    pre_rope_keys: bool = True  # cold keys stored before RoPE (rotated back by their positions)
    # settings that only change how attention reads the cache: a stored session follows the server's (stored_policy)
    # what sessions stored before a setting existed or changed its default were written with (stored_policy)
    STORED_BEFORE: ClassVar[dict] = {"key_codec": "k6v4_k", "pre_rope_keys": False}
    READ_SIDE: ClassVar[tuple[str, ...]] = ("retrieve", "v_skip", "rest", "dense", "union_floor", "near", "far",
                                               "far_layout", "far_retrieve")

    def __post_init__(self):
        check_budget("sink", self.sink, 0)
        check_budget("hot", self.hot)
        check_budget("warm", self.warm, 0)
        check_budget("block_tokens", self.block_tokens)
        check_budget("retrieve", self.retrieve, 0)
        check_budget("union_floor", self.union_floor)
        if self.retrieve and self.retrieve < self.block_tokens:
            raise ValueError(f"retrieve must be 0 or at least one block ({self.block_tokens}), got {self.retrieve}")
        from memsvc.kernels.registry import CODECS
        for c in (self.key_codec, self.value_codec, self.boundary_key_codec, self.boundary_value_codec):
            if c not in CODECS:
                raise ValueError(f"unknown codec {c!r}; valid codecs: {', '.join(sorted(CODECS))}")

    def plan(self, layer: int, n_layers: int) -> LayerPlan:
        edge = layer in {b % n_layers for b in self.boundary}
        return LayerPlan(
            sink=self.sink, hot=self.hot, block=self.block_tokens,
            cold_k=self.boundary_key_codec if edge else self.key_codec,
            cold_v=self.boundary_value_codec if edge else self.value_codec,
            retrieve=0 if layer in {b % n_layers for b in self.dense} else self.retrieve, rest=self.rest, keep=self.warm, keep_by="attention" if self.warm else "none", keep_bits=8,
            v_skip=self.v_skip, exact_dtype=self.exact_dtype, union_floor=self.union_floor, near=self.near,
            far=self.far, far_layout=self.far_layout, far_retrieve=self.far_retrieve,
            pre_rope_keys=self.pre_rope_keys,
        )


def tiered_v8(**overrides) -> TieredPolicy:
    """`tiered-v8`: hot and warm 128, cold values 8-bit, 3,072 retrieved tokens. In the peers run (issue 7) it
    kept every NIAH cell `full` answers (27 of 27, and 9 of 9 at held-out depths) where the defaults missed essay
    needles at 4k (26/27, 7/9), at fewer resident bytes. It keeps the cold keys it was measured with (6-bit
    per token, at their positions)."""
    return TieredPolicy(**{"name": "tiered-v8", "hot": 128, "warm": 128, "retrieve": 3072, "value_codec": "k8v8_v",
                           "key_codec": "k6v4_k", "pre_rope_keys": False, **overrides})  # the keys it was measured with


def tiered_k6(**overrides) -> TieredPolicy:
    """`tiered-k6`: tiered as it was before cold keys went below 6 bits: keys 6-bit per token, at their
    positions (6.6 bits per value where `tiered`'s take 4.0)."""
    return TieredPolicy(**{"name": "tiered-k6", "key_codec": "k6v4_k", "pre_rope_keys": False, **overrides})
