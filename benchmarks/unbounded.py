"""Sessions longer than the model's window (issue 18): recall, perplexity and speed at 8k to 128k tokens.

Build (once per length, kept in --data and reused): the essays (memsvc.corpus) of L tokens as a `tiered`
session, appended --append tokens per Append through the session manager (the path of the Append RPC); and
per depth d one cell: the classic passkey needle ("The pass key is N. Remember it. N is the pass key.")
placed at d of the history. A cell forks the plain session where its needle goes (forks share every block),
appends the needle and the rest of the essays, so the L tokens before the first needle are run once. One
needle per history: this model answers a question about one of several similar needles with the wrong one.

Measure, after a restart (a new session manager over the same LMDB store: nothing resident):
- recall: per cell, a fork (shares every block), Resume (load the fork), the question ("What is the pass
  key?" and the answer's prefix "The pass key is") appended, a greedy reply of --new-tokens tokens: found
  when the key is in it; the key's log-probability (teacher forced, summed over its tokens) on a second fork.
  Resume->first token (load + question + first token) and decode tok/s from the greedy reply.
- perplexity of the next --ppl essay tokens after the plain session (on a fork).
- baselines, per cell: `full` on the cell's last window (what starting over in a new session keeps:
  8,192 - ppl - 64 tokens), `full` with the needle at the same depth of an 8k history (what the model finds
  inside its context: the reference a cell is judged against), and with --streaming, `streaming` (a budget of
  the same window) fed the whole cell history.

    python benchmarks/unbounded.py --lengths 8192,32768,65536 --plot benchmarks/figures/unbounded-recall.png

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
from dataclasses import dataclass
from pathlib import Path

import torch

from memsvc.cache.base import KVShape
from memsvc.cache.factory import new_cache
from memsvc.cache.forward import run
from memsvc.cache.policies import get_policy
from memsvc.corpus import haystack_tokens
from memsvc.errors import NotFound
from memsvc.eval.niah import ANSWER_PREFIX, NEEDLE, NEEDLE_KEY, NEEDLE_PREFIX, NEEDLE_QUESTION
from memsvc.model import load_model
from memsvc.sessions.manager import SessionManager
from memsvc.store.open import open_store



@dataclass(frozen=True)
class Task:
    """A needle task in the chat form of memsvc.eval.niah: the history opens a user turn with `intro`, the
    question closes it and the answer's `prefix` opens the assistant's turn."""
    name: str
    intro: str
    question: str
    prefix: str

    def needle(self, key: str) -> str:
        return f" The pass key is {key}. Remember it. {key} is the pass key. " if self is PASSKEY else f" {NEEDLE} "

    def answer(self, key: str) -> str:  # what follows the prefix; a reply holding found() found it
        return f" {key}" if self is PASSKEY else NEEDLE[len(NEEDLE_PREFIX):]

    def found(self, key: str) -> str:
        return key if self is PASSKEY else NEEDLE_KEY

    def parts(self, tok) -> tuple[list[int], list[int]]:
        """(ids before the history, ids after it up to the answer's prefix), as the chat template renders."""
        text = tok.apply_chat_template([{"role": "user", "content": self.intro + "\x00" + self.question}],
                                       add_generation_prompt=True, tokenize=False)
        before, after = text.split("\x00")
        return tok(before, add_special_tokens=False).input_ids, tok(after + self.prefix, add_special_tokens=False).input_ids


PASSKEY = Task("passkey", "What is the pass key in the following text?\n\nThere is an important info hidden inside a lot of "
               "irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n\n",
               "\n\nWhat is the pass key?", ANSWER_PREFIX)
ESSAY = Task("needle", "Read the text below and answer the question that follows it.\n\n",
             "\n\n" + NEEDLE_QUESTION + " Answer from the text.", NEEDLE_PREFIX)
TASKS = {t.name: t for t in (PASSKEY, ESSAY)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cut_at(n: int, depth: float) -> int:
    return min(n, int(round(depth * n)))


def grow(mgr: SessionManager, sid: str, ids: list[int], step: int, fork_of: tuple[str, int] | None = None,
         policy: str = "tiered") -> float:
    """Make session sid hold ids (continuing a part-built one; a new one forks `fork_of` = (session, its
    length) when given); seconds spent this time."""
    try:
        have = mgr.view(sid).record.n_tokens
    except NotFound:
        if fork_of is None:
            mgr.create(sid, policy=policy)
            have = 0
        else:
            mgr.fork(fork_of[0], sid)
            have = fork_of[1]
    t0 = time.perf_counter()
    for lo in range(have, len(ids), step):
        mgr.append(sid, tokens=ids[lo:lo + step])
        done = min(len(ids), lo + step)
        rate = (done - have) / (time.perf_counter() - t0)
        log(f"  {sid}: {done:,}/{len(ids):,} tokens ({rate:,.0f} tok/s, {(len(ids) - done) / rate / 60:.1f} min left)")
    return time.perf_counter() - t0


def plain_id(task: Task, n: int, policy: str) -> str:
    """The plain session of n tokens (the default policy's keep the names they were built under)."""
    return f"unbounded-{task.name}-{n}" + ("" if policy == "tiered" else f"-{policy}")


def build_length(mgr, task: Task, n: int, depths: list[float], keys: list[str], hay: list[int], step: int,
                 policy: str) -> float:
    """The plain session of n essay tokens and one cell per depth; seconds spent."""
    tok = mgr.model.tokenizer
    intro = task.parts(tok)[0]
    hay = intro + hay
    plain = plain_id(task, n, policy)
    secs = 0.0
    for depth, key in sorted(zip(depths, keys)):
        cut = len(intro) + cut_at(n, depth)
        sid = f"{plain}-d{int(depth * 100):03d}"
        try:
            mgr.view(sid)
        except NotFound:
            try:
                if mgr.view(plain).record.n_tokens > cut:
                    raise SystemExit(f"cell {sid} is missing and {plain} is already past its needle: start from a "
                                     f"new --data dir")
            except NotFound:
                pass
        secs += grow(mgr, plain, hay[:cut], step, policy=policy)
        ids = hay[:cut] + tok(task.needle(key), add_special_tokens=False).input_ids + hay[cut:len(intro) + n]
        secs += grow(mgr, sid, ids, step, (plain, cut))
    return secs + grow(mgr, plain, hay[:len(intro) + n], step, policy=policy)


def answer(model, kv, first: list[int], found: str, n_new: int) -> dict:
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
    return {"found": found in text, "reply": text, "question_to_first_s": t_first,
            "decode_tok_s": (n_new - 1) / dt if dt > 0 else 0.0}


def logprob(model, kv, first: list[int], answer_ids: list[int]) -> float:
    """log p(answer | history, question) on kv, teacher forced."""
    logits = run(model, kv, first + answer_ids[:-1], 512, all_logits=True)[-len(answer_ids):]
    lp = torch.log_softmax(logits.float(), -1)
    return float(sum(lp[i, t] for i, t in enumerate(answer_ids)))


def ppl(model, kv, first: int, cont: list[int]) -> float:
    logits = run(model, kv, [first] + cont[:-1], 512, all_logits=True)
    lp = torch.log_softmax(logits.float(), -1)
    return math.exp(-float(lp[torch.arange(len(cont)), torch.tensor(cont)].mean()))


def measure_tiered(model, store, task: Task, n: int, depths: list[float], keys: list[str], cont: list[int],
                   n_new: int, policy: str) -> dict:
    tok = model.tokenizer
    mgr = SessionManager(store, model, sweep_every=0)  # a restart: nothing resident
    q = task.parts(tok)[1]
    try:
        rows = []
        for depth, key in zip(depths, keys):
            sid = f"{plain_id(task, n, policy)}-d{int(depth * 100):03d}"
            want = answer_ids(tok, task, key)
            mgr.fork(sid, "probe")
            t0 = time.perf_counter()
            live = mgr._load("probe")  # Resume: the fork's summaries and states from the store
            t_load = time.perf_counter() - t0
            r = answer(model, live.kv, live.tokens[-1:] + q, task.found(key), n_new)
            r.update(resume_s=t_load, resume_to_first_s=t_load + r["question_to_first_s"], depth=depth, key=key,
                     max_distance=live.kv.stats().get("max_distance", 0))
            mgr.delete("probe")
            mgr.fork(sid, "probe")
            live = mgr._load("probe")
            r["logprob"] = logprob(model, live.kv, live.tokens[-1:] + q, want)
            mgr.delete("probe")
            rows.append(r)
            log(f"  tiered {n:,} depth {depth:.2f}: found={r['found']} {r['reply']!r} lp={r['logprob']:.2f} "
                f"resume->first {r['resume_to_first_s']:.2f}s decode {r['decode_tok_s']:.1f} tok/s")
        mgr.fork(plain_id(task, n, policy), "probe")
        live = mgr._load("probe")
        p = ppl(model, live.kv, live.tokens[-1], cont)
        mgr.delete("probe")
        return {"rows": rows, "ppl": p, "max_distance": max(r["max_distance"] for r in rows)}
    finally:
        mgr.close()


def window_cache(model, policy: str, window: int):
    return new_cache(get_policy(policy, budget=window) if policy == "streaming" else get_policy(policy),
                     KVShape.of(model))


def answer_ids(tok, task: Task, key: str) -> list[int]:
    """The answer's ids after the prefix (tokenized with it, as the model sees them)."""
    n = len(tok(task.prefix, add_special_tokens=False).input_ids)
    return tok(task.prefix + task.answer(key), add_special_tokens=False).input_ids[n:]


def window_cell(model, task: Task, ids: list[int], key: str, n_new: int, policy: str, window: int,
                depth: float) -> dict:
    """`full` on the last `window` tokens of ids, or `streaming` (a budget of `window`) fed all of them."""
    tok = model.tokenizer
    kv = window_cache(model, policy, window)
    feed = ids[-window:] if policy == "full" else ids
    run(model, kv, feed[:-1], 512)
    q = task.parts(tok)[1]
    snap = kv.checkpoint()
    r = answer(model, kv, feed[-1:] + q, task.found(key), n_new)
    kv.restore(snap)
    r["logprob"] = logprob(model, kv, feed[-1:] + q, answer_ids(tok, task, key))
    r.update(depth=depth, key=key)
    log(f"  {policy} ({len(feed):,} tokens fed) depth {depth:.2f}: found={r['found']} lp={r['logprob']:.2f}")
    return r


def window_ppl(model, ids: list[int], cont: list[int], policy: str, window: int) -> float:
    kv = window_cache(model, policy, window)
    feed = ids[-window:] if policy == "full" else ids
    run(model, kv, feed[:-1], 512)
    return ppl(model, kv, feed[-1], cont)


def plot(results: list[dict], reference: dict | None, path: str) -> None:
    """One heatmap per kind (depth x length, colour log p(key), text found or -)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("full, needle inside\nits 8k context", [(reference["tokens"], reference["rows"])])] if reference else []
    kinds = list(dict.fromkeys(k for r in results for k in r["kinds"]))  # the policy's first, then the baselines
    for kind in kinds:
        cols = [(r["tokens"], r["kinds"][kind]["rows"]) for r in results if kind in r["kinds"]]
        if cols:
            panels.append((kind, cols))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.1 * sum(len(c) for _, c in panels), 4), squeeze=False,
                             gridspec_kw={"width_ratios": [len(c) for _, c in panels]})
    for ax, (title, cols) in zip(axes[0], panels):
        depths = [row["depth"] for row in cols[0][1]]
        grid = [[row["logprob"] for row in rows] for _, rows in cols]  # [length][depth]
        im = ax.imshow(list(map(list, zip(*grid))), vmin=-12, vmax=0, cmap="viridis", aspect="auto")
        for x, (_, rows) in enumerate(cols):
            for y, row in enumerate(rows):
                ax.text(x, y, "found" if row["found"] else "-", ha="center", va="center", fontsize=7,
                        color="white" if row["logprob"] < -6 else "black")
        ax.set_xticks(range(len(cols)), [f"{n / 1024:.0f}k" for n, _ in cols])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("history (tokens)")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), label="log p(answer)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    log(f"wrote {path}")


def table(results: list[dict], reference: dict | None) -> str:
    ok = [r["found"] for r in reference["rows"]] if reference else None
    lines = [f"{'tokens':>8} {'kind':>17} {'found':>6} {'of ref':>6} {'mean lp':>8} {'ppl':>7} {'resume->1st':>11} "
             f"{'decode':>8} {'max dist':>8}"]
    if reference:
        rows = reference["rows"]
        lines.append(f"{reference['tokens']:>8,} {'full, in context':>17} {sum(ok):>2}/{len(ok):<3} {'':>6} "
                     f"{statistics.mean(x['logprob'] for x in rows):>8.2f}")
    for r in results:
        for kind, m in r["kinds"].items():
            rows = m["rows"]
            first = statistics.median(x.get("resume_to_first_s", x["question_to_first_s"]) for x in rows)
            dec = statistics.median(x["decode_tok_s"] for x in rows)
            of = f"{sum(x['found'] for x, k in zip(rows, ok) if k)}/{sum(ok)}" if ok else ""
            lines.append(f"{r['tokens']:>8,} {kind:>17} {sum(x['found'] for x in rows):>2}/{len(rows):<3} {of:>6} "
                         f"{statistics.mean(x['logprob'] for x in rows):>8.2f} {m['ppl']:>7.2f} {first:>10.2f}s "
                         f"{dec:>6.1f}/s {m.get('max_distance', ''):>8}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--task", choices=sorted(TASKS), default="needle")
    ap.add_argument("--policy", default="tiered", help="the policy of the long sessions (a tiered one)")
    ap.add_argument("--append", type=int, default=2048, help="tokens per Append while building")
    ap.add_argument("--ppl", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--window", type=int, default=8192, help="the model's context, for the baselines")
    ap.add_argument("--baselines", default="full", help="comma list of full, streaming ('' for none)")
    ap.add_argument("--no-reference", action="store_true", help="skip full on an 8k history per depth")
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
    tok = model.tokenizer
    args.data.mkdir(parents=True, exist_ok=True)
    built_path = args.data.parent / "built.json"
    built = json.loads(built_path.read_text()) if built_path.exists() else {}
    depths = [float(x) for x in args.depths.split(",")]
    keys = [str(random.Random(args.seed * 1000 + i).randint(10000, 99999)) for i in range(len(depths))]
    keep = args.window - args.ppl - 64
    task = TASKS[args.task]
    intro = task.parts(tok)[0]
    results = []
    reference = None
    if not args.no_reference:
        hay = haystack_tokens(tok, keep)
        ref = []
        for depth, key in zip(depths, keys):
            cut = cut_at(keep - 24 - len(intro), depth)
            ids = intro + hay[:cut] + tok(task.needle(key), add_special_tokens=False).input_ids + \
                hay[cut:keep - 24 - len(intro)]
            ref.append(window_cell(model, task, ids, key, args.new_tokens, "full", args.window, depth))
        reference = {"tokens": keep, "rows": ref}
    for n in [int(x) for x in args.lengths.split(",")]:
        hay = haystack_tokens(tok, n + args.ppl)
        cont = hay[n:]
        with open_store(args.data) as store:
            mgr = SessionManager(store, model, sweep_every=0)
            try:
                log(f"build {n:,}: the plain session and {len(depths)} cells")
                secs = build_length(mgr, task, n, depths, keys, hay, args.append, args.policy)
            finally:
                mgr.close()
            if secs > 1:
                built[plain_id(task, n, args.policy)[10:]] = built.get(plain_id(task, n, args.policy)[10:], 0.0) + secs
                built_path.write_text(json.dumps(built, indent=1))
            log(f"measure {n:,}")
            kinds = {args.policy: measure_tiered(model, store, task, n, depths, keys, cont, args.new_tokens, args.policy)}
        for b in [x for x in args.baselines.split(",") if x]:
            name = "full-last-window" if b == "full" else b
            rows = []
            for depth, key in zip(depths, keys):
                cut = cut_at(n, depth)
                ids = intro + hay[:cut] + tok(task.needle(key), add_special_tokens=False).input_ids + hay[cut:n]
                rows.append(window_cell(model, task, ids, key, args.new_tokens, b, keep, depth))
            kinds[name] = {"rows": rows, "ppl": window_ppl(model, intro + hay[:n], cont, b, keep)}
        results.append({"tokens": n, "build_s": built.get(plain_id(task, n, args.policy)[10:]), "kinds": kinds})
        print(table(results[-1:], reference), flush=True)
    print(table(results, reference))
    if args.plot:
        plot(results, reference, args.plot)
    print(json.dumps({"benchmark": "unbounded", "task": task.name, "depths": depths, "window": args.window, "reference": reference,
                      "results": results}))


if __name__ == "__main__":
    main()
