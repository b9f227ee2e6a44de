"""How much of the cold tier's attention each block score keeps, at the decode steps of one NIAH cell.

Runs the cell's prompt through `tiered` (PolicyRun, as the peers driver does), then teacher-forces the
first --answer-tokens answer tokens. At every decode step and layer it records the query, every cold
block's decoded keys, the live masks and the 8-bit summaries, and afterwards scores the blocks with each
estimator below. For each (step, layer, KV head) it reports the cold attention mass the estimator's top-k
blocks hold, as a share of the best possible top-k (the blocks with the most mass), and whether the
needle's blocks are picked wherever one of them holds >= --needle-mass of the mass.

Estimators (top-k blocks per KV head; the group's queries summed):
    quest          the Quest bound from the 8-bit min/max summaries (what `tiered` retrieves by)
    quest-sub{S}   the bound over sub-blocks of S tokens, a block scored by its best sub-block
    mean           q . the block's mean key (8-bit summary)
    two-stage      Quest's top 1.5k, then the k with the highest exact max logit among them
    exact-max      the block's exact max logit (needs every key: the ceiling for a max-type score)

    python benchmarks/retrieval_mass.py                       # needle, 4k, depth 25% (the cell tiered missed)
    python benchmarks/retrieval_mass.py --task passkey --depth 0.5

Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch


def _cells():
    """The peers driver's cell builder (benchmarks/peers/cells.py), so the cell is the very one the driver ran."""
    spec = importlib.util.spec_from_file_location("peers_cells", Path(__file__).parent / "peers" / "cells.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def record(args) -> tuple[list[dict], list[int], float]:
    """The per-(step, layer) records, the needle's block indices, and the teacher-forced log p."""
    import memsvc.cache.tiered.layer as L
    from memsvc.eval.runner import PolicyRun
    from memsvc.model import load_model, pull_default

    torch.set_num_threads(args.threads)
    m = load_model(pull_default())
    cells = _cells().build_niah_cells(m.tokenizer, [args.length], [args.depth], 0, (args.task,))
    cell = cells[0]
    run = PolicyRun(m, "tiered")
    cache = run.new_cache()
    logits = run.forward(cache, cell["prompt_ids"])
    run.end_prompt(cache)
    plan = cache.layers[1].plan
    # the needle: the answer's first tokens where they occur in the prompt (the key sentence)
    ids, ans = cell["prompt_ids"], cell["answer_ids"]
    at = next((i for w in (ans[0:3], ans[1:4], ans[0:2]) for i in range(len(ids) - len(w) + 1)
               if ids[i:i + len(w)] == w), None)
    needle = sorted({(p - plan.sink) // plan.block for p in (at, at + 8)}) if at is not None else []
    recs: list[dict] = []
    scale = 1.0 / (m.model.config.head_dim ** 0.5) if hasattr(m.model.config, "head_dim") else 0.125
    keys = L.TierLayer._cold_keys

    def spy(self, q):
        out = keys(self, q)
        if q.shape[2] == 1 and self.n_blocks:
            packed = self.cold.get_stacked(self.layer_idx, list(range(self.n_blocks)), 0)
            recs.append({"q": q[:, :, 0].float().clone(), "k": self._decode(self.kcodec, packed), "live": self.live.clone(),
                         "mn": L._dq8(self.sum_min), "mx": L._dq8(self.sum_max), "mean": L._dq8(self.sum_mean_k),
                         "B": self.plan.block, "scale": scale})
        return out
    L.TierLayer._cold_keys = spy
    try:
        lp = run.teacher_logprob(cache, logits, ans[:args.answer_tokens])
    finally:
        L.TierLayer._cold_keys = keys
    return recs, needle, lp


def _logits(r: dict) -> torch.Tensor:
    """[H, G, nb*B] exact logits of the group's queries over every cold token (dead tokens -inf)."""
    H = r["q"].shape[0]
    lg = torch.einsum("hgd,htd->hgt", r["q"], r["k"]) * r["scale"]
    return lg.masked_fill(~r["live"].permute(1, 0, 2).reshape(H, 1, -1), float("-inf"))


def mass(r: dict) -> torch.Tensor:
    """[H, nb] each block's share of the cold attention, averaged over the group's queries."""
    H, G, _ = r["q"].shape
    nb = r["live"].shape[0]
    return torch.softmax(_logits(r), -1).view(H, G, nb, r["B"]).sum(dim=(1, 3)) / G


def quest(r: dict) -> torch.Tensor:
    q = r["q"]
    return torch.einsum("hgd,bhd->hb", q.clamp(min=0), r["mx"]) + torch.einsum("hgd,bhd->hb", q.clamp(max=0), r["mn"])


def quest_sub(size: int):
    def score(r: dict) -> torch.Tensor:
        k, live, B = r["k"], r["live"], r["B"]
        H, nb = k.shape[0], live.shape[0]
        kk = k.view(H, nb, B // size, size, -1)
        ok = live.permute(1, 0, 2).reshape(H, nb, B // size, size, 1)
        mn = kk.masked_fill(~ok, float("inf")).amin(3)
        mx = kk.masked_fill(~ok, float("-inf")).amax(3)
        dead = ~ok.any(3)  # a sub-block with no live token scores nothing
        q = r["q"]
        ub = torch.einsum("hgd,hbsd->hgbs", q.clamp(min=0), mx.masked_fill(dead, 0)) + \
            torch.einsum("hgd,hbsd->hgbs", q.clamp(max=0), mn.masked_fill(dead, 0))
        return ub.sum(1).masked_fill(dead.squeeze(-1).all(-1).unsqueeze(-1), float("-inf")).amax(-1)
    return score


def mean_key(r: dict) -> torch.Tensor:
    return torch.einsum("hgd,bhd->hb", r["q"], r["mean"])


def exact_max(r: dict) -> torch.Tensor:
    H, G, _ = r["q"].shape
    return _logits(r).view(H, G, r["live"].shape[0], r["B"]).amax(-1).amax(1)


def picks(score: torch.Tensor, k: int) -> torch.Tensor:
    """[H, nb] bool: the top-k blocks by score."""
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(min(k, score.shape[1]), -1).indices, True)


def two_stage(k: int):
    def pick(r: dict) -> torch.Tensor:
        cand = quest(r).topk(min(k * 3 // 2, r["live"].shape[0]), -1).indices
        best = exact_max(r).gather(1, cand).topk(min(k, cand.shape[1]), -1).indices
        return torch.zeros_like(quest(r), dtype=torch.bool).scatter_(1, cand.gather(1, best), True)
    return pick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="needle", choices=("needle", "passkey"))
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depth", type=float, default=0.25)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--k", type=int, default=32, help="blocks picked per KV head (tiered's retrieve / block)")
    ap.add_argument("--needle-mass", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    recs, needle, lp = record(args)
    pickers = {"quest": lambda r: picks(quest(r), args.k)}
    pickers |= {f"quest-sub{s}": (lambda s: lambda r: picks(quest_sub(s)(r), args.k))(s) for s in (32, 16, 8)}
    pickers |= {"mean": lambda r: picks(mean_key(r), args.k), "two-stage": two_stage(args.k),
                "exact-max": lambda r: picks(exact_max(r), args.k)}
    rows = []
    print(f"{len(recs)} (step, layer) records; needle blocks {needle}; teacher-forced log p {lp:.2f}")
    print(f"| score | kept / best top-{args.k} mass: mean | p5 | min | needle block picked where it holds >= {args.needle_mass:.0%} |")
    print("|---|---:|---:|---:|---:|")
    for name, pick in pickers.items():
        shares, hit, need = [], 0, 0
        for r in recs:
            p = mass(r)
            sel = pick(r)
            shares.append((p * sel).sum(1) / p.topk(min(args.k, p.shape[1]), -1).values.sum(1))
            for b in needle:
                if b < p.shape[1]:
                    where = p[:, b] >= args.needle_mass
                    need += int(where.sum())
                    hit += int(sel[:, b][where].sum())
        x = torch.cat(shares)
        row = {"score": name, "mean": float(x.mean()), "p5": float(x.quantile(0.05)), "min": float(x.min()),
               "needle_picked": hit, "needle_places": need}
        rows.append(row)
        print(f"| {name} | {row['mean']:.3f} | {row['p5']:.3f} | {row['min']:.3f} | {hit}/{need} |")
    print(json.dumps({"benchmark": "retrieval_mass", "task": args.task, "length": args.length, "depth": args.depth,
                      "k": args.k, "needle_blocks": needle, "logprob": lp, "rows": rows}))


if __name__ == "__main__":
    main()
