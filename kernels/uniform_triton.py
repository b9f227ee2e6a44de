"""Triton kernels for uniform asymmetric quantization: same contract as the references in `uniform.py`.

Both axes are one strided layout `[O, C, K]`, reduced over K (a group):
- axis="token":   x [B, T, G*g] viewed as [O=B*T, C=G, K=g], strides (G*g, g, 1);
- axis="channel": x [B, G*g, D] viewed as [O=B*G, C=D, K=g], strides (g*D, 1, D).
Scales and minima come out as [O, C] (= [B, T, G] or [B, G, D]), codes in x's
(padded) layout. Each program owns BLOCK_C groups of one row o. The wrappers do
the same edge padding as the reference and drop it again, and follow its
operation order, so codes agree bit for bit. Codes come out unpacked; the codec
packs them with `packing.pack_bits` (a fused quantize-and-pack kernel for the
GPU is a later optimization).

Imported lazily by `dispatch.py`: `TRITON_INTERPRET=1` must be set before this
module is first imported for the kernels to run on CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .uniform import AXES, FP16_MAX, _grouped, _ungroup, check_config


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scale_ptr, min_ptr, C, K, s_o, s_c, s_k,
                     QMAX: tl.constexpr, FMAX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    o = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    ok = (cs[:, None] < C) & (ks[None, :] < K)
    offs = o * s_o + cs[:, None] * s_c + ks[None, :] * s_k
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # [BLOCK_C, BLOCK_K]
    cok = cs < C
    mn = tl.where(cok, tl.min(tl.where(ok, x, float("inf")), axis=1), 0.0)  # 0 in lanes past C: no inf/nan
    mx = tl.where(cok, tl.max(tl.where(ok, x, float("-inf")), axis=1), 0.0)
    # div_rn: IEEE division as in torch (a bare `/` may be approximate on the GPU)
    scale16 = tl.minimum(tl.math.div_rn(mx - mn, QMAX), FMAX).to(tl.float16)
    min16 = tl.minimum(tl.maximum(mn, -FMAX), FMAX).to(tl.float16)
    s = scale16.to(tl.float32)
    m = min16.to(tl.float32)
    inv = tl.where(s > 0, tl.math.div_rn(tl.zeros_like(s) + 1.0, tl.where(s > 0, s, 1.0)), 0.0)
    off = m - s * 0.5
    q = (x - off[:, None]) * inv[:, None]
    q = tl.minimum(tl.maximum(q, 0.0), QMAX)
    tl.store(codes_ptr + offs, q.to(tl.int16).to(tl.uint8), mask=ok)
    tl.store(scale_ptr + o * C + cs, scale16, mask=cok)
    tl.store(min_ptr + o * C + cs, min16, mask=cok)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, min_ptr, out_ptr, C, K, s_o, s_c, s_k,
                       BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    o = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ks = tl.arange(0, BLOCK_K)
    ok = (cs[:, None] < C) & (ks[None, :] < K)
    offs = o * s_o + cs[:, None] * s_c + ks[None, :] * s_k
    c = tl.load(codes_ptr + offs, mask=ok, other=0).to(tl.float32)
    s = tl.load(scale_ptr + o * C + cs, mask=cs < C, other=0.0).to(tl.float32)
    m = tl.load(min_ptr + o * C + cs, mask=cs < C, other=0.0).to(tl.float32)
    y = c * s[:, None] + m[:, None]
    tl.store(out_ptr + offs, y, mask=ok)


def _layout(t: torch.Tensor, axis: str):
    # t: grouped contiguous [B, T, G, g] (token) or [B, G, g, D] (channel) -> (O, C, K, strides)
    if axis == "token":
        B, T, G, g = t.shape
        return B * T, G, g, (G * g, g, 1)
    B, G, g, D = t.shape
    return B * G, D, g, (g * D, 1, D)


def _launch_shape(C: int, K: int):
    block_k = triton.next_power_of_2(K)
    block_c = max(1, min(triton.next_power_of_2(C), 4096 // block_k))
    return block_c, block_k


def quantize_triton(x: torch.Tensor, bits: int, group_size: int | None, axis: str):
    """x: [..., T, D] float -> (codes uint8 [..., T, D], scale fp16, min fp16), as `quantize_reference`."""
    check_config(bits, group_size, axis)
    *lead, T, D = x.shape
    # fp16/fp32 go in as they are (exact in fp32 inside); others (bf16) through an exact fp32 copy
    src = x if x.dtype in (torch.float16, torch.float32) else x.float()
    xg, _ = _grouped(src.reshape(-1, T, D), group_size, axis)
    xg = xg.contiguous()
    O, C, K, (s_o, s_c, s_k) = _layout(xg, axis)
    codes = torch.empty(xg.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty((O, C), dtype=torch.float16, device=x.device)
    mn = torch.empty((O, C), dtype=torch.float16, device=x.device)
    block_c, block_k = _launch_shape(C, K)
    if xg.numel():
        _quantize_kernel[(O, triton.cdiv(C, block_c))](
            xg, codes, scale, mn, C, K, s_o, s_c, s_k,
            QMAX=float((1 << bits) - 1), FMAX=FP16_MAX, BLOCK_C=block_c, BLOCK_K=block_k,
        )
    B = xg.shape[0]
    codes = _ungroup(codes, T, D, axis).contiguous().reshape(*lead, T, D)
    sshape = (*lead, T, C) if axis == "token" else (*lead, O // B, C)
    return codes, scale.reshape(sshape), mn.reshape(sshape)


def dequantize_triton(codes, scale, mn, group_size, axis, dtype):
    """codes uint8 [..., T, D], scale/min fp16 -> x_hat [..., T, D] of `dtype`, as `dequantize_reference`."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    *lead, T, D = codes.shape
    cg, _ = _grouped(codes.reshape(-1, T, D), group_size, axis, pad_zero=True)
    cg = cg.contiguous()
    O, C, K, (s_o, s_c, s_k) = _layout(cg, axis)
    out_dtype = dtype if dtype in (torch.float16, torch.float32) else torch.float32
    out = torch.empty(cg.shape, dtype=out_dtype, device=codes.device)
    block_c, block_k = _launch_shape(C, K)
    if cg.numel():
        _dequantize_kernel[(O, triton.cdiv(C, block_c))](
            cg, scale.contiguous(), mn.contiguous(), out, C, K, s_o, s_c, s_k, BLOCK_C=block_c, BLOCK_K=block_k,
        )
    out = _ungroup(out, T, D, axis).to(dtype).contiguous()
    return out.reshape(*lead, T, D)
