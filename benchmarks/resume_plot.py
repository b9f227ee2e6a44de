"""Plot `resume_tiered.py` results: resume-to-first-token against session length, and where the time goes.

Left: one line per labelled set of runs (each a JSON line `resume_tiered.py` printed, several files = several
rounds: the median of their medians, and their range), with the ±25% band around the first set's mean (issue 5)
and the 8k target (the re-prefill over 50, from whichever of these runs re-prefilled). Right: the parts of one run
(Resume RPC, the question's Append, the first chunk of Generate), stacked.

    python benchmarks/resume_plot.py --set "union floor 4 (default)" benchmarks/figures/resume_tiered_floor4_*.json \\
        --set "union floor 2" benchmarks/figures/resume_tiered_floor2_*.json \\
        --set "union floor 1" benchmarks/figures/resume_tiered_floor1_*.json \\
        --parts benchmarks/figures/resume_tiered_828f18c.json --out benchmarks/figures/resume_tiered.png

Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _load(path: str) -> dict:
    doc = json.loads(Path(path).read_text().strip().splitlines()[-1])
    if doc.get("benchmark") != "resume_tiered":
        raise SystemExit(f"{path} is not a resume_tiered.py result")
    return doc


def _series(files: list[str]) -> dict[int, list[float]]:
    """tokens -> resume-to-first-token medians, one per file."""
    out: dict[int, list[float]] = {}
    for f in files:
        for row in _load(f)["rows"]:
            out.setdefault(row["tokens"], []).append(row["resume_to_first_token_s"])
    return dict(sorted(out.items()))


def _reprefill(files: list[str]) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for f in files:
        for row in _load(f)["rows"]:
            if "reprefill_to_first_token_s" in row:
                out.setdefault(row["tokens"], []).append(row["reprefill_to_first_token_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", nargs="+", action="append", metavar=("LABEL", "JSON"), required=True,
                    help="a label, then the JSON files of its runs")
    ap.add_argument("--parts", help="one run whose parts are drawn stacked (default: the first set's first file)")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args()
    sets = []
    for item in args.set:
        if len(item) < 2:
            raise SystemExit("--set needs a label and at least one JSON file")
        sets.append((item[0], item[1:]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    table = []
    for label, files in sets:
        series = _series(files)
        xs = list(series)
        mid = [statistics.median(v) for v in series.values()]
        lo = [m - min(v) for m, v in zip(mid, series.values())]
        hi = [max(v) - m for m, v in zip(mid, series.values())]
        ax.errorbar(xs, mid, yerr=[lo, hi], marker="o", capsize=4, label=f"{label} ({len(files)} runs)")
        mean = statistics.mean(mid)
        table.append({"label": label, "files": files, "tokens": xs, "median_s": [round(m, 4) for m in mid],
                      "spread": [round(max(mid) / mean - 1, 3), round(1 - min(mid) / mean, 3)]})
    first = table[0]
    mean = statistics.mean(first["median_s"])
    ax.axhspan(0.75 * mean, 1.25 * mean, color="green", alpha=0.12, label=f"±25% of {first['label']}'s mean")
    parts_file = args.parts or sets[0][1][0]
    pre = {n: statistics.median(v) for n, v in _reprefill([f for _, fs in sets for f in fs] + [parts_file]).items()}
    for n, seconds in pre.items():
        ax.plot([n], [seconds / 50], marker="*", markersize=14, color="red", linestyle="none",
                label=f"{n // 1024}k target: re-prefill {seconds:.0f} s / 50")
    ax.set_xscale("log", base=2)
    ax.set_xticks(first["tokens"], [f"{n // 1024}k" for n in first["tokens"]])
    ax.set_xlabel("stored session (tokens)")
    ax.set_ylabel("resume → first token (s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Resume + question + first token, fresh server per run")

    parts_doc = _load(parts_file)
    rows = parts_doc["rows"]
    names = [("resume_s", "Resume RPC"), ("append_s", "Append (question)"), ("first_chunk_s", "first chunk")]
    bottom = [0.0] * len(rows)
    labels = [f"{r['tokens'] // 1024}k" for r in rows]
    for key, name in names:
        vals = [r["median_parts_s"][key] for r in rows]
        bx.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    bx.set_ylabel("seconds (median of each part)")
    bx.set_title(f"Where the time goes ({Path(parts_file).name})", fontsize=9)
    bx.legend(fontsize=8)
    bx.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)

    head = f"{'set':<28} {'runs':>4}  " + "  ".join(f"{n // 1024:>5}k" for n in first["tokens"]) + "   spread"
    print(head)
    print("-" * len(head))
    for t in table:
        cells = "  ".join(f"{m:>5.2f}s" for m in t["median_s"])
        print(f"{t['label']:<28} {len(t['files']):>4}  {cells}   +{t['spread'][0]:.0%} / -{t['spread'][1]:.0%}")
    print(f"wrote {args.out}")
    print(json.dumps({"benchmark": "resume_plot", "out": args.out, "sets": table,
                      "reprefill_s": {str(k): v for k, v in pre.items()}}))


if __name__ == "__main__":
    main()
