"""Triton kernels for TurboQuant's Hadamard MSE path (no QJL, no outliers).

Same contract and the same operation order as the torch reference in
turboquant.py / rotation.py, so packed codes are bit-identical:
  encode: load x (zero-pad D to D_pad) · signs -> butterfly stages h = 1, 2, 4, ...
          (a+b, a-b) -> · 1/sqrt(D_pad) -> n = ||y||, u = y · (1/n) ->
          code = #{boundaries < u} (by symmetry, as bucketize_codes) -> (norm-corrected) fp16 scale, codes packed
          little-endian in cells exactly as packing.py lays them out;
  decode: unpack -> centroid lookup -> · scale -> butterfly -> · 1/sqrt(D_pad)
          -> · signs -> crop to D.
One program handles BLOCK_T vectors of one head. The norm is a tree sum here
and a vectorized sum in torch: they can differ in the last bit, which moves a
code only for a coordinate within an ulp of a boundary.

Imported lazily by `dispatch.py`: TRITON_INTERPRET=1 must be set before the
first import for the kernels to run on CPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import lloyd_max
from .packing import cell
from .rotation import hadamard_signs, next_pow2

BLOCK_T = 16


@triton.jit
def _butterfly(y, BT: tl.constexpr, DP: tl.constexpr, LOG: tl.constexpr):
    # y: [BT, DP] -> unnormalized Walsh–Hadamard transform of each row, reference stage order
    for s in tl.static_range(LOG):
        h: tl.constexpr = 1 << s
        v = tl.reshape(y, (BT, DP // (2 * h), 2, h))
        v = tl.permute(v, (0, 1, 3, 2))  # [BT, DP/2h, h, 2]
        a, b = tl.split(v)
        v = tl.join(a + b, a - b)  # [BT, DP/2h, h, 2]
        v = tl.permute(v, (0, 1, 3, 2))
        y = tl.reshape(v, (BT, DP))
    return y


@triton.jit
def _encode_kernel(
    x_ptr, signs_ptr, pos_ptr, cent_ptr, codes_ptr, scales_ptr,
    T, H, inv_sqrt,
    D: tl.constexpr, DP: tl.constexpr, LOG: tl.constexpr, NPOS: tl.constexpr, HALF: tl.constexpr,
    BITS: tl.constexpr, G: tl.constexpr, NB: tl.constexpr, NORM_CORR: tl.constexpr,
    BT: tl.constexpr,
):
    # x: [BH, T, D] -> codes: [BH, T, DP*BITS/8] uint8, scales: [BH, T] fp16
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    head = bh % H
    rows = pid_t * BT + tl.arange(0, BT)
    cols = tl.arange(0, DP)
    rmask = rows < T
    x = tl.load(x_ptr + (bh * T + rows[:, None]) * D + cols[None, :], mask=rmask[:, None] & (cols[None, :] < D), other=0.0)
    s = tl.load(signs_ptr + head * DP + cols)
    y = _butterfly(x.to(tl.float32) * s[None, :], BT, DP, LOG) * inv_sqrt
    norm = tl.sqrt(tl.sum(y * y, axis=1))  # [BT]
    inv = tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 0.0)
    u = y * inv[:, None]
    # bucketize by symmetry, as turboquant.bucketize_codes: m = #{positive boundaries < |u|}
    a = tl.abs(u)
    m = tl.zeros((BT, DP), dtype=tl.int32)
    for i in tl.static_range(NPOS):
        m += (a > tl.load(pos_ptr + i)).to(tl.int32)
    code = tl.where(u > 0, HALF + m, HALF - 1 - m)
    if NORM_CORR:
        c = tl.load(cent_ptr + code)
        cn = tl.sqrt(tl.sum(c * c, axis=1))
        scale = norm / cn
    else:
        scale = norm
    tl.store(scales_ptr + bh * T + rows, scale.to(tl.float16), mask=rmask)
    # pack: cells of G codes -> NB bytes, little-endian
    cells = tl.reshape(code, (BT, DP // G, G))
    lanes = tl.arange(0, G)
    word = tl.sum(cells << (lanes * BITS)[None, None, :], axis=2)  # [BT, DP/G]
    cidx = tl.arange(0, DP // G)
    row_bytes: tl.constexpr = DP * BITS // 8
    base = codes_ptr + (bh * T + rows[:, None]) * row_bytes + cidx[None, :] * NB
    for j in tl.static_range(NB):
        tl.store(base + j, ((word >> (8 * j)) & 0xFF).to(tl.uint8), mask=rmask[:, None])


@triton.jit
def _decode_kernel(
    codes_ptr, scales_ptr, signs_ptr, cent_ptr, out_ptr,
    T, H, inv_sqrt,
    D: tl.constexpr, DP: tl.constexpr, LOG: tl.constexpr,
    BITS: tl.constexpr, G: tl.constexpr, NB: tl.constexpr, BT: tl.constexpr,
):
    # codes: [BH, T, DP*BITS/8] uint8, scales: [BH, T] fp16 -> out: [BH, T, D] float32
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    head = bh % H
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < T
    cidx = tl.arange(0, DP // G)
    row_bytes: tl.constexpr = DP * BITS // 8
    base = codes_ptr + (bh * T + rows[:, None]) * row_bytes + cidx[None, :] * NB
    word = tl.zeros((BT, DP // G), dtype=tl.int32)
    for j in tl.static_range(NB):
        byte = tl.load(base + j, mask=rmask[:, None], other=0).to(tl.int32)
        word = word | (byte << (8 * j))
    lanes = tl.arange(0, G)
    code = (word[:, :, None] >> (lanes * BITS)[None, None, :]) & ((1 << BITS) - 1)
    code = tl.reshape(code, (BT, DP))
    scale = tl.load(scales_ptr + bh * T + rows, mask=rmask, other=0.0).to(tl.float32)
    y = tl.load(cent_ptr + code) * scale[:, None]
    cols = tl.arange(0, DP)
    s = tl.load(signs_ptr + head * DP + cols)
    x = _butterfly(y, BT, DP, LOG) * inv_sqrt * s[None, :]
    tl.store(out_ptr + (bh * T + rows[:, None]) * D + cols[None, :], x, mask=rmask[:, None] & (cols[None, :] < D))


def _geometry(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    # [..., H, T, D] (2-D: one head) -> (BH, H, T, D)
    d, t = shape[-1], shape[-2]
    h = shape[-3] if len(shape) >= 3 else 1
    bh = math.prod(shape[:-2]) if len(shape) > 2 else 1
    return bh, h, t, d


def encode_mse_triton(x: torch.Tensor, bits: int, seed: int, layer: int, norm_correction: bool):
    """x: [..., H, T, D] -> (packed codes uint8 [..., H, T, D_pad*bits/8], scales fp16 [..., H, T])."""
    bh, h, t, d = _geometry(tuple(x.shape))
    dp = next_pow2(d)
    g, nb = cell(bits)
    dev = x.device
    signs = hadamard_signs(dp, seed, layer, h).to(dev)
    half = 1 << (bits - 1)
    pos = lloyd_max.boundaries(bits, dp)[half:].contiguous().to(dev)  # positive boundaries
    cent = lloyd_max.centroids(bits, dp).to(dev)
    xc = x.contiguous()
    codes = torch.empty(*x.shape[:-1], dp * bits // 8, dtype=torch.uint8, device=dev)
    scales = torch.empty(x.shape[:-1], dtype=torch.float16, device=dev)
    if bh and t:
        grid = (triton.cdiv(t, BLOCK_T), bh)
        _encode_kernel[grid](
            xc, signs, pos, cent, codes, scales, t, h, 1.0 / math.sqrt(dp),
            D=d, DP=dp, LOG=dp.bit_length() - 1, NPOS=half - 1, HALF=half,
            BITS=bits, G=g, NB=nb, NORM_CORR=bool(norm_correction), BT=BLOCK_T,
        )
    return codes, scales


def decode_mse_triton(codes: torch.Tensor, scales: torch.Tensor, bits: int, seed: int, layer: int, shape,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed codes, fp16 scales) of a block of `shape` [..., H, T, D] -> [..., H, T, D] of dtype (computed in float32)."""
    shape = tuple(shape)
    bh, h, t, d = _geometry(shape)
    dp = next_pow2(d)
    g, nb = cell(bits)
    dev = codes.device
    signs = hadamard_signs(dp, seed, layer, h).to(dev)
    cent = lloyd_max.centroids(bits, dp).to(dev)
    out = torch.empty(shape, dtype=torch.float32, device=dev)
    if bh and t:
        grid = (triton.cdiv(t, BLOCK_T), bh)
        _decode_kernel[grid](
            codes.contiguous(), scales.contiguous(), signs, cent, out, t, h, 1.0 / math.sqrt(dp),
            D=d, DP=dp, LOG=dp.bit_length() - 1, BITS=bits, G=g, NB=nb, BT=BLOCK_T,
        )
    return out.to(dtype)
