"""Building and running the gRPC server: MemoryService, health and reflection, one `Service` holding its parts.

`create_server(address, ...) -> (service, port)` binds (port 0 picks one) but does not start, so tests bind
port 0; `serve()` runs until SIGTERM/SIGINT and shuts down gracefully. Health and reflection need no key.

Knows gRPC and the session manager; knows nothing about tensors or how the store keeps bytes.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memsvc.store.base import Store
from memsvc.store.open import claim, describe, open_store

from ..alloc import keep_heap
from ..auth import KeyRing, is_loopback
from ..limits import Limits
from ..logs import configure_rpc_log
from ..metrics import Metrics
from ..model import LoadedModel, load_model
from ..sessions import SessionManager
from ..threads import single_threaded
from .calls import SERVICE_NAME, WIRE_SLACK
from .servicer import MemoryServicer

log = logging.getLogger("memsvc.server")
MAX_SEND_BYTES = 64 << 20


@dataclass
class Service:
    """A built server and what it serves: start() it, stop(grace) it (a grpc event to wait on), then close() the
    metrics endpoint and the store, which are the caller's."""

    grpc_server: grpc.Server
    port: int
    manager: SessionManager
    store: Store
    servicer: MemoryServicer
    health: health.HealthServicer
    metrics: Metrics
    metrics_port: int | None  # the bound metrics endpoint's port; None without one
    auth: bool  # API keys required
    dir_lock: object | None = None  # the data dir's lock while this server runs (store.open.claim)
    advertise: str = ""  # where clients reach it (host:port), kept with its leases; "" unknown

    def start(self) -> None:
        self.grpc_server.start()

    def stop(self, grace: float | None = None):
        return self.grpc_server.stop(grace)

    def close(self) -> None:
        self.manager.close()
        self.metrics.close()
        self.store.close()
        if self.dir_lock is not None:
            self.dir_lock.release()


def _auth_enabled(host: str, auth: str, keys: KeyRing | None) -> bool:
    if auth not in ("auto", "on", "off"):
        raise ValueError(f"auth must be 'auto', 'on' or 'off', got {auth!r}")
    on = auth == "on" or (auth == "auto" and (bool(keys) or not is_loopback(host)))
    if on and not keys:
        why = "--auth on was given" if auth == "on" else f"the server binds {host or 'every address'}, " \
                                                           f"which is not a loopback address"
        raise ValueError(
            f"API keys are required ({why}) but none were given: pass --api-keys-file FILE or set "
            f"MEMSVC_API_KEYS (`memsvc keys new TENANT` makes a key), bind 127.0.0.1, or pass --auth off "
            f"if something in front of the server authenticates callers")
    if not on and not is_loopback(host):
        log.warning("auth is off on a non-loopback address (%s): every caller sees every session", host)
    return on


def advertised(host: str, port: int) -> str:
    """Where clients reach a server bound to host:port: that host, or this machine's name when it binds every
    address (0.0.0.0, ::)."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 address
    return f"{host}:{port}"


def _check_advertise(advertise: str) -> str:
    host, _, port = advertise.rpartition(":")
    if advertise and not (host and port.isdigit() and 0 < int(port) < 65536 and advertise.isascii()
                          and advertise.isprintable() and " " not in advertise):
        raise ValueError(f"--advertise must be HOST:PORT (where clients reach this server), got {advertise!r}")
    return advertise


def create_server(address: str, *, data_dir: str | Path, model: LoadedModel | str | None = None,
                  device: str = "cpu", max_workers: int = 64, auth: str = "auto", api_keys: KeyRing | None = None,
                  tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                  limits: Limits | None = None, metrics_port: int | None = None, metrics_host: str | None = None,
                  context: int | None = None, advertise: str | None = None,
                  **manager_options) -> tuple["Service", int]:
    """Build (not start) a server bound to `address` ('host:port', port 0 picks one), over the store `data_dir`
names (store/open.py: an LMDB directory, or a postgresql:// URL).

    auth: 'auto' (on when keys are given or the host is not loopback), 'on' or 'off'.
    max_workers: calls served at once (a streaming Generate holds one while it streams; the model's steps batch
    them: memsvc.sessions.steps).
    metrics_port: serve Prometheus metrics over HTTP there (0 picks a port; None: no endpoint).
    context: tokens a session may hold, in place of the model's max_position_embeddings (None: the
    model's); past the model's own context it runs on positions it was not trained on.
    advertise: where clients reach this server (host:port), kept with the leases it takes over a shared store
    and named to clients sent to another replica (None: the address it binds, this machine's name for 0.0.0.0;
    "": none).

    Returns (service, port): a `Service`, which the caller starts, stops and closes.
    """
    host = address.rsplit(":", 1)[0] if ":" in address else address
    auth_on = _auth_enabled(host, auth, api_keys)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
    credentials = None
    if tls_cert is not None:
        try:
            credentials = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        except OSError as exc:
            raise ValueError(f"cannot read the TLS certificate or key: {exc}") from exc
    limits = limits or Limits()
    if advertise is not None:
        _check_advertise(advertise)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    if context is not None:
        if context < 2:
            raise ValueError(f"--context must be at least 2 tokens, got {context}")
        loaded = dataclasses.replace(loaded, max_positions=context)
    lock = claim(data_dir, "a memsvc server")  # no offline writer (upgrade, import, rm, ...) beside it
    try:
        store = open_store(data_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    manager = SessionManager(store, loaded, **manager_options)
    metrics = Metrics(manager, store_stats=store.stats, store_io=store.io_counters)
    manager.holds.waited = metrics.session_wait.observe
    manager.steps.observe = metrics.observe_step
    servicer = MemoryServicer(manager, keys=api_keys if auth_on else None, limits=limits, metrics=metrics)
    server = grpc.server(
        # the calls' own torch work (loads, forks, commits, sampling) on one thread each: torch's threads are the
        # model's (the step scheduler's), whose steps would otherwise wait on woken threads (memsvc.threads)
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memsvc", initializer=single_threaded),
        options=[("grpc.max_receive_message_length", min(limits.max_request_bytes + WIRE_SLACK, 2**31 - 1)),
                 ("grpc.max_send_message_length", MAX_SEND_BYTES)],
    )
    server.add_generic_rpc_handlers((servicer.handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        store.close()
        if lock is not None:
            lock.release()
        raise OSError(f"could not bind {address}")
    advertise = advertised(host, port) if advertise is None else advertise
    manager.leases.address = advertise  # before it serves: no lease is taken yet
    bound_metrics = None
    if metrics_port is not None:
        try:
            bound_metrics = metrics.serve(metrics_port, metrics_host or host or "0.0.0.0")
        except OSError:
            store.close()
            if lock is not None:
                lock.release()
            raise
    return Service(server, port, manager, store, servicer, health_servicer, metrics, bound_metrics, auth_on,
                   lock, advertise), port


def serve(host: str, port: int, *, data_dir: str | Path, model: str | None = None, device: str = "cpu",
          log_rpcs: bool = True, **options) -> None:
    """Serve until SIGTERM or SIGINT; in-flight calls get a grace period, then the store closes.
    log_rpcs: one JSON line per RPC on stderr. options: those of create_server (auth, api_keys,
    tls_cert, tls_key, limits, metrics_port, ...) and of SessionManager."""
    keep_heap()  # before the model loads: large buffers come from the heap, not fresh pages (memsvc.alloc)
    service, bound = create_server(f"{host}:{port}", data_dir=data_dir, model=model, device=device, **options)
    configure_rpc_log(enabled=log_rpcs)
    stop = threading.Event()

    def _on_signal(signum, _frame):
        log.info("signal %s: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # Everything loaded by now (model, tokenizer, libraries) lives until exit: frozen, the cyclic collector's full
    # passes no longer walk it while a call allocates thousands of block objects (an 8k session's question: a
    # pass could add 0.2 s; median 1.44 -> 1.30 s over 5 runs in one process). Unfrozen at exit.
    gc.freeze()
    service.start()
    single_threaded()  # this thread only waits from here on (memsvc.threads)
    m = service.manager.model
    extras = [f"auth {'on' if service.auth else 'off'}", "TLS" if options.get("tls_cert") else "plaintext"]
    if service.metrics_port is not None:
        extras.append(f"metrics on :{service.metrics_port}/metrics")
    if service.advertise:
        extras.append(f"advertised as {service.advertise}")
    print(f"memsvc: serving {m.name} ({m.short_fingerprint}) on {host}:{bound}, store {describe(data_dir)} "
          f"({', '.join(extras)})", file=sys.stdout, flush=True)
    stop.wait()
    service.health.enter_graceful_shutdown()
    service.stop(grace=5).wait()
    service.close()
    gc.unfreeze()
    print("memsvc: stopped", flush=True)
