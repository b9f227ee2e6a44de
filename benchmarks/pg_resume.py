"""Resume-to-first-token from PostgreSQL against LMDB (issue 23, acceptance 6), with the round trips counted.

For each history length: one session of that many essay tokens is built (Appends of --chunk tokens) in an LMDB
data directory and in a PostgreSQL database (a throwaway server, tools/pgserver.py, fsync on: the setting a
deployment keeps); then, --repeats times, a fresh server over each store (the session is in the store only)
times Resume + the first generated token, and the store's round trips and bytes read during it are counted
(Store.io_counters; LMDB has none: it reads memory-mapped pages). Same model, same tokens, greedy: the first
tokens must agree.

    python benchmarks/pg_resume.py --lengths 8000            # real model (SmolLM2-135M-Instruct)
    python benchmarks/pg_resume.py --lengths 8000 32000 --context 32768

Prints a table and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memsvc.clients.client import MemoryClient  # noqa: E402
from memsvc.corpus import haystack_tokens  # noqa: E402
from memsvc.model import load_model  # noqa: E402
from memsvc.server import create_server  # noqa: E402
from tools.pgserver import PgServer  # noqa: E402


def _serve(spec, model, context: int | None):
    server, port = create_server("127.0.0.1:0", data_dir=spec, model=model, context=context)
    server.start()
    return server, MemoryClient(f"127.0.0.1:{port}", timeout=3600)


def _stop(server, client) -> None:
    client.close()
    server.stop(grace=None).wait()
    server.close()


def _trips(io: dict | None) -> tuple[int, int]:
    return (0, 0) if io is None else (sum(io["round_trips"].values()), io["bytes_read"])


def _build(spec, model, ids: list[int], chunk: int, policy: str, context: int | None) -> float:
    server, c = _serve(spec, model, context)
    try:
        t0 = time.perf_counter()
        c.create_session("s", policy=policy)
        for lo in range(0, len(ids), chunk):
            c.append("s", tokens=ids[lo:lo + chunk])
        return time.perf_counter() - t0
    finally:
        _stop(server, c)


def _resume(spec, model, context: int | None) -> dict:
    server, c = _serve(spec, model, context)
    try:
        trips0, read0 = _trips(server.store.io_counters())
        t0 = time.perf_counter()
        c.resume("s")
        first = next(iter(c.generate("s", max_new_tokens=1)))
        seconds = time.perf_counter() - t0
        trips1, read1 = _trips(server.store.io_counters())
        return {"seconds": seconds, "token": list(first.token_ids), "round_trips": trips1 - trips0,
                "bytes_read": read1 - read0}
    finally:
        _stop(server, c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8000])
    ap.add_argument("--repeats", type=int, default=3, help="resumes per length and store (median reported)")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per Append while building")
    ap.add_argument("--policy", default="tiered")
    ap.add_argument("--model", default=None, help="as for `memsvc serve` (default SmolLM2-135M-Instruct)")
    ap.add_argument("--context", type=int, default=None, help="as for `memsvc serve --context`")
    args = ap.parse_args()
    model = load_model(args.model)
    pg = PgServer.start(fsync=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="memsvc-bench-") as tmp:
            for n in args.lengths:
                ids = haystack_tokens(model.tokenizer, n)
                stores = {"lmdb": Path(tmp) / f"lmdb-{n}", "postgresql": pg.create_database(f"bench_{n}")}
                for name, spec in stores.items():
                    built = _build(spec, model, ids, args.chunk, args.policy, args.context)
                    runs = [_resume(spec, model, args.context) for _ in range(args.repeats)]
                    rows.append({"store": name, "tokens": n, "build_seconds": round(built, 2),
                                 "resume_first_token_s": round(statistics.median(r["seconds"] for r in runs), 3),
                                 "round_trips": runs[-1]["round_trips"], "bytes_read": runs[-1]["bytes_read"],
                                 "first_token": runs[-1]["token"]})
    finally:
        pg.stop()
    print(f"{'store':<11} {'tokens':>7} {'resume->1st s':>14} {'round trips':>12} {'bytes read':>11}  first token")
    for r in rows:
        print(f"{r['store']:<11} {r['tokens']:>7} {r['resume_first_token_s']:>14.3f} {r['round_trips']:>12} "
              f"{r['bytes_read']:>11}  {r['first_token']}")
    same = all(a["first_token"] == b["first_token"] for a, b in zip(rows[::2], rows[1::2]))
    print(json.dumps({"bench": "pg_resume", "policy": args.policy, "machine": platform.processor() or platform.machine(),
                      "same_first_tokens": same, "rows": rows}))


if __name__ == "__main__":
    main()
