"""`memsvc serve`, `memsvc keys new` and `memsvc model pull`."""
from __future__ import annotations

import click

from .common import store_option


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=50051, show_default=True, type=int, help="0 picks a free port (printed).")
@store_option
@click.option("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--max-new-tokens", default=4096, show_default=True, type=int, help="Upper bound per Generate.")
@click.option("--auth", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="API keys: auto = on when keys are given or the host is not loopback.")
@click.option("--api-keys-file", default=None, envvar="MEMSVC_API_KEYS_FILE", type=click.Path(dir_okay=False),
              help="TENANT=sha256:<hex> lines (see `memsvc keys new`); $MEMSVC_API_KEYS adds TENANT=KEY entries.")
@click.option("--tls-cert", default=None, type=click.Path(exists=True, dir_okay=False), help="PEM certificate chain.")
@click.option("--tls-key", default=None, type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
@click.option("--metrics-port", default=None, type=int, help="Serve Prometheus /metrics on this port (0 picks one).")
@click.option("--metrics-host", default=None, help="Address of the metrics endpoint (default: --host).")
@click.option("--max-append-tokens", default=0, show_default=True, type=int, help="Per Append (0 = no limit).")
@click.option("--max-session-tokens", default=1 << 20, show_default=True, type=int,
              help="Tokens one session may hold (0 = no limit); sessions of the tiered policies outgrow the model's "
                   "context, whose window bounds only what one step attends (full sessions stay within it).")
@click.option("--max-request-bytes", default=16 << 20, show_default=True, type=int, help="Per request message.")
@click.option("--max-sessions-per-tenant", default=0, show_default=True, type=int, help="0 = no limit.")
@click.option("--max-bytes-per-tenant", default=0, show_default=True, type=int,
              help="Stored bytes of a tenant's sessions (0 = no limit).")
@click.option("--resident-budget", default=512 << 20, show_default=True, type=int,
              help="Bytes of KV cache that idle sessions keep in memory; least recently used ones beyond it "
                   "are dropped (they stay stored) and load again on their next call (0 = no limit).")
@click.option("--ttl", default=0.0, show_default=True, type=float,
              help="Seconds without a change after which a session is deleted (0 = never); "
                   "CreateSession's ttl_seconds overrides it per session.")
@click.option("--block-cache", default=256 << 20, show_default=True, type=int,
              help="Bytes of cold KV blocks read back from the store that stay in memory, one LRU shared by "
                   "every tiered session (0 = none).")
@click.option("--decoded-cache", default=256 << 20, show_default=True, type=int,
              help="Bytes of decoded cold keys and values that stay in memory, each tiered layer's recent reads', "
                   "one LRU shared by every session: the next call decodes only the blocks they did not (0 = none).")
@click.option("--hold-wait", default=60.0, show_default=True, type=float,
              help="Seconds a call waits for a session another call holds (calls on one session run one at a "
                   "time, in arrival order); past it the call is refused with ABORTED (0 = refuse at once).")
@click.option("--context", default=None, type=int,
              help="The window one step attends, in positions, instead of the model's max_position_embeddings "
                   "(a full session holds at most this many tokens; past the model's own context it runs on "
                   "positions it was not trained on; for benchmarks and tests).")
@click.option("--lease-seconds", default=30.0, show_default=True, type=float,
              help="A store shared by replicas (PostgreSQL): the term of the lease this replica holds on each session "
                   "in memory, renewed every third of it; another replica takes a session over once it expires.")
@click.option("--advertise", default=None, metavar="HOST:PORT",
              help="Where clients reach this server, for a store shared by replicas (PostgreSQL): kept with its "
                   "leases, and named to a client whose call reaches another replica, which the client follows "
                   "(default: the address it binds, this machine's name for 0.0.0.0; '' for none).")
@click.option("--max-batch", default=16, show_default=True, type=int,
              help="Sessions whose tokens one model step runs together (continuous batching: decode tokens of every "
                   "streaming Generate and chunks of pending Appends share the weights' read); 1 = one at a time.")
@click.option("--step-tokens", default=512, show_default=True, type=int,
              help="Tokens one model step runs at most (decode tokens and prefill chunks; a long Append is cut in "
                   "chunks of at most this many): lower it to keep streams' inter-token latency low beside long "
                   "Appends, at some cost to the Appends' speed.")
@click.option("--log-rpcs/--no-log-rpcs", default=True, show_default=True,
              help="One JSON line per RPC on stderr (no conversation content).")
def serve(host: str, port: int, store_spec: str, model: str | None, device: str, max_new_tokens: int, auth: str,
          api_keys_file: str | None, tls_cert: str | None, tls_key: str | None, metrics_port: int | None,
          metrics_host: str | None, max_append_tokens: int, max_session_tokens: int, max_request_bytes: int,
          max_sessions_per_tenant: int, max_bytes_per_tenant: int, resident_budget: int, ttl: float,
          block_cache: int, decoded_cache: int, hold_wait: float, context: int | None, lease_seconds: float,
          advertise: str | None, max_batch: int, step_tokens: int, log_rpcs: bool) -> None:
    """Serve MemoryService over gRPC (fetches the default model on first use)."""
    from ..auth import KeyRing
    from ..limits import Limits
    from ..server import serve as _serve
    from ..sessions.steps import StepConfig

    try:
        keys = KeyRing.load(api_keys_file)
        limits = Limits(max_append_tokens=max_append_tokens, max_session_tokens=max_session_tokens,
                        max_request_bytes=max_request_bytes, max_sessions_per_tenant=max_sessions_per_tenant,
                        max_bytes_per_tenant=max_bytes_per_tenant)
        steps = StepConfig(max_batch=max_batch, step_tokens=step_tokens)
        _serve(host, port, data_dir=store_spec, model=model, device=device, max_new_tokens=max_new_tokens,
               log_rpcs=log_rpcs, auth=auth, api_keys=keys, tls_cert=tls_cert, tls_key=tls_key, limits=limits,
               metrics_port=metrics_port, metrics_host=metrics_host, resident_budget=resident_budget, ttl=ttl,
               block_cache_bytes=block_cache, decoded_cache_bytes=decoded_cache, hold_wait=hold_wait,
               context=context, lease_seconds=lease_seconds, advertise=advertise, steps=steps)
    except ValueError as exc:
        raise click.ClickException(str(exc))


@click.group()
def keys() -> None:
    """API keys for `serve` (stored hashed)."""


@keys.command("new")
@click.argument("tenant")
@click.option("--keys-file", default=None, type=click.Path(dir_okay=False),
              help="Append the hashed entry to this file (created with mode 600).")
def keys_new(tenant: str, keys_file: str | None) -> None:
    """Make a key for TENANT: prints the key (shown once) and stores only its hash."""
    import os

    from ..auth import check_tenant, hash_key, new_key

    try:
        check_tenant(tenant)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="TENANT")
    key = new_key()
    line = f"{tenant}={hash_key(key)}"
    if keys_file:
        fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        click.echo(f"added tenant {tenant!r} to {keys_file}", err=True)
    else:
        click.echo(f"add this line to the keys file: {line}", err=True)
    click.echo(key)


@click.group()
def model() -> None:
    """Model cache commands."""


@model.command("pull")
@click.option("--model", "spec", default=None, help="A .gguf file to convert instead of the default model.")
def model_pull(spec: str | None) -> None:
    """Fetch and convert the default model (or convert SPEC) into $MEMSVC_HOME."""
    from ..model import fingerprint, resolve_model

    path = resolve_model(spec)
    click.echo(f"{path}  fingerprint {fingerprint(path)[:12]}")
