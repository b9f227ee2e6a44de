"""Plot of benchmarks/cold_keys.py's JSON line: key bits per value against needle retention and mean Δ log p.

    python benchmarks/cold_keys_plot.py benchmarks/figures/cold_keys.json benchmarks/figures/cold_keys.png
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, out: str) -> None:
    doc = json.loads(open(src).read().strip().splitlines()[-1])
    rows = doc["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "retention", "cells kept of those full answers (%)"),
                           (axes[1], "mean_dlogp", "mean Δ log p(answer) vs full")):
        for r in rows:
            y = 100 * r["kept"] / r["of"] if key == "retention" else r[key]
            pre = r["variant"].endswith("pre")
            ax.scatter(r["key_bits"], y, marker="o" if pre else "s", color="tab:blue" if pre else "tab:orange")
            ax.annotate(r["variant"], (r["key_bits"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("key bits per value (all-in, 64-token blocks)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("needle retention (circles: before RoPE)")
    axes[1].set_title("answer log-probability")
    fig.suptitle(f"cold keys: {len(doc['rows'])} NIAH cells at {', '.join(map(str, doc['lengths']))} tokens, "
                 "values turbo3, every cold block attended", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
