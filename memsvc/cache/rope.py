"""Moving keys and queries along the model's rotary position embedding (RoPE).

RoPE rotates each pair of dims (i, i + R/2) of a query or key by its position times a frequency, so a score
depends only on the distance between query and key: q_t . k_p = q . R(p - t) k. Rotating a stored key by d
positions moves it by d exactly, and rotating a query moves every key it meets the other way. `Rope.rotate`
does that, in the pairing transformers' models use (the first R dims of the head, halves paired; R = 2 x the
frequencies, less than the head dim for partial rotary), with angles computed in float64 (positions of a
long session times the highest frequency are far beyond float32's precision for an angle).

Only RoPE whose frequencies do not depend on the sequence (default, linear, llama3, yarn) can be moved so;
`Rope.of(model)` is None otherwise (and for models without RoPE), and such sessions stay within the context.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

MOVABLE = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Rope:
    inv_freq: tuple[float, ...]  # the R / 2 frequencies, radians per position

    def __post_init__(self):
        if not self.inv_freq:
            raise ValueError("RoPE needs at least one frequency")

    @classmethod
    def of(cls, model) -> "Rope | None":
        """The RoPE of a transformers model (the first module with `inv_freq`), or None if it has none that
        can be moved (frequencies that change with the sequence length)."""
        for module in model.modules():
            inv = getattr(module, "inv_freq", None)
            if isinstance(inv, torch.Tensor) and inv.dim() == 1:
                if getattr(module, "rope_type", "default") not in MOVABLE:
                    return None
                return cls(tuple(float(x) for x in inv.double()))
        return None

    @cached_property
    def _freq(self) -> torch.Tensor:
        """The frequencies [R/2] in float64, made once (rotate runs per layer and step)."""
        return torch.tensor(self.inv_freq, dtype=torch.float64)

    @property
    def dims(self) -> int:
        return 2 * len(self.inv_freq)

    def rotate(self, x: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """x [..., T, D] moved by delta positions: delta an int, or a tensor [..., T] (broadcast over x's
        leading dims) of positions per row. Returns a new tensor in x's dtype."""
        R, half = self.dims, len(self.inv_freq)
        if x.shape[-1] < R:
            raise ValueError(f"a head of {x.shape[-1]} dims cannot take {R} rotary dims")
        freq = self._freq.to(x.device)  # [R/2]
        d = torch.as_tensor(delta, dtype=torch.float64, device=x.device)
        angle = d.unsqueeze(-1) * freq  # [..., T, R/2]
        cos, sin = angle.cos().to(torch.float32), angle.sin().to(torch.float32)
        xf = x.float()
        a, b = xf[..., :half], xf[..., half:R]
        out = xf.clone()
        out[..., :half] = a * cos - b * sin
        out[..., half:R] = b * cos + a * sin
        return out.to(x.dtype)
