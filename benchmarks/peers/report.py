"""The peers run's report: the summary table, the per-length tables, the target check, the plots, a JSON line.

Prints to stdout (the tables, then one JSON line); the scatter plots and heatmaps go to --figures.
"""
from __future__ import annotations

import json
import math
import os

from budgets import ratio_key
from cells import task_of
from results import log
from summary import by_length, mark_correct, summarize, target_check


def length_table(rows: list[dict], fp16: int, task: str | None = None) -> str:
    at = by_length(rows, task=task)
    lengths = sorted({n for s in at for n in at[s]})
    lines = ["| method | " + " | ".join(f"{n:,}: retention, B/tok (×)" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for s, per in at.items():
        cells = []
        for n in lengths:
            x = per.get(n)
            cells.append("—" if x is None else
                         f"{x['correct']}/{x['of']}, {x['bytes']:,.0f} ({fp16 / x['bytes']:.1f}×)")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(summary: list[dict]) -> str:
    def f(v, fmt, none="—"):
        return none if v is None else format(v, fmt)
    tasks = list(dict.fromkeys(t for s in summary for t in s.get("tasks", {})))
    lines = ["| method | side | resident B/tok | × vs fp16 | recall | retention vs full | "
             + "".join(f"{t} | " for t in tasks) + "mean Δ log p | Δppl | decode tok/s |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|---:|"]
    for s in summary:
        if s["cells"] == 0 and s["ppl"] is None:
            lines.append(f"| {s['setting']} | {s['side']} | failed: {s['error']} |" + " |" * (6 + len(tasks)))
            continue

        def share(x):
            return "—" if x is None or x["retention"] is None else \
                f"{x['retention']:.0%} ({round(x['retention'] * x['full_correct'])}/{x['full_correct']})"
        ret = share(s)
        per = "".join(f"{share(s.get('tasks', {}).get(t))} | " for t in tasks)
        tps = "—" if s["decode_tok_s"] is None else f"{s['decode_tok_s']:.2f} @{s['decode_at']}"
        dppl = "—" if s["dppl"] is None else f"{100 * s['dppl']:+.2f}%"
        lines.append(f"| {s['setting']} | {s['side']} | {f(s['resident_bytes_per_token'], ',.0f')} | "
                     f"{f(s['x_vs_fp16'], '.1f')}× | {f(s['recall'], '.0%')} | {ret} | {per}{f(s['mean_dlogprob'], '+.2f')} | "
                     f"{dppl} | {tps} |")
    return "\n".join(lines)


def json_line(summary: list[dict], rows: list[dict], ratios_at: dict, check: dict | None = None) -> str:
    keep = ("setting", "side", "resident_bytes_per_token", "x_vs_fp16", "recall", "retention", "tasks",
            "mean_dlogprob", "dppl", "decode_tok_s", "failed")
    return json.dumps({"peers": [{k: s[k] for k in keep} for s in summary], "rows": len(rows),
                       "matched_ratios": {ratio_key(k): v for k, v in sorted(ratios_at.items())},
                       "target": check})


def scatter(summary: list[dict], y: str, path: str, ylabel: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    seen: dict = {}  # points that (nearly) coincide get their labels stacked
    for s in summary:
        x = s["resident_bytes_per_token"] if y != "dppl" else s["ppl_resident_bytes_per_token"]
        v = s[y]
        if x is None or v is None:
            continue
        v = 100 * v
        mem = s["side"] == "memsvc"
        ax.scatter([x], [v], marker="o" if mem else "s", color="tab:blue" if mem else "tab:orange", s=40)
        spot = (round(math.log10(x), 1), round(v / 4))
        k = seen[spot] = seen.get(spot, -1) + 1
        ax.annotate(s["setting"], (x, v), fontsize=7, xytext=(4, 3 - 9 * k), textcoords="offset points")
    ax.set_xscale("log")
    if y == "dppl":
        ax.set_yscale("symlog", linthresh=1.0)  # a few percent and a few hundred percent on one axis
    ax.set_xlabel("resident bytes per token (fp16 = 23,040; log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title + "  (blue: memsvc, orange: peers)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(rows: list[dict], fp16: int, ratios_at: dict, figures: str | None, decode) -> None:
    mark_correct(rows, decode)
    summary = summarize(rows, fp16)
    print(table(summary))
    tasks = list(dict.fromkeys(task_of(r) for r in rows if r["kind"] == "niah"))
    for t in tasks:
        print(f"\nBy length, {t} (retention: of the cells full answers, those the method answers; "
              "resident bytes per token):")
        print(length_table(rows, fp16, t))
    check = target_check(rows, fp16)
    print(f"\nTarget, on the cells of every task ({', '.join(tasks)}) at each length.")
    print("Target (a): wherever a peer keeps >= 90% retention, a tiered setting keeps as much with fewer bytes:")
    for x in check["a"]:
        print(f"  {x['peer']} @{x['length']}: {x['retention']:.0%} at {x['bytes']:,.0f} B/tok -> "
              + (f"held by {x['by']}" if x["held"] else "MISSED"))
    print(f"Target (b): tiered >= 99% retention at >= 10x fewer bytes than fp16: at lengths {check['b_lengths']} "
          f"of {check['lengths']}" + "".join(f"\n  {x['setting']} @{x['length']}: {x['retention']:.0%}, "
                                              f"{x['x_vs_fp16']:.1f}x" for x in check["b"]))
    if figures:
        from memsvc.eval.niah import heatmap
        os.makedirs(figures, exist_ok=True)
        scatter(summary, "retention", os.path.join(figures, "peers_recall_vs_bytes.png"),
                "NIAH retention vs full (%), " + " + ".join(tasks), "Recall vs resident bytes")
        scatter(summary, "dppl", os.path.join(figures, "peers_ppl_vs_bytes.png"),
                "perplexity change vs full (%)", "Perplexity vs resident bytes")
        peers = [s for s in summary if s["side"] == "peer" and s["retention"] is not None and s["method"] != "hf-full"]
        best = max(peers, key=lambda s: (s["retention"], -(s["resident_bytes_per_token"] or 0)), default=None)
        tiered_rows = [s["setting"] for s in summary if s["side"] == "memsvc" and s["setting"].startswith("tiered")]
        for t in tasks:  # passkey maps keep their old names (peers_niah_*.png)
            hm = [dict(r, policy=r["setting"]) for r in rows if r["kind"] == "niah" and r.get("ok") and task_of(r) == t]
            stem = "peers_niah" if t == "passkey" else f"peers_{t}"
            for s in ["full"] + tiered_rows + ([best["setting"]] if best else []):
                if any(r["policy"] == s for r in hm):
                    heatmap(hm, s, os.path.join(figures, f"{stem}_{s.replace('@', '_')}.png"),
                            what="passkey" if t == "passkey" else "essay needle")
        log(f"[report] figures in {figures}")
    print(json_line(summary, rows, ratios_at, check))
