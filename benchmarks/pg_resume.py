"""Resume-to-first-token from PostgreSQL against LMDB (issue 23, acceptance 6), with the round trips counted.

For each history length: one session of that many essay tokens is built (Appends of --chunk tokens) in an LMDB
data directory and in a PostgreSQL database (a throwaway server, tools/pgserver.py, fsync on: the setting a
deployment keeps); then, --repeats times, a fresh server over each store (the session is in the store only)
times Resume + the first generated token, and the store's round trips and bytes read during it are counted
(Store.io_counters; LMDB has none: it reads memory-mapped pages). Same model, same tokens, greedy: the first
tokens must agree.

    python benchmarks/pg_resume.py --lengths 8000            # real model (SmolLM2-135M-Instruct)
    python benchmarks/pg_resume.py --lengths 8000 32000 --context 32768

With --sessions, exported sessions (`memsvc sessions export`, e.g. of the 8k and 32k sessions the unbounded
benchmark stored) are imported into each store instead of being built, and --lengths is not used:

    memsvc sessions export unbounded-needle-32768 s32k.memsvc --data-dir COPY_OF_ITS_DATA_DIR
    python benchmarks/pg_resume.py --threads 1 --sessions s8k.memsvc s32k.memsvc

Round trips are counted for the Resume alone and for Resume + the first token (the first Generate step
retrieves cold blocks, layer by layer). Prints a table and ends with one JSON line.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memsvc.clients.client import MemoryClient  # noqa: E402
from memsvc.corpus import haystack_tokens  # noqa: E402
from memsvc.model import load_model  # noqa: E402
from memsvc.server import create_server  # noqa: E402
from memsvc.store.archive import read_export  # noqa: E402
from memsvc.store.open import open_store  # noqa: E402
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


def _import(spec, path: Path) -> tuple[float, int]:
    """Store the exported session at path as "s": (seconds, its tokens)."""
    export = read_export(path)
    with open_store(spec) as store:
        t0 = time.perf_counter()
        rec = store.import_session(export, "s")
        return time.perf_counter() - t0, rec.n_tokens


def _resume(spec, model, context: int | None) -> dict:
    server, c = _serve(spec, model, context)
    try:
        trips0, read0 = _trips(server.store.io_counters())
        t0 = time.perf_counter()
        c.resume("s")
        resumed = time.perf_counter() - t0
        trips_r, read_r = _trips(server.store.io_counters())
        first = next(iter(c.generate("s", max_new_tokens=1)))
        seconds = time.perf_counter() - t0
        trips1, read1 = _trips(server.store.io_counters())
        return {"seconds": seconds, "resume_seconds": resumed, "token": list(first.token_ids),
                "round_trips": trips1 - trips0, "bytes_read": read1 - read0,
                "resume_round_trips": trips_r - trips0, "resume_bytes_read": read_r - read0}
    finally:
        _stop(server, c)


def _row(store: str, built: tuple[float, int], runs: list[dict], imported: bool) -> dict:
    last = runs[-1]
    return {"store": store, "tokens": built[1], "build_seconds": round(built[0], 2),
            "built_by": "import" if imported else "appends",
            "resume_first_token_s": round(statistics.median(r["seconds"] for r in runs), 3),
            "resume_first_token_runs": [round(r["seconds"], 3) for r in runs],
            "resume_s": round(statistics.median(r["resume_seconds"] for r in runs), 3),
            "round_trips": last["round_trips"], "bytes_read": last["bytes_read"],
            "resume_round_trips": last["resume_round_trips"], "resume_bytes_read": last["resume_bytes_read"],
            "first_token": last["token"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8000])
    ap.add_argument("--repeats", type=int, default=3, help="resumes per length and store (median reported)")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per Append while building")
    ap.add_argument("--policy", default="tiered")
    ap.add_argument("--model", default=None, help="as for `memsvc serve` (default SmolLM2-135M-Instruct)")
    ap.add_argument("--context", type=int, default=None, help="as for `memsvc serve --context`")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; 1 keeps a shared machine's noise down)")
    ap.add_argument("--sessions", type=Path, nargs="+", default=None,
                    help="exported sessions to import into each store instead of building (--lengths unused)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    pg = PgServer.start(fsync=True)
    rows = []
    cases = args.sessions or args.lengths
    try:
        with tempfile.TemporaryDirectory(prefix="memsvc-bench-") as tmp:
            for i, case in enumerate(cases):
                stores = {"lmdb": Path(tmp) / f"lmdb-{i}", "postgresql": pg.create_database(f"bench_{i}")}
                if not args.sessions:
                    ids = haystack_tokens(model.tokenizer, case)
                built = {}
                for name, spec in stores.items():
                    if args.sessions:
                        built[name] = _import(spec, case)
                    else:
                        built[name] = _build(spec, model, ids, args.chunk, args.policy, args.context), case
                runs = {name: [] for name in stores}
                for _ in range(args.repeats):  # alternated, so that the machine's noise falls on both stores
                    for name, spec in stores.items():
                        runs[name].append(_resume(spec, model, args.context))
                for name in stores:
                    rows.append(_row(name, built[name], runs[name], bool(args.sessions)))
    finally:
        pg.stop()
    print(f"{'store':<11} {'tokens':>7} {'resume s':>9} {'trips':>6} {'bytes':>11} {'resume->1st s':>14} "
          f"{'trips':>6} {'bytes':>11}  first token")
    for r in rows:
        print(f"{r['store']:<11} {r['tokens']:>7} {r['resume_s']:>9.3f} {r['resume_round_trips']:>6} "
              f"{r['resume_bytes_read']:>11} {r['resume_first_token_s']:>14.3f} {r['round_trips']:>6} "
              f"{r['bytes_read']:>11}  {r['first_token']}")
    same = all(a["first_token"] == b["first_token"] for a, b in zip(rows[::2], rows[1::2]))
    print(json.dumps({"bench": "pg_resume", "policy": args.policy, "threads": torch.get_num_threads(),
                      "machine": platform.processor() or platform.machine(), "same_first_tokens": same,
                      "rows": rows}))


if __name__ == "__main__":
    main()
