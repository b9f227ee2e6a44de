"""Seeded random rotations for TurboQuant, one per (seed, layer, KV head).

Two kinds, selectable by name:
- "hadamard": randomized Walsh–Hadamard, R = H·diag(s)/sqrt(d) with seeded
  ±1 signs s and the fast butterfly transform H (O(d log d)). H is symmetric
  and H·H = d·I, so the inverse is diag(s)·H/sqrt(d).
- "haar": a dense Haar-random orthogonal matrix Q (QR of a seeded Gaussian,
  sign-fixed so that diag(R) > 0), applied as y = x @ Q^T.

A head dimension D that is not a power of two is zero-padded to
D_pad = next_pow2(D) before rotating (96 -> 128); `unrotate` drops the padding.

Shapes: rotations act on the last dim; the KV head is dim `head_axis` (default
-3, i.e. x: [..., H, T, D]); a 2-D x is one head's [T, D] block (head 0).

What this module does not know: codecs, bits, storage. It only rotates.
Cached sign vectors and matrices are shared: never modify them in place.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

ROTATIONS = ("hadamard", "haar")

_MASK64 = (1 << 64) - 1


def next_pow2(d: int) -> int:
    if d < 1:
        raise ValueError(f"dimension must be >= 1, got {d}")
    return 1 << (d - 1).bit_length()


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, layer: int, head: int, stream: int = 0) -> int:
    """A 63-bit generator seed, a deterministic function of (seed, layer, head, stream).

    `stream` separates independent draws for the same head (0: the rotation,
    1: the QJL sketch matrix, ...). Stable across processes and platforms.
    """
    z = 0
    for part in (seed, layer, head, stream):
        z = _splitmix64(z ^ (int(part) & _MASK64))
    return z >> 1


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized fast Walsh–Hadamard transform along the last dim (a power of two).

    x: [..., n] -> [..., n] float32, = x @ H_n / sqrt(n) (Sylvester ordering).
    Butterfly order (stage h = 1, 2, 4, ...; pair (i, i + h) -> (a + b, a - b)),
    then one multiply by 1/sqrt(n); the Triton kernels follow the same order,
    so their results are bit-identical to this one.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    src = x.reshape(-1, n).to(torch.float32).contiguous()
    if n == 1:
        return src.reshape(*lead, n).clone()
    # ping-pong between two buffers, writing a+b and a-b in place of a stack()
    buf_a = torch.empty_like(src)
    buf_b = torch.empty_like(src)
    dst = buf_a
    h = 1
    while h < n:
        v = src.view(-1, n // (2 * h), 2, h)
        o = dst.view(-1, n // (2 * h), 2, h)
        a, b = v[:, :, 0], v[:, :, 1]
        torch.add(a, b, out=o[:, :, 0])
        torch.sub(a, b, out=o[:, :, 1])
        src, dst = dst, (buf_b if dst is buf_a else buf_a)
        h *= 2
    src.mul_(1.0 / math.sqrt(n))
    return src.view(*lead, n)


@functools.lru_cache(maxsize=1024)
def hadamard_signs(d_pad: int, seed: int, layer: int, n_heads: int) -> torch.Tensor:
    """±1 float32 signs [n_heads, d_pad]; row h is head h's diagonal."""
    rows = []
    for h in range(n_heads):
        g = torch.Generator().manual_seed(derive_seed(seed, layer, h, 0))
        rows.append(torch.randint(0, 2, (d_pad,), generator=g, dtype=torch.int64))
    return (torch.stack(rows).to(torch.float32) * 2 - 1).contiguous()


@functools.lru_cache(maxsize=256)
def haar_matrices(d_pad: int, seed: int, layer: int, n_heads: int) -> torch.Tensor:
    """Haar-random orthogonal matrices [n_heads, d_pad, d_pad] float32 (rows orthonormal)."""
    mats = []
    for h in range(n_heads):
        g = torch.Generator().manual_seed(derive_seed(seed, layer, h, 0))
        a = torch.randn(d_pad, d_pad, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        # sign fix: makes Q exactly Haar-distributed (and the draw unique)
        d = torch.sign(torch.diagonal(r))
        d[d == 0] = 1
        mats.append(q * d)
    return torch.stack(mats).to(torch.float32).contiguous()


@functools.lru_cache(maxsize=256)
def rotation_matrices(kind: str, d_pad: int, seed: int, layer: int, n_heads: int) -> torch.Tensor:
    """The rotations as dense matrices R: [n_heads, d_pad, d_pad], y = R x (rotate), x = R^T y.

    For "hadamard" this is H·diag(s)/sqrt(d_pad), built with the butterfly; a
    dense matmul is the fastest CPU inverse when bit-exactness is not needed.
    """
    if kind == "haar":
        return haar_matrices(d_pad, seed, layer, n_heads)
    eye = torch.eye(d_pad).expand(n_heads, d_pad, d_pad)  # [H, D, D] rows e_j
    # rows of rotate(eye) are (R e_j)^T, i.e. the matrix R^T
    return rotate(eye, kind, seed, layer).transpose(-1, -2).contiguous()


def gaussian_sketch(m: int, d_pad: int, seed: int, layer: int, n_heads: int) -> torch.Tensor:
    """QJL sketch matrices S: [n_heads, m, d_pad] float32, i.i.d. N(0, 1), seeded per head."""
    return _gaussian_sketch(m, d_pad, seed, layer, n_heads)


@functools.lru_cache(maxsize=256)
def _gaussian_sketch(m: int, d_pad: int, seed: int, layer: int, n_heads: int) -> torch.Tensor:
    mats = []
    for h in range(n_heads):
        g = torch.Generator().manual_seed(derive_seed(seed, layer, h, 1))
        mats.append(torch.randn(m, d_pad, generator=g, dtype=torch.float32))
    return torch.stack(mats).contiguous()


def _heads_view(t: torch.Tensor, x_dim: int, head_axis: int) -> torch.Tensor:
    """Reshape per-head parameters t: [H, ...] to broadcast against x (head at head_axis)."""
    if x_dim < 2 or head_axis >= -1 or -head_axis > x_dim:
        return t[0]  # a [T, D] block (or a single vector): head 0
    trailing = -head_axis - 1  # dims after the head axis (including the rotated last dim)
    return t.reshape(t.shape[0], *([1] * (trailing - 1)), *t.shape[1:])


def _per_head_matmul(x: torch.Tensor, m: torch.Tensor, head_axis: int) -> torch.Tensor:
    """x: [..., H, *mid, D] @ m: [H, D, D'] per head -> [..., H, *mid, D']."""
    if x.dim() < -head_axis:
        return torch.matmul(x, m[0])
    shape = x.shape
    lead = shape[: x.dim() + head_axis + 1]  # [..., H]
    x3 = x.reshape(*lead, -1, shape[-1])  # [..., H, M, D]
    out = torch.matmul(x3, m)
    return out.reshape(*shape[:-1], m.shape[-1])


def n_heads_of(x: torch.Tensor, head_axis: int = -3) -> int:
    """Number of KV heads in x (1 for a [T, D] block)."""
    if x.dim() < -head_axis:
        return 1
    return x.shape[head_axis]


def rotate(x: torch.Tensor, kind: str, seed: int, layer: int, head_axis: int = -3) -> torch.Tensor:
    """x: [..., H, T, D] (head_axis=-3) or [..., H, D] (head_axis=-2) -> [..., D_pad] float32."""
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation {kind!r}; valid: {', '.join(ROTATIONS)}")
    d = x.shape[-1]
    d_pad = next_pow2(d)
    h = n_heads_of(x, head_axis)
    xf = x.to(torch.float32)
    if d_pad != d:
        xf = F.pad(xf, (0, d_pad - d))
    if kind == "hadamard":
        s = _heads_view(hadamard_signs(d_pad, seed, layer, h), x.dim(), head_axis)
        return fwht(xf * s)
    # y = Q x per head
    return _per_head_matmul(xf, haar_matrices(d_pad, seed, layer, h).transpose(-1, -2), head_axis)


def unrotate(y: torch.Tensor, kind: str, seed: int, layer: int, d: int, head_axis: int = -3, dense: bool = False) -> torch.Tensor:
    """Inverse of `rotate`: y: [..., H, T, D_pad] -> [..., H, T, d] float32.

    dense=True multiplies by the cached matrix (cropped to d columns) instead
    of running the butterfly: faster on CPU, equal up to float rounding.
    """
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation {kind!r}; valid: {', '.join(ROTATIONS)}")
    d_pad = y.shape[-1]
    if d_pad != next_pow2(d):
        raise ValueError(f"rotated dim {d_pad} does not match head_dim {d} (expected {next_pow2(d)})")
    h = n_heads_of(y, head_axis)
    yf = y.to(torch.float32)
    if dense:
        # x = R^T y per head: x_row = y_row @ R, keeping only the first d columns
        return _per_head_matmul(yf, rotation_matrices(kind, d_pad, seed, layer, h)[..., :d], head_axis)
    if kind == "hadamard":
        s = _heads_view(hadamard_signs(d_pad, seed, layer, h), y.dim(), head_axis)
        x = fwht(yf).mul_(s)
    else:
        x = _per_head_matmul(yf, haar_matrices(d_pad, seed, layer, h), head_axis)
    return x[..., :d] if d != d_pad else x
