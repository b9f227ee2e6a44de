"""Load test on loopback (issues 6 and 23): concurrent clients mixing Append, Generate and Resume.

Starts `memsvc serve` as a subprocess on 127.0.0.1 (port 0: it picks one) with
the given model (default: SmolLM2-135M-Instruct), the default policy (`tiered`)
and `--resident-budget`, in a temporary data dir (`--store lmdb`, the default);
or, with `--store postgresql`, a throwaway PostgreSQL server (tools/pgserver.py,
fsync on) and `--replicas` `memsvc serve --store URL` processes over one database
of it. Creates the sessions (each with a first user message; slot i's sessions on
replica i mod N, which serves every call on them: the clients route by session,
so a lease never refuses a call), then `--clients` threads, each with its own
channel to each replica, pick a random session and a random call until
`--seconds` have passed or `--max-calls` calls were made:
- Append: one user message of 1-3 sentences;
- Generate: `--max-new-tokens` greedy tokens, committed (the reply joins the session);
- Resume: loads the session if the budget had dropped it.
A session past `--max-session-tokens` is replaced by a fresh one under a new id
(the old one stays stored), so a long run stays inside the model's context.

Every ~1 s a sampler reads each server's RSS from /proc and GetStats' resident
session bytes (the manager's own sum, measured at call boundaries). Prints
progress every `--progress-every` seconds, then a table per RPC (count, ok/s,
errors by status code, p50/p99 latency), memory against the budget, what the run
cost the database (commits, rows, WAL bytes; PostgreSQL only), and ends with one
JSON line. Exits 1 if any call failed.

    python benchmarks/load.py --seconds 300 --resident-budget 134217728
    python benchmarks/load.py --seconds 300 --resident-budget 134217728 --store postgresql --replicas 2

Knows the client and the command line; imports neither torch nor the model. The parts:
load_servers.py (the servers and the database), load_workload.py (the clients and their calls) and
load_stats.py (latencies, memory, the table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time

from load_servers import STORES, Fleet
from load_stats import Recorder, Samples, memory_summary, merged_memory, mib, print_table, rss, sample_memory
from load_stats import server_counters
from load_workload import Config, Sessions, client_loop, new_session
from memsvc.clients.client import MemoryClient


def _setup(cfg: Config, fleet: Fleet, sessions: Sessions, rec: Recorder) -> None:
    """Create every session on its home replica, `cfg.clients` threads at once."""
    per_client = [list(range(len(sessions.ids)))[k::cfg.clients] for k in range(cfg.clients)]

    def make(k: int) -> None:
        rng = random.Random(cfg.seed * 1000 + 500 + k)
        clients = [MemoryClient(f"127.0.0.1:{p}", timeout=cfg.call_timeout) for p in fleet.ports]
        try:
            for i in per_client[k]:
                new_session(clients[sessions.home(i)], rec, sessions.ids[i], rng)
        finally:
            for c in clients:
                c.close()

    threads = [threading.Thread(target=make, args=(k,)) for k in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _progress(elapsed: float, rec: Recorder, samples: list[Samples], budget: int) -> None:
    n = rec.calls()
    parts = []
    for s in samples:
        st = s.stats
        parts.append(f"RSS {mib(s.rss[-1] if s.rss else 0)} (anon {mib(s.anon[-1] if s.anon else 0)}), resident "
                     f"sessions {st.sessions_resident if st else '?'} holding "
                     f"{mib(st.bytes_resident) if st else '?'} of {mib(budget)}, loads "
                     f"{st.session_loads if st else '?'}, unloads {st.sessions_unloaded if st else '?'}")
    print(f"  {elapsed:5.0f} s: {n} calls ({n / elapsed:.1f}/s), {rec.n_errors()} errors, " + "; ".join(parts),
          flush=True)


def _db_cost(before: dict | None, after: dict | None, run_s: float, rec: Recorder) -> dict | None:
    """What the run cost the database: the counters' growth, per second and per write call."""
    if before is None or after is None:
        return None
    out = {k: after[k] - before[k] for k in before if k != "database_bytes"}
    writes = sum(len(rec.ok.get(r, [])) for r in ("Append", "Generate"))
    out["commits_per_s"] = round(out["commits"] / max(run_s, 1e-9), 1)
    out["wal_bytes_per_s"] = round(out["wal_bytes"] / max(run_s, 1e-9))
    out["wal_bytes_per_write_call"] = round(out["wal_bytes"] / writes) if writes else None
    out["commits_per_write_call"] = round(out["commits"] / writes, 2) if writes else None
    out["database_bytes_after_setup"] = before["database_bytes"]
    return out


def run(cfg: Config, model: str | None = None, store: str = "lmdb", replicas: int = 1,
        lease_seconds: float = 30.0, serve_flags: tuple[str, ...] = ()) -> dict:
    """The whole load test; returns the JSON summary."""
    t_start = time.perf_counter()
    fleet = Fleet.start(store, replicas, cfg.resident_budget, model, lease_seconds, tuple(serve_flags))
    print(f"{len(fleet.servers)} server(s), pid(s) {fleet.pids} on 127.0.0.1 port(s) {fleet.ports} (started in "
          f"{time.perf_counter() - t_start:.1f} s), {fleet.where()}", flush=True)
    setup, rec = Recorder(), Recorder()
    samples, stop_sampling = [Samples() for _ in fleet.servers], threading.Event()
    samplers = [threading.Thread(target=sample_memory, args=(pid, port, s, stop_sampling), daemon=True)
                for pid, port, s in zip(fleet.pids, fleet.ports, samples)]
    db_before = db_after = None
    try:
        sessions = Sessions(cfg.sessions, cfg.max_session_tokens, replicas=len(fleet.servers))
        t0 = time.perf_counter()
        _setup(cfg, fleet, sessions, setup)
        setup_s = time.perf_counter() - t0
        print(f"setup: {cfg.sessions} sessions created in {setup_s:.1f} s "
              f"({setup.n_errors()} errors)", flush=True)
        after_setup = [rss(pid) for pid in fleet.pids]
        db_before = fleet.db_snapshot()

        for t in samplers:
            t.start()
        stop = threading.Event()
        budget_calls, budget_lock = [cfg.max_calls], threading.Lock()
        workers = [threading.Thread(target=client_loop, args=(k, fleet.ports, cfg, sessions, rec, stop,
                                                              budget_calls, budget_lock), daemon=True)
                   for k in range(cfg.clients)]
        t_run = time.perf_counter()
        for w in workers:
            w.start()
        next_report = cfg.progress_every
        while not stop.is_set():
            elapsed = time.perf_counter() - t_run
            if elapsed >= cfg.seconds:
                break
            stop.wait(min(1.0, cfg.seconds - elapsed))
            elapsed = time.perf_counter() - t_run
            if elapsed >= next_report:
                next_report += cfg.progress_every
                _progress(elapsed, rec, samples, cfg.resident_budget)
        stop.set()
        for w in workers:
            w.join(cfg.call_timeout + 10)
        run_s = time.perf_counter() - t_run
        stop_sampling.set()
        for t in samplers:
            t.join(60)
        stuck = sum(w.is_alive() for w in workers)
        db_after = fleet.db_snapshot()
        stored = fleet.stored_bytes()
    finally:
        stop_sampling.set()
        codes = fleet.stop()
    log_tails = fleet.log_tails()
    fleet.remove()

    rpcs = rec.summary()
    n_errors = rec.n_errors() + setup.n_errors()
    by_code: dict[str, int] = {}
    for r in (*rpcs.values(), *setup.summary().values()):
        for code, n in r["errors"].items():
            by_code[code] = by_code.get(code, 0) + n
    per_replica = [memory_summary(s, cfg.resident_budget, a) for s, a in zip(samples, after_setup)]
    out = {
        "benchmark": "load",
        "model": model or "default (SmolLM2-135M-Instruct)",
        "policy": "tiered (default)",
        "store": store,
        "replicas": len(fleet.servers),
        "lease_seconds": lease_seconds if store == "postgresql" else None,
        "config": vars(cfg),
        "serve_flags": list(serve_flags),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setup_s": round(setup_s, 1),
        "run_s": round(run_s, 1),
        "calls": rec.calls(),
        "throughput_per_s": {name: round(r["ok"] / max(run_s, 1e-9), 3) for name, r in rpcs.items()},
        "rpcs": rpcs,
        "setup_rpcs": setup.summary(),
        "errors": n_errors,
        "errors_by_code": by_code,
        "intended_errors": 0,
        "stuck_clients": stuck,
        "sessions_replaced": sessions.replaced,
        "server_exit_code": next((c for c in codes if c not in (0, None)), codes[0] if codes else None),
        "server_exit_codes": codes,
        "memory": merged_memory(per_replica, stored),
        "memory_by_replica": per_replica,
        "database": _db_cost(db_before, db_after, run_s, rec),
        "server_counters": server_counters([s.stats for s in samples]),
    }
    print_table(out)
    if n_errors or stuck or any(c not in (0, None) for c in codes):
        print(f"\nserver log (tail):\n{log_tails}", flush=True)
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Config()
    ap.add_argument("--seconds", type=float, default=d.seconds)
    ap.add_argument("--max-calls", type=int, default=d.max_calls, help="stop after this many calls")
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--sessions", type=int, default=d.sessions)
    ap.add_argument("--resident-budget", type=int, default=d.resident_budget, help="bytes (0 = no limit)")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--max-session-tokens", type=int, default=d.max_session_tokens,
                    help="a session past this is replaced by a fresh one")
    ap.add_argument("--mix", default="0.4,0.4,0.2", help="weights of Append,Generate,Resume")
    ap.add_argument("--progress-every", type=float, default=d.progress_every)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--store", choices=STORES, default="lmdb",
                    help="lmdb: one server on a data dir; postgresql: a throwaway PostgreSQL (fsync on) and "
                         "--replicas servers over one database of it")
    ap.add_argument("--replicas", type=int, default=1, help="servers over the one database (--store postgresql)")
    ap.add_argument("--lease-seconds", type=float, default=30.0, help="each replica's --lease-seconds")
    ap.add_argument("--serve-flags", default="", help="more `memsvc serve` flags, e.g. '--step-tokens 256'")
    args = ap.parse_args(argv)
    try:
        mix = tuple(float(x) for x in args.mix.split(","))
        cfg = Config(seconds=args.seconds, max_calls=args.max_calls, clients=args.clients, sessions=args.sessions,
                     resident_budget=args.resident_budget, max_new_tokens=args.max_new_tokens,
                     max_session_tokens=args.max_session_tokens, mix=mix, progress_every=args.progress_every,
                     seed=args.seed)
    except ValueError as exc:
        ap.error(str(exc))
    if args.replicas < 1 or (args.store == "lmdb" and args.replicas != 1):
        ap.error("--replicas N > 1 needs --store postgresql (an LMDB data dir has one server)")
    out = run(cfg, model=args.model, store=args.store, replicas=args.replicas, lease_seconds=args.lease_seconds,
              serve_flags=tuple(args.serve_flags.split()))
    ok = not out["errors"] and not out["stuck_clients"] and out["memory"]["within_budget"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
