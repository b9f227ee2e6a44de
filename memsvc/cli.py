"""The `memsvc` command line: serve, keys new, model pull, chat,
sessions ls|show|stats|rm|gc|export|import|upgrade.

`sessions` reads the LMDB data directory directly (ls, show, stats and export
open it read-only), so an operator can inspect a store with or without a server
running; rm, gc and import write in one LMDB transaction each, which is safe
beside a running server (it keeps an in-memory copy of a removed session until
its next restart). Nothing imports this module.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import sys

import click

DEFAULT_DATA_DIR = "./data"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """memsvc: long-term KV-cache memory for LLM agents and chatbots."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=50051, show_default=True, type=int, help="0 picks a free port (printed).")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True, help="LMDB data directory.")
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
@click.option("--max-session-tokens", default=0, show_default=True, type=int, help="Per session (0 = no limit).")
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
              help="Bytes of decoded cold keys and values that stay in memory, each tiered layer's last read, one "
                   "LRU shared by every session: the next call decodes only the blocks that read did not (0 = none).")
@click.option("--context", default=None, type=int,
              help="Tokens a session may hold, instead of the model's max_position_embeddings (past it the "
                   "model runs on positions it was not trained on; for benchmarks).")
@click.option("--log-rpcs/--no-log-rpcs", default=True, show_default=True,
              help="One JSON line per RPC on stderr (no conversation content).")
def serve(host: str, port: int, data_dir: str, model: str | None, device: str, max_new_tokens: int, auth: str,
          api_keys_file: str | None, tls_cert: str | None, tls_key: str | None, metrics_port: int | None,
          metrics_host: str | None, max_append_tokens: int, max_session_tokens: int, max_request_bytes: int,
          max_sessions_per_tenant: int, max_bytes_per_tenant: int, resident_budget: int, ttl: float,
          block_cache: int, decoded_cache: int, context: int | None, log_rpcs: bool) -> None:
    """Serve MemoryService over gRPC (fetches the default model on first use)."""
    from .auth import KeyRing
    from .limits import Limits
    from .server import serve as _serve

    try:
        keys = KeyRing.load(api_keys_file)
        limits = Limits(max_append_tokens=max_append_tokens, max_session_tokens=max_session_tokens,
                        max_request_bytes=max_request_bytes, max_sessions_per_tenant=max_sessions_per_tenant,
                        max_bytes_per_tenant=max_bytes_per_tenant)
        _serve(host, port, data_dir=data_dir, model=model, device=device, max_new_tokens=max_new_tokens,
               log_rpcs=log_rpcs, auth=auth, api_keys=keys, tls_cert=tls_cert, tls_key=tls_key, limits=limits,
               metrics_port=metrics_port, metrics_host=metrics_host, resident_budget=resident_budget, ttl=ttl,
               block_cache_bytes=block_cache, decoded_cache_bytes=decoded_cache, context=context)
    except ValueError as exc:
        raise click.ClickException(str(exc))


@main.group()
def keys() -> None:
    """API keys for `serve` (stored hashed)."""


@keys.command("new")
@click.argument("tenant")
@click.option("--keys-file", default=None, type=click.Path(dir_okay=False),
              help="Append the hashed entry to this file (created with mode 600).")
def keys_new(tenant: str, keys_file: str | None) -> None:
    """Make a key for TENANT: prints the key (shown once) and stores only its hash."""
    import os

    from .auth import check_tenant, hash_key, new_key

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


@main.group()
def model() -> None:
    """Model cache commands."""


@model.command("pull")
@click.option("--model", "spec", default=None, help="A .gguf file to convert instead of the default model.")
def model_pull(spec: str | None) -> None:
    """Fetch and convert the default model (or convert SPEC) into $MEMSVC_HOME."""
    from .model import fingerprint, resolve_model

    path = resolve_model(spec)
    click.echo(f"{path}  fingerprint {fingerprint(path)[:12]}")


@main.command()
@click.argument("session")
@click.option("--address", default="127.0.0.1:50051", show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--system", default=None, help="A system message for a new session.")
def chat(session: str, address: str, max_new_tokens: int, temperature: float, system: str | None) -> None:
    """Chat in SESSION (created if missing), streaming each reply. Ctrl-D ends."""
    import grpc

    from memsvc.clients.client import MemoryClient

    with MemoryClient(address) as client:
        try:
            s = client.resume(session)
            click.echo(f"[resumed {s.id}: {s.tokens} tokens, {s.messages} messages]", err=True)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise click.ClickException(f"{exc.code().name}: {exc.details()}")
            s = client.create_session(session)
            click.echo(f"[new session {s.id}]", err=True)
            if system:
                client.append(s.id, messages=[{"role": "system", "content": system}])
        while True:
            try:
                line = input("you> ")
            except EOFError:
                click.echo("", err=True)
                return
            if not line.strip():
                continue
            try:
                client.append(session, messages=[{"role": "user", "content": line}])
                click.echo("model> ", nl=False)
                for chunk in client.generate(session, max_new_tokens=max_new_tokens, temperature=temperature,
                                             commit=True):
                    click.echo(chunk.text, nl=False)
                    sys.stdout.flush()
                click.echo("")
            except grpc.RpcError as exc:
                raise click.ClickException(f"{exc.code().name}: {exc.details()}")


@main.group()
def sessions() -> None:
    """Inspect stored sessions straight from the LMDB data directory."""


def _open_store(data_dir: str, readonly: bool):
    from memsvc.store.errors import StoreError
    from memsvc.store.open import open_store

    try:
        return open_store(data_dir, readonly=readonly)
    except StoreError as exc:
        raise click.ClickException(str(exc))


def _record_dict(rec) -> dict:
    return {
        "id": rec.id, "model": rec.model_name, "model_fingerprint": rec.model_fingerprint, "policy": rec.policy,
        "tokens": rec.n_tokens, "bytes_stored": rec.stored_bytes, "messages": len(rec.messages),
        "created": rec.created, "updated": rec.updated, "labels": rec.labels, "layout": rec.layout,
        "format_version": rec.format_version,
        "stored_bytes_per_token": rec.stored_bytes / rec.n_tokens if rec.n_tokens else 0.0,
        "resident_bytes_per_token": (rec.extra.get("cache", {}).get("resident_bytes", 0) / rec.n_tokens
                                     if rec.n_tokens else 0.0),
        "tier_tokens": rec.extra.get("cache", {}).get("tier_tokens", {}),
        "ttl": rec.ttl,  # the session's own; 0: the server's --ttl, which the store does not know
        "expires": rec.expires() if rec.ttl else None,
        "repair": rec.extra.get("repair"),  # {count, last_unix, last_blocks, last_exact} once repaired
    }


_SORTS = {"id": None, "updated": lambda r: r.updated, "created": lambda r: r.created,
          "size": lambda r: r.stored_bytes, "tokens": lambda r: r.n_tokens}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _seconds(text: str) -> float:
    """'90', '90s', '15m', '2h', '7d', '1w' -> seconds."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:], None)
    try:
        value = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise click.BadParameter(f"{text!r} is not a duration: a number of seconds, or with s, m, h, d or w")
    return value


def _all_records(store, labels: dict | None = None) -> list:
    recs, after = [], ""
    while True:
        page = store.list(after=after, limit=1000, labels=labels or None)
        recs.extend(page)
        if len(page) < 1000:
            return recs
        after = page[-1].id


@sessions.command("ls")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
@click.option("--label", "labels", multiple=True, help="KEY=VALUE; all must match.")
@click.option("--sort", "sort_by", type=click.Choice(list(_SORTS)), default="id", show_default=True,
              help="updated, created: newest first; size, tokens: largest first.")
@click.option("--older-than", default=None, help="Only sessions not updated for this long (90, 15m, 2h, 7d).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def sessions_ls(data_dir: str, labels: tuple[str, ...], sort_by: str, older_than: str | None, as_json: bool) -> None:
    """List stored sessions with tokens and bytes."""
    import time

    wanted = {}
    for item in labels:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        k, v = item.split("=", 1)
        wanted[k] = v
    cutoff = time.time() - _seconds(older_than) if older_than is not None else None
    with _open_store(data_dir, readonly=True) as store:
        recs = _all_records(store, wanted)
    if cutoff is not None:
        recs = [r for r in recs if r.updated <= cutoff]
    if _SORTS[sort_by] is not None:
        recs.sort(key=lambda r: (_SORTS[sort_by](r), r.id), reverse=True)
    if as_json:
        for rec in recs:
            click.echo(json.dumps(_record_dict(rec)))
        return
    rows = [("ID", "POLICY", "TOKENS", "STORED", "B/TOKEN", "MODEL", "UPDATED")]
    for rec in recs:
        per = f"{rec.stored_bytes / rec.n_tokens:.0f}" if rec.n_tokens else "-"
        rows.append((rec.id, rec.policy, str(rec.n_tokens), _human_bytes(rec.stored_bytes), per,
                     f"{rec.model_name} ({rec.model_fingerprint[:8]})", _when(rec.updated)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    total_tokens = sum(r.n_tokens for r in recs)
    total_bytes = sum(r.stored_bytes for r in recs)
    click.echo(f"{len(recs)} sessions, {total_tokens} tokens, {_human_bytes(total_bytes)} stored")


@sessions.command("show")
@click.argument("session_id")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sessions_show(session_id: str, data_dir: str, as_json: bool) -> None:
    """Show one stored session."""
    with _open_store(data_dir, readonly=True) as store:
        rec = store.get(session_id)
        if rec is None:
            raise click.ClickException(f"no session {session_id!r} in {data_dir}")
        doc = _record_dict(rec)
        doc["kv_blocks"] = blobs = store.session_blobs(session_id)
    if as_json:
        click.echo(json.dumps(doc))
        return
    lay = rec.layout
    elem = {"float32": 4, "float16": 2, "bfloat16": 2}.get(lay.get("dtype"), 0)
    fp16 = rec.n_tokens * 2 * lay.get("layers", 0) * lay.get("kv_heads", 0) * lay.get("head_dim", 0) * 2
    lines = [
        ("id", rec.id),
        ("model", f"{rec.model_name}  fingerprint {rec.model_fingerprint[:16]}"),
        ("policy", f"{rec.policy}  {_settings_line(rec)}"),
        ("tokens", str(rec.n_tokens)),
        ("messages", str(len(rec.messages))),
        ("bytes stored", f"{rec.stored_bytes} ({_human_bytes(rec.stored_bytes)})"),
        ("bytes / token", f"{rec.stored_bytes / rec.n_tokens:.0f}" if rec.n_tokens else "-"),
        ("vs fp16 cache", f"{rec.stored_bytes / fp16:.2f}x of {_human_bytes(fp16)}" if fp16 else "-"),
        ("kv blocks", f"{blobs['blocks']}, {blobs['shared']} shared with other sessions "
                      f"({_human_bytes(blobs['shared_bytes'])}); deleting it frees {_human_bytes(blobs['own_bytes'])}"),
        ("resident / token", _resident_line(rec, fp16)),
        ("tiers (tokens/head)", ", ".join(f"{k} {v:g}" for k, v in rec.extra.get("cache", {}).get("tier_tokens", {}).items())
         or "-"),
        ("kv layout", f"{lay.get('layers')} layers x {lay.get('kv_heads')} kv heads x {lay.get('head_dim')} dims, "
                      f"{lay.get('dtype')} ({elem} B), blocks of {lay.get('block_tokens')} tokens"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(rec.labels.items())) or "-"),
        ("created", _when(rec.created)),
        ("updated", _when(rec.updated)),
        ("ttl", f"{rec.ttl:g} s, expires {_when(rec.expires())}" if rec.ttl else "the server's --ttl"),
        ("last repair", _repair_line(rec.extra.get("repair"))),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k.ljust(width)}  {v}")


def _settings_line(rec) -> str:
    """The session's stored policy settings that differ from this memsvc's defaults."""
    from memsvc.cache import POLICY_CONFIG, get_policy, policy_config, record_policy

    if POLICY_CONFIG not in rec.layout:
        return "(settings not stored: read with this memsvc's defaults)"
    try:
        today, used = policy_config(get_policy(rec.policy)), policy_config(record_policy(rec))
    except ValueError as exc:
        return f"(settings this memsvc cannot use: {exc})"
    other = {k: v for k, v in used.items() if today[k] != v}
    listed = ", ".join(f"{k}={v}" for k, v in sorted(other.items())) or "today's defaults"
    return f"(settings as stored: {listed})"


def _repair_line(rep) -> str:
    if not isinstance(rep, dict) or not rep.get("count"):
        return "never"
    return (f"{_when(rep.get('last_unix', 0))}: {rep.get('last_blocks', '?')} KV entries rebuilt from the token ids "
            f"({rep['count']} repair{'s' if rep['count'] != 1 else ''} in all)")


def _resident_line(rec, fp16: int) -> str:
    """Resident bytes per token when loaded, as measured at the session's last commit."""
    res = rec.extra.get("cache", {}).get("resident_bytes")
    if res is None or not rec.n_tokens:
        return "-"
    return f"{res / rec.n_tokens:.0f} B ({fp16 / res:.1f}x smaller than fp16)" if res else "0 B"


@sessions.command("rm")
@click.argument("session_ids", nargs=-1, required=True)
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
def sessions_rm(session_ids: tuple[str, ...], data_dir: str) -> None:
    """Delete stored sessions (a running server keeps its in-memory copy until restart)."""
    missing = []
    with _open_store(data_dir, readonly=False) as store:
        for sid in session_ids:
            if store.delete(sid):
                click.echo(f"deleted {sid}")
            else:
                missing.append(sid)
    if missing:
        raise click.ClickException(f"no such session: {', '.join(missing)}")


@sessions.command("stats")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sessions_stats(data_dir: str, as_json: bool) -> None:
    """The whole store: sessions, tokens, bytes by kind, what sharing saves."""
    with _open_store(data_dir, readonly=True) as store:
        recs = _all_records(store)
        st = store.stats()
    doc = {
        "sessions": len(recs), "tokens": sum(r.n_tokens for r in recs),
        "policies": {p: sum(r.policy == p for r in recs) for p in sorted({r.policy for r in recs})},
        "bytes_referenced": sum(r.stored_bytes for r in recs),  # shared blocks counted once per session
        "bytes_stored": st["total_bytes"],
        "record_bytes": st["record_bytes"], "token_bytes": st["token_bytes"], "kv_blob_bytes": st["blob_bytes"],
        "pointer_bytes": st["pointer_bytes"], "kv_blocks": st["kv_blocks"], "kv_blobs": st["blobs"],
        "shared_blobs": st["shared_blobs"], "shared_blob_bytes": st["shared_blob_bytes"],
        "bytes_saved_by_sharing": st["logical_blob_bytes"] - st["blob_bytes"],
        "lmdb_used_bytes": st["used_bytes"], "lmdb_map_size": st["map_size"],
        "block_cache": None,  # per server process, in memory: GetStats and /metrics report it
    }
    if as_json:
        click.echo(json.dumps(doc))
        return
    lines = [
        ("sessions", f"{doc['sessions']}" + (" (" + ", ".join(f"{p} {n}" for p, n in doc["policies"].items()) + ")"
                                             if recs else "")),
        ("tokens", str(doc["tokens"])),
        ("bytes stored", f"{doc['bytes_stored']} ({_human_bytes(doc['bytes_stored'])})"),
        ("  records", _human_bytes(doc["record_bytes"])),
        ("  token ids", _human_bytes(doc["token_bytes"])),
        ("  kv blobs", f"{_human_bytes(doc['kv_blob_bytes'])} in {doc['kv_blobs']} blobs, {doc['shared_blobs']} "
                       f"shared ({_human_bytes(doc['shared_blob_bytes'])})"),
        ("  kv pointers", f"{_human_bytes(doc['pointer_bytes'])} ({doc['kv_blocks']} blocks of sessions)"),
        ("referenced", f"{_human_bytes(doc['bytes_referenced'])} (sessions' bytes, shared blocks in each)"),
        ("saved by sharing", _human_bytes(doc["bytes_saved_by_sharing"])),
        ("lmdb map", f"{_human_bytes(doc['lmdb_used_bytes'])} used of {_human_bytes(doc['lmdb_map_size'])}"),
        ("block cache", "not kept offline: a server's GetStats and /metrics report its hits and misses"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k.ljust(width)}  {v}")


@sessions.command("gc")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sessions_gc(data_dir: str, as_json: bool) -> None:
    """Remove KV blobs no session points to and entries of sessions without a record; fix reference counts.

    Safe while a server runs (one write transaction). LMDB reuses the freed pages; the file does not shrink."""
    with _open_store(data_dir, readonly=False) as store:
        out = store.gc()
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"freed {out['freed_blobs']} unreferenced blobs ({_human_bytes(out['freed_bytes'])}), removed "
               f"{out['orphan_entries']} orphan entries, fixed {out['fixed_counts']} reference counts; "
               f"{out['blobs']} blobs ({_human_bytes(out['blob_bytes'])}) left")
    if out["dangling_pointers"]:
        click.echo(f"warning: {out['dangling_pointers']} KV blocks point to missing blobs; those sessions fail "
                   f"to load until they are deleted", err=True)


@sessions.command("verify")
@click.argument("session_ids", nargs=-1)
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
@click.option("--repair", is_flag=True,
              help="Rebuild damaged KV entries from the sessions' token ids with the model, and fix reference "
                   "counts (gc). Stop the server first, or let it repair sessions itself as it meets them.")
@click.option("--model", default=None, help="The sessions' model, for --repair (as for `serve`; default "
                                             "SmolLM2-135M-Instruct).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: sessions, store, repairs, ok.")
def sessions_verify(session_ids: tuple[str, ...], data_dir: str, repair: bool, model: str | None, device: str,
                    as_json: bool) -> None:
    """Check every record, token block, KV pointer and blob and the reference counts (all sessions, or
    SESSION_IDS); with --repair rebuild what is damaged. Exits 0 when nothing is (left) damaged, 1 otherwise."""
    from memsvc.store.errors import StoreError

    from .repair import Unrepairable, check_session, repair_session

    loaded = None
    repairs, failures = [], {}
    with _open_store(data_dir, readonly=not repair) as store:
        try:
            known = store.session_ids()
            ids = list(session_ids) or known
            missing = [sid for sid in ids if sid not in known]
            if missing:
                raise click.ClickException(f"no such session: {', '.join(missing)}")
            checks = {sid: check_session(store, sid) for sid in ids}
            refs = store.check_refs()
            if repair:
                for sid, chk in checks.items():
                    if not chk.damaged:
                        continue
                    if not chk.repairable:
                        failures[sid] = "its record or token ids are damaged: it cannot be rebuilt (delete it)"
                        continue
                    if loaded is None:
                        from .model import load_model

                        loaded = load_model(model, device=device)
                    try:
                        done = repair_session(store, loaded, sid, check=chk)
                    except Unrepairable as exc:
                        failures[sid] = str(exc)
                        continue
                    if done is not None:
                        repairs.append(done.as_dict())
                refs = store.check_refs()  # a repair leaves the counts of unreadable pointers to gc
                if any(refs.values()):
                    refs_fixed = store.gc()
                    repairs.append({"store": "gc", **refs_fixed})
                before = checks
                checks = {sid: check_session(store, sid) for sid in ids}
                refs = store.check_refs()
            else:
                before = checks
        except StoreError as exc:
            raise click.ClickException(str(exc))
    damaged = [sid for sid, chk in checks.items() if chk.damaged]
    ok = not damaged and not any(refs.values())
    if as_json:
        click.echo(json.dumps({"sessions": [before[sid].as_dict() for sid in ids],
                               "after_repair": [checks[sid].as_dict() for sid in ids] if repair else None,
                               "store": refs, "repairs": repairs, "failures": failures, "ok": ok}))
    else:
        for sid in ids:
            chk = before[sid]
            if not chk.damaged:
                click.echo(f"ok       {sid}  ({chk.n_tokens} tokens, {chk.kv_entries} KV entries)")
                continue
            parts = ([f"record: {chk.record}"] if chk.record else []) + \
                [f"token block {k}: {v}" for k, v in sorted(chk.tokens.items())] + \
                [f"KV {w}: {v}" for w, v in chk.as_dict()["kv"].items()] + chk.other
            fixed = repair and not checks[sid].damaged
            click.echo(f"{'repaired' if fixed else 'DAMAGED '} {sid}  ({len(parts)} problem(s)"
                       f"{', repairable' if chk.repairable and not repair else ''})")
            for line in parts[:10]:
                click.echo(f"    {line}")
            if len(parts) > 10:
                click.echo(f"    ... {len(parts) - 10} more")
            if sid in failures:
                click.echo(f"    not repaired: {failures[sid]}")
        for r in repairs:
            if "store" in r:
                click.echo(f"gc: fixed {r['fixed_counts']} reference counts, freed {r['freed_blobs']} blobs, "
                           f"removed {r['orphan_entries']} orphan entries")
            else:
                click.echo(f"rebuilt {r['id']} from {r['tokens']} tokens in {r['seconds']:.1f} s: {r['rewritten']} "
                           f"KV entries rewritten" + ("" if r["exact"] else " (every entry: not an exact replay)"))
        store_line = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in refs.items() if v)
        click.echo(f"store: {store_line or 'reference counts and blobs consistent'}")
        click.echo(f"{len(ids)} session(s) checked, {len(damaged)} damaged" + (" after repair" if repair else ""))
    if not ok:
        sys.exit(1)


@sessions.command("upgrade")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
def sessions_upgrade(data_dir: str) -> None:
    """Bring a store up to date in place: a store written before KV blocks were shared (format 1) is
    converted in one transaction, then every tiered session whose layer states are stored in an older
    layout (whole, before parts, or in parts of another size) has them rewritten, one transaction per
    session, and every record that does not keep its policy's settings gets the ones it is read with now
    (this memsvc's defaults), so that later defaults cannot change how it is read.

    Stop the server first: nothing else may have the store open."""
    from memsvc.cache.upgrade import upgrade_session
    from memsvc.store.errors import StoreError
    from memsvc.store.lmdb import STORE_FORMAT, upgrade_store

    try:
        n = upgrade_store(data_dir)
        click.echo(f"upgraded {data_dir} to store format {STORE_FORMAT}: {n} KV blocks are now shared blobs")
    except StoreError as exc:
        if "already has a format stamp" not in str(exc):
            raise click.ClickException(str(exc))
    split = pinned = 0
    with _open_store(data_dir, readonly=False) as store:
        for sid in store.session_ids():
            try:
                done = upgrade_session(store, sid)
            except (StoreError, ValueError) as exc:
                click.echo(f"session {sid!r} left as it is: {exc}", err=True)
                continue
            split += bool(done.entries)
            pinned += done.pinned
    click.echo(f"{split} tiered session(s) rewrote their layer states in the current layout")
    click.echo(f"{pinned} record(s) now keep their policy's settings")


@sessions.command("export")
@click.argument("session_id")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
def sessions_export(session_id: str, file: str, data_dir: str) -> None:
    """Write one session (record, token ids, KV blocks) to FILE: portable, versioned, checksummed."""
    from memsvc.store.archive import write_export
    from memsvc.store.errors import StoreError

    with _open_store(data_dir, readonly=True) as store:
        try:
            export = store.export(session_id)
        except StoreError as exc:
            raise click.ClickException(f"cannot export {session_id!r}: {exc}")
    try:
        size = write_export(file, export)
    except StoreError as exc:
        raise click.ClickException(str(exc))
    h = export.header
    click.echo(f"exported {session_id} ({h['n_tokens']} tokens, {h['kv_blocks']} KV blocks, model {h['model_name']} "
               f"{h['model_fingerprint'][:12]}) to {file}: {size} bytes")


@sessions.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--as", "new_id", default=None, help="Store it under this id instead of the exported one.")
@click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True)
@click.option("--model", default=None,
              help="The model the target server runs (as for `serve`; default SmolLM2-135M-Instruct); "
                   "a session made with another model is refused.")
def sessions_import(file: str, new_id: str | None, data_dir: str, model: str | None) -> None:
    """Store a session from an export FILE (made by `sessions export`)."""
    from memsvc.store.archive import read_export
    from memsvc.store.errors import StoreError

    from .model import fingerprint, resolve_model

    try:
        export = read_export(file)
    except StoreError as exc:
        raise click.ClickException(str(exc))
    try:
        ours = fingerprint(resolve_model(model))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot fingerprint the model {model or 'default'!r}: {exc}")
    theirs = str(export.header.get("model_fingerprint", ""))
    if theirs != ours:
        raise click.ClickException(
            f"{file} holds a session of model {export.header.get('model_name')!r} (fingerprint {theirs[:12]}), "
            f"but the target model {model or 'default'!r} has fingerprint {ours[:12]}: a KV cache only works with "
            f"the model that made it; import it where that model is served (--model)")
    with _open_store(data_dir, readonly=False) as store:
        try:
            rec = store.import_session(export, new_id)
        except (StoreError, ValueError) as exc:
            raise click.ClickException(f"cannot import {file}: {exc}")
    click.echo(f"imported {rec.id} ({rec.n_tokens} tokens, {rec.stored_bytes} bytes) into {data_dir}")


def _eval_group():
    from memsvc.eval.cli import eval_cmd
    return eval_cmd


main.add_command(_eval_group(), "eval")


if __name__ == "__main__":
    main()
