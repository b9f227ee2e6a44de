"""Dense-and-sparse outliers (KVQuant): the data movement of the sparse part, pure torch.

`select_outliers` picks the flat positions of a block's largest |x| (torch.topk
on every path), `split_outliers_reference` gathers their values and zeroes them
in a dense copy, `merge_outliers_reference` writes them back over a decoded
dense block. This module is the reference; `sparse_outliers_triton.py` is its
Triton twin (same signatures, bit-exact with it), `dispatch.split_outliers` /
`dispatch.merge_outliers` pick one, and `sparse_outliers_codec.SparseOutlierCodec`
is the codec built on them.
"""
from __future__ import annotations

import torch


def outlier_value_dtype(dtype: torch.dtype) -> torch.dtype:
    """The stored dtype of the outlier values: bf16/fp16 as they are (bit-exact), anything else fp16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


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
