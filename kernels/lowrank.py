"""Low-rank projection (Palu / LoRC style): the two matmuls of the low-rank codec, pure torch.

`project_reference(x, basis, mean)` maps a block onto a basis of principal
directions (latent = (x - mean) @ basis) and `reconstruct_reference` maps a
latent back (x_hat = latent @ basis^T + mean). This module is the reference;
`lowrank_triton.py` is its Triton twin (same signatures, equal within float
rounding: the summation order differs), `dispatch.project` /
`dispatch.reconstruct` pick one, and `lowrank_codec.LowRankCodec` (fitting the
basis, the record layout) is built on them.
"""
from __future__ import annotations

import torch


def project_reference(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """x [..., T, D], basis [..., D, r], mean [..., 1, D] or None -> latent [..., T, r] fp32.

    latent = (x - mean) @ basis in fp32; leading dims broadcast as in torch.
    """
    xf = x.float()
    if mean is not None:
        xf = xf - mean.float()
    return xf @ basis.float()


def reconstruct_reference(latent: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """latent [..., T, r], basis [..., D, r], mean [..., 1, D] or None -> x_hat [..., T, D] of `dtype`.

    x_hat = latent @ basis^T (+ mean) in fp32, cast once to `dtype`.
    """
    x = latent.float() @ basis.float().transpose(-1, -2)
    if mean is not None:
        x = x + mean.float()
    return x.to(dtype)
