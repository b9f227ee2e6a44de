"""TurboQuant (arXiv 2504.19874): rotate, then Lloyd–Max quantize every coordinate.

A block x: [..., H, T, D] (dim -3 is the KV head; a 2-D [T, D] block is head 0)
is encoded per vector (one token of one head):
  y = R_h x          seeded rotation per (seed, layer, head), D zero-padded to
                     D_pad = next_pow2(D) (rotation.py);
  n = ||y||, u = y/n unit vector, each coordinate ~ the Beta-like law of a
                     rotated unit vector in D_pad dims;
  code_i = #{boundaries < u_i}   the Lloyd–Max bucket (lloyd_max.py), found by
                     comparing against the decision boundaries (== bucketize);
  stored: bit-packed codes and one fp16 `scale` per vector, where
          scale = n                        (norm_correction=False), or
          scale = n / ||c[code]||          (norm_correction=True, the default:
                     the decoded vector then has exactly the stored norm).
Decode: x̂ = R_h^T (scale · c[code]), cropped to D.

`qjl=True` (keys, off by default): the MSE code uses bits−1, and the residual
r = y − scale·c[code] gets a 1-bit sketch sign(S_h r) (S_h: seeded Gaussian,
D_pad × D_pad) plus its fp16 norm. `inner_product(q, p)` is the unbiased
estimator ⟨q, k⟩ ≈ ⟨R q, scale·c⟩ + ||r||·sqrt(π/2)/D_pad·⟨S R q, sign(S r)⟩,
and `decode` returns the matching unbiased reconstruction. Softmax attention
suffers from its variance (DESIGN.md: +45% perplexity), hence the default.

`outlier_channels=k`: per block and head, the k channels with the most energy
are split off (their indices stored) and coded by a second TurboQuant at
bits+1 (own rotation over k dims); the other D−k channels at `bits`.

Attention hooks (MSE variant without outliers): `rotate(x)` / `unrotate(y)`
apply the per-head rotation and its inverse, `decode_rotated(p)` returns
scale·c[code] still in the rotated domain, so attention rotates the query
once, scores it against decode_rotated keys, accumulates decode_rotated values
and unrotates the output once (the rotation is orthogonal: ⟨Rq, Rk⟩ = ⟨q, k⟩).

Separate key/value widths: a codec encodes one tensor. Policies name two
codecs, e.g. keys "turbo4" and values "turbo3"; `turbo_kv(4, 3)` builds the pair.

This module knows nothing of sessions, tiers or models. Encode/decode dispatch
between this pure-torch reference and turboquant_triton.py (Hadamard, MSE,
no outliers) on `codec.use_reference()`.

CPU throughput (the reference path, Hadamard MSE, 1-4 bits): encode works
coordinate-major with the same float operations as rotate() + quantize_rotated()
(`_encode_hadamard_cpu`: same codes, bit for bit); decode factors the
Walsh–Hadamard matrix as H_{D/4} ⊗ H_4 (`_decode_kron`: one table gather, one
small matmul); both keep per-thread scratch buffers (`_scratch`), the same ones.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import torch

from . import lloyd_max
from .codec import Packed, use_reference
from .packing import SUPPORTED_BITS, pack_bits, unpack_bits
from .rotation import ROTATIONS, gaussian_sketch, hadamard_signs, next_pow2, rotate, rotation_matrices, unrotate

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class TurboQuant:
    """TurboQuant codec config (the codec is the config).

    bits:             bits per coordinate, all included (with qjl: bits−1 MSE + 1 QJL)
    rotation:         "hadamard" (fast, default) or "haar" (dense)
    seed, layer:      rotation seeds derive from (seed, layer, head)
    qjl:              inner-product variant with the 1-bit QJL residual sketch
    outlier_channels: channels per block and head coded at bits+1 (0: none)
    norm_correction:  rescale decoded vectors to their stored norm
    name:             registry name written into Packed records
    """

    bits: int = 3
    rotation: str = "hadamard"
    seed: int = 0
    layer: int = 0
    qjl: bool = False
    outlier_channels: int = 0
    norm_correction: bool = True
    name: str = "turbo"

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise ValueError(f"bits must be an int, got {self.bits!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {self.rotation!r}; valid: {', '.join(ROTATIONS)}")
        if self.outlier_channels < 0:
            raise ValueError(f"outlier_channels must be >= 0, got {self.outlier_channels}")
        if self.qjl:
            if self.bits - 1 not in SUPPORTED_BITS:
                raise ValueError(f"with qjl, bits - 1 must be one of {SUPPORTED_BITS}, got bits={self.bits}")
            if self.outlier_channels:
                raise ValueError("qjl and outlier_channels cannot be combined")
        elif self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.outlier_channels and self.bits + 1 not in SUPPORTED_BITS:
            raise ValueError(f"outlier channels use bits + 1 = {self.bits + 1}, which must be one of {SUPPORTED_BITS}")

    # -- helpers -----------------------------------------------------------

    @property
    def mse_bits(self) -> int:
        return self.bits - 1 if self.qjl else self.bits

    def _check_block(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
            raise ValueError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() < 2:
            raise ValueError(f"x must be [..., T, D], got shape {tuple(x.shape)}")
        if self.outlier_channels and self.outlier_channels >= x.shape[-1]:
            raise ValueError(f"outlier_channels={self.outlier_channels} must be < head_dim {x.shape[-1]}")

    def _attention_ready(self) -> None:
        if self.outlier_channels:
            raise ValueError("rotate/decode_rotated are not defined with outlier_channels > 0 (two rotated spaces); use decode()")

    # -- the attention hooks --------------------------------------------------

    def rotate(self, x: torch.Tensor, head_axis: int = -3) -> torch.Tensor:
        """x: [..., H, T, D] (head_axis=-3) or [..., H, D] (head_axis=-2) -> [..., D_pad] float32."""
        self._attention_ready()
        return rotate(x, self.rotation, self.seed, self.layer, head_axis)

    def unrotate(self, y: torch.Tensor, d: int, head_axis: int = -3) -> torch.Tensor:
        """Inverse of rotate: [..., H, T, D_pad] -> [..., H, T, d] float32 (d: the head_dim)."""
        self._attention_ready()
        return unrotate(y, self.rotation, self.seed, self.layer, d, head_axis)

    def decode_rotated(self, p: Packed) -> torch.Tensor:
        """p -> [..., H, T, D_pad] float32: scale·c[code] (+ the QJL term with qjl), not unrotated."""
        self._attention_ready()
        h, t, d = _block_dims(p.shape)
        return _decode_rotated_part(p.tensors, "", p.meta, tuple(p.shape[:-1]), d)

    # -- the codec ------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> Packed:
        """x: [..., H, T, D] float -> Packed (codes uint8 packed, scales fp16 [..., H, T], ...)."""
        self._check_block(x)
        meta = {
            "bits": self.bits,
            "rotation": self.rotation,
            "seed": self.seed,
            "layer": self.layer,
            "qjl": self.qjl,
            "norm_correction": self.norm_correction,
            "outliers": self.outlier_channels,
        }
        if not self.outlier_channels:
            tensors = self._encode_part(x, self.bits, "")
        else:
            tensors = self._encode_outliers(x)
        return Packed(codec=self.name, shape=tuple(x.shape), dtype=x.dtype, tensors=tensors, meta=meta)

    def decode(self, p: Packed) -> torch.Tensor:
        """Packed -> x̂: p.shape, p.dtype."""
        m = p.meta
        d = p.shape[-1]
        if m["outliers"]:
            out = _decode_outliers(p, d)
        elif _triton_ok(m) and next_pow2(d) >= 8:
            from .turboquant_triton import decode_mse_triton

            out = decode_mse_triton(p.tensors["codes"], p.tensors["scales"], m["bits"], m["seed"], m["layer"], p.shape)
        elif not m["qjl"] and m["bits"] in _LUT_BITS and p.tensors["codes"].device.type != "cpu":
            y = _decode_rotated_part(p.tensors, "", m, tuple(p.shape[:-1]), d)
            out = unrotate(y, m["rotation"], m["seed"], m["layer"], d, dense=True)
        elif not m["qjl"] and m["rotation"] == "hadamard" and m["bits"] in _LUT_BITS and next_pow2(d) >= 8:
            return _decode_kron(p.tensors["codes"], p.tensors["scales"], m, tuple(p.shape), p.dtype)
        elif not m["qjl"] and m["bits"] in _LUT_BITS and next_pow2(d) >= 8:
            return _decode_lut(p.tensors["codes"], p.tensors["scales"], m, tuple(p.shape), p.dtype)
        else:
            y = _decode_rotated_part(p.tensors, "", m, tuple(p.shape[:-1]), d)
            out = unrotate(y, m["rotation"], m["seed"], m["layer"], d, dense=True)
        return out.to(p.dtype)

    def nbytes(self, p: Packed) -> int:
        return p.nbytes()

    def inner_product(self, q: torch.Tensor, p: Packed) -> torch.Tensor:
        """Estimate ⟨q, k_t⟩ from the codes. q: [..., H, D] (one query per head) -> [..., H, T] float32.

        With qjl this is the unbiased QJL estimator; without, ⟨q, k̂⟩ of the MSE
        reconstruction (biased towards 0 when norm_correction is off).
        """
        self._attention_ready()
        m = p.meta
        d = p.shape[-1]
        qr = rotate(q, m["rotation"], m["seed"], m["layer"], head_axis=-2)  # [..., H, Dp]
        lead = tuple(p.shape[:-1])
        codes, scales = _unpack_mse(p.tensors, "", m, lead, d)
        cent = lloyd_max.centroids(_mse_bits(m), next_pow2(d))
        c = cent[codes.long()]  # [..., H, T, Dp]
        est = scales.squeeze(-1) * torch.einsum("...td,...d->...t", c, qr)
        if m["qjl"]:
            dp = next_pow2(d)
            s = gaussian_sketch(dp, dp, m["seed"], m["layer"], _n_heads(p.shape))  # [H, m, Dp]
            s = s if len(p.shape) >= 3 else s[0]
            sq = torch.einsum("...md,...d->...m", s, qr)  # [..., H, m]
            z = _unpack_signs(p.tensors, "", lead, dp)  # [..., H, T, m] ±1
            est = est + p.tensors["rnorms"].float() * (math.sqrt(math.pi / 2) / dp) * torch.einsum("...tm,...m->...t", z, sq)
        return est

    # -- encoding internals ---------------------------------------------------

    def _encode_part(self, x: torch.Tensor, bits: int, prefix: str) -> dict[str, torch.Tensor]:
        # x: [..., H, T, D]
        d = x.shape[-1]
        dp = next_pow2(d)
        if not self.qjl and self.rotation == "hadamard" and dp >= 8 and not use_reference():
            from .turboquant_triton import encode_mse_triton

            codes_packed, scales = encode_mse_triton(x, bits, self.seed, self.layer, self.norm_correction)
            return {prefix + "codes": codes_packed, prefix + "scales": scales}
        if not self.qjl and self.rotation == "hadamard" and 8 <= dp < 256 and bits <= 4 and x.device.type == "cpu":
            codes_packed, scales = _encode_hadamard_cpu(x, bits, self.seed, self.layer, self.norm_correction)
            return {prefix + "codes": codes_packed, prefix + "scales": scales}
        mse_bits = bits - 1 if self.qjl else bits
        y = rotate(x, self.rotation, self.seed, self.layer)  # [..., H, T, Dp] float32
        codes, scales = quantize_rotated(y, mse_bits, self.norm_correction)
        out = {prefix + "codes": pack_bits(codes, mse_bits), prefix + "scales": scales}
        if self.qjl:
            cent = lloyd_max.centroids(mse_bits, dp)
            r = y - scales.float().unsqueeze(-1) * cent[codes.long()]  # residual, rotated domain
            s = gaussian_sketch(dp, dp, self.seed, self.layer, _n_heads(x.shape))
            s = s if x.dim() >= 3 else s[0]
            sr = torch.matmul(r, s.transpose(-1, -2)) if x.dim() >= 3 else r @ s.T  # [..., H, T, m]
            out[prefix + "qjl"] = pack_bits((sr >= 0).to(torch.uint8), 1)
            out[prefix + "rnorms"] = torch.linalg.vector_norm(r, dim=-1).to(torch.float16)
        return out

    def _encode_outliers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # x: [..., H, T, D]; choose k channels per (…, head) by energy over T
        k = self.outlier_channels
        d = x.shape[-1]
        energy = x.float().pow(2).sum(dim=-2)  # [..., H, D]
        idx = torch.topk(energy, k, dim=-1).indices.sort(dim=-1).values  # [..., H, k]
        mask = torch.zeros_like(energy, dtype=torch.bool).scatter_(-1, idx, True)
        rest = (~mask).nonzero(as_tuple=False)[:, -1].reshape(*energy.shape[:-1], d - k)  # [..., H, D-k]
        xo = torch.gather(x, -1, idx.unsqueeze(-2).expand(*x.shape[:-1], k))
        xi = torch.gather(x, -1, rest.unsqueeze(-2).expand(*x.shape[:-1], d - k))
        tensors = {"idx": idx.to(torch.uint8 if d <= 256 else torch.int16)}
        tensors.update(self._encode_part(xo, self.bits + 1, "out."))
        tensors.update(self._encode_part(xi, self.bits, "in."))
        return tensors


def _triton_ok(meta: dict) -> bool:
    """The Triton kernels cover the Hadamard MSE path without outliers."""
    return not (meta["qjl"] or meta["rotation"] != "hadamard" or meta["outliers"] or use_reference())


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


_SCRATCH = threading.local()
_PLUS_MINUS = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1)
_SCRATCH_MAX_BYTES = 16 << 20


def _scratch(slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized work buffer, reused across calls by this thread (fresh pages cost more
    than the arithmetic here). Never returned to callers; buffers over 16 MiB are not kept.
    Encode and decode share slots 0-3 (their big buffers), so that the two together touch
    less memory and keep it in cache."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.numel() < nbytes:
        buf = bufs[slot] = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(shape)


_UNIT_DTYPES = {16: torch.complex128, 8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}  # n bytes moved as one element


@functools.lru_cache(maxsize=256)
def _sign_bits(d_pad: int, seed: int, layer: int, n_heads: int, itemsize: int) -> torch.Tensor:
    """The Hadamard signs as sign-bit masks [H, D_pad] int16/int32: x ^ mask == x * sign, bit for bit."""
    dt = _UNIT_DTYPES[itemsize]
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


def _encode_hadamard_cpu(x: torch.Tensor, bits: int, seed: int, layer: int, norm_correction: bool):
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
    src = _scratch(0, (bh, dp, t), torch.float32)
    dst = _scratch(1, (bh, dp, t), torch.float32)
    flip = _scratch(2, (bh, dp, t), torch.int32)
    ind = _scratch(3, (bh, dp, t), torch.int32)
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
    idx = _scratch(2, (bh * t * nb,), torch.int32)
    idx.copy_(packed.view(-1))
    per_byte = torch.index_select(_level_count_table(bits), 0, idx, out=_scratch(3, (idx.numel(),), torch.int64))
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


# -- decoding internals -----------------------------------------------------------


def _block_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) < 2:
        raise ValueError(f"block shape must be [..., T, D], got {shape}")
    return (shape[-3] if len(shape) >= 3 else 1), shape[-2], shape[-1]


def _n_heads(shape) -> int:
    return shape[-3] if len(shape) >= 3 else 1


def _mse_bits(m: dict) -> int:
    return m["bits"] - 1 if m["qjl"] else m["bits"]


def _unpack_mse(tensors, prefix, m, lead, d, bits=None):
    bits = _mse_bits(m) if bits is None else bits
    dp = next_pow2(d)
    codes = unpack_bits(tensors[prefix + "codes"], bits, dp).reshape(*lead, dp)
    scales = tensors[prefix + "scales"].float().unsqueeze(-1)
    return codes, scales


def _unpack_signs(tensors, prefix, lead, dp):
    z = unpack_bits(tensors[prefix + "qjl"], 1, dp).reshape(*lead, dp)
    return z.to(torch.float32) * 2 - 1


def _decode_rotated_part(tensors, prefix, m, lead, d, bits=None) -> torch.Tensor:
    """-> [..., H, T, D_pad] float32 in the rotated domain (unrotated already on the Triton path)."""
    bits = _mse_bits(m) if bits is None else bits
    dp = next_pow2(d)
    codes, scales = _unpack_mse(tensors, prefix, m, lead, d, bits)
    cent = lloyd_max.centroids(bits, dp)
    y = torch.index_select(cent, 0, codes.reshape(-1).long()).view(codes.shape).mul_(scales)  # == cent[codes] * scales, 4x faster
    if m["qjl"]:
        s = gaussian_sketch(dp, dp, m["seed"], m["layer"], lead[-2] if len(lead) >= 2 else 1)
        s = s if len(lead) >= 2 else s[0]
        z = _unpack_signs(tensors, prefix, lead, dp)
        y = y + (tensors[prefix + "rnorms"].float().unsqueeze(-1) * (math.sqrt(math.pi / 2) / dp)) * torch.matmul(z, s)
    return y


_LUT_BITS = (1, 2, 3, 4)


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


def _decode_lut(codes: torch.Tensor, scales: torch.Tensor, m: dict, shape: tuple, dtype) -> torch.Tensor:
    """The CPU fast path of decode (MSE, no outliers, 1-4 bits, D_pad >= 8): one table gather
    from the packed bytes, one dense matmul by R (signs folded in, cropped to D) per head, and
    one multiply by the scales that writes the output dtype."""
    bits, d = m["bits"], shape[-1]
    dp = next_pow2(d)
    lead = shape[:-1]
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    lut = _byte_lut(bits, dp)
    idx = _lut_indices(codes, bits)
    y = _gather_rows(lut, idx, out=_scratch(0, (idx.shape[0], lut.shape[1]), torch.float32))
    t = shape[-2]
    h = shape[-3] if len(shape) >= 3 else 1
    rot = rotation_matrices(m["rotation"], dp, m["seed"], m["layer"], h)[..., :d]  # [H, Dp, d]: x_row = y_row @ R
    x = _scratch(1, (math.prod(lead) // (h * t) if t else 0, h, t, d), torch.float32)
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
    w = _scratch(15, (bh, nbytes // u, t), _UNIT_DTYPES[u])
    w.copy_(p.view(_UNIT_DTYPES[u]).transpose(1, 2))
    rows = _scratch(3, (bh, nbytes, t), torch.int32)
    rows.view(bh, nbytes // u, u, t).copy_(w.view(torch.uint8).view(bh, nbytes // u, t, u).transpose(2, 3))
    return rows


def _code_units(codes: torch.Tensor, bits: int, bh: int, t: int, a: int) -> torch.Tensor:
    """Packed codes -> [BH, A, T] int32: unit j of token t is its codes 4j .. 4j+3 as one 4*bits-bit
    integer (code k at bits [k*bits, ..)), i.e. 4*bits consecutive bits of the packed row."""
    rows = _byte_rows(codes, bh, t, a * bits // 2)
    if bits == 2:  # a unit is a byte
        return rows
    units = _scratch(2, (bh, a, t), torch.int32)
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


def _decode_kron(codes: torch.Tensor, scales: torch.Tensor, m: dict, shape: tuple, dtype) -> torch.Tensor:
    """The CPU fast path of the Hadamard decode (MSE, no outliers, 1-4 bits, D_pad >= 8).

    With i = 4a + b (b < 4, a < A = D_pad/4) the Walsh–Hadamard matrix factors as
    H[i, i'] = H_A[a, a'] · H_4[b, b']. The four codes at 4a' .. 4a'+3 are 4*bits
    consecutive bits of the packed row (a byte, two bytes, half a 3-byte cell or a
    nibble): one table gather per (a', token) returns H_4 applied to their centroids
    (4 bits: two gathers from byte tables and an add, _kron_byte_tables), laid out [a', (t, b)]; one matmul by H_A (K = A: 4x fewer multiply-adds than the
    dense rotation) gives x[a, (t, b)], and a transpose of whole 16-byte (t, b) runs
    brings coordinate 4a + b to its place. Equal to the butterfly decode up to float
    rounding.
    """
    bits, d = m["bits"], shape[-1]
    dp = next_pow2(d)
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    t = shape[-2]
    h = shape[-3] if len(shape) >= 3 else 1
    bh = math.prod(shape[:-2])
    a = dp // 4
    v = _scratch(0, (bh, a, t * 4), torch.float32)
    x = _scratch(1, (bh, a, t * 4), torch.float32)
    if bits == 4:
        ha = _kron_tables(2, dp)[1]  # (H_A only: the 2^16-entry 4-bit table is not built)
        left, right = _kron_byte_tables(bits, dp)
        rows = _scratch(3, (2, bh, a, t), torch.int32)  # [low / high byte of the unit, BH, A, T]
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
    y = y.view(-1, h, t, dp).mul_(_scaled_signs(dp, m["seed"], m["layer"], h)[:, None, :])
    out = torch.empty(shape, dtype=dtype)
    out.view(-1, h, t, d).copy_(y[..., :d])
    return out


def _decode_outliers(p: Packed, d: int) -> torch.Tensor:
    m = p.meta
    k = m["outliers"]
    lead = tuple(p.shape[:-1])
    idx = p.tensors["idx"].long()  # [..., H, k]
    sub = dict(m, outliers=0)
    yo = _decode_rotated_part(p.tensors, "out.", sub, lead, k, m["bits"] + 1)
    yi = _decode_rotated_part(p.tensors, "in.", sub, lead, d - k, m["bits"])
    xo = unrotate(yo, m["rotation"], m["seed"], m["layer"], k)
    xi = unrotate(yi, m["rotation"], m["seed"], m["layer"], d - k)
    mask = torch.zeros(*idx.shape[:-1], d, dtype=torch.bool).scatter_(-1, idx, True)
    rest = (~mask).nonzero(as_tuple=False)[:, -1].reshape(*idx.shape[:-1], d - k)
    out = torch.empty(*lead, d, dtype=torch.float32)
    out.scatter_(-1, idx.unsqueeze(-2).expand(*lead, k), xo)
    out.scatter_(-1, rest.unsqueeze(-2).expand(*lead, d - k), xi)
    return out


def turbo_kv(key_bits: int = 4, value_bits: int = 3, **common) -> tuple[TurboQuant, TurboQuant]:
    """The (keys, values) codec pair with separate widths, e.g. K4/V3 (DESIGN.md's best TurboQuant row)."""
    return (
        TurboQuant(bits=key_bits, name=f"turbo{key_bits}", **common),
        TurboQuant(bits=value_bits, name=f"turbo{value_bits}", **common),
    )
