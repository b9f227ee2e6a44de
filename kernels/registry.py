"""Name -> codec factory. One line per codec; an unknown name lists the valid ones.

Each value is a callable (usually the codec's dataclass) that takes keyword
config and returns a codec object satisfying `memsvc.kernels.codec.Codec`.
"""
from __future__ import annotations

from typing import Callable

from .codec import Codec

CODECS: dict[str, Callable[..., Codec]] = {
    # filled in by the codec files' entries below, one line each
}


def get_codec(name: str, **config) -> Codec:
    if name not in CODECS:
        valid = ", ".join(sorted(CODECS)) or "(none registered)"
        raise ValueError(f"unknown codec {name!r}; valid codecs: {valid}")
    return CODECS[name](**config)
