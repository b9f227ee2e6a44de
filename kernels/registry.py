"""Name -> codec factory. One line per codec; an unknown name lists the valid ones.

Each value is a callable (usually the codec's dataclass) that takes keyword
config and returns a codec object satisfying `memsvc.kernels.codec.Codec`.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from .codec import Codec
from .lowrank import LowRankCodec
from .turboquant import TurboQuant

CODECS: dict[str, Callable[..., Codec]] = {
    # filled in by the codec files' entries below, one line each
    "lowrank": LowRankCodec,  # full rank, fp16 latent: exact up to fp16
    "lowrank_ev99": partial(LowRankCodec, name="lowrank_ev99", explained_variance=0.99),
    # TurboQuant: keys and values are named separately by a policy (e.g. K "turbo4", V "turbo3")
    "turbo": TurboQuant,  # 3-bit MSE, Hadamard, norm-corrected
    "turbo2": partial(TurboQuant, name="turbo2", bits=2),
    "turbo3": partial(TurboQuant, name="turbo3", bits=3),
    "turbo4": partial(TurboQuant, name="turbo4", bits=4),
    "turbo3_haar": partial(TurboQuant, name="turbo3_haar", bits=3, rotation="haar"),
    "turbo3_qjl": partial(TurboQuant, name="turbo3_qjl", bits=3, qjl=True),  # 2-bit MSE + 1-bit QJL (keys)
    "turbo4_qjl": partial(TurboQuant, name="turbo4_qjl", bits=4, qjl=True),
    "turbo2_out8": partial(TurboQuant, name="turbo2_out8", bits=2, outlier_channels=8),  # 8 channels at 3 bits
    "turbo3_out8": partial(TurboQuant, name="turbo3_out8", bits=3, outlier_channels=8),
}


def get_codec(name: str, **config) -> Codec:
    if name not in CODECS:
        valid = ", ".join(sorted(CODECS)) or "(none registered)"
        raise ValueError(f"unknown codec {name!r}; valid codecs: {valid}")
    return CODECS[name](**config)
