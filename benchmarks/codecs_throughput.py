"""CPU throughput of the codecs, benchmarks/codecs.py's last part: encode and decode on one core.

Real keys [3, T, 64] fp16, median of `runs` runs, in MB/s of fp16 input, against issue 3's targets
(codecs_settings.TARGETS).
"""
from __future__ import annotations

import statistics
import time

import torch

from codecs_report import log
from codecs_settings import TARGETS, THROUGHPUT


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

