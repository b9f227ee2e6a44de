"""Load test on loopback (issue 6): concurrent clients mixing Append, Generate and Resume.

Starts `memsvc serve` as a subprocess on 127.0.0.1 (port 0: it picks one) with
the given model (default: SmolLM2-135M-Instruct), the default policy (`tiered`)
and `--resident-budget`, in a temporary data dir. Creates the sessions (each
with a first user message), then `--clients` threads, each with its own
channel, pick a random session and a random call until `--seconds` have passed
or `--max-calls` calls were made:
- Append: one user message of 1-3 sentences;
- Generate: `--max-new-tokens` greedy tokens, committed (the reply joins the session);
- Resume: loads the session if the budget had dropped it.
A session past `--max-session-tokens` is replaced by a fresh one under a new id
(the old one stays stored), so a long run stays inside the model's context.

Every ~1 s a sampler reads the server's RSS from /proc and GetStats' resident
session bytes (the manager's own sum, measured at call boundaries). Prints
progress every `--progress-every` seconds, then a table per RPC (count,
errors by status code, p50/p99 latency) and memory against the budget, and
ends with one JSON line. Exits 1 if any call failed.

    python benchmarks/load.py --seconds 300 --resident-budget 268435456

Knows the client and the command line; imports neither torch nor the model. The parts:
load_workload.py (the clients and their calls) and load_stats.py (latencies, memory, the table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from load_stats import Recorder, Samples, dir_bytes, mib, print_table, rss, sample_memory
from load_workload import Config, Sessions, client_loop, new_session
from memsvc.clients.client import MemoryClient
from served import ServeProcess


class Server(ServeProcess):
    """`memsvc serve` with the load test's budget; stderr goes to server.log next to the data dir."""

    def __init__(self, data_dir: Path, budget: int, model: str | None, start_timeout: float = 600):
        args = ["--data-dir", str(data_dir), "--resident-budget", str(budget), "--no-log-rpcs"]
        if model:
            args += ["--model", model]
        super().__init__(args, data_dir.parent / "server.log", start_timeout=start_timeout)


def run(cfg: Config, model: str | None = None) -> dict:
    """The whole load test; returns the JSON summary."""
    tmp = Path(tempfile.mkdtemp(prefix="memsvc-load-"))
    data = tmp / "data"
    t_start = time.perf_counter()
    server = Server(data, cfg.resident_budget, model)
    print(f"server pid {server.proc.pid} on 127.0.0.1:{server.port} (started in "
          f"{time.perf_counter() - t_start:.1f} s), data {data}", flush=True)
    setup, rec = Recorder(), Recorder()
    samples, stop_sampling = Samples(), threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(server.proc.pid, server.port, samples, stop_sampling),
                               daemon=True)
    try:
        sessions = Sessions(cfg.sessions, cfg.max_session_tokens)
        t0 = time.perf_counter()
        per_client = [sessions.ids[k::cfg.clients] for k in range(cfg.clients)]

        def make(k: int) -> None:
            rng = random.Random(cfg.seed * 1000 + 500 + k)
            with MemoryClient(f"127.0.0.1:{server.port}", timeout=cfg.call_timeout) as c:
                for sid in per_client[k]:
                    new_session(c, setup, sid, rng)

        threads = [threading.Thread(target=make, args=(k,)) for k in range(cfg.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        setup_s = time.perf_counter() - t0
        print(f"setup: {cfg.sessions} sessions created in {setup_s:.1f} s "
              f"({setup.n_errors()} errors)", flush=True)
        after_setup = rss(server.proc.pid)

        sampler.start()
        stop = threading.Event()
        budget_calls, budget_lock = [cfg.max_calls], threading.Lock()
        workers = [threading.Thread(target=client_loop, args=(k, server.port, cfg, sessions, rec, stop, budget_calls,
                                                          budget_lock), daemon=True) for k in range(cfg.clients)]
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
                n = rec.calls()
                st = samples.stats
                print(f"  {elapsed:5.0f} s: {n} calls ({n / elapsed:.1f}/s), {rec.n_errors()} errors, "
                      f"RSS {mib(samples.rss[-1] if samples.rss else 0)} "
                      f"(anon {mib(samples.anon[-1] if samples.anon else 0)}), resident sessions "
                      f"{st.sessions_resident if st else '?'} holding "
                      f"{mib(st.bytes_resident) if st else '?'} of {mib(cfg.resident_budget)}, "
                      f"loads {st.session_loads if st else '?'}, unloads {st.sessions_unloaded if st else '?'}",
                      flush=True)
        stop.set()
        for w in workers:
            w.join(cfg.call_timeout + 10)
        run_s = time.perf_counter() - t_run
        stop_sampling.set()
        sampler.join(60)
        stuck = sum(w.is_alive() for w in workers)
    finally:
        stop_sampling.set()
        code = server.stop()
    log_tail = server.log_tail()
    data_bytes = dir_bytes(data)
    shutil.rmtree(tmp, ignore_errors=True)

    st = samples.stats
    rpcs = rec.summary()
    n_errors = rec.n_errors() + setup.n_errors()
    resident_max = max(samples.resident, default=0)
    out = {
        "benchmark": "load",
        "model": model or "default (SmolLM2-135M-Instruct)",
        "policy": "tiered (default)",
        "config": vars(cfg),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setup_s": round(setup_s, 1),
        "run_s": round(run_s, 1),
        "calls": rec.calls(),
        "rpcs": rpcs,
        "setup_rpcs": setup.summary(),
        "errors": n_errors,
        "intended_errors": 0,
        "stuck_clients": stuck,
        "sessions_replaced": sessions.replaced,
        "server_exit_code": code,
        "memory": {
            "budget_bytes": cfg.resident_budget,
            "resident_session_bytes_max": resident_max,
            "resident_session_bytes_mean": round(sum(samples.resident) / len(samples.resident))
            if samples.resident else 0,
            "resident_sessions_max": max(samples.sessions_resident, default=0),
            "within_budget": cfg.resident_budget == 0 or resident_max <= cfg.resident_budget,
            "rss_after_setup_bytes": after_setup["VmRSS"],
            "rss_max_bytes": max(samples.rss, default=0),
            "rss_last_bytes": samples.rss[-1] if samples.rss else 0,
            "rss_hwm_bytes": samples.hwm,
            "rss_anon_after_setup_bytes": after_setup["RssAnon"],
            "rss_anon_max_bytes": max(samples.anon, default=0),
            "rss_file_max_bytes": max(samples.file, default=0),
            "data_dir_bytes": data_bytes,
            "samples": len(samples.rss),
        },
        "server_counters": None if st is None else {
            "session_loads": st.session_loads, "sessions_unloaded": st.sessions_unloaded, "resumes": st.resumes,
            "tokens_appended": st.tokens_appended, "tokens_generated": st.tokens_generated,
            "model_tokens_processed": st.model_tokens_processed},
    }
    print_table(out)
    if n_errors or stuck or code not in (0, None):
        print(f"\nserver log (tail):\n{log_tail}", flush=True)
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
    args = ap.parse_args(argv)
    try:
        mix = tuple(float(x) for x in args.mix.split(","))
        cfg = Config(seconds=args.seconds, max_calls=args.max_calls, clients=args.clients, sessions=args.sessions,
                     resident_budget=args.resident_budget, max_new_tokens=args.max_new_tokens,
                     max_session_tokens=args.max_session_tokens, mix=mix, progress_every=args.progress_every,
                     seed=args.seed)
    except ValueError as exc:
        ap.error(str(exc))
    out = run(cfg, model=args.model)
    ok = not out["errors"] and not out["stuck_clients"] and out["memory"]["within_budget"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
