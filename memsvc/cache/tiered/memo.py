"""Tensors derived from a tiered layer's state, kept between calls while the state they come from is unchanged.

A layer's state tensors are replaced, never written in place (memsvc.cache.tiered.layer), so a derived tensor
(the fp32 form of the 8-bit block summaries, of the sink and warm rows, the live counts) stays right for as
long as the objects it was computed from are the very ones the layer holds: `derived` recomputes it when any
of them was replaced. The values live in the cold store's decoded cache (bounded, shared by the sessions,
counted on its own as the layer's decoded cold blocks are), under (owner, layer, name); without one,
every call computes them.
"""
from __future__ import annotations

from typing import Callable

import torch


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


def derived(layer, name: str, sources: tuple, make: Callable[[], object]):
    """make(), or what it returned when last called for `name` on this layer with the same `sources` objects
    (tensors or tuples of them; compared by identity). make returns a tensor or a tuple of tensors."""
    cache = layer.cold.decoded
    if cache is None:
        return make()
    key = (layer.cold.owner, layer.layer_idx, name)
    hit = cache.get(key, count=False)
    if hit is not None and len(hit[0]) == len(sources) and all(a is b for a, b in zip(hit[0], sources)):
        return hit[1]
    value = make()
    cache.put(key, (sources, value), _nbytes(value))
    return value
