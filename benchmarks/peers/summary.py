"""The peers run's rows summed up: correctness, one summary per setting, per-length retention, issue 7's target.

Retention: of the cells memsvc `full` answers, the share a method still answers. Rows are the dicts the
memsvc side and the peer side make (side, method, setting, cell, kind, length, ok, resident_bpt, ...).
Knows rows only: nothing of the model, the peers or the files.
"""
from __future__ import annotations

import math

from cells import task_of


def mark_correct(rows: list[dict], decode) -> None:
    for r in rows:
        if r["kind"] == "niah" and r.get("ok") and "tokens" in r:
            r["answer"] = decode(r["tokens"])
            r["correct"] = r["key"] in r["answer"]


def summarize(rows: list[dict], fp16_per_token: int, base: str = "full") -> list[dict]:
    """One line per setting: bytes, recall, retention and Δ log p against memsvc `full`, Δppl, decode tok/s."""
    full = {r["cell"]: r for r in rows if r["side"] == "memsvc" and r["method"] == base and r.get("ok")}
    out = []
    for s in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == s]
        ok = [r for r in mine if r.get("ok")]
        niah = [r for r in ok if r["kind"] == "niah"]
        ppl = [r for r in ok if r["kind"] == "ppl"]
        base_cells = [r for r in niah if r["cell"] in full and full[r["cell"]].get("correct")]
        dlp = [r["logprob"] - full[r["cell"]]["logprob"] for r in niah if r["cell"] in full]
        res = [r["resident_bpt"] for r in niah] or [r["resident_bpt"] for r in ppl]
        res_mean = sum(res) / len(res) if res else None
        longest = max((r["length"] for r in niah), default=None)
        tps = [r["decode_tok_s"] for r in niah if r["length"] == longest and r.get("decode_tok_s")]
        dppl = [math.exp(r["nll"]) / math.exp(full[r["cell"]]["nll"]) - 1 for r in ppl if r["cell"] in full]
        per_task = {}
        for t in dict.fromkeys(task_of(r) for r in niah):
            of = [r for r in base_cells if task_of(r) == t]
            per_task[t] = {"retention": sum(r["correct"] for r in of) / len(of) if of else None,
                           "full_correct": len(of)}
        out.append({
            "setting": s, "side": mine[0]["side"], "method": mine[0]["method"], "cells": len(niah),
            "failed": len(mine) - len(ok), "error": next((r.get("error") for r in mine if not r.get("ok")), None),
            "recall": sum(r["correct"] for r in niah) / len(niah) if niah else None,
            "retention": sum(r["correct"] for r in base_cells) / len(base_cells) if base_cells else None,
            "full_correct": len(base_cells), "tasks": per_task,
            "mean_dlogprob": sum(dlp) / len(dlp) if dlp else None,
            "resident_bytes_per_token": res_mean,
            "x_vs_fp16": fp16_per_token / res_mean if res_mean else None,
            "ppl": math.exp(ppl[0]["nll"]) if ppl else None,
            "dppl": dppl[0] if dppl else None,
            "ppl_resident_bytes_per_token": ppl[0]["resident_bpt"] if ppl else None,
            "decode_tok_s": sum(tps) / len(tps) if tps else None, "decode_at": longest,
        })
    return out


def by_length(rows: list[dict], base: str = "full", task: str | None = None) -> dict[str, dict[int, dict]]:
    """setting -> length -> {bytes (mean resident B/token of its NIAH cells), correct, of (cells `base` answers)};
    the cells of one task, or of every task (None)."""
    full = {r["cell"]: r for r in rows if r["side"] == "memsvc" and r["method"] == base and r.get("ok")}
    out: dict = {}
    for r in rows:
        if r["kind"] != "niah" or not r.get("ok") or task not in (None, task_of(r)):
            continue
        at = out.setdefault(r["setting"], {}).setdefault(r["length"], {"bytes": [], "correct": 0, "of": 0})
        at["bytes"].append(r["resident_bpt"])
        if r["cell"] in full and full[r["cell"]].get("correct"):
            at["of"] += 1
            at["correct"] += bool(r.get("correct"))
    for lengths in out.values():
        for at in lengths.values():
            at["bytes"] = sum(at["bytes"]) / len(at["bytes"])
    return out


def target_check(rows: list[dict], fp16: int, keep: float = 0.9, best: float = 0.99, smaller: float = 10.0) -> dict:
    """Issue 7's target, per length: (a) wherever a peer keeps >= `keep` retention, some tiered setting keeps at
    least as much with fewer resident bytes; (b) some tiered setting keeps >= `best` retention at >= `smaller`x
    fewer bytes than fp16. Lengths where `full` answers no cell are left out (no retention to compare)."""
    at = by_length(rows)
    side = {r["setting"]: r["side"] for r in rows}
    tiered = [s for s in at if side[s] == "memsvc" and s.startswith("tiered")]

    def ret(x):
        return x["correct"] / x["of"]
    a = []
    for p in (s for s in at if side[s] == "peer"):
        for n, x in sorted(at[p].items()):
            if not x["of"] or ret(x) < keep:
                continue
            wins = [t for t in tiered if n in at[t] and ret(at[t][n]) >= ret(x) and at[t][n]["bytes"] < x["bytes"]]
            a.append({"peer": p, "length": n, "retention": ret(x), "bytes": x["bytes"], "held": bool(wins),
                      "by": min(wins, key=lambda t: at[t][n]["bytes"]) if wins else None})
    b = [{"setting": t, "length": n, "retention": ret(x), "x_vs_fp16": fp16 / x["bytes"]}
         for t in tiered for n, x in sorted(at[t].items()) if x["of"] and ret(x) >= best and fp16 / x["bytes"] >= smaller]
    lengths = sorted({n for s in at for n, x in at[s].items() if x["of"]})
    return {"a": a, "a_held": all(x["held"] for x in a), "b": b,
            "b_lengths": sorted({x["length"] for x in b}), "lengths": lengths}
