"""Many sessions streaming at once through one `memsvc serve` (issue 24): continuous batching's gain, measured.

Starts `memsvc serve` (benchmarks/served.py) on a fresh LMDB data dir with `--max-batch` and `--step-tokens`,
and per policy builds one session of `--context` essay tokens, forks it `--sessions` times and appends a
different user turn to each fork (so every session has its own context), loads them all with a 1-token
Generate, then measures greedy Generates of `--new` tokens (nothing committed), from the client:
- alone: one session at a time (3 of them, the median);
- together: every session at once, one thread and channel each.
Reported per policy: decode tok/s alone, aggregate tok/s together (all tokens / wall time) and their ratio, and
time to first token and inter-token latency p50 / p99.

With `--prefill N` a second part measures chunked prefill: `--streams` of the sessions stream `--new` tokens, once
alone and once while an Append of N essay tokens arrives in another (tiered) session after their first tokens;
the streams' inter-token p99 with the Append against without. A table, then one JSON line.

    python benchmarks/batching.py --sessions 16 --context 4096 --new 64 --policies full,tiered
    python benchmarks/batching.py --sessions 8 --context 4096 --new 96 --policies tiered --step-tokens 64 \\
        --prefill 16384 --streams 8 --skip-together

Knows the client and the command line; imports the tokenizer only (for the essays' token ids).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from served import ServeProcess  # noqa: E402

from memsvc.clients.client import MemoryClient  # noqa: E402
from memsvc.corpus import haystack_tokens  # noqa: E402
from memsvc.model import pull_default  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def stream(client: MemoryClient, sid: str, new: int, out: dict, start: threading.Event | None = None) -> None:
    """One Generate of `new` greedy tokens; out gets t0, the arrival time of each chunk with tokens, and the ids."""
    if start is not None:
        start.wait()
    times, ids = [], []
    t0 = time.perf_counter()
    out.update(t0=t0, times=times, ids=ids)  # filled as the chunks come
    for chunk in client.generate(sid, max_new_tokens=new):
        if chunk.token_ids:
            times.append(time.perf_counter())
            ids.extend(chunk.token_ids)


def gaps(run: dict) -> list[float]:
    t = run["times"]
    return [b - a for a, b in zip(t, t[1:])]


def build(client: MemoryClient, policy: str, base_ids: list[int], n: int) -> list[str]:
    base = f"base-{policy}"
    client.create_session(base, policy=policy)
    for lo in range(0, len(base_ids), 2048):
        client.append(base, tokens=base_ids[lo:lo + 2048])
    sids = []
    for i in range(n):
        sid = f"{policy}-{i}"
        client.fork_session(base, sid)
        client.append(sid, messages=[{"role": "user", "content": f"Reader {i}: what is essay number {i + 1} about, "
                                                                 f"in {i % 5 + 2} words?"}])
        client.generate_text(sid, max_new_tokens=1)  # loads it (and its cold blocks' decodes)
        sids.append(sid)
    return sids


def measure_policy(client: MemoryClient, addr: str, policy: str, sids: list[str], new: int) -> dict:
    alone = []
    for sid in sids[:3]:
        out: dict = {}
        stream(client, sid, new, out)
        alone.append(out)
    alone_tps = statistics.median(len(o["ids"]) / (o["times"][-1] - o["t0"]) for o in alone)
    clients = [MemoryClient(addr, timeout=3600) for _ in sids]
    outs = [dict() for _ in sids]
    go = threading.Event()
    threads = [threading.Thread(target=stream, args=(c, sid, new, o, go)) for c, sid, o in zip(clients, sids, outs)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    wall = max(o["times"][-1] for o in outs) - t0
    for c in clients:
        c.close()
    together = sum(len(o["ids"]) for o in outs) / wall
    same = all(o["ids"] == a["ids"] for o, a in zip(outs, alone))
    ttft = [o["times"][0] - o["t0"] for o in outs]
    itl = [g for o in outs for g in gaps(o)]
    alone_itl = [g for o in alone for g in gaps(o)]
    return {"policy": policy, "sessions": len(sids), "alone_tok_s": round(alone_tps, 2),
            "together_tok_s": round(together, 2), "ratio": round(together / alone_tps, 2),
            "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p99_s": round(pct(ttft, 0.99), 3),
            "itl_p50_s": round(pct(itl, 0.5), 4), "itl_p99_s": round(pct(itl, 0.99), 4),
            "alone_itl_p50_s": round(pct(alone_itl, 0.5), 4), "same_tokens_as_alone": same}


def measure_prefill(client: MemoryClient, addr: str, sids: list[str], new: int, tokens: list[int]) -> dict:
    """The streams' inter-token latency without, then with, an Append of `tokens` arriving mid-stream."""
    client.create_session("long-append", policy="tiered")
    client.append("long-append", tokens=tokens[:16])
    result = {}
    for label in ("without", "with"):
        clients = [MemoryClient(addr, timeout=3600) for _ in sids]
        outs = [dict() for _ in sids]
        threads = [threading.Thread(target=stream, args=(c, s, new, o)) for c, s, o in zip(clients, sids, outs)]
        for t in threads:
            t.start()
        append_s = None
        if label == "with":
            while not all(len(o.get("times", ())) >= 2 for o in outs) and all(t.is_alive() for t in threads):
                time.sleep(0.02)  # until every stream is going
            t = time.perf_counter()
            client.append("long-append", tokens=tokens[16:])
            append_s = time.perf_counter() - t
        for t in threads:
            t.join()
        for c in clients:
            c.close()
        itl = [g for o in outs for g in gaps(o)]
        result[label] = {"itl_p50_s": round(pct(itl, 0.5), 4), "itl_p99_s": round(pct(itl, 0.99), 4),
                         "itl_max_s": round(max(itl), 4), "append_s": None if append_s is None else round(append_s, 1)}
        print(f"  streams {label} the Append: inter-token p50 {result[label]['itl_p50_s']} s, p99 "
              f"{result[label]['itl_p99_s']} s" + (f", the Append took {append_s:.1f} s" if append_s else ""),
              flush=True)
    result["p99_ratio"] = round(result["with"]["itl_p99_s"] / result["without"]["itl_p99_s"], 2)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--policies", default="full,tiered")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--step-tokens", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=0, help="tokens of the Append that arrives mid-stream (0: skip)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--skip-together", action="store_true", help="only the prefill part")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the server (0: its default)")
    ap.add_argument("--serve-flags", default="", help="more `memsvc serve` flags, e.g. '--decoded-cache 2147483648'")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pull_default(quiet=True)))
    base_ids = haystack_tokens(tok, args.context)
    tmp = Path(tempfile.mkdtemp(prefix="memsvc-batching-"))
    flags = ["--store", str(tmp / "data"), "--resident-budget", "0", "--no-log-rpcs", "--max-batch",
             str(args.max_batch), "--step-tokens", str(args.step_tokens), *args.serve_flags.split()]
    env = None
    if args.threads:
        import os
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    server = ServeProcess(flags, tmp / "server.log", env=env)
    addr = f"127.0.0.1:{server.port}"
    client = MemoryClient(addr, timeout=3600)
    rows, prefill = [], None
    try:
        for policy in args.policies.split(","):
            t = time.perf_counter()
            sids = build(client, policy, base_ids, max(args.sessions, args.streams))
            print(f"{policy}: {len(sids)} sessions of {args.context} tokens built in {time.perf_counter() - t:.0f} s",
                  flush=True)
            if not args.skip_together:
                row = measure_policy(client, addr, policy, sids[:args.sessions], args.new)
                rows.append(row)
                print(f"  alone {row['alone_tok_s']} tok/s; {row['sessions']} together {row['together_tok_s']} "
                      f"tok/s ({row['ratio']}x)", flush=True)
            if args.prefill and policy == args.policies.split(",")[-1]:
                prefill = measure_prefill(client, addr, sids[:args.streams], args.new,
                                          haystack_tokens(tok, args.prefill + 16))
    finally:
        client.close()
        server.stop()
    if rows:
        print(f"\n{'policy':8} {'sessions':>8} {'alone tok/s':>11} {'together tok/s':>14} {'ratio':>6} "
              f"{'TTFT p50/p99 s':>16} {'ITL p50/p99 s':>16} {'same ids':>8}")
        for r in rows:
            print(f"{r['policy']:8} {r['sessions']:>8} {r['alone_tok_s']:>11} {r['together_tok_s']:>14} "
                  f"{r['ratio']:>6} {r['ttft_p50_s']:>7}/{r['ttft_p99_s']:<8} {r['itl_p50_s']:>7}/{r['itl_p99_s']:<8} "
                  f"{str(r['same_tokens_as_alone']):>8}")
    if prefill:
        print(f"\nchunked prefill ({args.prefill} tokens, --step-tokens {args.step_tokens}, {args.streams} streams): "
              f"inter-token p99 {prefill['without']['itl_p99_s']} s without, {prefill['with']['itl_p99_s']} s with "
              f"({prefill['p99_ratio']}x)")
    print(json.dumps({"bench": "batching", "context": args.context, "new": args.new, "max_batch": args.max_batch,
                      "step_tokens": args.step_tokens, "serve_flags": args.serve_flags, "rows": rows, "prefill": prefill}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
