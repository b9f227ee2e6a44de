"""Dense-and-sparse outliers (KVQuant): the few largest entries kept exactly, the rest quantized.

`encode(x [..., T, D])` picks the `ceil(outlier_fraction * numel)` entries of
largest magnitude in the block, stores them exactly in a sparse list (values in
fp16 -- bf16/fp16 input is kept bit-exact -- and flat indices as uint16 when the
block has at most 65536 entries, int32 otherwise), zeroes them, and hands the
now narrower-ranged block to the `dense` codec (a codec object, typically a
uniform one from the registry: composed, not re-implemented; this module knows
no codec names). `decode` decodes the dense part and writes the outliers back
over it.

This module knows nothing of which tensor (keys or values) it holds; pick the
dense codec's axis accordingly (per-channel for keys, per-token for values).
Split and merge go through `dispatch` (Triton on CUDA, the torch reference of
`sparse_outliers.py` on CPU; bit-exact with each other).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .codec import Codec, Packed, nest_packed, unnest_packed
from .dispatch import merge_outliers, split_outliers
from .sparse_outliers import select_outliers

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_U16_MAX_ENTRIES = 1 << 16


@dataclass(frozen=True)
class SparseOutlierCodec:
    """dense: the codec object for everything else (e.g. `registry.get_codec("kivi4_k")`);
    outlier_fraction: share of a block's entries kept exactly (0 keeps none)."""

    dense: Codec
    outlier_fraction: float = 0.01
    name: str = "sparse_outliers"

    def __post_init__(self):
        if not 0.0 <= self.outlier_fraction < 1.0:
            raise ValueError(f"outlier_fraction must be in [0, 1), got {self.outlier_fraction!r}")
        if not all(hasattr(self.dense, a) for a in ("encode", "decode", "name")):
            raise ValueError(f"dense must be a codec object (such as registry.get_codec(name)), got {self.dense!r}")
        if isinstance(self.dense, SparseOutlierCodec):
            raise ValueError("the dense codec cannot be a sparse-outlier codec itself")

    def encode(self, x: torch.Tensor) -> Packed:
        """x: [..., T, D] -> Packed with the dense record under 'dense.' and the sparse list."""
        if x.dtype not in _FLOATS:
            raise ValueError(f"expected a float16/bfloat16/float32 block, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"expected a block [..., T, D], got shape {tuple(x.shape)}")
        n = x.numel()
        k = min(math.ceil(self.outlier_fraction * n), n)
        # idx: [k] flat positions of the largest |x|, sorted so the list is canonical
        idx = select_outliers(x, k)
        values, inliers = split_outliers(x, idx)
        dense_t, dense_m = nest_packed("dense", self.dense.encode(inliers))
        if n <= _U16_MAX_ENTRIES:
            # the Packed format has no uint16: store its bits as int16 (two's complement)
            index = torch.where(idx >= 1 << 15, idx - (1 << 16), idx).to(torch.int16)
        else:
            index = idx.to(torch.int32)
        tensors = {**dense_t, "outlier_index": index.contiguous(), "outlier_value": values.contiguous()}
        meta = {"dense": dense_m}
        return Packed(codec=self.name, shape=tuple(x.shape), dtype=x.dtype, tensors=tensors, meta=meta)

    def decode(self, p: Packed) -> torch.Tensor:
        """p -> x [p.shape]. p may be U records of one layout stacked on a first axis (`stack_packed`): shape
        [U, *block], the dense parts stacked and the sparse lists concatenated, each of a block's own flat
        positions."""
        inner = unnest_packed("dense", p, p.meta["dense"])
        per = max(math.prod(inner.shape), 1)  # entries of one record
        U = math.prod(p.shape) // per  # records stacked
        index = p.tensors["outlier_index"]
        if U > 1:
            inner = dataclasses.replace(inner, shape=(U, *inner.shape))
            flat = (index.to(torch.int64) & 0xFFFF) if index.dtype == torch.int16 else index.to(torch.int64)
            index = (flat.view(U, -1) + torch.arange(U, device=flat.device).unsqueeze(1) * per).flatten()
        dense = self.dense.decode(inner).to(p.dtype).reshape(p.shape)
        return merge_outliers(dense, index, p.tensors["outlier_value"])

    def nbytes(self, p: Packed) -> int:
        return p.nbytes()
