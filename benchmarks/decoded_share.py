"""Several sessions generating at once: decode speed and decoded-cache hits, the cache fair or plain LRU.

Each tiered layer keeps its last decoded cold keys and values in the decoded cache (`serve --decoded-cache`),
and every decode step re-reads all of a session's layers. When the sessions generating at once need more than
the capacity between them, plain LRU evicts each entry just before its next use; the fair cache gives each
session a share (capacity / sessions in it) and keeps a stable part of each.

One process, one `SessionManager` over the stored sessions of `benchmarks/resume_tiered.py` (its data dir;
build them there first). For each mode: a fork of each session, Resume + Append(the question) + the first
chunk of Generate (untimed), then the sessions' decode steps interleaved one token each, --new tokens per
session, not committed; the forks are deleted after.

    python benchmarks/decoded_share.py                                  # tiered-32768, tiered-8192, tiered-v8-8192
    python benchmarks/decoded_share.py --sessions tiered-8192 tiered-1024 --capacity-mib 64

Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

QUESTION = "In two sentences, what was the text above about?"


def run(mgr, sessions: list[str], new: int, fair: bool, capacity: int) -> dict:
    from memsvc.cache.tiered.blockcache import BlockCache
    from memsvc.sessions import GenerateParams

    mgr.decoded_cache = BlockCache(capacity, fair=fair)
    forks = []
    for i, sid in enumerate(sessions):
        fork = f"{sid}-share{i}"
        try:
            mgr.delete(fork)  # left by an interrupted run
        except Exception:
            pass
        mgr.fork(sid, fork)
        forks.append(fork)
    try:
        streams = []
        for fork in forks:
            mgr.resume(fork)
            mgr.append(fork, messages=[{"role": "user", "content": QUESTION}])
            stream = iter(mgr.generate(fork, GenerateParams(max_new_tokens=new, commit=False)))
            next(stream)  # the first chunk, untimed
            streams.append(stream)
        cache = mgr.decoded_cache
        hits0, misses0, steps, t0 = cache.hits, cache.misses, 0, time.perf_counter()
        live = list(streams)
        while live:
            for stream in list(live):
                try:
                    next(stream)
                    steps += 1
                except StopIteration:
                    live.remove(stream)
        seconds = time.perf_counter() - t0
        st = cache.stats()
        reads = st["hits"] - hits0 + st["misses"] - misses0  # each layer's keys and values, each step
        return {"fair": fair, "steps": steps, "seconds": round(seconds, 3), "tokens_per_s": round(steps / seconds, 2),
                "hits": st["hits"] - hits0, "layer_reads": reads, "hit_rate": round((st["hits"] - hits0) / reads, 3),
                "skipped": st["skipped"], "evictions": st["evictions"]}
    finally:
        for fork in forks:
            mgr.delete(fork)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", nargs="+", default=["tiered-32768", "tiered-8192", "tiered-v8-8192"])
    ap.add_argument("--data-dir", default=None, help="default: $MEMSVC_HOME/bench/resume-tiered/data")
    ap.add_argument("--capacity-mib", type=int, default=256, help="decoded cache capacity (serve's default: 256)")
    ap.add_argument("--new", type=int, default=24, help="tokens generated per session")
    ap.add_argument("--context", type=int, default=33792, help="model positions (the 32k session needs more "
                                                                  "than the model's 8,192)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.capacity_mib < 1 or args.new < 2:
        raise SystemExit("--capacity-mib must be >= 1 and --new >= 2")
    torch.set_num_threads(args.threads)

    from memsvc.model import load_model, memsvc_home, pull_default
    from memsvc.sessions import SessionManager
    from memsvc.store.open import open_store

    data = Path(args.data_dir) if args.data_dir else memsvc_home() / "bench" / "resume-tiered" / "data"
    model = dataclasses.replace(load_model(pull_default()), max_positions=args.context)
    rows = []
    with open_store(data) as store:
        mgr = SessionManager(store, model, sweep_every=0)
        for fair in (False, True):
            r = run(mgr, args.sessions, args.new, fair, args.capacity_mib << 20)
            rows.append(r)
            print(f"[{'fair' if fair else 'LRU'}] {r['steps']} steps, {r['tokens_per_s']} tok/s, hit rate "
                  f"{r['hit_rate']:.0%}", flush=True)
        mgr.close()

    print(f"\n{len(args.sessions)} sessions generating at once ({', '.join(args.sessions)}), decoded cache "
          f"{args.capacity_mib} MiB, {args.threads} thread(s)")
    head = f"{'cache':>6} {'steps':>6} {'tok/s':>7} {'hit rate':>9} {'skipped':>8} {'evictions':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{'fair' if r['fair'] else 'LRU':>6} {r['steps']:>6} {r['tokens_per_s']:>7.2f} {r['hit_rate']:>9.0%} "
              f"{r['skipped']:>8} {r['evictions']:>10}")
    print(json.dumps({"benchmark": "decoded_share", "sessions": args.sessions, "capacity_mib": args.capacity_mib,
                      "new": args.new, "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
