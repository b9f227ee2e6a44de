"""Sessions longer than the model's window (issue 18): recall, perplexity and speed at 8k to 128k tokens.

Build (once per length, kept in --data and reused): a `tiered` session of L tokens of the essays
(memsvc.corpus), appended --append tokens per Append through the session manager (the path of the Append
RPC), with --needles needles "The secret code of the <name> room is <5 digits>." placed at depths 0..100% of
the whole history. The continuation's next --ppl tokens of the essays are kept for perplexity.

Measure, after a restart (a new session manager over the same LMDB store: nothing resident):
- recall: per needle, a fork of the session (shares every block), Resume (load the fork), the question
  "... What is the secret code of the <name> room?" and the answer's prefix appended, greedy reply of
  --new-tokens tokens: found when the code is in it. The answer's log-probability (teacher forced, summed over
  the code's tokens) on a second fork. Resume->first token (load + question + first token) and decode tok/s
  from the greedy reply.
- perplexity of the next --ppl tokens after the whole history (on a third fork).
- the same questions and perplexity for `full` truncated to the last window (what starting over in a new
  session gives: the last 8,192 - ppl - 64 tokens of the history), and with --streaming for `streaming`
  fed the whole history (sinks + the last window).

    python benchmarks/unbounded.py --lengths 8192,32768 --plot benchmarks/figures/unbounded-recall.png

Prints progress on stderr, a table, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from memsvc.cache.factory import new_cache
from memsvc.cache.forward import run
from memsvc.cache.base import KVShape
from memsvc.cache.policies import get_policy
from memsvc.corpus import haystack_tokens
from memsvc.model import load_model
from memsvc.sessions.manager import SessionManager
from memsvc.store.open import open_store

NAMES = ["amber", "blue", "cedar", "dune", "ember", "frost", "garnet", "harbor", "iris", "jade", "kelp", "lilac",
         "moss", "north", "olive", "pearl"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def needles(k: int, seed: int) -> list[tuple[float, str, str]]:
    """k needles (depth, name, code), depths evenly 0..1."""
    rng = random.Random(seed)
    return [(i / max(1, k - 1), NAMES[i % len(NAMES)], str(rng.randint(10000, 99999))) for i in range(k)]


def history(tok, n: int, placed: list[tuple[float, str, str]], n_ppl: int) -> tuple[list[int], list[int]]:
    """(history ids of about n tokens with the needles spliced in at their depths, the next n_ppl essay ids)."""
    hay = haystack_tokens(tok, n + n_ppl)
    base, cont = hay[:n], hay[n:]
    out, at = [], 0
    for depth, name, code in placed:
        cut = min(n, int(round(depth * n)))
        out += base[at:cut] + tok(f" The secret code of the {name} room is {code}. ", add_special_tokens=False).input_ids
        at = cut
    return out + base[at:], cont


def question(tok, name: str) -> list[int]:
    return tok(f"\n\nQuestion: what is the secret code of the {name} room?\nAnswer: The secret code of the {name} "
               f"room is", add_special_tokens=False).input_ids


def build(mgr: SessionManager, sid: str, ids: list[int], step: int) -> float:
    """Append ids to session sid (continuing a part-built one); seconds spent this time."""
    have = mgr.view(sid).tokens if sid in {v.id for v in mgr.list(limit=1000)} else None
    if have is None:
        mgr.create(sid, policy="tiered")
        have = 0
    t0 = time.perf_counter()
    for lo in range(have, len(ids), step):
        mgr.append(sid, tokens=ids[lo:lo + step])
        done = min(len(ids), lo + step)
        rate = (done - have) / (time.perf_counter() - t0)
        log(f"  {sid}: {done:,}/{len(ids):,} tokens ({rate:,.0f} tok/s, {(len(ids) - done) / rate / 60:.1f} min left)")
    return time.perf_counter() - t0


def answer(model, kv, first: list[int], code: str, n_new: int) -> dict:
    """Greedy reply after `first` (question ids with the pending token before them) on kv."""
    tok = model.tokenizer
    t0 = time.perf_counter()
    logits = run(model, kv, first, 512)
    out = [int(logits.argmax())]
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        out.append(int(run(model, kv, out[-1:], 1).argmax()))
    dt = time.perf_counter() - t1
    text = tok.decode(out)
    return {"found": code in text.replace(" ", ""), "reply": text, "question_to_first_s": t_first,
            "decode_tok_s": (n_new - 1) / dt if dt > 0 else 0.0}


def logprob(model, kv, first: list[int], code_ids: list[int]) -> float:
    """log p(code | history, question) on kv, teacher forced."""
    logits = run(model, kv, first + code_ids[:-1], 512, all_logits=True)[-len(code_ids):]
    lp = torch.log_softmax(logits.float(), -1)
    return float(sum(lp[i, t] for i, t in enumerate(code_ids)))


def ppl(model, kv, first: int, cont: list[int]) -> float:
    logits = run(model, kv, [first] + cont[:-1], 512, all_logits=True)
    lp = torch.log_softmax(logits.float(), -1)
    return math.exp(-float(lp[torch.arange(len(cont)), torch.tensor(cont)].mean()))


def measure_tiered(model, store, sid: str, placed, cont: list[int], n_new: int) -> dict:
    mgr = SessionManager(store, model, sweep_every=0)  # a restart: nothing resident
    try:
        rows = []
        for i, (depth, name, code) in enumerate(placed):
            q = question(model.tokenizer, name)
            code_ids = model.tokenizer(f" {code}", add_special_tokens=False).input_ids
            fork = f"{sid}-q{i}"
            mgr.fork(sid, fork)
            t0 = time.perf_counter()
            live = mgr._load(fork)  # Resume: the fork's summaries and states from the store
            t_load = time.perf_counter() - t0
            r = answer(model, live.kv, live.tokens[-1:] + q, code, n_new)
            r["resume_to_first_s"] = t_load + r["question_to_first_s"]
            r["resume_s"] = t_load
            mgr.delete(fork)
            mgr.fork(sid, fork)
            live = mgr._load(fork)
            r["logprob"] = logprob(model, live.kv, live.tokens[-1:] + q, code_ids)
            mgr.delete(fork)
            r.update(depth=depth, name=name, code=code)
            rows.append(r)
            log(f"  tiered {sid} needle {i} depth {depth:.2f}: found={r['found']} {r['reply']!r} "
                f"lp={r['logprob']:.2f} first={r['resume_to_first_s']:.2f}s")
        mgr.fork(sid, f"{sid}-ppl")
        live = mgr._load(f"{sid}-ppl")
        p = ppl(model, live.kv, live.tokens[-1], cont)
        stats = live.kv.stats()
        mgr.delete(f"{sid}-ppl")
        return {"rows": rows, "ppl": p, "max_distance": stats.get("max_distance", 0)}
    finally:
        mgr.close()


def measure_window(model, ids: list[int], placed, cont: list[int], n_new: int, policy: str, window: int) -> dict:
    """`full` on the last `window` tokens of the history, or `streaming` fed all of it; a checkpoint per question."""
    shape = KVShape.of(model)
    kv = new_cache(get_policy(policy), shape)
    feed = ids[-window:] if policy == "full" else ids
    t0 = time.perf_counter()
    run(model, kv, feed[:-1], 512)
    log(f"  {policy}: {len(feed) - 1:,} tokens in {time.perf_counter() - t0:.0f} s")
    rows = []
    for depth, name, code in placed:
        q = question(model.tokenizer, name)
        code_ids = model.tokenizer(f" {code}", add_special_tokens=False).input_ids
        snap = kv.checkpoint()
        r = answer(model, kv, feed[-1:] + q, code, n_new)
        kv.restore(snap)
        snap = kv.checkpoint()
        r["logprob"] = logprob(model, kv, feed[-1:] + q, code_ids)
        kv.restore(snap)
        r.update(depth=depth, name=name, code=code)
        rows.append(r)
    p = ppl(model, kv, feed[-1], cont)
    return {"rows": rows, "ppl": p}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = sorted({k for r in results for k in r["kinds"]}, key=["tiered", "full-last-window", "streaming"].index)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 1, 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        cols = [r for r in results if kind in r["kinds"]]
        depths = [row["depth"] for row in cols[0]["kinds"][kind]["rows"]]
        grid = [[row["logprob"] for row in r["kinds"][kind]["rows"]] for r in cols]
        im = ax.imshow(list(map(list, zip(*grid))), vmin=-12, vmax=0, cmap="viridis", aspect="auto")
        for x, r in enumerate(cols):
            for y, row in enumerate(r["kinds"][kind]["rows"]):
                ax.text(x, y, "found" if row["found"] else "-", ha="center", va="center", fontsize=7,
                        color="white" if row["logprob"] < -6 else "black")
        ax.set_xticks(range(len(cols)), [f"{r['tokens'] // 1024}k" for r in cols])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(kind)
        ax.set_xlabel("history (tokens)")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), label="log p(code)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    log(f"wrote {path}")


def table(results: list[dict]) -> str:
    lines = [f"{'tokens':>8} {'kind':>17} {'recall':>7} {'mean lp':>8} {'ppl':>7} {'resume->1st':>11} "
             f"{'decode':>8} {'max dist':>8}"]
    for r in results:
        for kind, m in r["kinds"].items():
            rows = m["rows"]
            first = statistics.median(x.get("resume_to_first_s", x["question_to_first_s"]) for x in rows)
            dec = statistics.median(x["decode_tok_s"] for x in rows)
            lines.append(f"{r['tokens']:>8,} {kind:>17} {sum(x['found'] for x in rows):>3}/{len(rows):<3} "
                         f"{statistics.mean(x['logprob'] for x in rows):>8.2f} {m['ppl']:>7.2f} {first:>10.2f}s "
                         f"{dec:>6.1f}/s {m.get('max_distance', ''):>8}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--needles", type=int, default=8)
    ap.add_argument("--append", type=int, default=2048, help="tokens per Append while building")
    ap.add_argument("--ppl", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--window", type=int, default=8192, help="the model's context, for the baselines")
    ap.add_argument("--baselines", default="full", help="comma list of full, streaming ('' for none)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEMSVC_HOME", Path.home() / ".cache/memsvc"))
                    / "bench" / "unbounded" / "data")
    ap.add_argument("--model", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    args.data.mkdir(parents=True, exist_ok=True)
    built_path = args.data.parent / "built.json"
    built = json.loads(built_path.read_text()) if built_path.exists() else {}
    results = []
    for n in [int(x) for x in args.lengths.split(",")]:
        placed = needles(args.needles, args.seed + n)
        ids, cont = history(model.tokenizer, n, placed, args.ppl)
        sid = f"unbounded-{n}"
        with open_store(args.data) as store:
            mgr = SessionManager(store, model, sweep_every=0)
            try:
                log(f"build {sid}: {len(ids):,} tokens")
                secs = build(mgr, sid, ids, args.append)
            finally:
                mgr.close()
            if secs > 1:
                built[sid] = built.get(sid, 0.0) + secs
                built_path.write_text(json.dumps(built, indent=1))
            log(f"measure {sid}")
            kinds = {"tiered": measure_tiered(model, store, sid, placed, cont, args.new_tokens)}
        keep = args.window - args.ppl - 64
        for b in [x for x in args.baselines.split(",") if x]:
            kinds["full-last-window" if b == "full" else b] = measure_window(
                model, ids, placed, cont, args.new_tokens, b, keep)
        results.append({"tokens": len(ids), "build_s": built.get(sid), "kinds": kinds})
        print(table(results[-1:]), flush=True)
    print(table(results))
    if args.plot:
        plot(results, args.plot)
    print(json.dumps({"benchmark": "unbounded", "results": results}))


if __name__ == "__main__":
    main()
