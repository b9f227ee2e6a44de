"""Uniform asymmetric (min/max) quantization of KV blocks: KIVI, K8V8, K6V4.

`UniformCodec(bits, group_size, axis)` quantizes `x: [..., T, D]` in groups:

- axis="token":   groups of `group_size` consecutive channels of one token
                  (per-token, as KIVI values, K8V8, K6V4); scales `[..., T, ceil(D / g)]`;
- axis="channel": groups of `group_size` consecutive tokens of one channel
                  (per-channel, as KIVI keys); scales `[..., ceil(T / g), D]`.

`group_size=None` means one group spanning the whole axis (plain per-token /
per-channel). A group size larger than the axis is clipped to it. When the
axis length is not a multiple of the group size the last group is *smaller*:
the implementation pads the axis by repeating its last element (which leaves
the last group's min and max unchanged) and drops the padded codes again, so
nothing padded is ever stored.

Per group it stores the minimum and the scale `(max - min) / (2**bits - 1)`,
both fp16, and codes `round((x - min) / scale)` (half rounds up) as uint8,
bit-packed with `packing.pack_bits` into one stream per block. Encoding uses
the fp16-rounded min and scale, so decode (`min + code * scale`, in fp32, cast
to the input dtype) sees exactly what encode assumed. A constant group stores
scale 0 and decodes exactly to its (fp16) value. Values beyond the fp16 range
(only possible for fp32/bf16 input) are clipped to it.

Registered names (`registry.CODECS`, one line each; keyword config overrides them):

| name              | bits | group | axis    | as in                      |
|-------------------|------|-------|---------|----------------------------|
| uniform           | 8    | whole | token   | generic: takes any config  |
| kivi2_k / kivi2_v | 2    | 32    | channel / token | KIVI-2 keys / values |
| kivi4_k / kivi4_v | 4    | 32    | channel / token | KIVI-4 keys / values |
| k8v8_k / k8v8_v   | 8    | whole | token   | K8V8                       |
| k6v4_k / k6v4_v   | 6 / 4| whole | token   | K6V4 (keys 6, values 4)    |

KIVI's full-precision residual window of recent tokens is a tier policy, not
part of this codec. Nothing here knows about sessions, tiers or storage.

This module is the pure-torch reference of the math (`quantize_reference`,
`dequantize_reference`: the fast CPU path); `uniform_triton.py` is its Triton
twin (same signatures, same codes), `dispatch.quantize` / `dispatch.dequantize`
pick one, and `uniform_codec.UniformCodec` is the codec built on them.
"""
from __future__ import annotations

import torch

from .packing import SUPPORTED_BITS

AXES = ("token", "channel")
FP16_MAX = 65504.0


def check_config(bits: int, group_size: int | None, axis: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int or None (whole axis), got {group_size!r}")
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def group_layout(T: int, D: int, group_size: int | None, axis: str) -> tuple[int, int, int]:
    """(group length g, number of groups G, padded axis length G * g) along the grouped axis."""
    n = D if axis == "token" else T
    g = n if group_size is None else min(group_size, n)
    g = max(g, 1)
    G = -(-n // g)
    return g, G, G * g


def _edge_pad(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    # repeat the last element along `dim` up to `length` (min/max of the last group unchanged)
    n = t.shape[dim]
    if n == length:
        return t
    idx = torch.arange(length, device=t.device).clamp_(max=n - 1)
    return t.index_select(dim, idx)


def _grouped(t: torch.Tensor, group_size: int | None, axis: str, pad_zero: bool = False) -> tuple[torch.Tensor, int]:
    """t: [B, T, D] -> (grouped view, reduction dim).

    token:   [B, T, G, g]  (reduce dim 3)
    channel: [B, G, g, D]  (reduce dim 2)
    """
    B, T, D = t.shape
    g, G, padded = group_layout(T, D, group_size, axis)
    if axis == "token":
        if padded != D:
            t = torch.nn.functional.pad(t, (0, padded - D)) if pad_zero else _edge_pad(t, 2, padded)
        return t.reshape(B, T, G, g), 3
    if padded != T:
        t = torch.nn.functional.pad(t, (0, 0, 0, padded - T)) if pad_zero else _edge_pad(t, 1, padded)
    return t.reshape(B, G, g, D), 2


def _ungroup(t: torch.Tensor, T: int, D: int, axis: str) -> torch.Tensor:
    # inverse of _grouped: [B, T, G, g] or [B, G, g, D] -> [B, T, D], padding dropped
    B = t.shape[0]
    if axis == "token":
        t = t.reshape(B, T, -1)
        return t if t.shape[2] == D else t[:, :, :D]
    t = t.reshape(B, -1, D)
    return t if t.shape[1] == T else t[:, :T]


def quantize_reference(x: torch.Tensor, bits: int, group_size: int | None, axis: str):
    """x: [..., T, D] float -> (codes uint8 [..., T, D], scale fp16, min fp16).

    scale/min: [..., T, G] (axis="token") or [..., G, D] (axis="channel").
    Operation order (the Triton kernel follows it, so codes agree bit for bit):
    fp32 min/max -> fp16 scale and min -> off = min - scale/2, inv = 1/scale
    (0 for a constant group) -> q = (x - off) * inv -> clamp to [0, qmax] -> truncate.
    """
    check_config(bits, group_size, axis)
    *lead, T, D = x.shape
    qmax = (1 << bits) - 1
    # everything in fp32: torch's CPU reductions over fp16/bf16 are not vectorized
    xg, red = _grouped(x.reshape(-1, T, D).float(), group_size, axis)
    # separate amin/amax: torch's fused aminmax is not vectorized on CPU (~10x slower)
    mn = torch.amin(xg, dim=red, keepdim=True).float()
    mx = torch.amax(xg, dim=red, keepdim=True).float()
    scale16 = mx.sub_(mn).div_(qmax).clamp_(max=FP16_MAX).to(torch.float16)
    min16 = mn.clamp_(-FP16_MAX, FP16_MAX).to(torch.float16)
    s, m = scale16.float(), min16.float()
    inv = torch.where(s > 0, s.reciprocal(), 0.0)
    off = m.sub_(s * 0.5)
    q = xg.sub_(off) if xg.data_ptr() != x.data_ptr() else xg - off  # fp32 [B, T, G, g] or [B, G, g, D]
    q.mul_(inv).clamp_(0.0, float(qmax))
    # truncate (q >= 0, so this rounds half up); through int16: fp32 -> uint8 is a slow cast on CPU
    codes = _ungroup(q.to(torch.int16).to(torch.uint8), T, D, axis).reshape(*lead, T, D)
    sq = scale16.squeeze(red)
    return codes, sq.reshape(*lead, *sq.shape[1:]), min16.squeeze(red).reshape(*lead, *sq.shape[1:])


def dequantize_reference(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, group_size: int | None, axis: str, dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 [..., T, D], scale/min fp16 as from quantize -> x_hat [..., T, D] of `dtype`.

    x_hat = min + code * scale in fp32, cast once to `dtype`.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    *lead, T, D = codes.shape
    cg, red = _grouped(codes.reshape(-1, T, D), group_size, axis, pad_zero=True)
    s = scale.reshape(cg.shape[0], *scale.shape[-2:]).float().unsqueeze(red)
    m = mn.reshape(cg.shape[0], *mn.shape[-2:]).float().unsqueeze(red)
    # same-dtype in-place steps: torch's mixed-dtype kernels (addcmul uint8*fp32 -> fp16) are ~10x slower on CPU
    out = torch.empty(cg.shape, dtype=torch.float32, device=codes.device)
    out.copy_(cg).mul_(s).add_(m)
    out = _ungroup(out.to(dtype), T, D, axis)
    return out.reshape(*lead, T, D) if out.is_contiguous() else out.contiguous().reshape(*lead, T, D)
