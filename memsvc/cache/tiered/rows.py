"""8-bit rows: a tensor's last dim quantized per row (codes uint8, scale and base fp16), and back.

`q8` rounds to nearest (the warm tier); `q8_rows` rounds in a chosen direction, so that a Quest bound built
from a min rounded down and a max rounded up stays an upper bound (the block summaries).
"""
from __future__ import annotations

import torch


def _q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric 8-bit: x [H, m, D] -> codes uint8, scale fp16 [H, m, 1], min fp16 [H, m, 1]."""
    x = x.float()
    mn = x.amin(-1, keepdim=True)
    scale = ((x.amax(-1, keepdim=True) - mn) / 255.0).to(torch.float16)
    mn16 = mn.to(torch.float16)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = ((x - mn16.float()) * inv).round_().clamp_(0, 255).to(torch.uint8)
    return codes, scale, mn16




def _dq8(q: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    codes, scale, mn = q
    return codes.float() * scale.float() + mn.float()


_ROUND = {"down": torch.floor, "up": torch.ceil, "near": torch.round}


def _q8_rows(x: torch.Tensor, rounding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block summaries x [nb, H, D] -> 8-bit codes [nb, H, D], scale and base fp16 [nb, H, 1].

    rounding "down" never dequantizes above x and "up" never below it (up to fp32 rounding), so a
    Quest bound built from a min rounded down and a max rounded up stays an upper bound."""
    x = x.float()
    lo = x.amin(-1, keepdim=True)
    base = lo.to(torch.float16)
    base = torch.where(base.float() > lo, torch.nextafter(base, torch.full_like(base, -float("inf"))), base)
    step = (x.amax(-1, keepdim=True) - base.float()) / 255.0
    scale = step.to(torch.float16)
    scale = torch.where(scale.float() < step, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = _ROUND[rounding]((x - base.float()) * inv).clamp_(0, 255).to(torch.uint8)
    return codes, scale, base


def _cat3(a: tuple, b: tuple) -> tuple:
    return tuple(torch.cat([x, y]) for x, y in zip(a, b))


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2's soft cap, in place: softcap * tanh(logits / softcap); the logits unchanged without one."""
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)
