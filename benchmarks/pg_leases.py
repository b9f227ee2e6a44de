"""What leases cost the database (issue 23): acquire, renew and release through the PostgreSQL store's own calls.

Starts a throwaway PostgreSQL server (tools/pgserver.py, fsync on, synchronous_commit on: the settings a
deployment keeps), opens a PgStore on a fresh database, and times, for --sessions session ids: one acquire
each, --rounds rounds of one renew each (first one at a time, then from --threads threads at once, as replicas
renewing side by side would), and one release each. For each kind: operations per second, p50/p99 latency,
round trips (Store.io_counters) and WAL bytes (the WAL insert position's advance) per operation. A replica
renews every resident session once per third of its --lease-seconds, so `renewals/s needed = resident
sessions x 3 / lease seconds` over all replicas; the table prints that for a few fleet sizes beside what was
measured.

    python benchmarks/pg_leases.py --sessions 500 --rounds 3 --threads 8

Prints a table and ends with one JSON line. Knows the store and the database's statistics; no model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memsvc.store.postgres import PgStore  # noqa: E402
from tools.pgserver import PgServer  # noqa: E402


def _wal(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint").fetchone()[0])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def _measure(store: PgStore, url: str, name: str, items: list, fn, threads: int) -> dict:
    """fn(item) for every item, from `threads` threads (each a slice); the figures of that kind of call."""
    lat: list[float] = []
    lock = threading.Lock()
    trips0, wal0 = sum(store.io_counters()["round_trips"].values()), _wal(url)

    def work(part: list) -> None:
        mine = []
        for item in part:
            t0 = time.perf_counter()
            fn(item)
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=work, args=(items[k::threads],)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    trips = sum(store.io_counters()["round_trips"].values()) - trips0  # _wal reads on a connection of its own
    n = len(items)
    return {"op": name, "threads": threads, "n": n, "per_s": round(n / wall, 1),
            "p50_ms": round(_pct(lat, 50) * 1000, 2), "p99_ms": round(_pct(lat, 99) * 1000, 2),
            "round_trips_per_op": round(trips / n, 2), "wal_bytes_per_op": round((_wal(url) - wal0) / n)}


def run(sessions: int, rounds: int, threads: int, lease_seconds: float) -> dict:
    server = PgServer.start(fsync=True)
    try:
        url = server.create_database("leases")
        store = PgStore(url, pool_max=max(threads, 1) + 1)
        try:
            sids = [f"lease-{i:05d}" for i in range(sessions)]
            held: dict[str, object] = {}

            def acquire(sid):
                held[sid] = store.acquire_lease(sid, "bench-replica", lease_seconds)

            rows = [_measure(store, url, "acquire", sids, acquire, 1)]
            for threads_now in (1, threads):
                for _ in range(rounds):
                    rows.append(_measure(store, url, "renew", sids,
                                         lambda sid: store.renew_lease(held[sid], lease_seconds), threads_now))
            rows.append(_measure(store, url, "release", sids, lambda sid: store.release_lease(held[sid]), 1))
        finally:
            store.close()
    finally:
        server.stop()
    best = {t: max(r["per_s"] for r in rows if r["op"] == "renew" and r["threads"] == t) for t in (1, threads)}
    fleets = [{"resident_sessions": n, "renewals_per_s_needed": round(n * 3 / lease_seconds, 1)}
              for n in (1_000, 10_000, 100_000)]
    return {"benchmark": "pg_leases", "sessions": sessions, "lease_seconds": lease_seconds, "rows": rows,
            "renewals_per_s_measured": {str(t): v for t, v in best.items()}, "fleets": fleets,
            "postgres": {"fsync": True, "synchronous_commit": "on", "startup_s": round(server.startup_seconds, 2)},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3, help="renew rounds per thread count")
    ap.add_argument("--threads", type=int, default=8, help="threads renewing at once in the second set")
    ap.add_argument("--lease-seconds", type=float, default=30.0)
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.rounds < 1 or args.threads < 1 or args.lease_seconds <= 0:
        ap.error("--sessions, --rounds and --threads must be >= 1 and --lease-seconds > 0")
    out = run(args.sessions, args.rounds, args.threads, args.lease_seconds)
    head = f"{'op':<10}{'threads':>8}{'n':>7}{'ops/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'trips/op':>10}{'WAL B/op':>10}"
    print(head)
    print("-" * len(head))
    for r in out["rows"]:
        print(f"{r['op']:<10}{r['threads']:>8}{r['n']:>7}{r['per_s']:>9.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['round_trips_per_op']:>10.2f}{r['wal_bytes_per_op']:>10}")
    print(f"\nlease {out['lease_seconds']} s: a replica renews each resident session every "
          f"{out['lease_seconds'] / 3:.0f} s; renewals/s measured: "
          + ", ".join(f"{v}/s from {t} thread(s)" for t, v in out["renewals_per_s_measured"].items()))
    for f in out["fleets"]:
        print(f"  {f['resident_sessions']:>7} resident sessions over all replicas need {f['renewals_per_s_needed']} "
              f"renewals/s")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
