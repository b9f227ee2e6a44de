"""The one forward path: token ids through the model on top of a session's cache, in chunks.

The session manager, repair's rebuild and the evaluation all call `run`, so what is measured is what is served.
The model attends through memsvc's attention function (memsvc.cache.attention): a tiered cache's layers read
their tiers, any other cache gets SDPA.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .attention import use_memsvc_attention


@torch.no_grad()
def run(model, cache, ids: Sequence[int], chunk: int, *, all_logits: bool = False,
        on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """Feed ids through model (a LoadedModel) on cache, `chunk` tokens per model call; returns the last
    token's logits [V] (fp32), or every token's [n, V] with all_logits. on_chunk(n) is told the size of
    each call once it ran (the session manager logs them: memsvc.repair replays that log)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if not len(ids):
        raise ValueError("nothing to run through the model")
    use_memsvc_attention(model.model)
    outs = []
    for lo in range(0, len(ids), chunk):
        part = torch.tensor([list(ids[lo:lo + chunk])], dtype=torch.long, device=model.device)
        with cache.attending():
            out = model.model(input_ids=part, cache=cache, use_cache=True, logits_to_keep=0 if all_logits else 1)
        outs.append(out.logits[0].float())
        if on_chunk is not None:
            on_chunk(part.shape[1])
    return torch.cat(outs) if all_logits else outs[-1][-1]
