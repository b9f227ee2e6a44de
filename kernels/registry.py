"""Name -> codec factory. One line per codec; an unknown name lists the valid ones.

Each value is a callable (usually the codec's dataclass) that takes keyword
config and returns a codec object satisfying `memsvc.kernels.codec.Codec`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from .codec import Codec
from .lowrank import LowRankCodec

CODECS: dict[str, Callable[..., Codec]] = {
    # filled in by the codec files' entries below, one line each
    "lowrank": LowRankCodec,  # full rank, fp16 latent: exact up to fp16
    "lowrank_ev99": partial(LowRankCodec, name="lowrank_ev99", explained_variance=0.99),
}


def get_codec(name: str, **config) -> Codec:
    if name not in CODECS:
        valid = ", ".join(sorted(CODECS)) or "(none registered)"
        raise ValueError(f"unknown codec {name!r}; valid codecs: {valid}")
    return CODECS[name](**config)
