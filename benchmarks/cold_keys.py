"""Cold keys at about 3 bits: which codec keeps the needle (issue 22's sweep, key side).

Each NIAH cell (passkey and essay needle, benchmarks' usual prompts) is prefilled with the full cache; then, in
every layer but the first and the last (tiered's boundary layers, kept at 8 bits), the keys of the positions
tiered keeps cold (after the 4 sinks, before the last 256) are replaced by their round trip through a key codec,
one record per 64-token block, and the values by their turbo3 round trip (tiered's cold values). The question's
last 64 tokens then run on that cache: the greedy reply (found: it holds the key) and the answer's
teacher-forced log-probability, against the same cell with the cache untouched. Every cold block is attended
(no retrieval): this isolates what the codec loses.

"pre" variants quantize the keys before RoPE: each key is rotated back by its position (memsvc.cache.rope),
encoded, decoded and rotated forward again, so per-channel groups see a channel's own distribution and not one
spun by the position (KVQuant's finding).

    .venv/bin/python benchmarks/cold_keys.py --lengths 2048,3072,4096      # ~15 min on 2 cores

Progress on stderr; a table (kept cells of those `full` answers, mean Δ log p, key bits per value, all-in at
64-token records) and one JSON line.
"""
from __future__ import annotations

import os

os.environ.setdefault("MEMSVC_KERNELS", "reference")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from memsvc.cache.rope import Rope  # noqa: E402
from memsvc.eval.niah import TASKS, task_prompt  # noqa: E402
from memsvc.kernels.registry import get_codec  # noqa: E402
from memsvc.kernels.sparse_outliers_codec import SparseOutlierCodec  # noqa: E402
from memsvc.kernels.uniform_codec import UniformCodec  # noqa: E402
from memsvc.model import load_model  # noqa: E402

SINK, HOT, BLOCK, TAIL = 4, 256, 64, 64


def channel(bits: int) -> UniformCodec:
    """Per-channel uniform codes, one scale and minimum per channel per 64-token block."""
    return UniformCodec(bits=bits, group_size=BLOCK, axis="channel", name=f"ch{bits}")


# name -> (layer -> key codec, pre-RoPE)
VARIANTS = {
    "k6 per-token (today)": (lambda l: get_codec("k6v4_k"), False),
    "turbo3": (lambda l: get_codec("turbo3", layer=l), False),
    "turbo3 pre": (lambda l: get_codec("turbo3", layer=l), True),
    "ch3": (lambda l: channel(3), False),
    "ch3 pre": (lambda l: channel(3), True),
    "ch4 pre": (lambda l: channel(4), True),
    "ch2 pre": (lambda l: channel(2), True),
    "1% exact + ch3": (lambda l: SparseOutlierCodec(dense=channel(3)), False),
    "1% exact + ch3 pre": (lambda l: SparseOutlierCodec(dense=channel(3)), True),
    "0.5% exact + ch3 pre": (lambda l: SparseOutlierCodec(dense=channel(3), outlier_fraction=0.005), True),
    "1% exact + ch2 pre": (lambda l: SparseOutlierCodec(dense=channel(2)), True),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def roundtrip(codec, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [H, T, D] (T a multiple of BLOCK) -> (decode(encode(x)) per block, stored bytes)."""
    out, nbytes = [], 0
    for t in range(0, x.shape[1], BLOCK):
        p = codec.encode(x[:, t:t + BLOCK].contiguous())
        nbytes += codec.nbytes(p)
        out.append(codec.decode(p).to(x.dtype))
    return torch.cat(out, 1), nbytes


def degraded(keys, values, variant, rope: Rope) -> tuple[list, list, float]:
    """Per-layer keys/values [H, T, D] with the cold span's round trips -> (keys, values, key bits per value)."""
    make, pre = VARIANTS[variant]
    T = keys[0].shape[1]
    lo = SINK
    hi = lo + (T - HOT - lo) // BLOCK * BLOCK
    pos = torch.arange(lo, hi)
    ks, vs, nbytes, numel = [], [], 0, 0
    for layer, (k, v) in enumerate(zip(keys, values)):
        k, v = k.clone(), v.clone()
        if 0 < layer < len(keys) - 1 and hi > lo:
            kc = k[:, lo:hi]
            kc = rope.rotate(kc, -pos) if pre else kc
            kh, nb = roundtrip(make(layer), kc)
            k[:, lo:hi] = rope.rotate(kh, pos) if pre else kh
            v[:, lo:hi] = roundtrip(get_codec("turbo3", layer=layer), v[:, lo:hi])[0]
            nbytes, numel = nbytes + nb, numel + kc.numel()
        ks.append(k)
        vs.append(v)
    return ks, vs, 8 * nbytes / max(numel, 1)


def answer(model, tok, ids: list[int], ans: list[int], key: str, keys, values) -> tuple[bool, float]:
    """The last TAIL prompt tokens and the answer on a cache of keys/values -> (greedy reply holds key, log p)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.unsqueeze(0), v.unsqueeze(0), layer)
    T = keys[0].shape[1]
    with torch.no_grad():
        lp = model(torch.tensor([ids[T:] + ans]), cache=cache, use_cache=True).logits[0].float().log_softmax(-1)
        n = len(ans)
        logp = sum(lp[-n - 1 + i, a].item() for i, a in enumerate(ans))
        cache.crop(-n)  # back to the prompt; greedy from there
        nxt = int(lp[-n - 1].argmax())
        out = [nxt]
        for _ in range(7):
            nxt = int(model(torch.tensor([[nxt]]), cache=cache, use_cache=True).logits[0, -1].argmax())
            out.append(nxt)
    return key in tok.decode(out), logp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,3072,4096")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--only", nargs="+", default=None, help="variant names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    variants = args.only or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    m = load_model()
    model, tok = m.model.eval(), m.tokenizer
    rope = Rope.of(model)
    if rope is None:
        raise SystemExit("pre-RoPE variants need a model whose RoPE can be moved")
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    rows, t_start = [], time.perf_counter()
    for n in lengths:
        for task in TASKS:
            for i, d in enumerate(depths):
                t0 = time.perf_counter()
                key = str(10000 + (7919 * (i + 1) * n) % 89999)
                ids, ans, found = task_prompt(tok, task, n, d, key)
                with torch.no_grad():
                    c = model(torch.tensor([ids[:-TAIL]]), use_cache=True).cache
                keys = [lay.keys[0].clone() for lay in c.layers]  # [H, T, D] per layer, post-RoPE
                values = [lay.values[0].clone() for lay in c.layers]
                ok, lp = answer(model, tok, ids, ans, found, keys, values)
                row = {"length": n, "task": task, "depth": d, "full": {"found": ok, "logp": lp}}
                for name in variants:
                    ks, vs, bits = degraded(keys, values, name, rope)
                    ok2, lp2 = answer(model, tok, ids, ans, found, ks, vs)
                    row[name] = {"found": ok2, "dlogp": lp2 - lp, "key_bits": bits}
                rows.append(row)
                log(f"[{len(rows)}/{len(lengths) * len(TASKS) * len(depths)}] {n} {task} depth {d}: full "
                    f"{'found' if ok else 'missed'} (log p {lp:.2f}); " + ", ".join(
                        f"{v} {'+' if row[v]['found'] else '-'}{row[v]['dlogp']:+.2f}" for v in variants)
                    + f" ({time.perf_counter() - t0:.0f} s)")
    base = [r for r in rows if r["full"]["found"]]
    summary = []
    for name in variants:
        kept = sum(r[name]["found"] for r in base)
        summary.append({"variant": name, "key_bits": rows[0][name]["key_bits"], "kept": kept, "of": len(base),
                        "found_all": sum(r[name]["found"] for r in rows),
                        "mean_dlogp": sum(r[name]["dlogp"] for r in rows) / len(rows),
                        "worst_dlogp": min(r[name]["dlogp"] for r in rows)})
    print(f"{len(rows)} cells ({args.lengths} tokens x {len(depths)} depths x passkey/needle); full answers "
          f"{len(base)}; values turbo3 (3.39 bits) in every variant; {time.perf_counter() - t_start:.0f} s")
    print("| key codec | key bits | kept of full's | found (all cells) | mean Δ log p | worst Δ log p |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in summary:
        print(f"| {s['variant']} | {s['key_bits']:.2f} | {s['kept']}/{s['of']} | {s['found_all']}/{len(rows)} | "
              f"{s['mean_dlogp']:+.3f} | {s['worst_dlogp']:+.2f} |")
    print(json.dumps({"benchmark": "cold_keys", "lengths": lengths, "depths": depths, "summary": summary,
                      "rows": rows}))


if __name__ == "__main__":
    main()
