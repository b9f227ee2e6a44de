"""Resume-to-first-token against re-prefilling the same history (real model).

For each history length: build a session of that many essay tokens once, then
restart the server on the same data dir (the session is on disk only) and time
Resume + the first generated token; against that, time a fresh session that
appends the same tokens and generates its first token (what a service without
stored KV must do). Both go through gRPC on loopback, greedy, same tokens.

    python benchmarks/resume.py --lengths 1024 4096 8000

Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from memsvc.clients.client import MemoryClient
from memsvc.corpus import haystack_tokens
from memsvc.model import load_model
from memsvc.server import create_server


def _first_token(client: MemoryClient, sid: str) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    chunk = next(iter(client.generate(sid, max_new_tokens=1)))
    return time.perf_counter() - t0, list(chunk.token_ids)


def _server(data: Path, model):
    server, port = create_server("127.0.0.1:0", data_dir=data, model=model)
    server.start()
    return server, MemoryClient(f"127.0.0.1:{port}", timeout=3600)


def _stop(server, client):
    client.close()
    server.stop(grace=None).wait()
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8000])
    ap.add_argument("--repeats", type=int, default=3, help="resume timings per length (median reported)")
    ap.add_argument("--data-dir", default=None, help="keep the data dir here instead of a temp dir")
    ap.add_argument("--policy", default="full", help="the sessions' policy (full: the whole cache at the model's "
                                                       "precision, as llama.cpp's slot restore reads it back)")
    ap.add_argument("--context", type=int, default=0,
                    help="the server's context in tokens (as serve --context; default: the model's own, 8,192)")
    args = ap.parse_args()

    model = load_model()
    if args.context:  # past the model's own context: timings and bytes, not answers
        model = dataclasses.replace(model, max_positions=args.context)
    data = Path(args.data_dir or tempfile.mkdtemp(prefix="memsvc-bench-"))
    corpus = haystack_tokens(model.tokenizer, max(args.lengths))
    # Warm the model and the allocator once, so the first length does not pay for it.
    server, client = _server(data, model)
    try:
        client.create_session("warmup")
        client.append("warmup", tokens=corpus[:512])
        _first_token(client, "warmup")
        client.delete_session("warmup")
    finally:
        _stop(server, client)
    rows = []
    for n in args.lengths:
        ids = corpus[:n]
        sid = f"bench-{n}"
        server, client = _server(data, model)
        try:
            client.create_session(sid, policy=args.policy)
            t0 = time.perf_counter()
            client.append(sid, tokens=ids)
            prefill_s, ref_tok = _first_token(client, sid)
            reprefill_s = time.perf_counter() - t0  # append the history + first token
            stored = client.get_session(sid).bytes_stored
        finally:
            _stop(server, client)
        resume_times = []
        for _ in range(args.repeats):
            server, client = _server(data, model)  # a fresh server: the session is on disk only
            try:
                t0 = time.perf_counter()
                client.resume(sid)
                _, tok = _first_token(client, sid)
                resume_times.append(time.perf_counter() - t0)
                processed = client.stats().model_tokens_processed
            finally:
                _stop(server, client)
            if tok != ref_tok:
                raise SystemExit(f"resumed session generated {tok}, re-prefill {ref_tok}")
        resume_s = sorted(resume_times)[len(resume_times) // 2]
        print(f"  {n} tokens: resume runs (s) {[round(t, 3) for t in resume_times]}", file=sys.stderr, flush=True)
        rows.append({"tokens": n, "resume_to_first_token_s": round(resume_s, 4),
                     "reprefill_to_first_token_s": round(reprefill_s, 3),
                     "speedup": round(reprefill_s / resume_s, 1), "stored_bytes": stored,
                     "stored_bytes_per_token": round(stored / n), "tokens_processed_after_resume": processed})
        print(f"  {n} tokens done", file=sys.stderr, flush=True)
    if not args.data_dir:
        shutil.rmtree(data, ignore_errors=True)

    print(f"\nResume-to-first-token vs re-prefill, {model.name}, policy {args.policy}, "
          f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    head = f"{'tokens':>7} {'resume+1st tok':>15} {'re-prefill+1st tok':>19} {'speedup':>8} {'stored B/token':>15} {'model tokens':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['tokens']:>7} {r['resume_to_first_token_s'] * 1000:>13.0f}ms {r['reprefill_to_first_token_s']:>18.2f}s "
              f"{r['speedup']:>7.1f}x {r['stored_bytes_per_token']:>15} {r['tokens_processed_after_resume']:>13}")
    print(json.dumps({"benchmark": "resume", "model": model.name, "policy": args.policy, "rows": rows}))


if __name__ == "__main__":
    main()
