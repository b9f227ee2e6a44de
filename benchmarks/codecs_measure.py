"""What benchmarks/codecs.py measures per codec setting: bits, reconstruction and attention error, Δppl.

- bits: all-in, 8 * nbytes / numel over everything a Packed record stores, one record per layer, and with
  one record per 64-token block (the service's block size);
- relMSE: sum ||x - x̂||² / sum ||x||²; attention error: ||o - ô|| / ||o|| of the captured queries' attention;
- Δppl: positions [0, prefix - WINDOW) of each essay window's cache through the codec, the last WINDOW exact,
  the next tokens teacher-forced and scored against the untouched cache (pooled over the windows);
- packed_check: packed_attention over 64-token records against dense attention over their decode.
"""
from __future__ import annotations

import math
import time

import torch

from codecs_capture import attend
from codecs_report import log
from codecs_settings import Factory, Setting
from memsvc.kernels.dispatch import packed_attention

WINDOW = 128  # recent tokens kept exact in the perplexity test


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



def ppl_segments(model, ids: list[int], keys: list, values: list, prefix: int, scored: int, n: int) -> list[dict]:
    """The perplexity windows, each with its prefix's cache and its baseline NLL. Segment 0 is the start of the
    captured context (its first `prefix` positions of the same causal forward); further segments are later,
    disjoint windows of the essays, each prefilled once."""
    n_layers = len(keys)
    span = prefix + scored + 1
    segments = []
    for j in range(n):
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
        b_nll, count = nll(model, make_cache(pk, pv), cont)
        segments.append({"keys": pk, "values": pv, "cont": cont, "base_nll": b_nll, "n": count})
        log(f"segment {j}: baseline ppl {math.exp(b_nll / count):.4f} over {count} tokens ({time.perf_counter() - t0:.1f} s)")
    return segments


def measure(s: Setting, model, keys: list, values: list, queries: list, ref_out: list, ref_sq: float,
            segments: list[dict], prefix: int, base_ppl: float, sample: list[int]) -> dict:
    """One setting's row; `sample`: the layers whose bits are counted with 64-token records."""
    n_layers = len(keys)
    n_tok = sum(g["n"] for g in segments)
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
    return {
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
