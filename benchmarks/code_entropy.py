"""How far an entropy coder could take tiered's 3-bit cold codes (issue 22's sweep, entropy-coding row).

One forward over the essays captures every layer's keys and values. The span tiered keeps cold (after the 4
sinks, before the last 256 positions; layers 1..L-2) is cut into 64-token blocks and each block is encoded as
the service stores it: keys rotated back before RoPE and coded with kvq3_k (1% largest exact, the rest 3-bit
per channel), values with turbo3. The 3-bit codes of every block are then measured five ways, in bits per code:

- packed:          as stored today (3 bits);
- zstd packed:     zstd level 3 over each block's packed codes (what the store's zstd gets today);
- zstd bytes:      zstd level 3 over each block's codes one per byte (zstd's Huffman stage sees the symbols);
- static table:    the cross-entropy of a code table per (layer, head, channel) counted on the first half of the
                   blocks (a calibration) and charged on the second half: what a static rANS/Huffman coder
                   with tables stored beside the model would pay, tables not counted;
- block entropy:   each (block, head, channel)'s own empirical entropy over its 64 codes, tables not counted:
                   a lower bound for any coder that adapts per block.

It ends with each way's all-in bits per value of the cold records (every other byte as today) and the bytes per
token it would save on the cold tier, against the packed codes.

    .venv/bin/python benchmarks/code_entropy.py --tokens 4096      # ~2 min on 2 cores

Progress on stderr; a table and one JSON line.
"""
from __future__ import annotations

import os

os.environ.setdefault("MEMSVC_KERNELS", "reference")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import zstandard  # noqa: E402

from memsvc.cache.rope import Rope  # noqa: E402
from memsvc.corpus import haystack_tokens  # noqa: E402
from memsvc.kernels.dispatch import unpack_bits  # noqa: E402
from memsvc.kernels.registry import get_codec  # noqa: E402
from memsvc.model import load_model  # noqa: E402

SINK, HOT, BLOCK, BITS = 4, 256, 64, 3
WAYS = ("packed", "zstd packed", "zstd bytes", "static table", "block entropy")


def log(msg: str) -> None:
    print(f"[code_entropy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def entropy_bits(counts: torch.Tensor) -> torch.Tensor:
    """counts [..., 2^BITS] -> empirical entropy in bits per symbol [...]."""
    n = counts.sum(-1, keepdim=True).clamp(min=1)
    p = counts / n
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(-1)


def histogram(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., N] uint8 -> counts [..., 2^BITS] float64 along the last axis."""
    one_hot = torch.nn.functional.one_hot(codes.long(), 1 << BITS)  # [..., N, 8]
    return one_hot.sum(-2).double()


def block_codes(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """One cold block k, v [H, 64, D] (k pre-RoPE) -> ((key codes [H, 64, D], their packed bytes), (value codes
    [H, 64, Dp], their packed bytes), key bytes, value bytes all-in as packed records)."""
    pk = get_codec("kvq3_k").encode(k)
    pv = get_codec("turbo3", layer=layer).encode(v)
    H, T, D = k.shape
    kpacked = pk.tensors["dense.codes"]
    kc = unpack_bits(kpacked, BITS, H * T * D).reshape(H, T, D)
    vpacked = pv.tensors["codes"]  # [H, T, Dp*3/8]
    dp = vpacked.shape[-1] * 8 // BITS
    vc = unpack_bits(vpacked, BITS, dp).reshape(H, T, dp)
    nb = lambda p: sum(t.numel() * t.element_size() for t in p.tensors.values())  # noqa: E731
    raw = lambda t: t.contiguous().numpy().tobytes()  # noqa: E731
    return (kc, raw(kpacked)), (vc, raw(vpacked)), nb(pk), nb(pv)


def zstd_bits(blobs: list[bytes], n_codes: int) -> float:
    cctx = zstandard.ZstdCompressor(level=3)
    return 8 * sum(len(cctx.compress(b)) for b in blobs) / n_codes


def ways(per_layer: dict[int, list[tuple[torch.Tensor, bytes]]]) -> dict[str, float]:
    """per_layer: layer -> its blocks' (codes [H, 64, C], packed bytes as stored) in position order -> bits per
    code each way."""
    n_all, static_bits, block_bits, packed_blobs, byte_blobs = 0, 0.0, 0.0, [], []
    for blocks in per_layer.values():
        codes = torch.stack([c for c, _ in blocks])  # [B, H, 64, C]
        B = codes.shape[0]
        per_channel = codes.permute(1, 3, 0, 2)  # [H, C, B, 64]
        calib, held = per_channel[:, :, : B // 2], per_channel[:, :, B // 2:]
        table = histogram(calib.reshape(*calib.shape[:2], -1)) + 0.5  # [H, C, 8], add-half smoothed
        logp = (table / table.sum(-1, keepdim=True)).log2()
        hist_held = histogram(held.reshape(*held.shape[:2], -1))  # [H, C, 8]
        n_held = held.numel()
        static_bits += float(-(hist_held * logp).sum()) / n_held * codes.numel()  # charged at the held-out rate
        block_bits += float(entropy_bits(histogram(per_channel)).sum()) * BLOCK  # [H, C, B] entropies x 64 codes
        for blk, packed in blocks:
            packed_blobs.append(packed)
            byte_blobs.append(blk.contiguous().numpy().tobytes())
        n_all += codes.numel()
    return {
        "packed": float(BITS),
        "zstd packed": zstd_bits(packed_blobs, n_all),
        "zstd bytes": zstd_bits(byte_blobs, n_all),
        "static table": static_bits / n_all,
        "block entropy": block_bits / n_all,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.tokens < SINK + HOT + 4 * BLOCK:
        ap.error(f"--tokens must be at least {SINK + HOT + 4 * BLOCK}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    m = load_model()
    model = m.model.eval()
    rope = Rope.of(model)
    if rope is None:
        raise SystemExit("the keys are stored before RoPE: this needs a model whose RoPE can be moved")
    ids = haystack_tokens(m.tokenizer, args.tokens)
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).cache
    n_layers = len(cache.layers)
    hi = SINK + (args.tokens - HOT - SINK) // BLOCK * BLOCK
    keys, values = {}, {}
    key_bytes = value_bytes = 0
    for layer in range(1, n_layers - 1):
        k_all, v_all = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [H, T, D]
        for lo in range(SINK, hi, BLOCK):
            pos = torch.arange(lo, lo + BLOCK)
            k = rope.rotate(k_all[:, lo:lo + BLOCK].float(), -pos)
            kc, vc, kb, vb = block_codes(layer, k, v_all[:, lo:lo + BLOCK].float())
            keys.setdefault(layer, []).append(kc)
            values.setdefault(layer, []).append(vc)
            key_bytes, value_bytes = key_bytes + kb, value_bytes + vb
        log(f"layer {layer}: {len(keys[layer])} blocks")
    n_blocks = sum(len(b) for b in keys.values())
    H, _, D = keys[1][0][0].shape
    elems = n_blocks * H * BLOCK * D  # per stream
    result = {"keys": ways(keys), "values": ways(values)}
    # all-in bits per value of each record, and what they become when only the codes change
    allin = {"keys": 8 * key_bytes / elems, "values": 8 * value_bytes / elems}
    code_share = {"keys": BITS, "values": BITS * values[1][0][0].shape[-1] / D}  # turbo pads D to a power of 2
    print(f"\ncode entropy of tiered's cold blocks: {args.tokens} essay tokens, layers 1..{n_layers - 2}, "
          f"{n_blocks} blocks of {BLOCK} tokens x {H} heads")
    print("bits per 3-bit code, and the cold record's all-in bits per value if its codes were coded that way\n")
    print(f"{'way':16s} {'K code':>7s} {'V code':>7s} {'K all-in':>9s} {'V all-in':>9s} {'saved B/token':>14s}")
    rows = []
    for way in WAYS:
        kb, vb = result["keys"][way], result["values"][way]
        k_all = allin["keys"] - code_share["keys"] * (1 - kb / BITS)
        v_all = allin["values"] - code_share["values"] * (1 - vb / BITS)
        # bytes per token saved against the packed codes, over the layers measured (the cold layers)
        saved = ((allin["keys"] - k_all) + (allin["values"] - v_all)) / 8 * len(keys) * H * D
        rows.append({"way": way, "key_bits_per_code": kb, "value_bits_per_code": vb, "key_bits_all_in": k_all,
                     "value_bits_all_in": v_all, "cold_bytes_saved_per_token": saved})
        print(f"{way:16s} {kb:7.3f} {vb:7.3f} {k_all:9.3f} {v_all:9.3f} {saved:14,.0f}")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"benchmark": "code_entropy", "tokens": args.tokens, "blocks": n_blocks, "rows": rows,
                      "wall_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
