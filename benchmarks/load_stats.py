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


def mib(b: float) -> str:
    return f"{b / (1 << 20):.1f} MiB"


def print_table(out: dict) -> None:
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
    print(f"resident session bytes: max {mib(mem['resident_session_bytes_max'])}, mean "
          f"{mib(mem['resident_session_bytes_mean'])}, budget {mib(mem['budget_bytes'])} "
          f"({'within' if mem['within_budget'] else 'OVER'}); resident sessions max {mem['resident_sessions_max']}")
    print(f"server RSS: after setup {mib(mem['rss_after_setup_bytes'])}, max {mib(mem['rss_max_bytes'])}, "
          f"last {mib(mem['rss_last_bytes'])}, peak (VmHWM) {mib(mem['rss_hwm_bytes'])}; "
          f"of it anonymous: after setup {mib(mem['rss_anon_after_setup_bytes'])}, max "
          f"{mib(mem['rss_anon_max_bytes'])}; mapped files max {mib(mem['rss_file_max_bytes'])}; "
          f"{mem['samples']} samples")
    print(f"data dir at the end: {mib(mem['data_dir_bytes'])}")
    if out["server_counters"]:
        print("server counters: " + ", ".join(f"{k} {v}" for k, v in out["server_counters"].items()))
