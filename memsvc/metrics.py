"""Prometheus metrics of one server, in a registry of its own (so several
servers can live in one process, as they do in tests).

Per RPC: `memsvc_rpc_total{method,code}` and `memsvc_rpc_duration_seconds{method,code}`.
Read from the session manager at scrape time: tokens appended / generated /
run through the model, resumes, session loads and unloads (the resident budget),
resident sessions, bytes and tokens per tier, the shared cold block cache (hits, misses,
bytes, capacity), the decoded cache (hits, bytes, capacity);
from the store, at most every `store_every` seconds (it walks every value):
stored sessions, bytes and tokens per tier (as of each session's last commit); and, for a store that talks
to a database server (PostgreSQL), its round trips per store method and the bytes sent and received, at
every scrape.

Knows prometheus_client and the counters it is handed; nothing about gRPC or the store's backends.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def _cache_gauges(name: str, bytes_doc: str, bound_doc: str, stats: dict):
    """memsvc_<name>_bytes and memsvc_<name>_capacity_bytes of a BlockCache's stats()."""
    for suffix, doc, key in (("bytes", bytes_doc, "bytes"), ("capacity_bytes", bound_doc, "capacity")):
        g = GaugeMetricFamily(f"memsvc_{name}_{suffix}", doc)
        g.add_metric([], stats[key])
        yield g


def _tiers(name: str, doc: str, tokens: dict[str, float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["tier"])
    for tier, n in sorted(tokens.items()):
        g.add_metric([tier], n)
    return g


def _store_io(counters: dict | None):
    """memsvc_store_round_trips{op} and memsvc_store_bytes_{read,written} of a Store.io_counters()."""
    if counters is None:
        return
    m = CounterMetricFamily("memsvc_store_round_trips", "Round trips to the database (statements, BEGIN and "
                            "COMMIT; a COPY of many rows is one), by store method.", labels=["op"])
    for op, n in sorted(counters["round_trips"].items()):
        m.add_metric([op], n)
    yield m
    for key, doc in (("bytes_read", "Bytes of stored values received from the database."),
                     ("bytes_written", "Bytes of stored values sent to the database.")):
        m = CounterMetricFamily(f"memsvc_store_{key}", doc)
        m.add_metric([], counters[key])
        yield m


class _ServiceCollector:
    def __init__(self, manager, store_stats: Callable[[], dict] | None, store_every: float,
                 store_io: Callable[[], dict | None] | None = None):
        self.manager = manager
        self.store_stats = store_stats
        self.store_io = store_io
        self.store_every = store_every
        self._store_lock = threading.Lock()
        self._store_at = float("-inf")
        self._store: dict = {}

    def _stored(self) -> dict:
        with self._store_lock:
            now = time.monotonic()
            if self.store_stats is not None and now - self._store_at >= self.store_every:
                try:
                    self._store = {**self.store_stats(), "tier_tokens": self.manager.stored_tier_tokens()}
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
            ("memsvc_resumes", c.resumes, "Resume calls."),
            ("memsvc_session_loads", c.loads, "Sessions read back from the store into memory (by any call)."),
            ("memsvc_sessions_unloaded", c.unloads,
             "Idle sessions dropped from memory to keep within the resident budget."),
            ("memsvc_repairs", c.repairs,
             "Sessions rebuilt from their token ids because stored KV entries failed their checks."),
            ("memsvc_blocks_repaired", c.blocks_repaired, "KV entries (blocks, layer states) those repairs wrote again."),
            ("memsvc_kv_entries_written", c.kv_entries_written,
             "KV entries commits wrote (new cold blocks, changed layer state parts)."),
            ("memsvc_kv_bytes_written", c.kv_bytes_written, "Payload bytes of those entries, before compression."),
        ):
            m = CounterMetricFamily(name, doc)
            m.add_metric([], value)
            yield m
        hits, misses = self.manager.cold_cache()
        m = CounterMetricFamily("memsvc_cold_cache_hits",
                                "Cold block reads served from the block cache shared by all sessions.")
        m.add_metric([], hits)
        yield m
        m = CounterMetricFamily("memsvc_cold_cache_misses", "Cold block reads that went to the store.")
        m.add_metric([], misses)
        yield m
        yield from _cache_gauges("block_cache", "Bytes of cold blocks in the shared block cache.",
                                 "Bound of the shared block cache (--block-cache).", self.manager.block_cache.stats())
        if self.manager.decoded_cache is not None:
            dec = self.manager.decoded_cache.stats()
            m = CounterMetricFamily("memsvc_decoded_cache_hits", "Tiered layer reads that found the layer's last "
                                    "decoded cold keys or values (only blocks they lack are decoded).")
            m.add_metric([], dec["hits"])
            yield m
            m = CounterMetricFamily("memsvc_decoded_cache_skipped", "Decodes not kept, since their session already "
                                    "held its share of the decoded cache (the capacity over the sessions in it).")
            m.add_metric([], dec["skipped"])
            yield m
            yield from _cache_gauges("decoded_cache", "Bytes of decoded cold keys and values kept.",
                                     "Bound of the decoded cache (--decoded-cache).", dec)
        n, nbytes = self.manager.resident()
        g = GaugeMetricFamily("memsvc_sessions_resident", "Sessions held in memory.")
        g.add_metric([], n)
        yield g
        g = GaugeMetricFamily("memsvc_bytes_resident", "Bytes of KV cache held in memory.")
        g.add_metric([], nbytes)
        yield g
        g = GaugeMetricFamily("memsvc_resident_budget_bytes",
                              "Bytes of KV cache idle sessions may keep (0 = no limit).")
        g.add_metric([], self.manager.resident_budget)
        yield g
        yield _tiers("memsvc_tier_tokens_resident", "Tokens per cache tier (per KV head, mean over layers), "
                     "summed over the sessions in memory.", self.manager.resident_tier_tokens())
        yield _tiers("memsvc_tier_bytes_resident", "Bytes of KV cache in memory per tier (sink, hot, warm, "
                     "summaries of cold blocks, window, cold: the cold store's own memory), summed over sessions.",
                     self.manager.resident_tier_bytes())
        if self.store_io is not None:
            yield from _store_io(self.store_io())
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
            yield _tiers("memsvc_tier_tokens_stored", "Tokens per cache tier (per KV head, mean over layers), "
                         "summed over stored sessions as of their last commit.", st.get("tier_tokens", {}))


class Metrics:
    def __init__(self, manager, store_stats: Callable[[], dict] | None = None, store_every: float = 15.0,
                 store_io: Callable[[], dict | None] | None = None):
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
        self.session_wait = Histogram(
            "memsvc_session_wait_seconds", "Time a call waited in line for its session (held by another call).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram(
            "memsvc_generate_first_token_seconds", "Generate: time from the call's start to its first token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram(
            "memsvc_generate_inter_token_seconds", "Generate: time between consecutive tokens of one reply.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.step_sessions = Histogram(
            "memsvc_step_sessions", "Model steps, by the sessions whose tokens one step ran (the batch size).",
            buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64), registry=r)
        self.step_tokens = Histogram(
            "memsvc_step_tokens", "Model steps, by the tokens one step ran (decode tokens and prefill chunks).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048), registry=r)
        self.step_wait = Histogram(
            "memsvc_step_queue_seconds", "Time a call's next tokens waited for a model step (the step queue).",
            buckets=LATENCY_BUCKETS, registry=r)
        self.collector = _ServiceCollector(manager, store_stats, store_every, store_io)
        r.register(self.collector)
        self._http = None
        self.port: int | None = None

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def observe_step(self, sessions: int, tokens: int, waits: list[float]) -> None:
        """One model step of memsvc.sessions.steps: its batch, its tokens and how long each piece waited."""
        self.step_sessions.observe(sessions)
        self.step_tokens.observe(tokens)
        for w in waits:
            self.step_wait.observe(w)

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
