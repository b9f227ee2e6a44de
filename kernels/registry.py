"""Name -> codec factory. One line per codec; an unknown name lists the valid ones.

Each value is a callable (usually the codec's dataclass) that takes keyword
config and returns a codec object satisfying `memsvc.kernels.codec.Codec`.

This is the only module that knows codec names. Codecs that compose another one
(low-rank latents, the dense part of sparse outliers) take the inner codec as an
object; their entries below build it, and `get_codec` turns a name given for one
(`latent_codec="k8v8_k"`, `dense="kivi2_k"`) into that codec.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from .codec import Codec
from .lowrank_codec import LowRankCodec
from .sparse_outliers_codec import SparseOutlierCodec
from .turboquant_codec import TurboQuant
from .uniform_codec import UniformCodec

# the uniform codecs that others compose (registered below under the same names)
_K8V8_K = partial(UniformCodec, name="k8v8_k", bits=8, axis="token")
_KIVI4_K = partial(UniformCodec, name="kivi4_k", bits=4, group_size=32, axis="channel")
_KIVI4_V = partial(UniformCodec, name="kivi4_v", bits=4, group_size=32, axis="token")
_CH3_K = partial(UniformCodec, name="ch3_k", bits=3, group_size=64, axis="channel")

CODECS: dict[str, Callable[..., Codec]] = {
    # uniform asymmetric (min/max, fp16 scale + min per group); _k / _v: for keys / values
    "uniform": UniformCodec,  # generic: 8 bits, per-token, whole row; takes any config
    "kivi2_k": partial(UniformCodec, name="kivi2_k", bits=2, group_size=32, axis="channel"),
    "kivi2_v": partial(UniformCodec, name="kivi2_v", bits=2, group_size=32, axis="token"),
    "kivi4_k": _KIVI4_K,
    "kivi4_v": _KIVI4_V,
    "k8v8_k": _K8V8_K,
    "k8v8_v": partial(UniformCodec, name="k8v8_v", bits=8, axis="token"),
    "k6v4_k": partial(UniformCodec, name="k6v4_k", bits=6, axis="token"),
    "k6v4_v": partial(UniformCodec, name="k6v4_v", bits=4, axis="token"),
    "lowrank": LowRankCodec,  # full rank, fp16 latent: exact up to fp16
    "lowrank_ev99": partial(LowRankCodec, name="lowrank_ev99", explained_variance=0.99),
    "lowrank_ev99_k8": partial(LowRankCodec, name="lowrank_ev99_k8", explained_variance=0.99, latent_codec=_K8V8_K()),
    # dense-and-sparse (KVQuant): 1% largest |x| exact, the rest 4-bit KIVI (keys per-channel, values per-token)
    "sparse_outliers": partial(SparseOutlierCodec, dense=_KIVI4_K()),
    "sparse_outliers_v": partial(SparseOutlierCodec, name="sparse_outliers_v", dense=_KIVI4_V()),
    # 3-bit keys per channel, one scale and minimum per channel per 64 tokens (a cold block): 3.5 bits
    "ch3_k": _CH3_K,
    # tiered's cold keys (stored before RoPE): 1% largest |x| exact, the rest ch3_k; 4.0 bits all-in
    "kvq3_k": partial(SparseOutlierCodec, name="kvq3_k", dense=_CH3_K()),
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

_INNER = ("latent_codec", "dense")  # config keys whose value is a codec (given here by name, or as an object)


def get_codec(name: str, **config) -> Codec:
    if name not in CODECS:
        valid = ", ".join(sorted(CODECS)) or "(none registered)"
        raise ValueError(f"unknown codec {name!r}; valid codecs: {valid}")
    for key in _INNER:
        if isinstance(config.get(key), str):
            config[key] = get_codec(config[key])
    return CODECS[name](**config)
