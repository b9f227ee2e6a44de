"""`memsvc eval ppl | niah | speed`: the fidelity harness on the real model (SmolLM2) and the essays.

Every policy runs on the same token ids in one process. `--match-budget`
gives each eviction baseline, at each context length, the resident bytes that
`tiered` measured there (its budget in fp16 tokens per head). Each command
prints progress on stderr, a Markdown table, and ends with one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

ALL = "full,k8v8,k6v4,kivi2,kivi4,turbo3,tiered,tiered-v8,tiered-k6,streaming,h2o,snapkv,pyramidkv"
EVICTION = ("streaming", "h2o", "snapkv", "pyramidkv")


def _list(s: str, cast=str) -> list:
    return [cast(x) for x in s.replace(" ", ",").split(",") if x]


def _load(threads: int):
    import torch

    from memsvc.model import load_model, pull_default
    if threads:
        torch.set_num_threads(threads)
    return load_model(pull_default())


def _check(policies):
    from memsvc.cache import POLICIES
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise click.BadParameter(f"unknown policy {bad[0]!r}; valid policies: {', '.join(sorted(POLICIES))}")


def _budget(resident_per_token: float, tokens: int, fp16_per_token: int) -> int:
    """Tokens per head that fit, at fp16, the resident bytes `tiered` used for `tokens` tokens."""
    return max(64, round(resident_per_token * tokens / fp16_per_token))


@click.group("eval")
def eval_cmd() -> None:
    """Fidelity and speed of every policy on the real model (SmolLM2-135M) and the essays."""


@eval_cmd.command("ppl")
@click.option("--policies", default=ALL, show_default=True)
@click.option("--prefix", "prefixes", default="2048,4096,8192", show_default=True, help="Prefix lengths.")
@click.option("--target", default=512, show_default=True, help="Scored tokens after the prefix.")
@click.option("--windows", default=1, show_default=True, help="Essay windows pooled per prefix length.")
@click.option("--match-budget/--no-match-budget", default=True, show_default=True)
@click.option("--threads", default=0, help="torch threads (0: torch's default).")
@click.option("--out", default=None, help="Write the rows as JSON here.")
def ppl_cmd(policies, prefixes, target, windows, match_budget, threads, out):
    """Perplexity of the next --target tokens after a compressed prefix, against full."""
    from . import ppl
    pols = _list(policies)
    _check(pols)
    m = _load(threads)
    rows = []
    for prefix in _list(prefixes, int):
        first = [p for p in pols if p not in EVICTION or not match_budget]
        rows += ppl.run(m, first, [prefix], target=target, n_windows=windows)
        later = [p for p in pols if p in EVICTION and match_budget]
        if later:
            tiered = next((r for r in rows if r["policy"] == "tiered" and r["prefix"] == prefix), None)
            if tiered is None:
                raise click.UsageError("--match-budget needs tiered among the policies")
            fp16 = _fp16(m)
            b = _budget(tiered["resident_bytes_per_token"], prefix, fp16)
            print(f"[ppl] eviction budget at {prefix}: {b} tokens per head", file=sys.stderr)
            more = ppl.run(m, ["full"] + later, [prefix], target=target, n_windows=windows,
                           overrides={p: {"budget": b} for p in later})
            rows += [dict(r, budget=b) for r in more if r["policy"] != "full"]
    ppl.add_dppl(rows)
    click.echo(ppl.table(rows, _fp16(m)))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    click.echo(json.dumps({"ppl": [{k: r[k] for k in ("policy", "prefix", "ppl", "dppl", "resident_bytes_per_token")}
                                   for r in rows]}))


def _fp16(m) -> int:
    from memsvc.cache import fp16_bytes_per_token
    return fp16_bytes_per_token(m.num_layers, m.num_kv_heads, m.head_dim)


@eval_cmd.command("niah")
@click.option("--policies", default=ALL, show_default=True)
@click.option("--lengths", default="1024,2048,4096,6144,8192", show_default=True)
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True)
@click.option("--match-budget/--no-match-budget", default=True, show_default=True)
@click.option("--heatmaps", default=None, help="Directory for niah_<policy>.png heatmaps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--split-question", "split", default=0, show_default=True, type=click.IntRange(0),
              help="Feed the prompt's last N tokens (question, chat template, answer prefix) as their own chunk "
                   "after the context, as a question appended to a stored session (0: one pass).")
@click.option("--task", default="passkey", show_default=True, type=click.Choice(["passkey", "needle"]),
              help="passkey: the classic pass key; needle: the essay needle (\"The best thing to do in San "
                   "Francisco is ...\").")
@click.option("--threads", default=0)
@click.option("--out", default=None, help="Write the cells as JSON here.")
def niah_cmd(policies, lengths, depths, match_budget, heatmaps, seed, split, task, threads, out):
    """Needle recall (passkey or essay needle) over lengths × depths; retention against full; heatmaps."""
    from . import niah
    pols = _list(policies)
    _check(pols)
    if "full" not in pols:
        pols = ["full"] + pols
    m = _load(threads)
    fp16 = _fp16(m)
    rows = []
    for n in _list(lengths, int):
        first = [p for p in pols if p not in EVICTION or not match_budget]
        got = niah.run_grid(m, first, [n], _list(depths, float), seed=seed + n, split=split, task=task)
        rows += got
        later = [p for p in pols if p in EVICTION and match_budget]
        if later:
            t = [r for r in got if r["policy"] == "tiered"]
            if not t:
                raise click.UsageError("--match-budget needs tiered among the policies")
            b = _budget(sum(r["resident_bytes_per_token"] for r in t) / len(t), t[0]["prompt_tokens"], fp16)
            print(f"[niah] eviction budget at {n}: {b} tokens per head", file=sys.stderr)
            rows += [dict(r, budget=b) for r in niah.run_grid(m, later, [n], _list(depths, float), seed=seed + n,
                                                              overrides={p: {"budget": b} for p in later},
                                                              split=split, task=task)]
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    _niah_report(rows, fp16, heatmaps)


def _niah_report(rows: list[dict], fp16: int, heatmaps: str | None) -> None:
    """The summary table, the heatmaps if asked, and the JSON line."""
    from . import niah
    summary = niah.summarize(rows, fp16)
    click.echo(niah.table(summary))
    if heatmaps:
        os.makedirs(heatmaps, exist_ok=True)
        for p in dict.fromkeys(r["policy"] for r in rows):
            what = "essay needle" if rows[0].get("task") == "needle" else "passkey"
            niah.heatmap(rows, p, os.path.join(heatmaps, f"niah_{p}.png"), what=what)
    click.echo(niah.dump(summary, rows))


@eval_cmd.command("niah-report")
@click.argument("files", nargs=-1, required=True)
@click.option("--heatmaps", default=None, help="Directory for niah_<policy>.png heatmaps.")
@click.option("--layers", default=30, show_default=True, help="Model layers (for the fp16 reference).")
@click.option("--kv-heads", default=3, show_default=True)
@click.option("--head-dim", default=64, show_default=True)
def niah_report_cmd(files, heatmaps, layers, kv_heads, head_dim):
    """Merge the --out cell files of several `eval niah` runs (e.g. lengths split over processes)."""
    from memsvc.cache import fp16_bytes_per_token

    rows = []
    for path in files:
        with open(path) as f:
            rows += json.load(f)
    _niah_report(rows, fp16_bytes_per_token(layers, kv_heads, head_dim), heatmaps)


@eval_cmd.command("speed")
@click.option("--policies", default="full,tiered", show_default=True)
@click.option("--lengths", default="4096,8192", show_default=True)
@click.option("--new", "n_new", default=32, show_default=True, help="Tokens decoded per measurement.")
@click.option("--threads", default=0)
@click.option("--decoded-cache", default=256 << 20, show_default=True, type=click.IntRange(min=0),
              help="Bytes of each tiered layer's recently decoded cold keys and values kept (as `serve`; 0 = none).")
def speed_cmd(policies, lengths, n_new, threads, decoded_cache):
    """Decode tokens/s after a prompt of each length (greedy, one token at a time)."""
    from memsvc import corpus

    from .runner import PolicyRun
    pols = _list(policies)
    _check(pols)
    m = _load(threads)
    rows = []
    for n in _list(lengths, int):
        ids = corpus.haystack_tokens(m.tokenizer, n)
        for p in pols:
            run = PolicyRun(m, p, decoded_cache=decoded_cache)
            cache = run.new_cache()
            t0 = time.time()
            logits = run.forward(cache, ids)
            run.end_prompt(cache)
            _, tps = run.decode_greedy(cache, logits, n_new)
            res = run.measure(cache)
            rows.append({"policy": p, "context": n, "decode_tok_s": tps, "resident_bytes_per_token":
                         res.resident_bytes / res.tokens, "seconds": time.time() - t0})
            print(f"[speed] {n} {p}: {tps:.2f} tok/s", file=sys.stderr, flush=True)
    click.echo("| policy | context | decode tok/s | resident B/token |\n|---|---:|---:|---:|")
    for r in rows:
        click.echo(f"| {r['policy']} | {r['context']} | {r['decode_tok_s']:.2f} | {r['resident_bytes_per_token']:,.0f} |")
    click.echo(json.dumps({"speed": rows}))
