"""Triton kernels for the dense-and-sparse codec: same contract as the references in `sparse_outliers.py`.

- `split_outliers_triton(x, index)`: given the flat positions of the outliers
  (chosen by the torch selection `select_outliers`), gather their values and
  zero them in a dense copy of the block -> (values, inliers);
- `merge_outliers_triton(dense, index, values)`: scatter the stored values back
  over a decoded dense block.

Pure data movement, so the results are bit-exact with the references: half
precision (fp16/bf16) entries move as raw 16-bit words, and the only conversions
are fp32 -> fp16 (split, round to nearest even as `Tensor.to`) and fp16 -> fp32
(merge, exact). One program handles BLOCK outliers.

Imported lazily by `dispatch.py`: `TRITON_INTERPRET=1` must be set before
this module is first imported for the kernels to run on CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_outliers import outlier_value_dtype

BLOCK = 256  # outliers per program

_HALVES = (torch.float16, torch.bfloat16)


@triton.jit
def _split_kernel(x_ptr, idx_ptr, val_ptr, inl_ptr, K, BLOCK: tl.constexpr):
    # x, inl: flat [N] (inl a copy of x); idx: [K] flat positions; val: [K]
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    i = tl.load(idx_ptr + offs, mask=ok, other=0).to(tl.int64)
    v = tl.load(x_ptr + i, mask=ok, other=0)
    tl.store(val_ptr + offs, v.to(val_ptr.dtype.element_ty), mask=ok)
    tl.store(inl_ptr + i, tl.zeros_like(v), mask=ok)  # all-zero bits: +0.0, as `inliers[idx] = 0`


@triton.jit
def _merge_kernel(out_ptr, idx_ptr, val_ptr, K, IDX_U16: tl.constexpr, BLOCK: tl.constexpr):
    # out: flat [N] (a copy of the decoded dense block); idx, val: [K]
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    i = tl.load(idx_ptr + offs, mask=ok, other=0).to(tl.int64)
    if IDX_U16:
        i = i & 0xFFFF  # uint16 positions stored in int16 (two's complement)
    v = tl.load(val_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=ok)


def _bits(t: torch.Tensor) -> torch.Tensor:
    # half-precision floats move as raw int16 words (bit-exact, no float path in between)
    return t.view(torch.int16) if t.dtype in _HALVES else t


def split_outliers_triton(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D] float, index [k] flat positions (distinct) -> (values [k], inliers like x),
    bit-exact with `split_outliers_reference`."""
    val_dtype = outlier_value_dtype(x.dtype)
    src = x.contiguous().reshape(-1)
    inliers = src.clone()
    k = index.numel()
    values = torch.empty(k, dtype=val_dtype, device=x.device)
    if k:
        if x.dtype == val_dtype:
            xs, vs, ins = _bits(src), _bits(values), _bits(inliers)
        else:  # fp32 in, fp16 values: the kernel converts
            xs, vs, ins = src, values, inliers
        _split_kernel[(triton.cdiv(k, BLOCK),)](xs, index.contiguous(), vs, ins, k, BLOCK=BLOCK)
    return values, inliers.reshape(x.shape)


def merge_outliers_triton(dense: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """dense [..., T, D] (the output dtype), index [k] (int16 holding uint16, or int32/int64), values [k]
    -> dense with the values written at the flat positions, bit-exact with `merge_outliers_reference`."""
    out = dense.contiguous().reshape(-1).clone()
    k = index.numel()
    if k:
        if values.dtype == out.dtype:
            vs, os_ = _bits(values.contiguous()), _bits(out)
        elif values.dtype == torch.float16 and out.dtype == torch.float32:  # exact widening in the kernel
            vs, os_ = values.contiguous(), out
        else:  # any other pair: the same `Tensor.to` as the reference, then move bits
            vs, os_ = _bits(values.to(out.dtype).contiguous()), _bits(out)
        _merge_kernel[(triton.cdiv(k, BLOCK),)](os_, index.contiguous(), vs, k,
                                                IDX_U16=index.dtype == torch.int16, BLOCK=BLOCK)
    return out.reshape(dense.shape)
