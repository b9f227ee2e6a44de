"""Low-rank keys (Palu / LoRC style): project each head's vectors onto a PCA basis.

Per leading index (layer, KV head), `fit(x [..., T, D])` returns an orthonormal
basis `[..., D, r]` of the principal directions of the vectors seen, with the
rank `r` chosen by a rank budget or by the fraction of (uncentered, or centered
when `center=True`) variance it explains. `encode` projects a block onto a basis
(a given one, typically fitted on the keys a session has seen so far, or one
fitted on the block itself) and stores the latent `[..., T, r]` -- as fp16, or
through another codec given as `latent_codec` (a codec object: this module
knows no codec names) -- *together with* the basis (fp16) and the mean, so a
Packed record holds everything needed to decode it.

At full rank (the default) the basis is square and orthogonal, so the round
trip is exact up to fp16 storage of latent and basis.

This module knows nothing of sessions or layers: whoever keeps a session's
running basis passes it in. The two matmuls go through `dispatch` (`project`,
`reconstruct`: Triton on CUDA, the torch reference of `lowrank.py` on CPU);
both paths give the same result within float rounding and the stored record is
the same format.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import Codec, Packed, nest_packed, unnest_packed
from .dispatch import project, reconstruct

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LowRankCodec:
    """PCA projection of keys; `rank` (a budget) wins over `explained_variance`.

    rank:               keep exactly min(rank, D) directions; None -> by variance
    explained_variance: keep the fewest directions explaining at least this
                        fraction of the energy (max over heads, so every head
                        reaches it); 1.0 -> full rank
    center:             subtract (and store) the per-head mean before projecting
    latent_codec:       a codec object for the latent [..., T, r] (e.g.
                        `registry.get_codec("k8v8_k")`); None stores it as fp16
    """

    rank: int | None = None
    explained_variance: float = 1.0
    center: bool = False
    latent_codec: Codec | None = None
    name: str = "lowrank"

    def __post_init__(self):
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive int or None, got {self.rank!r}")
        if not 0.0 < self.explained_variance <= 1.0:
            raise ValueError(f"explained_variance must be in (0, 1], got {self.explained_variance!r}")
        if self.latent_codec is not None and not all(hasattr(self.latent_codec, a) for a in ("encode", "decode", "name")):
            raise ValueError(f"latent_codec must be a codec object (such as registry.get_codec(name)) or None, "
                             f"got {self.latent_codec!r}")

    # -- basis ---------------------------------------------------------------

    def fit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [..., T, D] -> (basis [..., D, r] fp32 orthonormal columns, mean [..., 1, D] or None)."""
        _check_block(x)
        xf = x.float()
        mean = xf.mean(dim=-2, keepdim=True) if self.center else None
        if mean is not None:
            xf = xf - mean
        # cov: [..., D, D]; eigh returns ascending eigenvalues -> flip to descending
        cov = xf.transpose(-1, -2) @ xf
        evals, evecs = _eigh_one_thread(cov.double())
        evals, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)
        r = self._rank(evals)
        return evecs[..., :r].float().contiguous(), mean

    def _rank(self, evals: torch.Tensor) -> int:
        # evals: [..., D] descending
        d = evals.shape[-1]
        if self.rank is not None:
            return min(self.rank, d)
        if self.explained_variance >= 1.0:
            return d
        total = evals.sum(-1, keepdim=True)
        frac = evals.cumsum(-1) / total.clamp_min(torch.finfo(torch.float64).tiny)
        # per head: first index reaching the threshold (all-zero heads need 1)
        need = (frac < self.explained_variance).sum(-1) + 1
        need = torch.where(total.squeeze(-1) > 0, need, torch.ones_like(need))
        return int(need.max().clamp(max=d)) if need.numel() else 1

    # -- codec ---------------------------------------------------------------

    def encode(
        self,
        x: torch.Tensor,
        basis: torch.Tensor | None = None,
        mean: torch.Tensor | None = None,
    ) -> Packed:
        """x: [..., T, D]; basis: [..., D, r] (broadcastable), fitted on x when None."""
        _check_block(x)
        if basis is None:
            basis, mean = self.fit(x)
        elif basis.dim() < 2 or basis.shape[-2] != x.shape[-1]:
            raise ValueError(f"basis must be [..., D={x.shape[-1]}, r], got {tuple(basis.shape)}")
        if self.center and mean is None:
            raise ValueError("center=True needs the mean that goes with a given basis")
        basis16 = basis.to(torch.float16)
        mean16 = mean.to(torch.float16) if self.center else None
        # latent: [..., T, r]  (project with the stored fp16 basis and mean: decode sees the same ones)
        latent = project(x, basis16, mean16)
        tensors = {"basis": basis16.contiguous()}
        meta: dict = {"rank": int(basis.shape[-1]), "center": self.center}
        if self.center:
            tensors["mean"] = mean16.contiguous()
        if self.latent_codec is None:
            tensors["latent"] = latent.to(torch.float16).contiguous()
        else:
            inner_t, inner_m = nest_packed("latent", self.latent_codec.encode(latent))
            tensors.update(inner_t)
            meta["latent"] = inner_m
        return Packed(codec=self.name, shape=tuple(x.shape), dtype=x.dtype, tensors=tensors, meta=meta)

    def decode(self, p: Packed) -> torch.Tensor:
        if "latent" in p.meta:
            inner = unnest_packed("latent", p, p.meta["latent"])
            if self.latent_codec is None:
                raise ValueError(f"record {p.codec!r} holds a latent coded by {inner.codec!r}, "
                                 f"but this codec ({self.name!r}) has no latent_codec")
            latent = self.latent_codec.decode(inner)
        else:
            latent = p.tensors["latent"]
        # x_hat: [..., T, D] = latent [..., T, r] @ basis^T [..., r, D] (+ mean)
        mean = p.tensors["mean"] if p.meta.get("center") else None
        return reconstruct(latent, p.tensors["basis"], mean, p.dtype).reshape(p.shape)

    def nbytes(self, p: Packed) -> int:
        return p.nbytes()


def _check_block(x: torch.Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise ValueError(f"expected a float16/bfloat16/float32 block, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"expected a block [..., T, D], got shape {tuple(x.shape)}")


def _eigh_one_thread(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh with one intra-op thread.

    Measured on a 2-core CPU: eigh of [6, 128, 128] float64 takes ~5.5 s with 2
    threads and ~0.01 s with 1 (LAPACK's threads spin against each other on
    these small matrices). The thread count is process-wide, so it is restored
    right after.
    """
    if cov.device.type != "cpu":
        return torch.linalg.eigh(cov)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(cov)
    finally:
        torch.set_num_threads(prev)
