"""Read-side variants of `tiered` on the stored cells of benchmarks/unbounded.py, without writing to the store.

Each cell session (`unbounded-needle-{n}-d{depth}`) is read from the LMDB data dir opened read-only and loaded
into a cache with the stored policy and a variant's read-side settings (TieredPolicy.READ_SIDE: far_layout,
far_retrieve, near, far, retrieve, ...); the question runs through that cache in this process and nothing is
committed. Per cell and variant: the greedy reply (found: it names the needle) and the answer's teacher-forced
log-probability, each on a fresh load, as benchmarks/unbounded.py measures them; with --ppl, the perplexity of
the next --ppl essay tokens after the plain session.

    python benchmarks/unbounded_layouts.py --lengths 32768 --depths 0.5,0.9 \\
        --variant shared: --variant point:far_layout=point --variant ordered:far_layout=ordered,near=6144

A variant is NAME:key=value,... (empty: the stored policy as the server reads it). Prints a line per
measurement on stderr, a table, and one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from memsvc.cache.base import Backing, KVShape
from memsvc.cache.factory import load_cache
from memsvc.cache.policies import record_policy
from memsvc.cache.storage import CheckedEntries
from memsvc.corpus import haystack_tokens
from memsvc.model import load_model
from memsvc.store.open import open_store


def _unbounded():
    """benchmarks/unbounded.py (its task, answer, log-probability and perplexity), so the cells are measured
    as it measures them."""
    spec = importlib.util.spec_from_file_location("unbounded", Path(__file__).parent / "unbounded.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["unbounded"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def variant(text: str) -> tuple[str, dict]:
    """NAME:key=value,... -> (NAME, read-side overrides); values are ints where they parse as ints."""
    name, _, rest = text.partition(":")
    out = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"variant {text!r}: {item!r} is not key=value")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, out


def load(model, store, sid: str, overrides: dict):
    """(the cell's cache with the variant's read-side settings, its token ids); reads only."""
    rec = store.get(sid)
    if rec is None:
        raise SystemExit(f"no session {sid!r} in the store")
    policy = record_policy(rec)
    bad = set(overrides) - set(getattr(policy, "READ_SIDE", ()))
    if bad:
        raise ValueError(f"not read-side settings of {policy.name}: {sorted(bad)}")
    policy = dataclasses.replace(policy, **overrides)
    kv = load_cache(policy, KVShape.of(model), rec.layout, rec.n_tokens - 1, Backing(CheckedEntries(store, sid)))
    return kv, store.tokens(sid)


def needle_at(tok, tokens: list[int]) -> int:
    """Where the essay needle starts in a cell's token ids."""
    from memsvc.eval.niah import NEEDLE
    ids = tok(f" {NEEDLE} ", add_special_tokens=False).input_ids[1:7]  # its middle: the same ids in any context
    for i in range(len(tokens) - len(ids)):
        if tokens[i:i + len(ids)] == ids:
            return i
    raise ValueError("no needle in the cell")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="32768")
    ap.add_argument("--depths", default="0.5,0.9")
    ap.add_argument("--variant", action="append", type=variant, default=None)
    ap.add_argument("--ppl", type=int, default=0, help="tokens of perplexity after the plain session (0: none)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--full-tail", type=int, default=0,
                    help="also `full` on the opening instruction + the cell's last N tokens, and on the last N alone")
    ap.add_argument("--full-at", type=int, default=0, help="with --full-tail N: also `full` on the instruction + N "
                    "tokens of the cell ending this many tokens after the needle (its distance in the question)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEMSVC_HOME", Path.home() / ".cache/memsvc"))
                    / "bench" / "unbounded" / "data")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ub = _unbounded()
    task = ub.ESSAY
    model = load_model(args.model)
    tok = model.tokenizer
    q = task.parts(tok)[1]
    want = ub.answer_ids(tok, task, "")
    variants = args.variant or [("shared", {})]
    rows = []
    with open_store(args.data, readonly=True) as store:
        for n in [int(x) for x in args.lengths.split(",")]:
            for name, over in variants:
                cells = [(d, f"{ub.plain_id(task, n, 'tiered')}-d{int(round(d * 100)):03d}")
                         for d in map(float, args.depths.split(","))]
                for depth, sid in cells:
                    t0 = time.perf_counter()
                    kv, tokens = load(model, store, sid, over)
                    r = ub.answer(model, kv, tokens[-1:] + q, task.found(""), args.new_tokens)
                    dist = kv.stats().get("max_distance", 0)
                    kv, tokens = load(model, store, sid, over)
                    lp = ub.logprob(model, kv, tokens[-1:] + q, want)
                    rows.append({"tokens": n, "variant": name, "settings": over, "depth": depth, "found": r["found"],
                                 "reply": r["reply"], "logprob": lp, "max_distance": dist,
                                 "seconds": time.perf_counter() - t0})
                    ub.log(f"{n:,} {name} depth {depth:.2f}: found={r['found']} {r['reply']!r} lp={lp:.2f} "
                           f"max distance {dist} ({rows[-1]['seconds']:.0f} s)")
                for depth, sid in cells if args.full_tail and name == variants[0][0] else ():
                    intro, tokens = task.parts(tok)[0], store.tokens(sid)
                    cuts = [("full-intro+tail", intro + tokens[-(args.full_tail - len(intro)):]),
                            ("full-tail", tokens[-args.full_tail:])]
                    if args.full_at:
                        end = needle_at(tok, tokens) + args.full_at
                        lo = max(len(intro), end - args.full_tail + len(intro))
                        cuts = [(f"full-at-{args.full_at}", intro + tokens[lo:end])]
                    for kind, ids in cuts:
                        r = ub.window_cell(model, task, ids, "", args.new_tokens, "full", len(ids), depth)
                        rows.append({"tokens": n, "variant": kind, "settings": {}, "depth": depth, "found": r["found"],
                                     "reply": r["reply"], "logprob": r["logprob"], "max_distance": len(ids)})
                if args.ppl:
                    kv, tokens = load(model, store, ub.plain_id(task, n, "tiered"), over)
                    cont = haystack_tokens(tok, n + args.ppl)[n:]
                    p = ub.ppl(model, kv, tokens[-1], cont)
                    rows.append({"tokens": n, "variant": name, "settings": over, "ppl": p})
                    ub.log(f"{n:,} {name}: ppl {p:.2f}")
    for r in rows:
        what = f"ppl {r['ppl']:.2f}" if "ppl" in r else \
            f"depth {r['depth']:.0%} found={r['found']!s:5} lp {r['logprob']:8.2f} dist {r['max_distance']}"
        print(f"{r['tokens']:>7,} {r['variant']:>12} {what}")
    print(json.dumps({"benchmark": "unbounded_layouts", "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
