"""Perplexity of the next `target` tokens after a prefix of the essays, per policy.

The prefix goes through the policy's cache in prefill chunks (so it is
compressed as it would be in the service) and ends the prompt (SnapKV and
PyramidKV select there); the target tokens are then fed as one chunk and
scored. Several essay windows (disjoint offsets) are pooled.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from memsvc import corpus

from .runner import PolicyRun


def windows(tok, prefix: int, target: int, n: int) -> list[list[int]]:
    ids = corpus.haystack_tokens(tok, (prefix + target) * n)
    w = prefix + target
    return [ids[i * w:(i + 1) * w] for i in range(n)]


def run(loaded, policies: list[str], prefixes: list[int], *, target: int = 512, n_windows: int = 1,
        overrides: dict | None = None, progress=sys.stderr) -> list[dict]:
    rows = []
    runs = {p: PolicyRun(loaded, p, **(overrides or {}).get(p, {})) for p in policies}
    for prefix in prefixes:
        wins = windows(loaded.tokenizer, prefix, target, n_windows)
        for p, r in runs.items():
            t0 = time.time()
            nll, count, res_bytes = 0.0, 0, 0.0
            for ids in wins:
                cache = r.new_cache()
                r.forward(cache, ids[:prefix])
                r.end_prompt(cache)  # the prefix is the prompt: SnapKV-style policies compress it here
                res = r.measure(cache)
                res_bytes += res.resident_bytes / res.tokens / len(wins)
                logits = r.forward(cache, ids[prefix:], all_logits=True)  # [target, V]
                tgt = torch.tensor(ids[prefix + 1:])
                lp = torch.log_softmax(logits[:-1], -1).gather(1, tgt.unsqueeze(1))
                nll -= float(lp.sum())
                count += tgt.numel()
            rows.append({"policy": p, "prefix": prefix, "target": target, "windows": n_windows,
                         "nll": nll / count, "ppl": math.exp(nll / count),
                         "resident_bytes_per_token": res_bytes, "seconds": time.time() - t0})
            print(f"[ppl] prefix {prefix} {p}: ppl {rows[-1]['ppl']:.3f} resident {res_bytes:,.0f} B/tok "
                  f"({time.time() - t0:.0f} s)", file=progress, flush=True)
    return add_dppl(rows)


def add_dppl(rows: list[dict]) -> list[dict]:
    """Set each row's perplexity change against the `full` row of its prefix (None without one)."""
    full = {r["prefix"]: r for r in rows if r["policy"] == "full"}
    for r in rows:
        r["dppl"] = r["ppl"] / full[r["prefix"]]["ppl"] - 1 if r["prefix"] in full else None
    return rows


def table(rows: list[dict], fp16_per_token: int) -> str:
    lines = ["| policy | prefix | ppl | Δppl vs full | resident B/token (prefix) | × vs fp16 |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = "—" if r.get("dppl") is None else f"{100 * r['dppl']:+.2f}%"
        lines.append(f"| {r['policy']} | {r['prefix']} | {r['ppl']:.3f} | {d} | {r['resident_bytes_per_token']:,.0f} | "
                     f"{fp16_per_token / r['resident_bytes_per_token']:.1f}× |")
    return "\n".join(lines)
