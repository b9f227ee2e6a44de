"""The uniform asymmetric codec (KIVI, K8V8, K6V4): `uniform.py`'s math as a `Codec`.

`UniformCodec(bits, group_size, axis)` encodes `x: [..., T, D]` into codes
bit-packed into one stream per block plus fp16 scales and minima per group (see
`uniform.py` for the grouping and the rounding). Quantization and packing go
through `dispatch`, so Triton runs on CUDA and the torch reference on CPU; both
write the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import Packed
from .dispatch import dequantize, pack_bits, quantize, unpack_bits
from .uniform import check_config


@dataclass(frozen=True)
class UniformCodec:
    """Uniform asymmetric quantization of `[..., T, D]` blocks; see `uniform.py`."""

    bits: int = 8
    group_size: int | None = None
    axis: str = "token"
    name: str = "uniform"

    def __post_init__(self):
        check_config(self.bits, self.group_size, self.axis)

    def encode(self, x: torch.Tensor) -> Packed:
        # x: [..., T, D] floating
        if not torch.is_floating_point(x) or x.dim() < 2:
            raise ValueError(f"expected a floating tensor [..., T, D], got {x.dtype} of shape {tuple(x.shape)}")
        codes, scale, mn = quantize(x, self.bits, self.group_size, self.axis)
        return Packed(
            codec=self.name,
            shape=tuple(x.shape),
            dtype=x.dtype,
            tensors={"codes": pack_bits(codes.reshape(-1), self.bits), "scale": scale, "min": mn},
            meta={"bits": self.bits, "group_size": self.group_size, "axis": self.axis},
        )

    def decode(self, p: Packed) -> torch.Tensor:
        # -> x_hat: p.shape, p.dtype
        try:
            bits, group_size, axis = p.meta["bits"], p.meta["group_size"], p.meta["axis"]
            packed, scale, mn = p.tensors["codes"], p.tensors["scale"], p.tensors["min"]
        except KeyError as e:
            raise ValueError(f"not a uniform-quantized record (codec {p.codec!r}): missing {e}") from None
        check_config(bits, group_size, axis)
        numel = 1
        for n in p.shape:
            numel *= n
        codes = unpack_bits(packed, bits, numel).reshape(p.shape)
        return dequantize(codes, scale, mn, group_size, axis, p.dtype)

    def nbytes(self, p: Packed) -> int:
        return p.nbytes()
