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

Knows the client and the command line; imports neither torch nor the model.
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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from memsvc.clients.client import MemoryClient
from served import ServeProcess

SENTENCES = (
    "I keep my bike in the shed behind the house.",
    "Remind me to call the plumber on Thursday morning.",
    "My sister moved to Lisbon last spring and loves it.",
    "The project deadline moved to the end of the month.",
    "Can you summarize what we discussed about the budget?",
    "I prefer tea to coffee, especially green tea.",
    "Our team meets every Monday at ten in room four.",
    "The dog needs his vaccination before the trip.",
    "What did I say about the garden last time?",
    "I started learning the cello two years ago.",
    "Please keep the answer short and practical.",
    "The invoice number for the new laptop is 77120.",
)
RPCS = ("Append", "Generate", "Resume")
FIRST = "Generate (first chunk)"  # a latency row, not a call


@dataclass
class Config:
    seconds: float = 300.0
    max_calls: int = 100_000
    clients: int = 16
    sessions: int = 50
    resident_budget: int = 256 << 20
    max_new_tokens: int = 8
    max_session_tokens: int = 4096
    mix: tuple[float, float, float] = (0.4, 0.4, 0.2)  # Append, Generate, Resume
    progress_every: float = 15.0
    call_timeout: float = 300.0
    seed: int = 0

    def __post_init__(self):
        if self.seconds <= 0 or self.max_calls < 1:
            raise ValueError("seconds must be > 0 and max_calls >= 1")
        if self.clients < 1 or self.sessions < 1:
            raise ValueError("clients and sessions must be >= 1")
        if self.resident_budget < 0:
            raise ValueError("resident_budget must be >= 0 (0 = no limit)")
        if self.max_new_tokens < 1 or self.max_session_tokens < 64:
            raise ValueError("max_new_tokens must be >= 1 and max_session_tokens >= 64")
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix needs three weights >= 0 (Append, Generate, Resume), got {self.mix}")


@dataclass
class Recorder:
    """Latencies (seconds) of successful calls and error counts, per RPC; thread-safe."""

    ok: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, rpc: str, seconds: float) -> None:
        with self.lock:
            self.ok[rpc].append(seconds)

    def failed(self, rpc: str, code: str) -> None:
        with self.lock:
            self.errors[rpc][code] += 1

    def calls(self) -> int:
        with self.lock:
            return sum(len(v) for k, v in self.ok.items() if k != FIRST) + self.n_errors()

    def n_errors(self) -> int:
        return sum(n for codes in self.errors.values() for n in codes.values())

    def summary(self) -> dict:
        with self.lock:
            out = {}
            for rpc in sorted(set(self.ok) | set(self.errors)):
                lat = sorted(self.ok.get(rpc, []))
                errs = dict(self.errors.get(rpc, {}))
                out[rpc] = {"calls": len(lat) + sum(errs.values()), "ok": len(lat), "errors": errs,
                            "p50_ms": _ms(_pct(lat, 50)), "p99_ms": _ms(_pct(lat, 99)),
                            "max_ms": _ms(lat[-1] if lat else None)}
            return out


def _pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted xs."""
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


def _rss(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon (heap) and RssFile (mapped files: the LMDB map, libraries) of a
    process, in bytes; zeros once it is gone."""
    out = dict.fromkeys(("VmRSS", "VmHWM", "RssAnon", "RssFile"), 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Server(ServeProcess):
    """`memsvc serve` with the load test's budget; stderr goes to server.log next to the data dir."""

    def __init__(self, data_dir: Path, budget: int, model: str | None, start_timeout: float = 600):
        args = ["--data-dir", str(data_dir), "--resident-budget", str(budget), "--no-log-rpcs"]
        if model:
            args += ["--model", model]
        super().__init__(args, data_dir.parent / "server.log", start_timeout=start_timeout)


class Sessions:
    """The session ids the clients pick from; one past the token cap is replaced by a fresh id."""

    def __init__(self, n: int, cap: int):
        self.ids = [f"load-{i:03d}" for i in range(n)]
        self.generation = [0] * n
        self.cap = cap
        self.replacing = [False] * n
        self.replaced = 0
        self.lock = threading.Lock()

    def pick(self, rng: random.Random) -> tuple[int, str]:
        i = rng.randrange(len(self.ids))
        with self.lock:
            return i, self.ids[i]

    def claim_replacement(self, i: int, sid: str, tokens: int) -> str | None:
        """A new id for slot i if its session `sid` passed the cap and nobody is replacing it yet."""
        with self.lock:
            if tokens <= self.cap or self.replacing[i] or self.ids[i] != sid:
                return None
            self.replacing[i] = True
            self.generation[i] += 1
            return f"load-{i:03d}.{self.generation[i]}"

    def replaced_by(self, i: int, new_id: str | None) -> None:
        with self.lock:
            if new_id is not None:
                self.ids[i] = new_id
                self.replaced += 1
            self.replacing[i] = False


def _message(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": " ".join(rng.sample(SENTENCES, rng.randint(1, 3)))}]


def _call(rec: Recorder, rpc: str, fn):
    """Run fn(), recording its latency or its error code; the result, or None on error."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except grpc.RpcError as exc:
        rec.failed(rpc, exc.code().name if exc.code() else "UNKNOWN")
        return None
    except Exception as exc:  # the client itself failed: count it, never hide it
        rec.failed(rpc, f"CLIENT_{type(exc).__name__}")
        return None
    rec.done(rpc, time.perf_counter() - t0)
    return out


def _generate(c: MemoryClient, rec: Recorder, sid: str, n: int):
    """Committed greedy generation; records the first chunk's latency as 'Generate (first chunk)'.
    Returns the session's token count after the commit, or None on error."""
    t0 = time.perf_counter()
    tokens = None
    first = True
    for chunk in c.generate(sid, max_new_tokens=n, commit=True):
        if first:
            rec.done(FIRST, time.perf_counter() - t0)
            first = False
        if chunk.HasField("session"):
            tokens = chunk.session.tokens
    return tokens


def _new_session(c: MemoryClient, rec: Recorder, sid: str, rng: random.Random) -> int | None:
    if _call(rec, "CreateSession", lambda: c.create_session(sid)) is None:
        return None
    r = _call(rec, "Append", lambda: c.append(sid, messages=[{"role": "system", "content": "You are a helpful "
                                                               "assistant with a long memory."}] + _message(rng)))
    return None if r is None else r.session.tokens


def _worker(k: int, port: int, cfg: Config, sessions: Sessions, rec: Recorder, stop: threading.Event,
            budget_calls: list[int], budget_lock: threading.Lock) -> None:
    rng = random.Random(cfg.seed * 1000 + k)
    with MemoryClient(f"127.0.0.1:{port}", timeout=cfg.call_timeout) as c:
        while not stop.is_set():
            with budget_lock:
                if budget_calls[0] <= 0:
                    stop.set()
                    return
                budget_calls[0] -= 1
            i, sid = sessions.pick(rng)
            rpc = rng.choices(RPCS, weights=cfg.mix)[0]
            if rpc == "Append":
                r = _call(rec, rpc, lambda: c.append(sid, messages=_message(rng)))
                tokens = None if r is None else r.session.tokens
            elif rpc == "Generate":
                tokens = _call(rec, rpc, lambda: _generate(c, rec, sid, cfg.max_new_tokens))
            else:
                r = _call(rec, rpc, lambda: c.resume(sid))
                tokens = None if r is None else r.tokens
            new_id = sessions.claim_replacement(i, sid, tokens or 0)
            if new_id is not None:
                ok = _new_session(c, rec, new_id, rng) is not None
                sessions.replaced_by(i, new_id if ok else None)


@dataclass
class Samples:
    rss: list[int] = field(default_factory=list)
    anon: list[int] = field(default_factory=list)
    file: list[int] = field(default_factory=list)
    resident: list[int] = field(default_factory=list)
    sessions_resident: list[int] = field(default_factory=list)
    hwm: int = 0
    stats: object = None  # the last GetStats


def _sampler(pid: int, port: int, samples: Samples, stop: threading.Event, every: float = 1.0) -> None:
    with MemoryClient(f"127.0.0.1:{port}", timeout=30) as c:
        while True:
            mem = _rss(pid)
            if mem["VmRSS"]:
                samples.rss.append(mem["VmRSS"])
                samples.anon.append(mem["RssAnon"])
                samples.file.append(mem["RssFile"])
                samples.hwm = max(samples.hwm, mem["VmHWM"])
            try:
                st = c.stats()
                samples.resident.append(st.bytes_resident)
                samples.sessions_resident.append(st.sessions_resident)
                samples.stats = st
            except grpc.RpcError:
                pass
            if stop.wait(every):
                return


def _mib(b: float) -> str:
    return f"{b / (1 << 20):.1f} MiB"


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
    sampler = threading.Thread(target=_sampler, args=(server.proc.pid, server.port, samples, stop_sampling),
                               daemon=True)
    try:
        sessions = Sessions(cfg.sessions, cfg.max_session_tokens)
        t0 = time.perf_counter()
        per_client = [sessions.ids[k::cfg.clients] for k in range(cfg.clients)]

        def make(k: int) -> None:
            rng = random.Random(cfg.seed * 1000 + 500 + k)
            with MemoryClient(f"127.0.0.1:{server.port}", timeout=cfg.call_timeout) as c:
                for sid in per_client[k]:
                    _new_session(c, setup, sid, rng)

        threads = [threading.Thread(target=make, args=(k,)) for k in range(cfg.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        setup_s = time.perf_counter() - t0
        print(f"setup: {cfg.sessions} sessions created in {setup_s:.1f} s "
              f"({setup.n_errors()} errors)", flush=True)
        after_setup = _rss(server.proc.pid)

        sampler.start()
        stop = threading.Event()
        budget_calls, budget_lock = [cfg.max_calls], threading.Lock()
        workers = [threading.Thread(target=_worker, args=(k, server.port, cfg, sessions, rec, stop, budget_calls,
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
                      f"RSS {_mib(samples.rss[-1] if samples.rss else 0)} "
                      f"(anon {_mib(samples.anon[-1] if samples.anon else 0)}), resident sessions "
                      f"{st.sessions_resident if st else '?'} holding "
                      f"{_mib(st.bytes_resident) if st else '?'} of {_mib(cfg.resident_budget)}, "
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
    data_bytes = _dir_bytes(data)
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
    _print_table(out)
    if n_errors or stuck or code not in (0, None):
        print(f"\nserver log (tail):\n{log_tail}", flush=True)
    print(json.dumps(out), flush=True)
    return out


def _print_table(out: dict) -> None:
    cfg, mem = out["config"], out["memory"]
    print(f"\nLoad test: {cfg['clients']} clients, {cfg['sessions']} sessions, {out['run_s']} s, "
          f"model {out['model']}, policy {out['policy']}, {out['machine']['cpus']} CPUs")
    head = f"{'rpc':<24}{'calls':>8}{'ok':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}  errors"
    print(head)
    print("-" * len(head))
    for name, r in out["rpcs"].items():
        errs = ", ".join(f"{c} {n}" for c, n in sorted(r["errors"].items())) or "-"
        cells = [f"{r[k]:>10.1f}" if r[k] is not None else f"{'-':>10}" for k in ("p50_ms", "p99_ms", "max_ms")]
        print(f"{name:<24}{r['calls']:>8}{r['ok']:>8}{''.join(cells)}  {errs}")
    print(f"\ncalls {out['calls']} ({out['calls'] / max(out['run_s'], 1e-9):.1f}/s), errors {out['errors']} "
          f"(intended {out['intended_errors']}), sessions replaced at the token cap {out['sessions_replaced']}, "
          f"setup {out['setup_s']} s")
    print(f"resident session bytes: max {_mib(mem['resident_session_bytes_max'])}, mean "
          f"{_mib(mem['resident_session_bytes_mean'])}, budget {_mib(mem['budget_bytes'])} "
          f"({'within' if mem['within_budget'] else 'OVER'}); resident sessions max {mem['resident_sessions_max']}")
    print(f"server RSS: after setup {_mib(mem['rss_after_setup_bytes'])}, max {_mib(mem['rss_max_bytes'])}, "
          f"last {_mib(mem['rss_last_bytes'])}, peak (VmHWM) {_mib(mem['rss_hwm_bytes'])}; "
          f"of it anonymous: after setup {_mib(mem['rss_anon_after_setup_bytes'])}, max "
          f"{_mib(mem['rss_anon_max_bytes'])}; mapped files max {_mib(mem['rss_file_max_bytes'])}; "
          f"{mem['samples']} samples")
    print(f"data dir at the end: {_mib(mem['data_dir_bytes'])}")
    if out["server_counters"]:
        print("server counters: " + ", ".join(f"{k} {v}" for k, v in out["server_counters"].items()))


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
