"""One model call over the next tokens of several sessions: the packed step of memsvc.sessions.steps.

The parts' tokens sit side by side along the sequence of one call made without a cache: the embeddings, the
linear layers, the MLP and the norms run on every part's rows at once (for a decode step, one read of the weights
for all sessions instead of one per session), each row at its own session's position (RoPE from the packed
position ids), and attention runs per part over its own cache (memsvc.cache.attention's packed mode). A part
alone gives the same tokens as `forward.run` (greedy), not the same bits: a matrix product sums a row in an
order that depends on how many rows it holds.

Models that attend a sliding window are not packed (`can_pack`): a part's mask here is plain causal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .attention import packing, use_memsvc_attention


@dataclass
class Part:
    """One session's tokens in a packed call: `ids` fed on top of `cache`; logits of the last token, or of every
    token with all_logits."""

    cache: object
    ids: Sequence[int]
    all_logits: bool = False

    def __post_init__(self):
        if not len(self.ids):
            raise ValueError("a packed part needs at least one token")


def can_pack(model) -> bool:
    """Whether model (a LoadedModel) can run packed calls: every layer attends all the tokens before it."""
    cfg = model.model.config
    return getattr(cfg, "sliding_window", None) is None and not getattr(cfg, "use_sliding_window", False)


@torch.no_grad()
def run_packed(model, parts: list[Part]) -> list[torch.Tensor]:
    """Feed every part's ids on top of its cache in one model call; returns per part the last token's logits [V]
    (fp32), or [n, V] for a part with all_logits. Each cache must belong to a different session."""
    if not parts:
        raise ValueError("nothing to run through the model")
    if len({id(p.cache) for p in parts}) != len(parts):
        raise ValueError("two parts of one packed call share a cache")
    if not can_pack(model):
        raise ValueError("this model attends a sliding window: its calls are not packed")
    use_memsvc_attention(model.model)
    ids, pos, bounds, keep = [], [], [], []
    for p in parts:
        start, n = p.cache.length, len(p.ids)
        lo = len(ids)
        ids.extend(int(t) for t in p.ids)
        pos.extend(range(start, start + n))
        bounds.append((p.cache, lo, lo + n))
        keep.extend(range(lo, lo + n) if p.all_logits else [lo + n - 1])
    dev = model.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=dev)  # [1, T]
    position_ids = torch.tensor([pos], dtype=torch.long, device=dev)  # [1, T]
    rows = torch.tensor(keep, dtype=torch.long, device=dev)  # [R] the rows whose logits are kept
    with packing(bounds):
        out = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=rows)
    logits = out.logits[0].float()  # [R, V]
    result, at = [], 0
    for p in parts:
        n = len(p.ids) if p.all_logits else 1
        result.append(logits[at:at + n] if p.all_logits else logits[at])
        at += n
    return result
