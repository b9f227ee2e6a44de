"""kvpress compression ratios matched to memsvc's resident bytes, and the worker's input cells.

A press keeps int(n * (1 - ratio)) of a prompt's n tokens at fp16; the ratio that holds a memsvc row's mean
resident bytes per token is found per (row, budget group, length): the passkey cells ("niah"), the essay
needle ("needle") and the perplexity prefixes ("ppl") apart. Knows the cells' and rows' dicts, not the model.
"""
from __future__ import annotations

from cells import group
from settings import PEERS


def ratio_for_bytes(bytes_per_token: float, fp16_per_token: int) -> float:
    """kvpress compression ratio whose kept tokens (fp16) hold bytes_per_token per prompt token."""
    return round(min(0.99, max(0.0, 1.0 - bytes_per_token / fp16_per_token)), 4)


def matched_ratios(rows: list[dict], fp16_per_token: int, policies=("tiered",)) -> dict:
    """(policy, group, length) -> compression ratio matching `policy`'s mean resident bytes per token there
    (group: niah = the passkey cells, needle, ppl)."""
    acc: dict = {}
    for r in rows:
        if r["method"] in policies and r.get("ok", True):
            acc.setdefault((r["method"], group(r), r["length"]), []).append(r["resident_bpt"])
    return {k: ratio_for_bytes(sum(v) / len(v), fp16_per_token) for k, v in acc.items()}


def ratio_key(k: tuple) -> str:
    """(policy, kind, length) as written in the JSON and --matched: 'niah@1024' for tiered, else 'tiered-h64/niah@1024'."""
    pol, kind, n = k
    return f"{kind}@{n}" if pol == "tiered" else f"{pol}/{kind}@{n}"


def parse_ratio_key(s: str) -> tuple:
    pol, _, rest = s.rpartition("/")
    kind, _, n = rest.partition("@")
    return (pol or "tiered", kind, int(n))


def is_matched(ratio: str) -> bool:
    """A --ratios entry that names a memsvc row (matched to its bytes) rather than a number."""
    try:
        float(ratio)
        return False
    except ValueError:
        return True


def peer_cells(cells: list[dict], settings, ratios_at: dict, n_new: int = 8) -> list[dict]:
    """The worker's input: every cell x setting, the very token ids of the memsvc side."""
    out = []
    for label, peer, ratio in settings:
        method, params, protocol = PEERS[peer]
        for c in cells:
            if protocol == "pipeline" and c["kind"] == "ppl":
                continue  # a ppl prefix has no question: the pipeline reads it as the plain protocol does
            par = dict(params)
            proto = protocol if c["kind"] == "niah" else "prompt"  # a ppl prefix is all context
            if method == "kvpress":
                par["compression_ratio"] = ratios_at[(ratio, group(c), c["length"])] if is_matched(ratio) \
                    else float(ratio)
            w = {"id": f"{label}|{c['cell']}", "kind": c["kind"], "method": method, "params": par,
                 "protocol": proto, "prompt_ids": c["prompt_ids"], "answer_ids": c["answer_ids"], "n_new": n_new}
            if proto == "pipeline":
                w["context_len"] = c["context_len"]
            out.append(w)
    return out
