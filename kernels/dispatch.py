"""Which implementation of each kernel runs: the Triton twin or the pure-torch reference.

The kernels come in pairs with the same signature: `X.py` holds the pure-torch
reference (knows nothing of Triton), `X_triton.py` its Triton twin (imports the
reference for shared helpers, never the other way). The codecs (`*_codec.py`)
call the functions below, and only this module imports both sides.

`use_reference()` decides: the Triton path is the default on a CUDA device; the
reference runs without one, or when forced with `MEMSVC_KERNELS=reference`
(`MEMSVC_KERNELS=triton` forces Triton, e.g. on CPU under `TRITON_INTERPRET=1`).

The Triton modules are imported inside the functions, on first use: Triton
reads `TRITON_INTERPRET=1` when a module defining a kernel is imported, so a
test that sets it before its first call still gets the interpreter, and the
reference path never imports Triton at all.
"""
from __future__ import annotations

import os

import torch

from .attention import packed_attention_reference
from .lowrank import project_reference, reconstruct_reference
from .packing import pack_bits_reference, unpack_bits_reference
from .sparse_outliers import merge_outliers_reference, split_outliers_reference
from .turboquant import decode_mse_reference, encode_mse_reference
from .uniform import dequantize_reference, quantize_reference


def use_reference() -> bool:
    """True when the pure-torch reference path must be used instead of Triton.

    Set `MEMSVC_KERNELS=reference` to force it; without a CUDA device and
    without `MEMSVC_KERNELS=triton` the reference path is the only one that runs.
    """
    if os.environ.get("MEMSVC_KERNELS", "").lower() == "reference":
        return True
    if os.environ.get("MEMSVC_KERNELS", "").lower() == "triton":
        return False
    return not torch.cuda.is_available()


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., N] with values < 2**bits -> uint8 [..., ceil(N * bits / 8)] (packing.py's layout).

    bits in {1, 2, 3, 4, 6, 8}; ValueError on bad bits or out-of-range codes.
    """
    if use_reference():
        return pack_bits_reference(codes, bits)
    from .packing_triton import pack_bits_triton

    return pack_bits_triton(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: uint8 [..., ceil(n * bits / 8)] -> uint8 [..., n]."""
    if use_reference():
        return unpack_bits_reference(packed, bits, n)
    from .packing_triton import unpack_bits_triton

    return unpack_bits_triton(packed, bits, n)


def quantize(x: torch.Tensor, bits: int, group_size: int | None, axis: str):
    """x: [..., T, D] -> (codes uint8 [..., T, D], scale fp16, min fp16) (uniform.py)."""
    if use_reference():
        return quantize_reference(x, bits, group_size, axis)
    from .uniform_triton import quantize_triton

    return quantize_triton(x, bits, group_size, axis)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, group_size: int | None, axis: str,
               dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 [..., T, D], scale/min fp16 -> x_hat [..., T, D] of `dtype` (uniform.py)."""
    if use_reference():
        return dequantize_reference(codes, scale, mn, group_size, axis, dtype)
    from .uniform_triton import dequantize_triton

    return dequantize_triton(codes, scale, mn, group_size, axis, dtype)


def project(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """x [..., T, D], basis [..., D, r], mean [..., 1, D] or None -> latent [..., T, r] fp32 (lowrank.py)."""
    if use_reference():
        return project_reference(x, basis, mean)
    from .lowrank_triton import project_triton

    return project_triton(x, basis, mean)


def reconstruct(latent: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """latent [..., T, r], basis [..., D, r], mean [..., 1, D] or None -> x_hat [..., T, D] of dtype (lowrank.py)."""
    if use_reference():
        return reconstruct_reference(latent, basis, mean, dtype)
    from .lowrank_triton import reconstruct_triton

    return reconstruct_triton(latent, basis, mean, dtype)


def split_outliers(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D], index [k] flat positions -> (values [k], inliers like x) (sparse_outliers.py)."""
    if use_reference():
        return split_outliers_reference(x, index)
    from .sparse_outliers_triton import split_outliers_triton

    return split_outliers_triton(x, index)


def merge_outliers(dense: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """dense [..., T, D], index [k], values [k] -> dense with the values written back (sparse_outliers.py)."""
    if use_reference():
        return merge_outliers_reference(dense, index, values)
    from .sparse_outliers_triton import merge_outliers_triton

    return merge_outliers_triton(dense, index, values)


def encode_mse(x: torch.Tensor, bits: int, seed: int, layer: int, norm_correction: bool):
    """x: [..., H, T, D] (D_pad >= 8) -> (packed codes, fp16 scales): TurboQuant's Hadamard MSE code (turboquant.py)."""
    if use_reference():
        return encode_mse_reference(x, bits, seed, layer, norm_correction)
    from .turboquant_triton import encode_mse_triton

    return encode_mse_triton(x, bits, seed, layer, norm_correction)


def decode_mse(codes: torch.Tensor, scales: torch.Tensor, bits: int, seed: int, layer: int, shape,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `encode_mse` for a block of `shape` [..., H, T, D] -> [..., H, T, D] of dtype."""
    if use_reference():
        return decode_mse_reference(codes, scales, bits, seed, layer, shape, dtype)
    from .turboquant_triton import decode_mse_triton

    return decode_mse_triton(codes, scales, bits, seed, layer, shape, dtype)


def packed_attention(q, keys, values, *, key_codec, value_codec, scale=None, v_skip_threshold=0.0):
    """q: [H_q, D]; keys/values: blocks [H_kv, T_i, D] -> (out [H_q, D], stats) (attention.py)."""
    if use_reference():
        return packed_attention_reference(q, keys, values, key_codec=key_codec, value_codec=value_codec,
                                          scale=scale, v_skip_threshold=v_skip_threshold)
    from .attention_triton import packed_attention_triton

    return packed_attention_triton(q, keys, values, key_codec=key_codec, value_codec=value_codec,
                                   scale=scale, v_skip_threshold=v_skip_threshold)
