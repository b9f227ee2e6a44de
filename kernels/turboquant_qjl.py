"""TurboQuant's QJL residual (`qjl=True`, keys): a 1-bit sketch of what the MSE code misses.

With the MSE code at bits−1, the residual r = y − scale·c[code] (rotated domain)
gets a 1-bit sketch sign(S_h r) (S_h: the seeded Gaussian D_pad × D_pad matrix of
rotation.gaussian_sketch, one per head) plus its fp16 norm. Then

  ⟨q, k⟩ ≈ ⟨R q, scale·c⟩ + ||r||·sqrt(π/2)/D_pad·⟨S R q, sign(S r)⟩

is unbiased (`inner_term` is the second summand), and `residual` the matching
reconstruction term of the decode. Shapes: a block [..., H, T, D_pad] (a 2-D
[T, D_pad] block is one head). Knows nothing of records beyond the tensor names
`qjl` and `rnorms`.
"""
from __future__ import annotations

import math

import torch

from . import lloyd_max
from .dispatch import pack_bits, unpack_bits
from .rotation import gaussian_sketch


def encode_residual(y: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int, seed: int, layer: int):
    """y: rotated float32 [..., H, T, Dp], codes uint8 [..., H, T, Dp] of the `bits`-bit MSE code, scales fp16
    [..., H, T] -> (packed signs uint8 [..., H, T, Dp/8], residual norms fp16 [..., H, T])."""
    dp = y.shape[-1]
    cent = lloyd_max.centroids(bits, dp)
    r = y - scales.float().unsqueeze(-1) * cent[codes.long()]  # residual, rotated domain
    s = gaussian_sketch(dp, dp, seed, layer, y.shape[-3] if y.dim() >= 3 else 1)
    s = s if y.dim() >= 3 else s[0]
    sr = torch.matmul(r, s.transpose(-1, -2)) if y.dim() >= 3 else r @ s.T  # [..., H, T, m]
    return pack_bits((sr >= 0).to(torch.uint8), 1), torch.linalg.vector_norm(r, dim=-1).to(torch.float16)


def _signs(tensors: dict, prefix: str, lead: tuple, dp: int) -> torch.Tensor:
    # -> [..., H, T, m] float32, ±1
    z = unpack_bits(tensors[prefix + "qjl"], 1, dp).reshape(*lead, dp)
    return z.to(torch.float32) * 2 - 1


def residual(tensors: dict, prefix: str, lead: tuple, dp: int, seed: int, layer: int) -> torch.Tensor:
    """The QJL reconstruction of the residual, [*lead, Dp] float32 (lead: the block shape without D)."""
    s = gaussian_sketch(dp, dp, seed, layer, lead[-2] if len(lead) >= 2 else 1)
    s = s if len(lead) >= 2 else s[0]
    z = _signs(tensors, prefix, lead, dp)
    return (tensors[prefix + "rnorms"].float().unsqueeze(-1) * (math.sqrt(math.pi / 2) / dp)) * torch.matmul(z, s)


def inner_term(qr: torch.Tensor, tensors: dict, prefix: str, lead: tuple, dp: int, seed: int, layer: int) -> torch.Tensor:
    """qr: rotated queries [..., H, Dp] -> the residual's share of ⟨q, k_t⟩, [..., H, T] float32."""
    s = gaussian_sketch(dp, dp, seed, layer, lead[-2] if len(lead) >= 2 else 1)  # [H, m, Dp]
    s = s if len(lead) >= 2 else s[0]
    sq = torch.einsum("...md,...d->...m", s, qr)  # [..., H, m]
    z = _signs(tensors, prefix, lead, dp)  # [..., H, T, m] ±1
    return tensors[prefix + "rnorms"].float() * (math.sqrt(math.pi / 2) / dp) * torch.einsum("...tm,...m->...t", z, sq)
