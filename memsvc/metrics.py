"""Prometheus metrics of one server, in a registry of its own (so several
servers can live in one process, as they do in tests).

Per RPC: `memsvc_rpc_total{method,code}` and `memsvc_rpc_duration_seconds{method,code}`.
Read from the session manager at scrape time: tokens appended / generated /
run through the model, resumes, resident sessions and bytes; from the store,
at most every `store_every` seconds (it walks every value): stored sessions and bytes.

Knows prometheus_client and the counters it is handed; nothing about gRPC or LMDB.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _ServiceCollector:
    def __init__(self, manager, store_stats: Callable[[], dict] | None, store_every: float):
        self.manager = manager
        self.store_stats = store_stats
        self.store_every = store_every
        self._store_lock = threading.Lock()
        self._store_at = float("-inf")
        self._store: dict = {}

    def _stored(self) -> dict:
        with self._store_lock:
            now = time.monotonic()
            if self.store_stats is not None and now - self._store_at >= self.store_every:
                try:
                    self._store = self.store_stats()
                except Exception:  # a closed store: keep the last figures
                    pass
                self._store_at = now
            return self._store

    def collect(self):
        c = self.manager.counters
        for name, value, doc in (
            ("memsvc_tokens_appended", c.tokens_appended, "Tokens added to sessions by Append."),
            ("memsvc_tokens_generated", c.tokens_generated, "Tokens produced by finished Generate calls."),
            ("memsvc_model_tokens_processed", c.model_tokens_processed,
             "Every token run through the model (prefill and decode)."),
            ("memsvc_resumes", c.resumes, "Sessions resumed."),
        ):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], value)
            yield m
        n, nbytes = self.manager.resident()
        g = GaugeMetricFamily("memsvc_sessions_resident", "Sessions held in memory.")
        g.add_metric([], n)
        yield g
        g = GaugeMetricFamily("memsvc_bytes_resident", "Bytes of KV cache held in memory.")
        g.add_metric([], nbytes)
        yield g
        st = self._stored()
        if st:
            g = GaugeMetricFamily("memsvc_sessions_stored", "Sessions in the store.")
            g.add_metric([], st.get("sessions", 0))
            yield g
            g = GaugeMetricFamily("memsvc_bytes_stored", "Bytes of all stored values (records, token ids, KV blocks).")
            g.add_metric([], st.get("total_bytes", 0))
            yield g
            g = GaugeMetricFamily("memsvc_store_map_used_bytes", "Bytes of the LMDB map in use.")
            g.add_metric([], st.get("used_bytes", 0))
            yield g


class Metrics:
    def __init__(self, manager, store_stats: Callable[[], dict] | None = None, store_every: float = 15.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter("memsvc_rpc", "RPCs answered, by method and status code.", ["method", "code"],
                            registry=r)
        self.latency = Histogram("memsvc_rpc_duration_seconds", "RPC duration, by method and status code.",
                                 ["method", "code"], buckets=LATENCY_BUCKETS, registry=r)
        self.auth_failures = Counter("memsvc_auth_failures", "Calls refused for a missing or unknown API key.",
                                     registry=r)
        self.generate_cancelled = Counter(
            "memsvc_generate_cancelled", "Generate calls stopped early (client cancelled or deadline passed).",
            registry=r)
        self.quota_refusals = Counter("memsvc_limit_refusals", "Calls refused by a limit or quota.", ["limit"],
                                      registry=r)
        self.collector = _ServiceCollector(manager, store_stats, store_every)
        r.register(self.collector)
        self._http = None
        self.port: int | None = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def serve(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP endpoint (port 0 picks a free one); returns the bound port."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = httpd
        self.port = httpd.server_address[1]
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
