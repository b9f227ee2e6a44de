"""Triton kernels for bit packing: same contract and byte layout as the references in `packing.py`.

A row `[..., N]` is zero-padded to whole cells (g codes -> nb bytes, see
`packing.cell`); each program packs BLOCK cells of the flattened rows: it
gathers a cell's g codes into one int32 word (at most 24 bits used) and writes
the word's nb low bytes. Unpacking reverses it. The wrappers do the padding and
the final trim, so the kernels only see whole cells.

Imported lazily by `dispatch.py`: `TRITON_INTERPRET=1` must be set before this
module is first imported for the kernels to run on CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packing import _check_codes, _check_packed, _pad_last, _trim, cell, packed_size

BLOCK = 256  # cells per program


@triton.jit
def _pack_kernel(codes_ptr, out_ptr, n_cells, BITS: tl.constexpr, G: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    # codes: [n_cells, G] uint8 -> out: [n_cells, NB] uint8
    pid = tl.program_id(0)
    cells = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cells < n_cells
    lanes = tl.arange(0, G)
    c = tl.load(codes_ptr + cells[:, None] * G + lanes[None, :], mask=ok[:, None], other=0).to(tl.int32)
    word = tl.sum(c << (lanes * BITS)[None, :], axis=1)  # disjoint bit ranges: sum == or
    for j in tl.static_range(NB):
        tl.store(out_ptr + cells * NB + j, ((word >> (8 * j)) & 0xFF).to(tl.uint8), mask=ok)


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, n_cells, BITS: tl.constexpr, G: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    # packed: [n_cells, NB] uint8 -> out: [n_cells, G] uint8
    pid = tl.program_id(0)
    cells = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cells < n_cells
    word = tl.zeros([BLOCK], dtype=tl.int32)
    for j in tl.static_range(NB):
        byte = tl.load(packed_ptr + cells * NB + j, mask=ok, other=0).to(tl.int32)
        word = word | (byte << (8 * j))
    lanes = tl.arange(0, G)
    c = (word[:, None] >> (lanes * BITS)[None, :]) & ((1 << BITS) - 1)
    tl.store(out_ptr + cells[:, None] * G + lanes[None, :], c.to(tl.uint8), mask=ok[:, None])


def pack_bits_triton(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., N], values < 2**bits -> packed uint8 [..., ceil(N * bits / 8)], as `pack_bits_reference`."""
    _check_codes(codes, bits, check_range=True)
    n = codes.shape[-1]
    g, nb = cell(bits)
    padded = _pad_last(codes, g).contiguous()
    n_cells = padded.numel() // g
    out = torch.empty(padded.shape[:-1] + (padded.shape[-1] // g * nb,), dtype=torch.uint8, device=codes.device)
    if n_cells:
        _pack_kernel[(triton.cdiv(n_cells, BLOCK),)](padded, out, n_cells, BITS=bits, G=g, NB=nb, BLOCK=BLOCK)
    return _trim(out, packed_size(n, bits))


def unpack_bits_triton(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packed: uint8 [..., ceil(n * bits / 8)] -> codes uint8 [..., n], as `unpack_bits_reference`."""
    _check_packed(packed, bits, n)
    g, nb = cell(bits)
    padded = _pad_last(packed, nb).contiguous()
    n_cells = padded.numel() // nb
    out = torch.empty(padded.shape[:-1] + (padded.shape[-1] // nb * g,), dtype=torch.uint8, device=packed.device)
    if n_cells:
        _unpack_kernel[(triton.cdiv(n_cells, BLOCK),)](padded, out, n_cells, BITS=bits, G=g, NB=nb, BLOCK=BLOCK)
    return _trim(out, n)
