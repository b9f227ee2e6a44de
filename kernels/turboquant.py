"""TurboQuant's MSE code (arXiv 2504.19874), pure torch: the reference of `turboquant_triton.py`.

Per vector (one token of one head) of a block x: [..., H, T, D]: y = R_h x (the
seeded rotation of rotation.py, D zero-padded to D_pad), n = ||y||, u = y/n, and
code_i = #{Lloyd–Max boundaries < u_i} (lloyd_max.py); stored: the bit-packed codes
and one fp16 scale per vector (n, or n / ||c[code]|| with norm correction).
Decode: x̂ = R_h^T (scale · c[code]), cropped to D.

- `quantize_rotated` / `bucketize_codes`: the quantizer, in the operation order
  the Triton kernel follows;
- `centroid_values`: scale · c[code] in the rotated domain;
- `encode_mse_reference` / `decode_mse_reference`: the Hadamard MSE path with the
  signatures of `turboquant_triton.encode_mse_triton` / `decode_mse_triton`
  (`dispatch.encode_mse` / `dispatch.decode_mse` pick one). On CPU they take the
  fast paths of turboquant_cpu_encode.py (same codes, bit for bit) and
  turboquant_cpu_decode.py (equal up to float rounding).

The codec (record layout, QJL, outlier channels) is `turboquant_codec.TurboQuant`.
"""
from __future__ import annotations

import torch

from . import lloyd_max
from .packing import pack_bits_reference, unpack_bits_reference
from .rotation import next_pow2, rotate, unrotate
from .turboquant_cpu_decode import LUT_BITS, decode_kron
from .turboquant_cpu_encode import encode_hadamard_cpu


def quantize_rotated(y: torch.Tensor, bits: int, norm_correction: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y: [..., Dp] rotated float32 -> (codes uint8 [..., Dp], scales fp16 [...]).

    The reference operation order (the Triton kernel follows it): n = ||y||,
    u = y · (1/n) (0 for a zero vector), code = #{boundaries < u}.
    """
    dp = y.shape[-1]
    norms = torch.linalg.vector_norm(y, dim=-1)  # [...]
    inv = torch.where(norms > 0, norms.reciprocal(), 0.0)
    u = y * inv.unsqueeze(-1)
    codes, mag = bucketize_codes(u, lloyd_max.boundaries(bits, dp), with_magnitude=norm_correction)
    if norm_correction:
        # ||c[code]||^2 = sum_j c2[m_j]: |c[code]| depends only on the magnitude index m (symmetry)
        c2 = lloyd_max.centroids(bits, dp)[(1 << bits) // 2 :] ** 2
        scales = norms / torch.take(c2, mag.long()).sum(-1).sqrt()
    else:
        scales = norms
    return codes, scales.to(torch.float16)


def bucketize_codes(u: torch.Tensor, bounds: torch.Tensor, with_magnitude: bool = False):
    """code = #{b in bounds : b < u}, uint8 [...] (== torch.bucketize(u, bounds), right=False).

    Uses the symmetry of the Lloyd–Max boundaries (b[L/2 - 1] == 0, b[L/2 + i] ==
    -b[L/2 - 2 - i]): m = #{positive b < |u|}, then code = L/2 + m for u > 0 and
    L/2 - 1 - m for u <= 0; half the comparisons of a plain count, and ~8x
    faster than torch.bucketize's binary search on CPU. The two differ only
    when |u| equals a boundary exactly. The Triton kernel follows this order.
    Returns (codes, m): m (uint8, the magnitude index) only with with_magnitude=True, else None.
    """
    half = (bounds.numel() + 1) // 2
    pos = bounds[half:].tolist()  # the positive boundaries, ascending
    a = u.abs()
    m = torch.zeros(u.shape, dtype=torch.uint8, device=u.device)
    for b in pos:
        m.add_(torch.gt(a, b).view(torch.uint8))
    mag = m.clone() if with_magnitude else None
    neg = torch.le(u, 0).view(torch.uint8)
    # u > 0: half + m; u <= 0: half + (255 - m) == half - 1 - m (mod 256)
    codes = m.bitwise_xor_(neg.mul_(255)).add_(half)
    return codes, mag


def centroid_values(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [..., D_pad] (unpacked), scales [...] -> scale · c[code], float32 [..., D_pad] (rotated domain)."""
    cent = lloyd_max.centroids(bits, codes.shape[-1])
    # == cent[codes] * scales, 4x faster
    return torch.index_select(cent, 0, codes.reshape(-1).long()).view(codes.shape).mul_(scales.float().unsqueeze(-1))


def encode_mse_reference(x: torch.Tensor, bits: int, seed: int, layer: int, norm_correction: bool):
    """x: [..., H, T, D] -> (packed codes uint8 [..., H, T, D_pad*bits/8], scales fp16 [..., H, T]), Hadamard rotation."""
    dp = next_pow2(x.shape[-1])
    if 8 <= dp < 256 and bits <= 4 and x.device.type == "cpu":
        return encode_hadamard_cpu(x, bits, seed, layer, norm_correction)
    y = rotate(x, "hadamard", seed, layer)  # [..., H, T, Dp] float32
    codes, scales = quantize_rotated(y, bits, norm_correction)
    return pack_bits_reference(codes, bits), scales


def decode_mse_reference(codes: torch.Tensor, scales: torch.Tensor, bits: int, seed: int, layer: int, shape,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed codes, fp16 scales) of a block of `shape` [..., H, T, D], Hadamard rotation -> [..., H, T, D] of dtype."""
    shape = tuple(shape)
    d = shape[-1]
    dp = next_pow2(d)
    if codes.device.type == "cpu" and bits in LUT_BITS and dp >= 8:
        return decode_kron(codes, scales, bits, seed, layer, shape, dtype)
    y = centroid_values(unpack_bits_reference(codes, bits, dp).reshape(*shape[:-1], dp), scales, bits)
    return unrotate(y, "hadamard", seed, layer, d, dense=True).to(dtype)
