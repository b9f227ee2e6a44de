"""The codec settings benchmarks/codecs.py measures, and the distinct codecs it times on one core.

A setting pairs a key codec and a value codec, each a factory layer -> Codec (TurboQuant gets layer=l, so
each layer has its own rotation); None keeps that side as fp16. TARGETS are issue 3's throughput targets
per codec family, in MB/s of fp16 input (encode, decode; None: no target).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from memsvc.kernels.codec import Codec
from memsvc.kernels.registry import get_codec

Factory = Callable[[int], Codec]  # layer -> codec


def reg(name: str, **config) -> Factory:
    return lambda layer: get_codec(name, **config)


def turbo(name: str) -> Factory:
    return lambda layer: get_codec(name, layer=layer)


@dataclass(frozen=True)
class Setting:
    label: str
    key: Factory | None  # None: kept as fp16 (16 bits, no codec)
    value: Factory | None
    what: str


SETTINGS = [
    Setting("k8v8", reg("k8v8_k"), reg("k8v8_v"), "8-bit per-token keys and values"),
    Setting("k6v4", reg("k6v4_k"), reg("k6v4_v"), "6-bit keys, 4-bit values, per-token"),
    Setting("kivi4", reg("kivi4_k"), reg("kivi4_v"), "4-bit, group 32: keys per-channel, values per-token"),
    Setting("kivi2", reg("kivi2_k"), reg("kivi2_v"), "2-bit, group 32: keys per-channel, values per-token"),
    Setting("turbo4", turbo("turbo4"), turbo("turbo4"), "TurboQuant-MSE 4-bit, Hadamard, norm-corrected"),
    Setting("turbo3", turbo("turbo3"), turbo("turbo3"), "TurboQuant-MSE 3-bit"),
    Setting("turbo2", turbo("turbo2"), turbo("turbo2"), "TurboQuant-MSE 2-bit"),
    Setting("turbo K4/V3", turbo("turbo4"), turbo("turbo3"), "TurboQuant-MSE, 4-bit keys, 3-bit values"),
    Setting("turbo3 qjl-K", turbo("turbo3_qjl"), turbo("turbo3"), "keys 2-bit MSE + 1-bit QJL, values turbo3"),
    Setting("turbo3 haar", turbo("turbo3_haar"), turbo("turbo3_haar"), "TurboQuant-MSE 3-bit, dense Haar rotation"),
    Setting("turbo3 out8", turbo("turbo3_out8"), turbo("turbo3_out8"), "3-bit + 8 outlier channels at 4 bits"),
    Setting("turbo2 out8", turbo("turbo2_out8"), turbo("turbo2_out8"), "2-bit + 8 outlier channels at 3 bits"),
    Setting("lowrank32 K", reg("lowrank", rank=32), None, "keys PCA rank 32, fp16 latent; values fp16"),
    Setting("lowrank16 K", reg("lowrank", rank=16), None, "keys PCA rank 16, fp16 latent; values fp16"),
    Setting("lowrank32-k8 K", reg("lowrank", rank=32, latent_codec="k8v8_k"), None,
            "keys PCA rank 32, 8-bit latent; values fp16"),
    Setting("lowrank ev99-k8 K", reg("lowrank", explained_variance=0.99, latent_codec="k8v8_k"), None, "keys PCA to 99% energy, 8-bit latent; values fp16"),
    Setting("sparse+kivi4", reg("sparse_outliers", dense="kivi4_k"), reg("sparse_outliers", dense="kivi4_v"), "1% largest |x| exact, rest kivi4"),
    Setting("sparse+kivi2", reg("sparse_outliers", dense="kivi2_k"), reg("sparse_outliers", dense="kivi2_v"),
            "1% largest |x| exact, rest kivi2"),
    Setting("kvq3 K / turbo3 V", reg("kvq3_k"), turbo("turbo3"),
            "tiered's cold codecs: keys 1% exact + 3-bit per channel (post-RoPE here), values turbo3"),
]

# distinct codecs timed on one core: (name, factory, family)
THROUGHPUT = [
    ("k8v8_k", reg("k8v8_k"), "uniform"),
    ("k6v4_k", reg("k6v4_k"), "uniform"),
    ("k6v4_v", reg("k6v4_v"), "uniform"),
    ("kivi4_k", reg("kivi4_k"), "uniform"),
    ("kivi4_v", reg("kivi4_v"), "uniform"),
    ("kivi2_k", reg("kivi2_k"), "uniform"),
    ("kivi2_v", reg("kivi2_v"), "uniform"),
    ("turbo4", turbo("turbo4"), "turbo"),
    ("turbo3", turbo("turbo3"), "turbo"),
    ("turbo2", turbo("turbo2"), "turbo"),
    ("turbo3_qjl", turbo("turbo3_qjl"), "turbo-variant"),
    ("turbo3_haar", turbo("turbo3_haar"), "turbo-variant"),
    ("turbo3_out8", turbo("turbo3_out8"), "turbo-variant"),
    ("lowrank r32", reg("lowrank", rank=32), "other"),
    ("lowrank r32 k8", reg("lowrank", rank=32, latent_codec="k8v8_k"), "other"),
    ("sparse_outliers", reg("sparse_outliers", dense="kivi4_k"), "other"),
    ("ch3_k", reg("ch3_k"), "uniform"),
    ("kvq3_k", reg("kvq3_k"), "other"),
]
TARGETS = {"uniform": (1000.0, None), "turbo": (500.0, 1000.0), "turbo-variant": (500.0, 1000.0)}  # MB/s enc, dec
