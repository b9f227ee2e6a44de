"""benchmarks/codecs.py's report: progress on stderr, the machine and command line, the settings' table.

Knows rows (dicts) and strings; machine() also asks torch and the kernels which path runs.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time


def log(msg: str) -> None:
    print(f"[codecs {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    import torch
    import transformers

    from memsvc.kernels.dispatch import use_reference
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "reference_path": use_reference(),
        "commit": commit,
    }


def command_line() -> str:
    return " ".join([".venv/bin/python" if sys.executable.endswith(".venv/bin/python") else sys.executable] + sys.argv)


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}%"


def seg_range(r: dict) -> str:
    seg = r["ppl_change_pct_per_segment"]
    return fmt_pct(seg[0]) if len(seg) == 1 else f"{fmt_pct(min(seg))}..{fmt_pct(max(seg))}"


def print_table(command: str, info: dict, n_layers: int, ctx: int, prefix: int, window: int, n_tok: int,
                base_ppl: float, check: float, segments: int, rows: list[dict]) -> None:
    print(f"\nmemsvc codec benchmark (issue 3)\ncommand: {command}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads; "
          f"throughput on 1), transformers {info['transformers']}, reference path: {info['reference_path']}, "
          f"commit {info['commit']}")
    print(f"model: SmolLM2-135M-Instruct fp32, {n_layers} layers; context {ctx} essay tokens; "
          f"perplexity: prefix {prefix}, last {window} exact, {n_tok} scored; baseline ppl {base_ppl:.4f}")
    print(f"query capture check (our attention vs the model's): max rel diff {check:.1e}; "
          f"perplexity pooled over {segments} disjoint essay window(s)")
    worst = max((r["packed_attention_vs_dense"] or 0.0) for r in rows) if rows else 0.0
    print(f"packed_attention over 64-token records vs dense attention over their decode (layer 15, last query): "
          f"max rel diff {worst:.1e}\n")
    head = f"{'setting':<18} {'K bits':>6} {'V bits':>6} {'K@64':>6} {'V@64':>6} {'K relMSE':>9} {'V relMSE':>9} " \
           f"{'attn err':>8} {'Δppl':>8}  {'per segment (min..max)':<22}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['setting']:<18} {r['key_bits']:>6.2f} {r['value_bits']:>6.2f} {r['key_bits_64']:>6.2f} "
              f"{r['value_bits_64']:>6.2f} {r['key_rel_mse']:>9.2e} {r['value_rel_mse']:>9.2e} "
              f"{r['attn_rel_err']:>8.4f} {fmt_pct(r['ppl_change_pct']):>8}  {seg_range(r):<22}")
