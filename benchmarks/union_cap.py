"""The union cap of a prompt chunk (`union_floor`) on the passkey task's last chunk, from one shared prefill.

For each `eval niah` cell (same keys: seed = length) the prompt's whole
512-token chunks go through `full` and `tiered` once; then, from a snapshot,
the rest is fed two ways: "unsplit" (the rest as one chunk, as `eval niah`
does: 110 tokens) and "split40" (the rest minus 40 tokens, then the last 40 as
their own chunk: the question appended to a stored session, as `eval niah
--split-question 40`), each with `tiered`'s layers set to union_floor 1, 2, 3, 4
and 10**6 (never binds). Per variant: greedy answer, log p(answer) teacher-forced,
the last chunk's seconds and cold blocks read (summed over layers), and the
cold blocks a decode step reads per layer.

    python benchmarks/union_cap.py --length 8192 --depths 0,0.5,1 --out benchmarks/figures/x.json [--no-full]

Single-threaded (the machine is shared); run it niced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time

from memsvc.eval import niah
from memsvc.eval.cli import _load
from memsvc.eval.runner import PolicyRun

FLOORS = {"floor1": 1, "floor2": 2, "floor3": 3, "floor4": 4, "none": 10 ** 6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--tail", type=int, default=40)
    ap.add_argument("--no-full", action="store_true", help="tiered only (no Δ log p against full)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    m = _load(1)
    tok, n = m.tokenizer, a.length
    depths = [float(x) for x in a.depths.split(",")]
    rng = random.Random(n)  # `eval niah`'s seed for this length (seed 0 + n)
    cells = [(d, str(rng.randint(10000, 99999))) for d in (0, 0.25, 0.5, 0.75, 1)]
    rows = []
    for d, key in cells:
        if d not in depths:
            continue
        prompt, answer = niah.cell_prompt(tok, n, d, key)
        head = (len(prompt) - 1) // 512 * 512  # the whole chunks, shared by every variant
        if len(prompt) - head <= a.tail:
            raise SystemExit(f"the last chunk ({len(prompt) - head} tokens) must be longer than --tail")
        variants = {"unsplit": [prompt[head:]], f"split{a.tail}": [prompt[head:-a.tail], prompt[-a.tail:]]}
        for pol in ("tiered",) if a.no_full else ("full", "tiered"):
            run = PolicyRun(m, pol)
            cache = run.new_cache()
            t0 = time.time()
            run.forward(cache, prompt[:head])
            t_head = time.time() - t0
            snap = cache.checkpoint()
            for vname, parts in variants.items():
                for cap in FLOORS if pol == "tiered" else (None,):
                    if cap:
                        for layer in cache.layers:
                            layer.plan = dataclasses.replace(layer.plan, union_floor=FLOORS[cap])
                    cache.restore(snap)
                    for part in parts[:-1]:
                        run.forward(cache, part)
                    run.flush(cache)
                    reads, t1 = niah._cold_reads(cache), time.time()
                    logits = run.forward(cache, parts[-1])
                    t_tail = time.time() - t1
                    blocks = niah._cold_reads(cache) - reads
                    after = cache.checkpoint()
                    lp = run.teacher_logprob(cache, logits, answer)
                    cache.restore(after)
                    r0 = niah._cold_reads(cache)
                    out, _ = run.decode_greedy(cache, logits, 8)
                    text = tok.decode(out, skip_special_tokens=True)
                    row = {"policy": pol, "length": n, "depth": d, "key": key, "prompt_tokens": len(prompt),
                           "variant": vname, "last_chunk": len(parts[-1]), "cap": cap, "answer": text,
                           "correct": key in text, "logprob": lp, "tail_seconds": t_tail, "tail_cold_blocks": blocks,
                           "head_seconds": t_head,
                           "decode_blocks_per_step_per_layer": (niah._cold_reads(cache) - r0) / 7 / m.num_layers}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    with open(a.out, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
