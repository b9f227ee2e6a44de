"""Bit packing: uint8 codes of 1, 2, 3, 4, 6 or 8 bits <-> a dense uint8 byte stream.

Layout (the same on every path, so packed bytes are portable):
- codes `[..., N]` are packed row by row along the last axis into
  `[..., ceil(N * bits / 8)]` bytes;
- the stream is little-endian in bits: code i occupies stream bits
  `[i * bits, (i + 1) * bits)`, and stream bit k is bit `k % 8` of byte `k // 8`;
- nothing is wasted but the final partial byte of a row: 3-bit packs 8 codes
  into 3 bytes, 6-bit packs 4 codes into 3 bytes, 1/2/4-bit pack 8/4/2 codes
  per byte, 8-bit is the identity.

Internally a row is cut into *cells* of `g` codes that fill exactly `nb` whole
bytes (`g * bits == 8 * nb`); a row whose length is not a multiple of `g` is
padded with zero codes, and the trailing all-zero bytes are cut off again.

This module knows nothing about quantization: it moves bits. `pack_bits` /
`unpack_bits` dispatch on `codec.use_reference()` between the pure-torch
reference here and the Triton kernels in `packing_triton.py` (imported lazily,
so that `TRITON_INTERPRET=1` set by a test before the first call takes effect).
"""
from __future__ import annotations

import math

import torch

from .codec import use_reference

SUPPORTED_BITS = (1, 2, 3, 4, 6, 8)


def cell(bits: int) -> tuple[int, int]:
    """(codes per cell, bytes per cell): the smallest run of codes filling whole bytes."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    g = 8 // math.gcd(bits, 8)
    return g, g * bits // 8


def packed_size(n: int, bits: int) -> int:
    """Bytes holding n codes of `bits` bits: ceil(n * bits / 8)."""
    cell(bits)
    return (n * bits + 7) // 8


def _check_codes(codes: torch.Tensor, bits: int, check_range: bool) -> None:
    cell(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension [..., N]")
    if check_range and bits < 8 and codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing (max {int(codes.max())} >= {1 << bits})")


def _check_packed(packed: torch.Tensor, bits: int, n: int) -> None:
    cell(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension [..., bytes]")
    if n < 0 or packed.shape[-1] != packed_size(n, bits):
        raise ValueError(
            f"{n} codes of {bits} bits need {packed_size(n, bits)} bytes per row, got {packed.shape[-1]}"
        )


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    # t: [..., L] -> [..., ceil(L / multiple) * multiple], zero-filled
    rem = t.shape[-1] % multiple
    if rem == 0:
        return t
    return torch.nn.functional.pad(t, (0, multiple - rem))


def _trim(t: torch.Tensor, length: int) -> torch.Tensor:
    # drop the padding cells' tail; copy only when something was cut (keeps results contiguous)
    return t if t.shape[-1] == length else t[..., :length].contiguous()


def _pieces(bits: int):
    """For each byte j of a cell, the codes i overlapping it and the shift taking code i to byte j.

    shift > 0: (code << shift) truncated to a byte; shift < 0: code >> -shift.
    """
    g, nb = cell(bits)
    out = []
    for j in range(nb):
        row = []
        for i in range(g):
            lo, hi = i * bits, (i + 1) * bits  # stream bits of code i
            if hi > 8 * j and lo < 8 * (j + 1):
                row.append((i, lo - 8 * j))
        out.append(row)
    return out


def pack_bits_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., N], values < 2**bits -> packed uint8 [..., ceil(N * bits / 8)]."""
    _check_codes(codes, bits, check_range=True)
    n = codes.shape[-1]
    if bits == 8:
        return codes.contiguous().clone()
    g, nb = cell(bits)
    # c: [..., cells, g]; all arithmetic stays in uint8 (left shifts drop the high bits)
    c = _pad_last(codes, g).unflatten(-1, (-1, g))
    out = torch.empty(c.shape[:-1] + (nb,), dtype=torch.uint8, device=codes.device)
    for j, row in enumerate(_pieces(bits)):
        acc = out[..., j]
        for k, (i, shift) in enumerate(row):
            term = c[..., i] << shift if shift >= 0 else c[..., i] >> -shift
            if k == 0:
                acc.copy_(term)
            else:
                acc.bitwise_or_(term)
    return _trim(out.flatten(-2), packed_size(n, bits))


def unpack_bits_reference(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packed: uint8 [..., ceil(n * bits / 8)] -> codes uint8 [..., n]."""
    _check_packed(packed, bits, n)
    if bits == 8:
        return packed.contiguous().clone()
    g, nb = cell(bits)
    mask = (1 << bits) - 1
    # b: [..., cells, nb]
    b = _pad_last(packed, nb).unflatten(-1, (-1, nb))
    out = torch.empty(b.shape[:-1] + (g,), dtype=torch.uint8, device=packed.device)
    for i in range(g):
        acc = out[..., i]
        first = True
        for j, row in enumerate(_pieces(bits)):
            for i2, shift in row:
                if i2 != i:
                    continue
                # inverse of the pack shift: byte j moved back to code i's position
                term = b[..., j] >> shift if shift >= 0 else b[..., j] << -shift
                if first:
                    acc.copy_(term)
                    first = False
                else:
                    acc.bitwise_or_(term)
        if bits * g != 8 or i != g - 1:  # the top code of a 1/2/4-bit byte needs no mask
            acc.bitwise_and_(mask)
    return _trim(out.flatten(-2), n)


def pack_bits_triton(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Same contract as `pack_bits_reference`, computed by a Triton kernel."""
    from .packing_triton import pack_bits_triton as impl

    _check_codes(codes, bits, check_range=True)
    return impl(codes, bits)


def unpack_bits_triton(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Same contract as `unpack_bits_reference`, computed by a Triton kernel."""
    from .packing_triton import unpack_bits_triton as impl

    _check_packed(packed, bits, n)
    return impl(packed, bits, n)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., N] with values < 2**bits -> uint8 [..., ceil(N * bits / 8)].

    bits in {1, 2, 3, 4, 6, 8}; little-endian bit order; ValueError on bad bits
    or out-of-range codes.
    """
    if use_reference():
        return pack_bits_reference(codes, bits)
    return pack_bits_triton(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_bits`: uint8 [..., ceil(n * bits / 8)] -> uint8 [..., n]."""
    if use_reference():
        return unpack_bits_reference(packed, bits, n)
    return unpack_bits_triton(packed, bits, n)
