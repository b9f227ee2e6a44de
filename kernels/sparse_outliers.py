"""Dense-and-sparse outliers (KVQuant): the few largest entries kept exactly, the rest quantized.

`encode(x [..., T, D])` picks the `ceil(outlier_fraction * numel)` entries of
largest magnitude in the block, stores them exactly in a sparse list (values in
fp16 -- bf16/fp16 input is kept bit-exact -- and flat indices as uint16 when the
block has at most 65536 entries, int32 otherwise), zeroes them, and hands the
now narrower-ranged block to a dense codec named by `dense` (a registered
uniform codec: composed, not re-implemented). `decode` decodes the dense part and
writes the outliers back over it.

This module knows nothing of which tensor (keys or values) it holds; pick the
dense codec's axis accordingly (per-channel for keys, per-token for values).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .codec import Packed
from .lowrank import nest_packed, unnest_packed

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_U16_MAX_ENTRIES = 1 << 16


def _codec(name: str):
    from .registry import get_codec  # late: the registry imports this module

    return get_codec(name)


@dataclass(frozen=True)
class SparseOutlierCodec:
    """outlier_fraction: share of a block's entries kept exactly (0 keeps none);
    dense: registry name of the codec for everything else."""

    outlier_fraction: float = 0.01
    dense: str = "kivi4_k"
    name: str = "sparse_outliers"

    def __post_init__(self):
        if not 0.0 <= self.outlier_fraction < 1.0:
            raise ValueError(f"outlier_fraction must be in [0, 1), got {self.outlier_fraction!r}")
        if self.dense == self.name:
            raise ValueError("the dense codec cannot be the sparse-outlier codec itself")
        _codec(self.dense)  # unknown name -> ValueError listing valid ones

    def encode(self, x: torch.Tensor) -> Packed:
        """x: [..., T, D] -> Packed with the dense record under 'dense.' and the sparse list."""
        if x.dtype not in _FLOATS:
            raise ValueError(f"expected a float16/bfloat16/float32 block, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"expected a block [..., T, D], got shape {tuple(x.shape)}")
        flat = x.reshape(-1)
        k = min(math.ceil(self.outlier_fraction * flat.numel()), flat.numel())
        # idx: [k] flat positions of the largest |x|, sorted so the list is canonical
        idx = torch.topk(flat.float().abs(), k, sorted=False).indices.sort().values
        val_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16
        values = flat[idx].to(val_dtype)
        inliers = flat.clone()
        inliers[idx] = 0
        dense_t, dense_m = nest_packed("dense", _codec(self.dense).encode(inliers.reshape(x.shape)))
        if flat.numel() <= _U16_MAX_ENTRIES:
            # the Packed format has no uint16: store its bits as int16 (two's complement)
            index = torch.where(idx >= 1 << 15, idx - (1 << 16), idx).to(torch.int16)
        else:
            index = idx.to(torch.int32)
        tensors = {**dense_t, "outlier_index": index.contiguous(), "outlier_value": values.contiguous()}
        meta = {"dense": dense_m}
        return Packed(codec=self.name, shape=tuple(x.shape), dtype=x.dtype, tensors=tensors, meta=meta)

    def decode(self, p: Packed) -> torch.Tensor:
        inner = unnest_packed("dense", p, p.meta["dense"])
        x = _codec(inner.codec).decode(inner).to(p.dtype).reshape(-1).clone()
        index = p.tensors["outlier_index"]
        if index.dtype == torch.int16:
            index = index.to(torch.int64) & 0xFFFF
        x[index.long()] = p.tensors["outlier_value"].to(p.dtype)
        return x.reshape(p.shape)

    def nbytes(self, p: Packed) -> int:
        return p.nbytes()
