"""memsvc's rows of the peers run: each policy or tiered setting over each cell, in-process (PolicyRun).

Every row is appended to a JSONL store as it ends, keyed by a digest of what it ran, so an interrupted run
resumes. Resident bytes are counted as an fp16 model holds them (memsvc's compressed tiers are fp16 already).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from results import load_jsonl, log


def memsvc_key(name: str, base: str, overrides: dict, c: dict, n_new: int) -> str:
    """A memsvc row's identity: setting, cell and a digest of what it ran (policy, overrides, ids, n_new)."""
    what = {"policy": base, "overrides": overrides, "prompt_ids": c["prompt_ids"], "answer_ids": c["answer_ids"],
            "n_new": n_new}
    return f"{name}|{c['cell']}#" + hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_memsvc(m, policies: list[str], cells: list[dict], n_new: int = 8, variants: dict | None = None,
               store: Path | None = None, legacy: list[dict] | None = None) -> list[dict]:
    """memsvc's rows, policy x cell, shortest cells first. `variants` maps extra names to (policy, overrides)
    (the tiered settings). With `store` (a JSONL file) every row is appended as it ends and rows already
    there (same setting, cell and digest) are read back instead of run: an interrupted run resumes.
    `legacy`: rows of an older rows_memsvc.json, reused by (method, cell) (--reuse-memsvc)."""
    variants = variants or {}
    done = load_jsonl(store, "store_key") if store else {}  # ("key" is a NIAH row's passkey)
    old = {(r["method"], r["cell"]): r for r in legacy or []}
    spec = {p: variants.get(p, (p, {})) for p in policies}
    jobs = [(c, p) for c in sorted(cells, key=lambda c: len(c["prompt_ids"])) for p in policies]
    rows_at: dict = {}
    todo = []
    for c, p in jobs:
        k = memsvc_key(p, *spec[p], c, n_new)
        if k in done:
            rows_at[k] = done[k]
        elif (p, c["cell"]) in old:
            rows_at[k] = old[(p, c["cell"])]
        else:
            todo.append((c, p, k))
    if len(todo) < len(jobs):
        log(f"[memsvc] {len(jobs) - len(todo)}/{len(jobs)} rows from earlier runs, {len(todo)} to run")
    t_start = time.time()
    for i, (c, p, k) in enumerate(todo):
        row = _memsvc_row(m, p, spec[p], c, n_new)
        rows_at[k] = row
        if store:
            with store.open("a") as f:
                f.write(json.dumps(dict(row, store_key=k)) + "\n")
        eta = (time.time() - t_start) / (i + 1) * (len(todo) - i - 1)
        log(f"[memsvc {i + 1}/{len(todo)}] {p} {c['cell']}: {row['seconds']:.1f} s (eta {eta / 60:.1f} min)")
    # in --policies order, cells in the order given
    return [dict(rows_at[memsvc_key(p, *spec[p], c, n_new)], **({"task": c["task"]} if "task" in c else {}))
            for p in policies for c in cells]


def _memsvc_row(m, p: str, spec: tuple, c: dict, n_new: int) -> dict:
    """One policy x cell, on a fresh PolicyRun (its own block cache), as the harness runs it."""
    import torch

    from memsvc.eval.runner import PolicyRun
    base, overrides = spec
    run = PolicyRun(m, base, **overrides)
    t0 = time.time()
    cache = run.new_cache()
    row = {"side": "memsvc", "method": p, "setting": p, "cell": c["cell"], "kind": c["kind"],
           "length": c["length"], "prompt_tokens": len(c["prompt_ids"]), "ok": True}
    if overrides:
        row.update(policy=base, overrides=overrides)
    if c["kind"] == "ppl":
        run.forward(cache, c["prompt_ids"])
        run.end_prompt(cache)
        row["resident_bpt"] = _resident_fp16(run, cache) / len(c["prompt_ids"])
        logits = run.forward(cache, c["answer_ids"], all_logits=True)
        tgt = torch.tensor(c["answer_ids"][1:])
        lp = torch.log_softmax(logits[:-1], -1).gather(1, tgt.unsqueeze(1))
        row.update(nll=-float(lp.sum()) / tgt.numel(), count=tgt.numel())
    else:
        logits = run.forward(cache, c["prompt_ids"])
        run.end_prompt(cache)
        row["resident_bpt"] = _resident_fp16(run, cache) / len(c["prompt_ids"])
        snap = cache.checkpoint()
        row["logprob"] = run.teacher_logprob(cache, logits, c["answer_ids"])
        cache.restore(snap)
        row["tokens"], row["decode_tok_s"] = run.decode_greedy(cache, logits, n_new)
        run.flush(cache)
        row.update(depth=c["depth"], key=c["key"])
    row["seconds"] = time.time() - t0
    del cache
    return row


def _resident_fp16(run, cache) -> float:
    """Resident bytes with exact keys and values counted at fp16: the compressed caches keep their exact tiers at
    fp16 already; the baseline `full` holds every token at the model's dtype (fp32 on the CPU)."""
    got = run.measure(cache)
    return got.tokens * run.fp16_per_token() if run.name == "full" else got.resident_bytes
