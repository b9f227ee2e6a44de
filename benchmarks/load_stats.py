"""The load test's measurements: latencies and errors per RPC, the server's memory, the printed table.

Recorder keeps each successful call's latency and each failure's status code, per RPC (thread-safe);
sample_memory() reads the server's RSS from /proc and GetStats' resident session bytes about once a second.
Knows the client and /proc; imports neither torch nor the model.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from memsvc.clients.client import MemoryClient

FIRST = "Generate (first chunk)"  # a latency row, not a call


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
                            "p50_ms": ms(pct(lat, 50)), "p99_ms": ms(pct(lat, 99)),
                            "max_ms": ms(lat[-1] if lat else None)}
            return out


def pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted xs."""
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


def rss(pid: int) -> dict[str, int]:
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


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass
class Samples:
    rss: list[int] = field(default_factory=list)
    anon: list[int] = field(default_factory=list)
    file: list[int] = field(default_factory=list)
    resident: list[int] = field(default_factory=list)
    sessions_resident: list[int] = field(default_factory=list)
    hwm: int = 0
    stats: object = None  # the last GetStats


def sample_memory(pid: int, port: int, samples: Samples, stop: threading.Event, every: float = 1.0) -> None:
    with MemoryClient(f"127.0.0.1:{port}", timeout=30) as c:
        while True:
            mem = rss(pid)
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


def memory_summary(samples: Samples, budget: int, after_setup: dict[str, int]) -> dict:
    """One server's memory over the run: resident session bytes against the budget, RSS and its parts."""
    resident_max = max(samples.resident, default=0)
    return {
        "budget_bytes": budget,
        "resident_session_bytes_max": resident_max,
        "resident_session_bytes_mean": round(sum(samples.resident) / len(samples.resident))
        if samples.resident else 0,
        "resident_sessions_max": max(samples.sessions_resident, default=0),
        "within_budget": budget == 0 or resident_max <= budget,
        "rss_after_setup_bytes": after_setup["VmRSS"],
        "rss_max_bytes": max(samples.rss, default=0),
        "rss_last_bytes": samples.rss[-1] if samples.rss else 0,
        "rss_hwm_bytes": samples.hwm,
        "rss_anon_after_setup_bytes": after_setup["RssAnon"],
        "rss_anon_max_bytes": max(samples.anon, default=0),
        "rss_file_max_bytes": max(samples.file, default=0),
        "samples": len(samples.rss),
    }


def merged_memory(per_replica: list[dict], stored_bytes: int) -> dict:
    """The replicas' memory in one dict: each figure the largest of any replica (each has its own budget),
    within_budget only if every replica stayed within it, samples summed; plus the store's bytes."""
    out = {k: max(m[k] for m in per_replica) for k in per_replica[0]}
    out["within_budget"] = all(m["within_budget"] for m in per_replica)
    out["samples"] = sum(m["samples"] for m in per_replica)
    out["data_dir_bytes"] = stored_bytes
    return out


COUNTERS = ("session_loads", "sessions_unloaded", "resumes", "tokens_appended", "tokens_generated",
            "model_tokens_processed")


def server_counters(stats: list) -> dict | None:
    """GetStats' counters summed over the replicas (None when a replica's stats never came)."""
    if not stats or any(st is None for st in stats):
        return None
    return {k: sum(getattr(st, k) for st in stats) for k in COUNTERS}


def mib(b: float) -> str:
    return f"{b / (1 << 20):.1f} MiB"


def print_table(out: dict) -> None:
    cfg, mem = out["config"], out["memory"]
    print(f"\nLoad test: {cfg['clients']} clients, {cfg['sessions']} sessions, {out['run_s']} s, "
          f"model {out['model']}, policy {out['policy']}, store {out['store']} x {out['replicas']} "
          f"replica(s), {out['machine']['cpus']} CPUs")
    head = f"{'rpc':<24}{'calls':>8}{'ok':>8}{'ok/s':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}  errors"
    print(head)
    print("-" * len(head))
    for name, r in out["rpcs"].items():
        errs = ", ".join(f"{c} {n}" for c, n in sorted(r["errors"].items())) or "-"
        cells = [f"{r[k]:>10.1f}" if r[k] is not None else f"{'-':>10}" for k in ("p50_ms", "p99_ms", "max_ms")]
        print(f"{name:<24}{r['calls']:>8}{r['ok']:>8}{r['ok'] / max(out['run_s'], 1e-9):>8.2f}{''.join(cells)}  "
              f"{errs}")
    by_code = ", ".join(f"{c} {n}" for c, n in sorted(out["errors_by_code"].items())) or "none"
    print(f"\ncalls {out['calls']} ({out['calls'] / max(out['run_s'], 1e-9):.1f}/s), errors {out['errors']} "
          f"(by code: {by_code}; intended {out['intended_errors']}), sessions replaced at the token cap "
          f"{out['sessions_replaced']}, setup {out['setup_s']} s")
    per = "" if out["replicas"] == 1 else " (the largest of any replica; each has this budget)"
    print(f"resident session bytes{per}: max {mib(mem['resident_session_bytes_max'])}, mean "
          f"{mib(mem['resident_session_bytes_mean'])}, budget {mib(mem['budget_bytes'])} "
          f"({'within' if mem['within_budget'] else 'OVER'}); resident sessions max {mem['resident_sessions_max']}")
    print(f"server RSS{per}: after setup {mib(mem['rss_after_setup_bytes'])}, max {mib(mem['rss_max_bytes'])}, "
          f"last {mib(mem['rss_last_bytes'])}, peak (VmHWM) {mib(mem['rss_hwm_bytes'])}; "
          f"of it anonymous: after setup {mib(mem['rss_anon_after_setup_bytes'])}, max "
          f"{mib(mem['rss_anon_max_bytes'])}; mapped files max {mib(mem['rss_file_max_bytes'])}; "
          f"{mem['samples']} samples")
    print(f"{'data dir' if out['store'] == 'lmdb' else 'database'} at the end: {mib(mem['data_dir_bytes'])}")
    db = out.get("database")
    if db:
        print(f"database during the run: {db['commits']} commits ({db['commits_per_s']}/s), {db['rollbacks']} "
              f"rollbacks, rows inserted/updated/deleted {db['rows_inserted']}/{db['rows_updated']}/"
              f"{db['rows_deleted']}, WAL {mib(db['wal_bytes'])} ({mib(db['wal_bytes_per_s'])}/s, "
              f"{db['wal_bytes_per_write_call']} B per Append or Generate)")
    if out["server_counters"]:
        print("server counters: " + ", ".join(f"{k} {v}" for k, v in out["server_counters"].items()))
