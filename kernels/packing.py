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

This module knows nothing about quantization: it moves bits. It is the
pure-torch reference; `packing_triton.py` is its Triton twin (same signatures,
same bytes), and `dispatch.pack_bits` / `dispatch.unpack_bits` pick one.
"""
from __future__ import annotations

import math

import torch

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


def _int64(mask: int) -> int:
    # a 64-bit pattern as the signed int64 torch expects
    return mask - (1 << 64) if mask >= (1 << 63) else mask


def _steps(bits: int) -> list[tuple[int, int, int]]:
    """(shift, low, high) of the three steps that squeeze 8 byte-wide codes into 8*bits bits.

    A word holds 8 codes, code k in byte k (a little-endian int64). Step s joins
    neighbouring units of u = 8 * 2**s bits that each hold f = bits * 2**s code
    bits at their bottom: w = (w & low) | ((w >> (u - f)) & high), where `low`
    and `high` are bits [0, f) and [f, 2f) of every 2u-bit unit. After three
    steps the word's low 8*bits bits are the packed stream of its 8 codes,
    little-endian. Unpacking undoes a step with
    w = (w & low) | ((w & high) << (u - f)).
    """
    out = []
    for s in range(3):
        u, f = 8 << s, bits << s
        low = high = 0
        for k in range(0, 64, 2 * u):
            low |= ((1 << f) - 1) << k
            high |= ((1 << f) - 1) << (k + f)
        out.append((u - f, _int64(low), _int64(high)))
    return out


# widths whose 8 packed codes fill a native integer: 1 -> 1 byte, 2 -> 2 bytes, 4 -> 4 bytes
_NATIVE = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # contiguous with an 8-byte aligned storage offset, so it can be viewed as int64
    t = t.contiguous()
    return t if t.storage_offset() % 8 == 0 else t.clone()


def pack_bits_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., N], values < 2**bits -> packed uint8 [..., ceil(N * bits / 8)].

    Vectorized over 64-bit words of 8 codes (see `_steps`); no loop over elements.
    """
    _check_codes(codes, bits, check_range=True)
    n = codes.shape[-1]
    if bits == 8:
        return codes.contiguous().clone()
    if codes.numel() == 0:
        return codes.new_empty(codes.shape[:-1] + (packed_size(n, bits),))
    w = _aligned(_pad_last(codes, 8)).view(torch.int64)  # [..., words]
    for k, (shift, low, high) in enumerate(_steps(bits)):
        hi = (w >> shift).bitwise_and_(high)
        w = (w & low) if k == 0 else w.bitwise_and_(low)  # step 0 must not write the caller's codes
        w.bitwise_or_(hi)
    # the low `bits` bytes of each word are the stream of its 8 codes
    if bits in _NATIVE:  # a truncating cast keeps exactly those bytes (little-endian)
        out = w.to(_NATIVE[bits]).view(torch.uint8)
    else:
        out = w.view(torch.uint8).unflatten(-1, (-1, 8))[..., :bits].flatten(-2)
    return _trim(out, packed_size(n, bits))


def unpack_bits_reference(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packed: uint8 [..., ceil(n * bits / 8)] -> codes uint8 [..., n].

    The three steps of `pack_bits_reference`, undone in reverse order.
    """
    _check_packed(packed, bits, n)
    if bits == 8:
        return packed.contiguous().clone()
    if packed.numel() == 0:
        return packed.new_empty(packed.shape[:-1] + (n,))
    b = _pad_last(packed, bits)  # [..., words * bits]
    if bits in _NATIVE:
        # sign extension fills bits >= 8*bits, which the first undo step masks off
        w = _aligned(b).view(_NATIVE[bits]).to(torch.int64)  # [..., words]
    else:
        words = b.shape[-1] // bits
        buf = torch.zeros(b.shape[:-1] + (words, 8), dtype=torch.uint8, device=packed.device)
        buf[..., :bits] = b.unflatten(-1, (words, bits))
        w = buf.flatten(-2).view(torch.int64)  # [..., words]
    for shift, low, high in reversed(_steps(bits)):
        hi = (w & high).bitwise_left_shift_(shift)
        w.bitwise_and_(low).bitwise_or_(hi)
    return _trim(w.view(torch.uint8), n)
