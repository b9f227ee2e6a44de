"""The CPU fast path of TurboQuant's Hadamard MSE encode, bit-exact with the plain reference.

`encode_hadamard_cpu(x, bits, seed, layer, norm_correction)` gives the same packed
codes and fp16 scales as rotate() + quantize_rotated() + pack_bits_reference
(turboquant.py), bit for bit, but works coordinate-major with scratch buffers,
computes codes on the int32 bit patterns of u, and gets ||c[code]||² from counters
instead of a gather. Used by `turboquant.encode_mse_reference` on CPU for
1-4 bits and 8 <= D_pad < 256. Knows nothing of codecs or records.
"""
from __future__ import annotations

import functools
import math

import torch

from . import lloyd_max
from .rotation import hadamard_signs, next_pow2
from .scratch import UNIT_DTYPES, scratch

_PLUS_MINUS = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1)


@functools.lru_cache(maxsize=256)
def _sign_bits(d_pad: int, seed: int, layer: int, n_heads: int, itemsize: int) -> torch.Tensor:
    """The Hadamard signs as sign-bit masks [H, D_pad] int16/int32: x ^ mask == x * sign, bit for bit."""
    dt = UNIT_DTYPES[itemsize]
    neg = hadamard_signs(d_pad, seed, layer, n_heads) < 0
    return (neg.to(dt) << (8 * itemsize - 1)).contiguous()


@functools.lru_cache(maxsize=64)
def _positive_bounds(bits: int, dp: int) -> list[int]:
    """The positive Lloyd–Max boundaries (the upper half, ascending) as int32 bit patterns."""
    return lloyd_max.boundaries(bits, dp)[1 << (bits - 1) :].view(torch.int32).tolist()


@functools.lru_cache(maxsize=64)
def _magnitude_lut(bits: int, dp: int) -> tuple[int, torch.Tensor] | None:
    """(s, E) such that m = #{positive boundaries b < a} == (E[a >> s] + a) >> (s + 1) for every int32 bit
    pattern a in [0, 2^31) (a = |u|'s bits, NaN patterns included), or None when no s in 16..23 puts at most
    one boundary into each run of 2^s patterns. E [2^(31-s)] int32: for run i, starting at lo = i << s, with
    k boundaries below lo and the boundary lo + rb inside it (rb = 2^s - 1: none, the compare never holds),
    E[i] = ((k + 1) << (s + 1)) - lo - rb - 1, so E[i] + a = ((k + 1) << (s + 1)) + (a - lo - rb - 1), and the
    second term, in [-2^s, 2^s), borrows from the first exactly when a <= lo + rb: m = k + [a > lo + rb]. All
    sums stay in [2^s, 2^(s+4)]: no int32 overflow."""
    pos = _positive_bounds(bits, dp)
    for s in range(23, 15, -1):
        lo = torch.arange(1 << (31 - s), dtype=torch.int64) << s
        b = torch.tensor(pos, dtype=torch.int64)
        below = (b[None, :] < lo[:, None]).sum(1)  # k
        inside = (b[None, :] >= lo[:, None]) & (b[None, :] < lo[:, None] + (1 << s))
        if inside.sum(1).max() > 1:
            continue
        rb = torch.where(inside.any(1), (torch.where(inside, b[None, :], 0).sum(1) - lo), (1 << s) - 1)
        e = ((below + 1) << (s + 1)) - lo - rb - 1
        return s, e.to(torch.int32)
    return None


def _signed_coordinate_major(xs: torch.Tensor, out: torch.Tensor, work: tuple[torch.Tensor, torch.Tensor], seed: int, layer: int) -> None:
    """xs [NB, H, T, D] float -> out [NB·H, D_pad, T] float32 = (xs · signs)^T, zero-padded to D_pad.

    A float transpose costs ~0.6 ns per element; when D = D_pad is a multiple of 16 bytes, this one
    flips the signs on the input's bits (XOR, exact), transposes whole 16-byte units (k coordinates),
    and only then transposes within the unit, widening to float32: [D/k, T, k] -> [D/k, k, T].
    work: two float32 buffers of out's size, overwritten."""
    nb, h, t, d = xs.shape
    dp = out.shape[1]
    es = xs.element_size()
    k = 16 // es
    if d == dp and d % k == 0 and es in (2, 4):
        masks = _sign_bits(dp, seed, layer, h, es)  # [H, D]
        it = masks.dtype
        xf = work[0].view(-1)[: xs.numel() * es // 4].view(xs.dtype).view(nb, h, t, d)
        torch.bitwise_xor(xs.view(it), masks[:, None, :], out=xf.view(it))
        units = work[1].view(-1)[: xs.numel() * es // 4].view(torch.complex128).view(nb * h, d // k, t)
        units.copy_(xf.view(nb * h, t, d).view(torch.complex128).transpose(1, 2))
        out.view(-1, d // k, k, t).copy_(units.view(xs.dtype).view(-1, d // k, t, k).transpose(2, 3))
        return
    signs = hadamard_signs(dp, seed, layer, h)  # [H, Dp]
    o = out.view(nb, h, dp, t)
    o[:, :, :d].copy_(xs.transpose(-1, -2)).mul_(signs[:, :d, None])  # (faster than one mul from the transpose)
    if dp != d:
        o[:, :, d:].zero_()


def encode_hadamard_cpu(x: torch.Tensor, bits: int, seed: int, layer: int, norm_correction: bool):
    """The CPU fast path of the Hadamard MSE encode: x [..., H, T, D] -> (packed codes, fp16 scales).

    Same operations as rotate() + quantize_rotated() (sign flip, butterfly stages
    h = 1, 2, 4, ... in the same order, · 1/sqrt(D_pad), u = y · (1/n), symmetric
    bucketize), so the rotated values and codes are the same floats; but it works
    coordinate-major ([BH, D_pad, T]: every butterfly operand is a contiguous run
    of T floats; a stage is one addcmul), reuses scratch buffers instead of
    allocating per step, computes the codes on u's int32 bit patterns, and gets
    ||c[code]||² from per-boundary counters carried in spare bytes of the magnitude
    index instead of a gather. The norm is summed in numpy's pairwise order
    (_pairwise_rows), as the Triton interpreter's tl.sum does, so codes match the
    interpreted kernel even next to a boundary.
    """
    d, t = x.shape[-1], x.shape[-2]
    dp = next_pow2(d)
    h = x.shape[-3] if x.dim() >= 3 else 1
    lead = x.shape[:-1]
    if x.numel() == 0:
        return torch.empty(*lead, dp * bits // 8, dtype=torch.uint8), torch.empty(lead, dtype=torch.float16)
    xs = x.reshape(-1, h, t, d)
    bh = xs.shape[0] * h
    src = scratch(0, (bh, dp, t), torch.float32)
    dst = scratch(1, (bh, dp, t), torch.float32)
    flip = scratch(2, (bh, dp, t), torch.int32)
    ind = scratch(3, (bh, dp, t), torch.int32)
    _signed_coordinate_major(xs, src, (dst, flip.view(torch.float32)), seed, layer)
    step = 1
    while step < dp:
        # (a, b) -> (a + b, a - b) as one op, a + b · (±1): the product is exact, so both are the same
        # floats as an add and a sub (each read a and b once more)
        v = src.view(bh, dp // (2 * step), 2, step * t)
        torch.addcmul(v[:, :, :1], v[:, :, 1:], _PLUS_MINUS, out=dst.view(v.shape))
        src, dst = dst, src
        step *= 2
    # fp16 input and D_pad a power of 4: 1/sqrt(D_pad) is a power of two and every butterfly value a
    # multiple of 2^-24, so the scaled y would be exactly y' / sqrt(D_pad): the norm scales exactly,
    # and u = y' · (1/n') is the same float as y · (1/n). Skip the multiply; rescale the norms.
    exact = x.dtype == torch.float16 and (dp.bit_length() - 1) % 2 == 0
    y = src if exact else src.mul_(1.0 / math.sqrt(dp))  # [BH, Dp, T]
    norms = _pairwise_rows(torch.mul(y, y, out=dst), 0, dp).sqrt()  # [BH, T]
    inv = torch.where(norms > 0, norms.reciprocal(), 0.0)
    if exact:
        norms.mul_(1.0 / math.sqrt(dp))
    ui = y.mul_(inv.unsqueeze(1)).view(torch.int32)  # u, as int32 bit patterns
    half = 1 << (bits - 1)
    pos = _positive_bounds(bits, dp)
    # codes in int32 on the float bits (a float comparison into bool is 4x slower than these):
    # u <= 0 <=> bits(u) <= 0, and for a = |u| >= 0 the int32 bit patterns order like the floats.
    # m < half (a power of two): u > 0: m ^ half == half + m; u <= 0: m ^ (half - 1) == half - 1 - m
    # (as bucketize_codes), i.e. code = m ^ flip ^ xor with flip = (2 half - 1)·[u > 0], xor = half - 1.
    # From fp16 input a nonzero u is at least 2^-53 (|y| >= 2^-28, n < 2^25), so its bits are >= 2 half - 1
    # and flip is one clamp of the bits; otherwise flip = half - [u <= 0] and xor = 0.
    if x.dtype == torch.float16:
        torch.clamp(ui, 0, 2 * half - 1, out=flip)
        xor = half - 1
    else:
        torch.sub(torch.tensor(half, dtype=torch.int32), torch.le(ui, 0, out=flip), out=flip)
        xor = 0
    ai = ui.bitwise_and_(0x7FFFFFFF)
    m = dst.view(torch.int32)  # m = #{positive boundaries < a}
    # With norm correction and 3 bits, the indicators are also counted per boundary: boundaries 1 and 2
    # in bytes 2 and 3 of m (m itself stays in bits 0-15; summed over a row of < 256 coordinates, m sums
    # to < 2^16 and a count to < 256: the fields never carry). With 4 bits, the level counts come from
    # the packed codes instead (_level_counts).
    fields = norm_correction and len(pos) == 3
    lut = _magnitude_lut(bits, dp) if len(pos) == 7 else None
    if lut is not None:
        # 4 bits: one table gather and one add instead of 7 compares and 6 adds (_magnitude_lut: the same m)
        s, e = lut
        torch.index_select(e, 0, torch.bitwise_right_shift(ai, s, out=ind).view(-1), out=m.view(-1))
        m.add_(ai).bitwise_right_shift_(s + 1)
    elif not pos:
        m.zero_()
    for i, b in enumerate(pos if lut is None else ()):
        torch.gt(ai, b, out=m if i == 0 else ind)
        if i:
            m.add_(ind, alpha=1 + (1 << (8 + 8 * i)) if fields else 1)
    energy = None
    if norm_correction and bits <= 3:
        energy = _norm_energy(m, bits, dp, fields, ind)  # ||c[code]||^2 per vector, float64 [BH, T]
        if fields:
            m.bitwise_and_(half - 1)
    codes = _pack_coordinate_major(m.bitwise_xor_(flip), bits, xor, (ind, flip))  # [BH, T, Dp*bits/8]
    if norm_correction and energy is None:
        energy = torch.matmul(_level_counts(codes, bits, dp).to(torch.float64), _level_energies(bits, dp))
    scales = norms / energy.sqrt_().to(torch.float32) if norm_correction else norms
    return codes.view(*lead, -1), scales.to(torch.float16).view(lead)


@functools.lru_cache(maxsize=64)
def _energy_weights(bits: int, dp: int) -> tuple[float, torch.Tensor]:
    """(base, w) with ||c[code]||^2 = base + bytes @ w for the row sums of _encode_hadamard_cpu's counters:
    base = D_pad·c2[0]; bytes b0 + 256·b1 = the sum of m = sum_i #{m > i}, byte i + 1 = #{m > i} for i >= 1."""
    c2 = lloyd_max.centroids(bits, dp)[(1 << bits) // 2 :].double() ** 2  # c[code]^2 by magnitude index
    step = c2[1:] - c2[:-1]  # a coordinate with m > i gains c2[i + 1] - c2[i]
    w = torch.zeros(len(step) + 1, dtype=torch.float64)
    w[0], w[1] = step[0], 256 * step[0]
    for i in range(1, len(step)):
        w[i + 1] = step[i] - step[0]  # (#{m > 0} = the sum of m - the other counts)
    return dp * c2[0].item(), w


def _norm_energy(m: torch.Tensor, bits: int, dp: int, fields: bool, work: torch.Tensor) -> torch.Tensor:
    """The sum over each row of c2[m] (the squared centroid magnitudes), float64 [BH, T], from m [BH, D_pad, T]
    int32 (magnitude indices of 1-3 bit codes; with fields, counters above bit 15). work: a buffer of m's
    size, overwritten."""
    bh, _, t = m.shape
    if bits == 1:
        return torch.full((bh, t), dp * lloyd_max.centroids(1, dp)[1].double().item() ** 2, dtype=torch.float64)
    base, w = _energy_weights(bits, dp)
    s = _row_sums(m, work)  # int32 [BH, T]: with 2 bits, the count #{m > 0} itself
    if not fields:
        return torch.mul(s, w[0], out=torch.empty(bh, t, dtype=torch.float64)).add_(base)
    return torch.matmul(s.view(torch.uint8).view(bh, t, 4).to(torch.float64), w).add_(base)


@functools.lru_cache(maxsize=64)
def _level_energies(bits: int, dp: int) -> torch.Tensor:
    """c[half + k]^2 in float64 for the magnitude levels k (the weights of _level_counts' counts)."""
    return lloyd_max.centroids(bits, dp)[1 << (bits - 1) :].double() ** 2


@functools.lru_cache(maxsize=4)
def _level_count_table(bits: int) -> torch.Tensor:
    """[256] int64: for a byte of packed codes (8 // bits codes), the number of them at each magnitude level
    (|code - half + 1/2| - 1/2) in byte `level` (a 2 KiB table: it stays in L1 while the encode's big buffers
    pass through the cache)."""
    u = torch.arange(256, dtype=torch.int64)
    half = 1 << (bits - 1)
    table = torch.zeros(256, dtype=torch.int64)
    for k in range(8 // bits):
        code = (u >> (k * bits)) & ((1 << bits) - 1)
        level = torch.where(code >= half, code - half, half - 1 - code)
        table += 1 << (8 * level)
    return table


def _level_counts(packed: torch.Tensor, bits: int, dp: int) -> torch.Tensor:
    """Packed 4-bit codes [BH, T, Dp/2] uint8 -> [BH, T, 8] uint8: n_k = #{codes of the row at level k}
    (one gather per byte; a row holds < 256 codes: the byte counts never carry)."""
    bh, t, nb = packed.shape
    idx = scratch(2, (bh * t * nb,), torch.int32)
    idx.copy_(packed.view(-1))
    per_byte = torch.index_select(_level_count_table(bits), 0, idx, out=scratch(3, (idx.numel(),), torch.int64))
    return per_byte.view(bh, t, nb).sum(-1).view(torch.uint8).view(bh, t, 8)


def _row_sums(v: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """Integer sums over dim 1 of v [BH, N, T] (N a power of two) by halving: [BH, T], a view of work
    (a buffer of at least half v's size, overwritten), or of v itself (overwritten) without work."""
    bh, n, t = v.shape
    if n == 1:
        return v[:, 0]
    n //= 2
    if work is None:
        acc = v
        acc[:, :n].add_(acc[:, n : 2 * n])
    else:
        acc = torch.add(v[:, :n], v[:, n:], out=work.view(-1)[: v.numel() // 2].view(bh, n, t))
    while n > 1:
        n //= 2
        acc[:, :n].add_(acc[:, n : 2 * n])
    return acc[:, 0]


def _pack_coordinate_major(codes: torch.Tensor, bits: int, xor: int, work: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """codes int32 [B, N, T] (coordinate-major, N >= 8 a power of two) -> packed [B, T, N*bits/8],
    byte for byte what pack_bits((codes ^ xor).transpose(1, 2)) returns. Codes are joined into int32 words
    of g codes (code k of a word at bits [k*bits, (k+1)*bits)) while still coordinate-major, and only the
    words are transposed (a uint8 transpose of the codes costs more than all the rest). work: two int32
    buffers of the codes' size, overwritten."""
    b, n, t = codes.shape
    if bits in (3, 6):
        g = 24 // bits  # one 3-byte cell per word
    else:
        g = min(32 // bits, n)
    nbw = g * bits // 8  # bytes used per word
    cw = codes.view(b, n // g, g, t).to(torch.int32)
    # a tree of g-1 fused adds (k and k + g/2 first, shifted by their distance): the fields never
    # overlap, so + is |, and int32 wraps into the sign bit as the shift would
    k = g // 2
    word = work[0].view(-1)[: codes.numel() // 2].view(b, n // g, k, t)
    torch.add(cw[:, :, :k], cw[:, :, k:], alpha=1 << (k * bits), out=word)
    while k > 1:
        k //= 2
        word[:, :, :k].add_(word[:, :, k : 2 * k], alpha=1 << (k * bits))
    word = word[:, :, 0]
    if xor:
        pattern = sum(xor << (k * bits) for k in range(g))
        word.bitwise_xor_(pattern - (1 << 32) if pattern >= 1 << 31 else pattern)  # as an int32
    if nbw == 3 and (n // g) % 4 == 0:
        # four 3-byte cells c0..c3 -> three int32 words (little-endian: the cells' bytes in order), still
        # coordinate-major; a uint8 slice of the 4-byte words costs more than all the rest
        c = word.unflatten(1, (n // g // 4, 4))
        o = work[1].view(-1)[: b * (n // g // 4) * 3 * t].view(b, n // g // 4, 3, t)
        torch.add(c[:, :, 0], c[:, :, 1], alpha=1 << 24, out=o[:, :, 0])
        torch.bitwise_right_shift(c[:, :, 1], 8, out=o[:, :, 1]).add_(c[:, :, 2], alpha=1 << 16)
        torch.bitwise_right_shift(c[:, :, 2], 16, out=o[:, :, 2]).add_(c[:, :, 3], alpha=1 << 8)
        rows = torch.empty(b, t, 3 * (n // g // 4), dtype=torch.int32)
        return rows.copy_(o.view(b, -1, t).transpose(1, 2)).view(torch.uint8)
    rows = torch.empty(b, t, n // g, dtype=torch.int32)  # (not .contiguous(): size-1 dims keep odd strides)
    rows = rows.copy_(word.transpose(1, 2)).view(torch.uint8).view(b, t, n // g, 4)
    if nbw == 4:
        return rows.view(b, t, -1)
    return rows[..., :nbw].reshape(b, t, -1)


def _pairwise_rows(sq: torch.Tensor, lo: int, n: int) -> torch.Tensor:
    """Sum of rows lo .. lo+n of sq [B, N, T] over dim 1 in numpy's pairwise order (n a multiple
    of 8): 8 running partial sums r_j += sq[i + j], combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7));
    blocks over 128 split in halves. Overwrites sq's rows; returns [B, T]."""
    if n > 128:
        n2 = n // 2
        n2 -= n2 % 8
        return _pairwise_rows(sq, lo, n2).add_(_pairwise_rows(sq, lo + n2, n - n2))
    r = sq[:, lo : lo + 8]
    for i in range(lo + 8, lo + n, 8):
        r.add_(sq[:, i : i + 8])
    pairs = r[:, 0::2] + r[:, 1::2]  # r0+r1, r2+r3, r4+r5, r6+r7
    quads = pairs[:, 0::2] + pairs[:, 1::2]
    return quads[:, 0] + quads[:, 1]
