"""The CPU fast paths of TurboQuant's MSE decode (no QJL, no outlier channels, 1-4 bits, D_pad >= 8).

- `decode_kron` (Hadamard): the Walsh–Hadamard matrix factored as H_{D/4} ⊗ H_4:
  one table gather from the packed bytes, one small matmul;
- `decode_lut` (any rotation, used for Haar): one table gather, one dense matmul
  by the rotation per head.
Both equal the plain decode (centroids gathered one by one, unrotated) up to float
rounding, and write the output dtype directly. Knows nothing of codecs or records.
"""
from __future__ import annotations

import functools
import math

import torch

from . import lloyd_max
from .rotation import hadamard_signs, next_pow2, rotation_matrices
from .scratch import UNIT_DTYPES, scratch

LUT_BITS = (1, 2, 3, 4)  # the widths these paths cover


@functools.lru_cache(maxsize=64)
def _byte_lut(bits: int, dp: int) -> torch.Tensor:
    """Packed index -> centroids: [2^(k*bits), k] float32, k codes per index (little-endian).

    1/2/4 bits: one byte holds k = 8/4/2 codes; 3 bits: a 12-bit half of a 3-byte cell, k = 4.
    """
    k = 4 if bits == 3 else 8 // bits
    idx = torch.arange(1 << (k * bits), dtype=torch.int64)
    shifts = torch.arange(k, dtype=torch.int64) * bits
    codes = (idx[:, None] >> shifts[None, :]) & ((1 << bits) - 1)
    return lloyd_max.centroids(bits, dp)[codes].contiguous()


def _lut_indices(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed uint8 [..., B] -> flat int64 indices into _byte_lut(bits), in code order."""
    if bits != 3:
        return codes.reshape(-1).to(torch.int64)
    cells = codes.reshape(-1, 3)  # one 3-byte cell (8 codes) per row
    w = torch.zeros(cells.shape[0], 4, dtype=torch.uint8)
    w[:, :3] = cells
    w = w.view(torch.int32).view(-1)  # the cell's 24 bits, little-endian
    idx = torch.empty(w.shape[0], 2, dtype=torch.int32)
    torch.bitwise_and(w, 0xFFF, out=idx[:, 0])
    torch.bitwise_right_shift(w, 12, out=idx[:, 1])
    return idx.view(-1)


_ROW_AS_ONE = {8: torch.int64, 16: torch.complex128}  # a table row moved as one element


def _gather_rows(table: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """table[idx] for a contiguous float32 table [n, k]: rows of 8 or 16 bytes are gathered as single
    int64 / complex128 elements (a 1-D gather is ~3x faster than index_select over 2-D rows; the bits
    are only moved, never computed on)."""
    k = table.shape[1]
    one = _ROW_AS_ONE.get(4 * k)
    if one is None:
        return torch.index_select(table, 0, idx, out=out)
    if out is None:
        out = torch.empty(idx.shape[0], k, dtype=table.dtype)
    torch.index_select(table.view(one).view(-1), 0, idx, out=out.view(one).view(-1))
    return out


def decode_lut(codes: torch.Tensor, scales: torch.Tensor, bits: int, rotation: str, seed: int, layer: int,
               shape: tuple, dtype) -> torch.Tensor:
    """The CPU fast path of decode (MSE, no outliers, 1-4 bits, D_pad >= 8): one table gather
    from the packed bytes, one dense matmul by R (signs folded in, cropped to D) per head, and
    one multiply by the scales that writes the output dtype. codes: packed [..., T, D_pad*bits/8] uint8,
    scales: fp16 [..., T] -> [*shape] of dtype."""
    d = shape[-1]
    dp = next_pow2(d)
    lead = shape[:-1]
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    lut = _byte_lut(bits, dp)
    idx = _lut_indices(codes, bits)
    y = _gather_rows(lut, idx, out=scratch(0, (idx.shape[0], lut.shape[1]), torch.float32))
    t = shape[-2]
    h = shape[-3] if len(shape) >= 3 else 1
    rot = rotation_matrices(rotation, dp, seed, layer, h)[..., :d]  # [H, Dp, d]: x_row = y_row @ R
    x = scratch(1, (math.prod(lead) // (h * t) if t else 0, h, t, d), torch.float32)
    torch.matmul(y.view(-1, h, t, dp), rot, out=x)  # [..., H, T, d] float32
    out = torch.empty(shape, dtype=dtype)
    return torch.mul(x.view(shape), scales.unsqueeze(-1), out=out)


def _sylvester(n: int) -> torch.Tensor:
    """The unnormalized Sylvester Hadamard matrix [n, n]: H[i, j] = (-1)^popcount(i & j)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def _kron_tables(bits: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lut, H_A) for _decode_kron: lut[j] = H_4 · c[the 4 codes of unit j] (code k at bits [k*bits, ..)), as
    2^(4*bits) complex128 elements (4 float32 moved as one: a 1-D gather is ~3x faster than rows);
    H_A the Sylvester matrix of order A = D_pad / 4."""
    idx = torch.arange(1 << (4 * bits), dtype=torch.int64)
    codes = (idx[:, None] >> (torch.arange(4) * bits)[None, :]) & ((1 << bits) - 1)
    c = lloyd_max.centroids(bits, dp).double()[codes]  # [n, 4]
    lut = (c @ _sylvester(4).double().T).to(torch.float32).contiguous()
    return lut.view(torch.complex128).view(-1), _sylvester(dp // 4)


@functools.lru_cache(maxsize=64)
def _kron_byte_tables(bits: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) for the 4-bit _decode_kron: a unit's 16 bits are two bytes (codes 0, 1 and 2, 3), and with
    P(byte) = H_2 · c[its two codes], H_4 · c[4 codes] = (P_lo + P_hi, P_lo - P_hi); L[byte] = (P, P),
    R[byte] = (P, -P), 256 complex128 elements each (4 KiB: they stay in L1, where the 2^16-entry table of
    _kron_tables, 1 MiB, is evicted by every encode), so the unit's entry is L[lo] + R[hi]."""
    idx = torch.arange(256, dtype=torch.int64)
    cent = lloyd_max.centroids(bits, dp).double()
    c0, c1 = cent[idx & 15], cent[idx >> 4]
    pair = torch.stack([c0 + c1, c0 - c1], 1).to(torch.float32)
    left = torch.cat([pair, pair], 1).contiguous()
    right = torch.cat([pair, -pair], 1).contiguous()
    return left.view(torch.complex128).view(-1), right.view(torch.complex128).view(-1)


@functools.lru_cache(maxsize=256)
def _scaled_signs(dp: int, seed: int, layer: int, n_heads: int) -> torch.Tensor:
    return (hadamard_signs(dp, seed, layer, n_heads) * (1.0 / math.sqrt(dp))).contiguous()  # [H, Dp]


def _byte_rows(codes: torch.Tensor, bh: int, t: int, nbytes: int) -> torch.Tensor:
    """Packed codes [..., T, nbytes] uint8 -> int32 [BH, nbytes, T]: row j holds byte j of every token.
    Tokens are transposed as whole 16/8/4-byte units first (cheap), then bytes within a unit."""
    p = codes.reshape(bh, t, nbytes)
    if not p.is_contiguous():
        p = p.contiguous()
    u = math.gcd(nbytes, 16, p.storage_offset())
    w = scratch(15, (bh, nbytes // u, t), UNIT_DTYPES[u])
    w.copy_(p.view(UNIT_DTYPES[u]).transpose(1, 2))
    rows = scratch(3, (bh, nbytes, t), torch.int32)
    rows.view(bh, nbytes // u, u, t).copy_(w.view(torch.uint8).view(bh, nbytes // u, t, u).transpose(2, 3))
    return rows


def _code_units(codes: torch.Tensor, bits: int, bh: int, t: int, a: int) -> torch.Tensor:
    """Packed codes -> [BH, A, T] int32: unit j of token t is its codes 4j .. 4j+3 as one 4*bits-bit
    integer (code k at bits [k*bits, ..)), i.e. 4*bits consecutive bits of the packed row."""
    rows = _byte_rows(codes, bh, t, a * bits // 2)
    if bits == 2:  # a unit is a byte
        return rows
    units = scratch(2, (bh, a, t), torch.int32)
    if bits == 4:  # two bytes
        r = rows.view(bh, a, 2, t)
        return torch.add(r[:, :, 0], r[:, :, 1], alpha=256, out=units)
    u2 = units.view(bh, a // 2, 2, t)
    if bits == 1:  # a nibble
        torch.bitwise_and(rows, 15, out=u2[:, :, 0])
        torch.bitwise_right_shift(rows, 4, out=u2[:, :, 1])
        return units
    r = rows.view(bh, a // 2, 3, t)  # 3 bits: a 3-byte cell holds units 2i (low 12 bits) and 2i + 1
    cell = torch.add(r[:, :, 0], r[:, :, 1], alpha=256, out=u2[:, :, 1]).add_(r[:, :, 2], alpha=65536)
    torch.bitwise_and(cell, 0xFFF, out=u2[:, :, 0])
    cell.bitwise_right_shift_(12)
    return units


def decode_kron(codes: torch.Tensor, scales: torch.Tensor, bits: int, seed: int, layer: int, shape: tuple, dtype) -> torch.Tensor:
    """The CPU fast path of the Hadamard decode (MSE, no outliers, 1-4 bits, D_pad >= 8).

    With i = 4a + b (b < 4, a < A = D_pad/4) the Walsh–Hadamard matrix factors as
    H[i, i'] = H_A[a, a'] · H_4[b, b']. The four codes at 4a' .. 4a'+3 are 4*bits
    consecutive bits of the packed row (a byte, two bytes, half a 3-byte cell or a
    nibble): one table gather per (a', token) returns H_4 applied to their centroids
    (4 bits: two gathers from byte tables and an add, _kron_byte_tables), laid out [a', (t, b)]; one matmul by H_A (K = A: 4x fewer multiply-adds than the
    dense rotation) gives x[a, (t, b)], and a transpose of whole 16-byte (t, b) runs
    brings coordinate 4a + b to its place. Equal to the butterfly decode up to float
    rounding. codes: packed [..., T, D_pad*bits/8] uint8, scales: fp16 [..., T] -> [*shape] of dtype.
    """
    d = shape[-1]
    dp = next_pow2(d)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    t = shape[-2]
    h = shape[-3] if len(shape) >= 3 else 1
    bh = math.prod(shape[:-2])
    a = dp // 4
    v = scratch(0, (bh, a, t * 4), torch.float32)
    x = scratch(1, (bh, a, t * 4), torch.float32)
    if bits == 4:
        ha = _kron_tables(2, dp)[1]  # (H_A only: the 2^16-entry 4-bit table is not built)
        left, right = _kron_byte_tables(bits, dp)
        rows = scratch(3, (2, bh, a, t), torch.int32)  # [low / high byte of the unit, BH, A, T]
        rows.copy_(codes.reshape(bh, t, a, 2).permute(3, 0, 2, 1))
        torch.index_select(left, 0, rows[0].view(-1), out=v.view(torch.complex128).view(-1))
        torch.index_select(right, 0, rows[1].view(-1), out=x.view(torch.complex128).view(-1))
        v.add_(x)
    else:
        lut, ha = _kron_tables(bits, dp)
        units = _code_units(codes, bits, bh, t, a)  # [BH, A, T]
        torch.index_select(lut, 0, units.view(-1), out=v.view(torch.complex128).view(-1))
    torch.matmul(ha, v, out=x)  # [BH, A, (T, 4)]: coordinate 4a + b at [a, (t, b)]
    y = v.view(bh, t, dp)  # (v is spent)
    y.view(torch.complex128).copy_(x.view(torch.complex128).view(bh, a, t).transpose(1, 2))
    y.mul_(scales.reshape(bh, t, 1))
    y = y.view(-1, h, t, dp).mul_(_scaled_signs(dp, seed, layer, h)[:, None, :])
    out = torch.empty(shape, dtype=dtype)
    out.view(-1, h, t, d).copy_(y[..., :d])
    return out
