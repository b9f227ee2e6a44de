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

Cross-check: for every setting, `kernels.attention.packed_attention` over
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

Prints a table and ends with one JSON line. Progress goes to stderr.
"""
from __future__ import annotations

import os

os.environ.setdefault("MEMSVC_KERNELS", "reference")  # the CPU path; throughput is the reference's

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from memsvc.corpus import haystack_tokens
from memsvc.kernels.codec import Codec
from memsvc.kernels.dispatch import packed_attention, use_reference
from memsvc.kernels.lowrank_codec import LowRankCodec
from memsvc.kernels.registry import get_codec
from memsvc.kernels.sparse_outliers_codec import SparseOutlierCodec
from memsvc.model import load_model

Factory = Callable[[int], Codec]  # layer -> codec


def reg(name: str, **config) -> Factory:
    return lambda layer: get_codec(name, **config)


def turbo(name: str) -> Factory:
    return lambda layer: get_codec(name, layer=layer)


def make(cls, **config) -> Factory:
    return lambda layer: cls(**config)


@dataclass(frozen=True)
class Setting:
    label: str
    key: Factory | None  # None: kept as fp16 (16 bits, no codec)
    value: Factory | None
    what: str


SETTINGS = [
    Setting("k8v8", reg("k8v8_k"), reg("k8v8_v"), "8-bit per-token keys and values"),
    Setting("k6v4", reg("k6v4_k"), reg("k6v4_v"), "6-bit keys, 4-bit values, per-token"),
    Setting("kivi4", reg("kivi4_k"), reg("kivi4_v"), "4-bit, group 32: keys per-channel, values per-token"),
    Setting("kivi2", reg("kivi2_k"), reg("kivi2_v"), "2-bit, group 32: keys per-channel, values per-token"),
    Setting("turbo4", turbo("turbo4"), turbo("turbo4"), "TurboQuant-MSE 4-bit, Hadamard, norm-corrected"),
    Setting("turbo3", turbo("turbo3"), turbo("turbo3"), "TurboQuant-MSE 3-bit"),
    Setting("turbo2", turbo("turbo2"), turbo("turbo2"), "TurboQuant-MSE 2-bit"),
    Setting("turbo K4/V3", turbo("turbo4"), turbo("turbo3"), "TurboQuant-MSE, 4-bit keys, 3-bit values"),
    Setting("turbo3 qjl-K", turbo("turbo3_qjl"), turbo("turbo3"), "keys 2-bit MSE + 1-bit QJL, values turbo3"),
    Setting("turbo3 haar", turbo("turbo3_haar"), turbo("turbo3_haar"), "TurboQuant-MSE 3-bit, dense Haar rotation"),
    Setting("turbo3 out8", turbo("turbo3_out8"), turbo("turbo3_out8"), "3-bit + 8 outlier channels at 4 bits"),
    Setting("turbo2 out8", turbo("turbo2_out8"), turbo("turbo2_out8"), "2-bit + 8 outlier channels at 3 bits"),
    Setting("lowrank32 K", reg("lowrank", rank=32), None, "keys PCA rank 32, fp16 latent; values fp16"),
    Setting("lowrank16 K", reg("lowrank", rank=16), None, "keys PCA rank 16, fp16 latent; values fp16"),
    Setting("lowrank32-k8 K", reg("lowrank", rank=32, latent_codec="k8v8_k"), None,
            "keys PCA rank 32, 8-bit latent; values fp16"),
    Setting("lowrank ev99-k8 K", make(LowRankCodec, explained_variance=0.99, latent_codec="k8v8_k"), None, "keys PCA to 99% energy, 8-bit latent; values fp16"),
    Setting("sparse+kivi4", make(SparseOutlierCodec, dense="kivi4_k"), make(SparseOutlierCodec, dense="kivi4_v"), "1% largest |x| exact, rest kivi4"),
    Setting("sparse+kivi2", make(SparseOutlierCodec, dense="kivi2_k"), make(SparseOutlierCodec, dense="kivi2_v"),
            "1% largest |x| exact, rest kivi2"),
]

# distinct codecs timed on one core: (name, factory, family)
THROUGHPUT = [
    ("k8v8_k", reg("k8v8_k"), "uniform"),
    ("k6v4_k", reg("k6v4_k"), "uniform"),
    ("k6v4_v", reg("k6v4_v"), "uniform"),
    ("kivi4_k", reg("kivi4_k"), "uniform"),
    ("kivi4_v", reg("kivi4_v"), "uniform"),
    ("kivi2_k", reg("kivi2_k"), "uniform"),
    ("kivi2_v", reg("kivi2_v"), "uniform"),
    ("turbo4", turbo("turbo4"), "turbo"),
    ("turbo3", turbo("turbo3"), "turbo"),
    ("turbo2", turbo("turbo2"), "turbo"),
    ("turbo3_qjl", turbo("turbo3_qjl"), "turbo-variant"),
    ("turbo3_haar", turbo("turbo3_haar"), "turbo-variant"),
    ("turbo3_out8", turbo("turbo3_out8"), "turbo-variant"),
    ("lowrank r32", reg("lowrank", rank=32), "other"),
    ("lowrank r32 k8", reg("lowrank", rank=32, latent_codec="k8v8_k"), "other"),
    ("sparse_outliers", make(SparseOutlierCodec, dense="kivi4_k"), "other"),
]
TARGETS = {"uniform": (1000.0, None), "turbo": (500.0, 1000.0), "turbo-variant": (500.0, 1000.0)}  # MB/s enc, dec

WINDOW = 128  # recent tokens kept exact in the perplexity test
N_QUERIES = 64


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
    import transformers

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


# ---------------------------------------------------------------------------
# capture


def capture(m, ids: list[int]):
    """One forward over ids -> (keys, values: per layer [3, T, 64] fp32; queries: per layer [9, 64, 64]; attn_out check)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = m.model
    layers = model.model.layers
    saved: dict[int, dict] = {}
    hooks = []

    def pre(idx):
        def hook(mod, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            saved.setdefault(idx, {}).update(h=h[:, -N_QUERIES:].detach().clone(),
                                             cos=cos[:, -N_QUERIES:].clone(), sin=sin[:, -N_QUERIES:].clone())
        return hook

    def o_pre(idx):
        def hook(mod, args):
            saved.setdefault(idx, {})["o"] = args[0][:, -N_QUERIES:].detach().clone()  # [1, 64, H_q * D]
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(pre(i), with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(o_pre(i)))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    cache = out.cache
    keys = [cache.layers[i].keys[0].detach().clone() for i in range(len(layers))]
    values = [cache.layers[i].values[0].detach().clone() for i in range(len(layers))]
    queries, model_out = [], []
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        for i, layer in enumerate(layers):
            s = saved[i]
            q = layer.self_attn.q_proj(s["h"]).view(1, N_QUERIES, -1, hd).transpose(1, 2)  # [1, H_q, 64, D]
            q, _ = apply_rotary_pos_emb(q, q, s["cos"], s["sin"])
            queries.append(q[0].contiguous())
            model_out.append(s["o"][0].view(N_QUERIES, -1, hd).transpose(0, 1))  # [H_q, 64, D]
    return keys, values, queries, model_out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last len(q) positions. q: [H_q, n, D]; k, v: [H_kv, T, D] -> [H_q, n, D]."""
    hq, n, d = q.shape
    g = hq // k.shape[0]
    k = k.float().repeat_interleave(g, dim=0)
    v = v.float().repeat_interleave(g, dim=0)
    t = k.shape[1]
    s = (q.float() @ k.transpose(-1, -2)) / math.sqrt(d)  # [H_q, n, T]
    pos = torch.arange(t - n, t).unsqueeze(1)
    s = s.masked_fill(torch.arange(t).unsqueeze(0) > pos, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


# ---------------------------------------------------------------------------
# per-setting measurements


def roundtrip(factory: Factory | None, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x: [3, T, D] -> (x̂ same dtype, stored bytes); no codec: fp16 storage."""
    if factory is None:
        return x.half().to(x.dtype), x.numel() * 2
    c = factory(layer)
    p = c.encode(x)
    nb = c.nbytes(p)
    return c.decode(p), nb


def block_bits(factory: Factory | None, layers: list[int], xs: list[torch.Tensor], block: int = 64) -> float:
    """All-in bits per value with one record per `block` tokens."""
    if factory is None:
        return 16.0
    nbytes = numel = 0
    for l in layers:
        c = factory(l)
        x = xs[l]
        for t0 in range(0, x.shape[1], block):
            xb = x[:, t0 : t0 + block]
            nbytes += c.nbytes(c.encode(xb))
            numel += xb.numel()
    return 8 * nbytes / numel


def nll(model, cache, ids: list[int], chunk: int = 128) -> tuple[float, int]:
    """Feed ids in chunks onto cache (mutated); -> (sum NLL of ids[1:] given the past, count)."""
    total, count = 0.0, 0
    x = torch.tensor([ids])
    with torch.no_grad():
        for t0 in range(0, len(ids) - 1, chunk):
            inp = x[:, t0 : min(t0 + chunk, len(ids) - 1)]
            tgt = x[:, t0 + 1 : t0 + 1 + inp.shape[1]]
            logits = model(inp, cache=cache, use_cache=True).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0], tgt[0], reduction="sum").item()
            count += tgt.numel()
    return total, count


def make_cache(keys, values):
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.unsqueeze(0).clone(), v.unsqueeze(0).clone(), i)
    return cache


def packed_check(s: Setting, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float | None:
    """packed_attention over 64-token packed blocks vs dense attention over their decode; last query only."""
    if s.key is None or s.value is None:
        return None
    kc, vc = s.key(layer), s.value(layer)
    kb = [kc.encode(k[:, t : t + 64]) for t in range(0, k.shape[1], 64)]
    vb = [vc.encode(v[:, t : t + 64]) for t in range(0, v.shape[1], 64)]
    kd = torch.cat([kc.decode(p).float() for p in kb], dim=1)
    vd = torch.cat([vc.decode(p).float() for p in vb], dim=1)
    ref = attend(q[:, -1:], kd, vd)[:, 0]  # [H_q, D]
    got, _ = packed_attention(q[:, -1].float(), kb, vb, key_codec=kc, value_codec=vc)
    return ((got.float() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------
# throughput


def throughput(x: torch.Tensor, runs: int, codecs: list = THROUGHPUT) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        mb = x.numel() * x.element_size() / 1e6
        for name, factory, family in codecs:
            c = factory(15)
            p = c.encode(x)
            c.decode(p)  # warm caches (rotations, tables)
            enc, dec = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                p = c.encode(x)
                enc.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                c.decode(p)
                dec.append(time.perf_counter() - t0)
            e, d = mb / statistics.median(enc), mb / statistics.median(dec)
            te, td = TARGETS.get(family, (None, None))
            rows.append({"codec": name, "family": family, "encode_MBps": round(e, 1), "decode_MBps": round(d, 1),
                         "encode_target_MBps": te, "decode_target_MBps": td,
                         "encode_met": None if te is None else e >= te, "decode_met": None if td is None else d >= td})
            log(f"throughput {name}: encode {e:.0f} MB/s, decode {d:.0f} MB/s")
    finally:
        torch.set_num_threads(threads)
    return rows


def print_throughput(tput: list[dict], shape: list[int], runs: int) -> None:
    print(f"\nthroughput, one core, {shape} fp16 real keys (layer 15), MB/s of fp16 input, median of {runs}")
    head = f"{'codec':<16} {'encode':>8} {'decode':>8}  target (enc / dec)     met"
    print(head)
    print("-" * len(head))
    for r in tput:
        te, td = r["encode_target_MBps"], r["decode_target_MBps"]
        tgt = "—" if te is None else f"≥{te:.0f}" + ("" if td is None else f" / ≥{td:.0f}")
        met = "—" if te is None else ("yes" if r["encode_met"] else "NO") + (
            "" if td is None else " / " + ("yes" if r["decode_met"] else "NO"))
        print(f"{r['codec']:<16} {r['encode_MBps']:>8.0f} {r['decode_MBps']:>8.0f}  {tgt:<22} {met}")


# ---------------------------------------------------------------------------


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x:+.2f}%"


def seg_range(r: dict) -> str:
    seg = r["ppl_change_pct_per_segment"]
    return fmt_pct(seg[0]) if len(seg) == 1 else f"{fmt_pct(min(seg))}..{fmt_pct(max(seg))}"


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
    m = load_model()
    model = m.model.eval()
    info = machine()
    command = " ".join([".venv/bin/python" if sys.executable.endswith(".venv/bin/python") else sys.executable] + sys.argv)
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

    # perplexity: segment 0 is the start of the captured context (its first `prefix` positions of the
    # same causal forward); further segments are later, disjoint windows of the essays, each prefilled once
    span = prefix + scored + 1
    segments = []
    for j in range(args.segments):
        window = ids[j * span : (j + 1) * span]
        if j == 0:
            pk, pv = [k[:, :prefix] for k in keys], [v[:, :prefix] for v in values]
        else:
            log(f"segment {j}: prefill {prefix} tokens at offset {j * span}")
            with torch.no_grad():
                c = model(torch.tensor([window[:prefix]]), use_cache=True).cache
            pk = [c.layers[l].keys[0].clone() for l in range(n_layers)]
            pv = [c.layers[l].values[0].clone() for l in range(n_layers)]
        cont = window[prefix:]
        t0 = time.perf_counter()
        b_nll, n = nll(model, make_cache(pk, pv), cont)
        segments.append({"keys": pk, "values": pv, "cont": cont, "base_nll": b_nll, "n": n})
        log(f"segment {j}: baseline ppl {math.exp(b_nll / n):.4f} over {n} tokens ({time.perf_counter() - t0:.1f} s)")
    n_tok = sum(g["n"] for g in segments)
    base_ppl = math.exp(sum(g["base_nll"] for g in segments) / n_tok)

    rows = []
    for i, s in enumerate(settings):
        t0 = time.perf_counter()
        kb = vb = 0
        k_err = k_sq = v_err = v_sq = a_err = 0.0
        for l in range(n_layers):
            kh, nbk = roundtrip(s.key, l, keys[l])
            vh, nbv = roundtrip(s.value, l, values[l])
            kb += nbk
            vb += nbv
            k_err += (kh.float() - keys[l]).pow(2).sum().item()
            k_sq += keys[l].pow(2).sum().item()
            v_err += (vh.float() - values[l]).pow(2).sum().item()
            v_sq += values[l].pow(2).sum().item()
            a_err += (attend(queries[l], kh, vh) - ref_out[l]).pow(2).sum().item()
        numel = keys[0].numel() * n_layers
        # bits with the service's 64-token records: every layer in --quick, 6 spread layers otherwise
        sample = list(range(n_layers)) if args.quick else [0, 6, 12, 18, 24, 29]
        kb64 = block_bits(s.key, sample, keys)
        vb64 = block_bits(s.value, sample, values)
        # perplexity: positions [0, prefix - WINDOW) through the codec, the last WINDOW exact
        cut = prefix - WINDOW
        c_total, seg_pct = 0.0, []
        for g in segments:
            ck, cv = [], []
            for l in range(n_layers):
                kh, _ = roundtrip(s.key, l, g["keys"][l][:, :cut])
                vh, _ = roundtrip(s.value, l, g["values"][l][:, :cut])
                ck.append(torch.cat([kh.to(torch.float32), g["keys"][l][:, cut:]], dim=1))
                cv.append(torch.cat([vh.to(torch.float32), g["values"][l][:, cut:]], dim=1))
            c_nll, _ = nll(model, make_cache(ck, cv), g["cont"])
            c_total += c_nll
            seg_pct.append(100 * (math.exp((c_nll - g["base_nll"]) / g["n"]) - 1))
        ppl = math.exp(c_total / n_tok)
        pchk = packed_check(s, 15 % n_layers, queries[15 % n_layers], keys[15 % n_layers], values[15 % n_layers])
        row = {
            "setting": s.label,
            "what": s.what,
            "key_bits": round(8 * kb / numel, 3),
            "value_bits": round(8 * vb / numel, 3),
            "key_bits_64": round(kb64, 3),
            "value_bits_64": round(vb64, 3),
            "key_rel_mse": k_err / k_sq,
            "value_rel_mse": v_err / v_sq,
            "attn_rel_err": math.sqrt(a_err / ref_sq),
            "ppl": ppl,
            "ppl_change_pct": 100 * (ppl / base_ppl - 1),
            "ppl_change_pct_per_segment": [round(x, 3) for x in seg_pct],
            "packed_attention_vs_dense": pchk,
        }
        rows.append(row)
        log(f"[{i + 1}/{len(settings)}] {s.label}: K {row['key_bits']:.2f} b V {row['value_bits']:.2f} b, "
            f"attn err {row['attn_rel_err']:.4f}, ppl {row['ppl_change_pct']:+.2f}% ({time.perf_counter() - t0:.1f} s)")

    log(f"throughput on one core, {runs} runs per codec")
    tput = throughput(keys[15 % n_layers].to(torch.float16).contiguous(), runs)

    # ---- the readable table
    print(f"\nmemsvc codec benchmark (issue 3)\ncommand: {command}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads; "
          f"throughput on 1), transformers {info['transformers']}, reference path: {info['reference_path']}, "
          f"commit {info['commit']}")
    print(f"model: SmolLM2-135M-Instruct fp32, {n_layers} layers; context {ctx} essay tokens; "
          f"perplexity: prefix {prefix}, last {WINDOW} exact, {n_tok} scored; baseline ppl {base_ppl:.4f}")
    print(f"query capture check (our attention vs the model's): max rel diff {check:.1e}; "
          f"perplexity pooled over {len(segments)} disjoint essay window(s)")
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
    command = " ".join([".venv/bin/python" if sys.executable.endswith(".venv/bin/python") else sys.executable] + sys.argv)
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
