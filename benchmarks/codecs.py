"""Every KV codec on the real model: bits, error, attention error, perplexity, CPU speed.

Issue 3, acceptance 4. One forward pass of SmolLM2-135M over a 4096-token Paul
Graham essay context captures the keys and values of all 30 layers
([1, 3, T, 64] each; keys post-RoPE, as transformers stores them) and, through
a pre-hook on each attention module, the queries of the last 64 tokens
(q_proj of the layer's input, RoPE applied with the model's own cos/sin). Then,
per codec setting (a key codec and a value codec; TurboQuant built with
layer=l, so each layer gets its own rotation):

- bits K / V: all-in bits per value, 8 * nbytes / numel, counting everything a
  Packed record stores (codes, scales, norms, indices, bases, headers), with one
  record per layer ([3, T, 64]); "@64" is the same with one record per 64-token
  block, the service's block size, where per-record headers and bases weigh more;
- K / V rel MSE: sum ||x - x̂||² / sum ||x||² over all layers, heads, tokens;
- attn err: ||o - ô|| / ||o|| (L2 over all layers, query heads and the last 64
  query positions) of causal softmax attention (GQA, scale 1/8) of the
  captured queries over the whole decoded context, against full precision;
- Δppl: prefill N tokens (2048; 4096 with --full), replace keys and values of
  positions [0, N - 128) by decode(encode(.)) per layer, keep the last 128
  exact, then feed the next 512 essay tokens in chunks of 128 (teacher forcing,
  appended to the cache at full precision) and score each one's next token;
  against the same with the untouched cache. Pooled over --segments disjoint
  essay windows (default 4: the first is the start of the captured context,
  the others are prefilled once each), with the per-window spread shown, since
  one 512-token window moves by a few tenths of a percent on its own.

Cross-check: for every setting, `kernels.dispatch.packed_attention` over
64-token packed records (layer 15, last query) against dense attention over
the same records' decode; it should agree to float rounding.

Then CPU throughput on one core (torch.set_num_threads(1), reference path):
encode and decode of real keys [3, 4096, 64] fp16, median of several runs, in MB/s
of fp16 input, against the issue's targets (uniform encode >= 1 GB/s;
TurboQuant encode >= 500 MB/s and decode >= 1 GB/s).

    .venv/bin/python benchmarks/codecs.py            # ~6 min on 2 shared cores
    .venv/bin/python benchmarks/codecs.py --quick    # 1k context, 1 window, ~40 s
    .venv/bin/python benchmarks/codecs.py --full     # perplexity after 4096 tokens
    .venv/bin/python benchmarks/codecs.py --throughput-only [--only turbo3 ...]  # CPU speed only, ~1 min

Prints a table and ends with one JSON line. Progress goes to stderr. The parts: codecs_settings.py (what
is measured), codecs_capture.py (keys, values, queries), codecs_measure.py (bits, errors, Δppl),
codecs_throughput.py (CPU speed) and codecs_report.py (machine, tables).
"""
from __future__ import annotations

import os

os.environ.setdefault("MEMSVC_KERNELS", "reference")  # the CPU path; throughput is the reference's

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from codecs_capture import N_QUERIES, attend, capture  # noqa: E402
from codecs_measure import WINDOW, measure, ppl_segments  # noqa: E402
from codecs_report import command_line, log, machine, print_table  # noqa: E402
from codecs_settings import SETTINGS, THROUGHPUT  # noqa: E402
from codecs_throughput import print_throughput, throughput  # noqa: E402
from memsvc.corpus import haystack_tokens  # noqa: E402
from memsvc.model import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024-token context, 512-token prefix, 256 scored, 3 timing runs")
    ap.add_argument("--full", action="store_true", help="perplexity after a 4096-token prefix (default 2048)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these setting labels")
    ap.add_argument("--segments", type=int, default=None,
                    help="disjoint essay windows for perplexity, pooled (default 4; 1 with --quick)")
    ap.add_argument("--runs", type=int, default=None, help="timing runs per codec (median reported)")
    ap.add_argument("--throughput-only", action="store_true",
                    help="only the CPU throughput part (one forward to capture the keys, ~1 min); "
                         "--only then names throughput codecs")
    args = ap.parse_args()
    if args.quick and args.full:
        ap.error("--quick and --full exclude each other")
    ctx, prefix, scored, runs = (1024, 512, 256, 3) if args.quick else (4096, 4096 if args.full else 2048, 512, 7)
    runs = args.runs or runs
    args.segments = args.segments or (1 if args.quick else 4)
    if args.segments < 1:
        ap.error("--segments must be >= 1")
    if args.throughput_only:
        codecs = [c for c in THROUGHPUT if args.only is None or c[0] in args.only]
        if args.only and len(codecs) != len(args.only):
            ap.error(f"unknown throughput codec among {args.only}; valid: {', '.join(c[0] for c in THROUGHPUT)}")
        return throughput_only(ctx, runs, codecs)
    settings = [s for s in SETTINGS if args.only is None or s.label in args.only]
    if args.only and len(settings) != len(args.only):
        ap.error(f"unknown setting among {args.only}; valid: {', '.join(s.label for s in SETTINGS)}")

    t_start = time.perf_counter()

    t_start = time.perf_counter()
    m = load_model()
    model = m.model.eval()
    info = machine()
    command = command_line()
    ids = haystack_tokens(m.tokenizer, max(ctx, args.segments * (prefix + scored + 1)))
    log(f"capture: forward over {ctx} tokens")
    t0 = time.perf_counter()
    keys, values, queries, model_out = capture(m, ids[:ctx])
    log(f"capture done in {time.perf_counter() - t0:.1f} s")
    n_layers = len(keys)

    # sanity: our queries reproduce the model's own attention output
    ref_out = [attend(queries[l], keys[l], values[l]) for l in range(n_layers)]
    check = max(((ref_out[l] - model_out[l]).norm() / model_out[l].norm()).item() for l in range(n_layers))
    log(f"query capture check: max rel diff of attention output vs the model's {check:.2e}")
    ref_sq = sum(o.pow(2).sum().item() for o in ref_out)

    segments = ppl_segments(model, ids, keys, values, prefix, scored, args.segments)
    n_tok = sum(g["n"] for g in segments)
    base_ppl = math.exp(sum(g["base_nll"] for g in segments) / n_tok)

    # bits with the service's 64-token records: every layer in --quick, 6 spread layers otherwise
    sample = list(range(n_layers)) if args.quick else [0, 6, 12, 18, 24, 29]
    rows = []
    for i, s in enumerate(settings):
        t0 = time.perf_counter()
        row = measure(s, model, keys, values, queries, ref_out, ref_sq, segments, prefix, base_ppl, sample)
        rows.append(row)
        log(f"[{i + 1}/{len(settings)}] {s.label}: K {row['key_bits']:.2f} b V {row['value_bits']:.2f} b, "
            f"attn err {row['attn_rel_err']:.4f}, ppl {row['ppl_change_pct']:+.2f}% ({time.perf_counter() - t0:.1f} s)")

    log(f"throughput on one core, {runs} runs per codec")
    tput = throughput(keys[15 % n_layers].to(torch.float16).contiguous(), runs)

    print_table(command, info, n_layers, ctx, prefix, WINDOW, n_tok, base_ppl, check, len(segments), rows)
    print_throughput(tput, list(keys[15 % n_layers].shape), runs)
    wall = time.perf_counter() - t_start
    print(f"\nwall time {wall:.0f} s")
    print(json.dumps({
        "bench": "codecs", "command": command, "machine": info,
        "config": {"context": ctx, "ppl_prefix": prefix, "window_exact": WINDOW, "scored": n_tok,
                   "segments": len(segments), "queries": N_QUERIES,
                   "timing_runs": runs},
        "query_capture_check": check, "baseline_ppl": base_ppl, "rows": rows, "throughput": tput,
        "wall_s": round(wall, 1),
    }))


def throughput_only(ctx: int, runs: int, codecs: list) -> None:
    """--throughput-only: capture the keys of a ctx-token context, time the codecs, print the table and a JSON line."""
    t_start = time.perf_counter()
    m = load_model()
    info = machine()
    command = command_line()
    ids = haystack_tokens(m.tokenizer, ctx)
    log(f"capture: forward over {ctx} tokens")
    keys, _, _, _ = capture(m, ids[:ctx])
    x = keys[15 % len(keys)].to(torch.float16).contiguous()
    log(f"throughput on one core, {runs} runs per codec")
    tput = throughput(x, runs, codecs)
    print(f"\nmemsvc codec benchmark (issue 3), throughput only\ncommand: {command}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} (1 thread), "
          f"reference path: {info['reference_path']}, commit {info['commit']}")
    print_throughput(tput, list(x.shape), runs)
    wall = time.perf_counter() - t_start
    print(f"\nwall time {wall:.0f} s")
    print(json.dumps({"bench": "codecs", "command": command, "machine": info,
                      "config": {"context": ctx, "timing_runs": runs, "throughput_only": True},
                      "throughput": tput, "wall_s": round(wall, 1)}))


if __name__ == "__main__":
    main()
