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

The data movement -- `split_outliers` (gather the outliers, zero them in the
dense copy) and `merge_outliers` (scatter them back on decode) -- dispatches on
`codec.use_reference()` between the pure-torch references here and the Triton
kernels in `sparse_outliers_triton.py` (imported lazily); both paths are bit-exact
with each other. The selection itself (`select_outliers`) is torch.topk on both
paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .codec import Packed, use_reference
from .lowrank import nest_packed, unnest_packed

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_U16_MAX_ENTRIES = 1 << 16


def outlier_value_dtype(dtype: torch.dtype) -> torch.dtype:
    """The stored dtype of the outlier values: bf16/fp16 as they are (bit-exact), anything else fp16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


# ---------------------------------------------------------------------------
# selection (torch), split and merge (torch reference, Triton kernel, dispatch)


def select_outliers(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., T, D] -> int64 [k]: flat positions of the k largest |x|, ascending (a canonical list).

    Stays torch.topk on both paths: a selection kernel (a k-th-largest threshold
    per block) is a later GPU optimization; the Triton path starts at the split.
    """
    return torch.topk(x.reshape(-1).float().abs(), k, sorted=False).indices.sort().values


def split_outliers_reference(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D] float, index [k] distinct flat positions -> (values [k], inliers like x).

    values: x at `index`, in `outlier_value_dtype(x.dtype)`; inliers: a copy of x
    with those entries set to +0.
    """
    flat = x.reshape(-1)
    values = flat[index].to(outlier_value_dtype(x.dtype))
    inliers = flat.clone()
    inliers[index] = 0
    return values, inliers.reshape(x.shape)


def merge_outliers_reference(dense: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """dense [..., T, D] in the output dtype, index [k] (int16 holding uint16 bits, or int32/int64),
    values [k] -> a copy of dense with the values (cast to its dtype) written at the flat positions."""
    x = dense.reshape(-1).clone()
    if index.dtype == torch.int16:
        index = index.to(torch.int64) & 0xFFFF
    x[index.long()] = values.to(dense.dtype)
    return x.reshape(dense.shape)


def split_outliers_triton(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and bit-exact result as `split_outliers_reference`, by a Triton kernel."""
    from .sparse_outliers_triton import split_outliers_triton as impl

    return impl(x, index)


def merge_outliers_triton(dense: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Same contract and bit-exact result as `merge_outliers_reference`, by a Triton kernel."""
    from .sparse_outliers_triton import merge_outliers_triton as impl

    return impl(dense, index, values)


def split_outliers(x, index):
    if use_reference():
        return split_outliers_reference(x, index)
    return split_outliers_triton(x, index)


def merge_outliers(dense, index, values):
    if use_reference():
        return merge_outliers_reference(dense, index, values)
    return merge_outliers_triton(dense, index, values)


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
        n = x.numel()
        k = min(math.ceil(self.outlier_fraction * n), n)
        # idx: [k] flat positions of the largest |x|, sorted so the list is canonical
        idx = select_outliers(x, k)
        values, inliers = split_outliers(x, idx)
        dense_t, dense_m = nest_packed("dense", _codec(self.dense).encode(inliers))
        if n <= _U16_MAX_ENTRIES:
            # the Packed format has no uint16: store its bits as int16 (two's complement)
            index = torch.where(idx >= 1 << 15, idx - (1 << 16), idx).to(torch.int16)
        else:
            index = idx.to(torch.int32)
        tensors = {**dense_t, "outlier_index": index.contiguous(), "outlier_value": values.contiguous()}
        meta = {"dense": dense_m}
        return Packed(codec=self.name, shape=tuple(x.shape), dtype=x.dtype, tensors=tensors, meta=meta)

    def decode(self, p: Packed) -> torch.Tensor:
        inner = unnest_packed("dense", p, p.meta["dense"])
        dense = _codec(inner.codec).decode(inner).to(p.dtype).reshape(p.shape)
        return merge_outliers(dense, p.tensors["outlier_index"], p.tensors["outlier_value"])

    def nbytes(self, p: Packed) -> int:
        return p.nbytes()
