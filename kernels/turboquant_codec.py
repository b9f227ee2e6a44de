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

This module knows nothing of sessions, tiers or models. The pieces: the MSE code
and its reference paths in turboquant.py (CPU fast paths in turboquant_cpu_encode.py
and turboquant_cpu_decode.py), the QJL residual in turboquant_qjl.py; the Hadamard
MSE path (no QJL, no outliers) goes through `dispatch.encode_mse` / `decode_mse`,
which run turboquant_triton.py on CUDA and the reference on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import lloyd_max, turboquant_qjl
from .codec import Packed
from .dispatch import decode_mse, encode_mse, pack_bits, unpack_bits
from .packing import SUPPORTED_BITS
from .rotation import ROTATIONS, next_pow2, rotate, unrotate
from .turboquant import centroid_values, quantize_rotated
from .turboquant_cpu_decode import LUT_BITS, decode_lut

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
        dp = next_pow2(d)
        codes, scales = p.tensors.get("codes"), p.tensors.get("scales")
        if m["outliers"]:
            out = _decode_outliers(p, d)
        elif not m["qjl"] and m["rotation"] == "hadamard" and dp >= 8:
            return decode_mse(codes, scales, m["bits"], m["seed"], m["layer"], tuple(p.shape), p.dtype)
        elif not m["qjl"] and m["bits"] in LUT_BITS and dp >= 8 and codes.device.type == "cpu":
            return decode_lut(codes, scales, m["bits"], m["rotation"], m["seed"], m["layer"], tuple(p.shape), p.dtype)
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
            est = est + turboquant_qjl.inner_term(qr, p.tensors, "", lead, next_pow2(d), m["seed"], m["layer"])
        return est

    # -- encoding internals ---------------------------------------------------

    def _encode_part(self, x: torch.Tensor, bits: int, prefix: str) -> dict[str, torch.Tensor]:
        # x: [..., H, T, D]
        dp = next_pow2(x.shape[-1])
        if not self.qjl and self.rotation == "hadamard" and dp >= 8:
            codes_packed, scales = encode_mse(x, bits, self.seed, self.layer, self.norm_correction)
            return {prefix + "codes": codes_packed, prefix + "scales": scales}
        mse_bits = bits - 1 if self.qjl else bits
        y = rotate(x, self.rotation, self.seed, self.layer)  # [..., H, T, Dp] float32
        codes, scales = quantize_rotated(y, mse_bits, self.norm_correction)
        out = {prefix + "codes": pack_bits(codes, mse_bits), prefix + "scales": scales}
        if self.qjl:  # (in this order: the record lists its tensors as inserted)
            out[prefix + "qjl"], out[prefix + "rnorms"] = turboquant_qjl.encode_residual(
                y, codes, scales, mse_bits, self.seed, self.layer)
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


# -- decoding internals -----------------------------------------------------------


def _block_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) < 2:
        raise ValueError(f"block shape must be [..., T, D], got {shape}")
    return (shape[-3] if len(shape) >= 3 else 1), shape[-2], shape[-1]


def _mse_bits(m: dict) -> int:
    return m["bits"] - 1 if m["qjl"] else m["bits"]


def _unpack_mse(tensors, prefix, m, lead, d, bits=None):
    bits = _mse_bits(m) if bits is None else bits
    dp = next_pow2(d)
    codes = unpack_bits(tensors[prefix + "codes"], bits, dp).reshape(*lead, dp)
    scales = tensors[prefix + "scales"].float().unsqueeze(-1)
    return codes, scales


def _decode_rotated_part(tensors, prefix, m, lead, d, bits=None) -> torch.Tensor:
    """-> [..., H, T, D_pad] float32 in the rotated domain: scale·c[code] (+ the QJL residual with qjl)."""
    bits = _mse_bits(m) if bits is None else bits
    dp = next_pow2(d)
    codes = unpack_bits(tensors[prefix + "codes"], bits, dp).reshape(*lead, dp)
    y = centroid_values(codes, tensors[prefix + "scales"], bits)
    if m["qjl"]:
        y = y + turboquant_qjl.residual(tensors, prefix, lead, dp, m["seed"], m["layer"])
    return y


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
