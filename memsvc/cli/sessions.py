"""`memsvc sessions ls|show|stats|rm|gc`: stored sessions, read straight from the store."""
from __future__ import annotations

import json
from collections import Counter

import click

from .common import (_SORTS, _all_records, _damaged_note, _human_bytes, _open_store, _record_dict, _seconds, _when,
                     describe, store_option)


@click.command("ls")
@store_option
@click.option("--label", "labels", multiple=True, help="KEY=VALUE; all must match.")
@click.option("--sort", "sort_by", type=click.Choice(list(_SORTS)), default="id", show_default=True,
              help="updated, created: newest first; size, tokens: largest first.")
@click.option("--older-than", default=None, help="Only sessions not updated for this long (90, 15m, 2h, 7d).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def sessions_ls(store_spec: str, labels: tuple[str, ...], sort_by: str, older_than: str | None, as_json: bool) -> None:
    """List stored sessions with tokens and bytes."""
    import time

    wanted = {}
    for item in labels:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        k, v = item.split("=", 1)
        wanted[k] = v
    cutoff = time.time() - _seconds(older_than) if older_than is not None else None
    with _open_store(store_spec, readonly=True) as store:
        recs, damaged = _all_records(store, wanted)  # a damaged record is listed as such, whatever the filters
    if cutoff is not None:
        recs = [r for r in recs if r.updated <= cutoff]
    if _SORTS[sort_by] is not None:
        recs.sort(key=lambda r: (_SORTS[sort_by](r), r.id), reverse=True)
    if as_json:
        for rec in recs:
            click.echo(json.dumps({**_record_dict(rec), "damaged": False}))
        for d in damaged:
            click.echo(json.dumps({"id": d.id, "damaged": True, "reason": d.reason}))
        return
    rows = [("ID", "POLICY", "TOKENS", "STORED", "B/TOKEN", "MODEL", "UPDATED")]
    for rec in recs:
        per = f"{rec.stored_bytes / rec.n_tokens:.0f}" if rec.n_tokens else "-"
        rows.append((rec.id, rec.policy, str(rec.n_tokens), _human_bytes(rec.stored_bytes), per,
                     f"{rec.model_name} ({rec.model_fingerprint[:8]})", _when(rec.updated)))
    for d in damaged:
        rows.append((d.id, "DAMAGED", "-", "-", "-", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    total_tokens = sum(r.n_tokens for r in recs)
    total_bytes = sum(r.stored_bytes for r in recs)
    click.echo(f"{len(recs)} sessions, {total_tokens} tokens, {_human_bytes(total_bytes)} stored")
    for d in damaged:
        click.echo(f"DAMAGED {d.id}: {d.reason}")
    if damaged:
        click.echo(_damaged_note(damaged))


@click.command("show")
@click.argument("session_id")
@store_option
@click.option("--json", "as_json", is_flag=True)
def sessions_show(session_id: str, store_spec: str, as_json: bool) -> None:
    """Show one stored session."""
    from memsvc.store.errors import CorruptRecord

    with _open_store(store_spec, readonly=True) as store:
        try:
            rec = store.get(session_id)
            damage = None
        except CorruptRecord as exc:
            rec, damage = None, str(exc)
        if rec is None and damage is None:
            raise click.ClickException(f"no session {session_id!r} in {describe(store_spec)}")
        blobs = store.session_blobs(session_id)
    if damage is not None:
        _show_damaged(session_id, damage, blobs, as_json)
        return
    doc = {**_record_dict(rec), "damaged": False, "kv_blocks": blobs}
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


def _show_damaged(sid: str, reason: str, blobs: dict, as_json: bool) -> None:
    """A session whose record does not read back: what is known of it, and what to do."""
    if as_json:
        click.echo(json.dumps({"id": sid, "damaged": True, "reason": reason, "kv_blocks": blobs}))
        return
    lines = [("id", sid), ("DAMAGED", f"its record fails its checks: {reason}"),
             ("kv blocks", f"{blobs['blocks']} ({_human_bytes(blobs['own_bytes'])} only this session holds)"),
             ("what to do", f"`memsvc sessions verify {sid}` checks every entry; the record holds the policy and "
                            f"layout, so the session cannot be rebuilt: `memsvc sessions rm {sid}` deletes it")]
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
    if not res:
        return "0 B"
    return f"{res / rec.n_tokens:.0f} B ({_versus_fp16(fp16 / res)})"


def _versus_fp16(ratio: float) -> str:
    """fp16 bytes over these bytes, in words: never '1.0x smaller'."""
    if ratio >= 1.05:
        return f"{ratio:.1f}x smaller than fp16"
    if ratio > 1 / 1.05:
        return "about the size of an fp16 cache"
    return f"{1 / ratio:.1f}x the size of an fp16 cache"


@click.command("rm")
@click.argument("session_ids", nargs=-1, required=True)
@store_option
def sessions_rm(session_ids: tuple[str, ...], store_spec: str) -> None:
    """Delete stored sessions. An LMDB store: refused while a server holds the data dir (delete through it:
    DeleteSession). A PostgreSQL store: a replica serving one keeps its in-memory copy until its next load."""
    missing = []
    with _open_store(store_spec, readonly=False, writer="`memsvc sessions rm`") as store:
        for sid in session_ids:
            if store.delete(sid):
                click.echo(f"deleted {sid}")
            else:
                missing.append(sid)
    if missing:
        raise click.ClickException(f"no such session: {', '.join(missing)}")


@click.command("stats")
@store_option
@click.option("--json", "as_json", is_flag=True)
def sessions_stats(store_spec: str, as_json: bool) -> None:
    """The whole store: sessions, tokens, bytes by kind, what sharing saves."""
    with _open_store(store_spec, readonly=True) as store:
        recs, damaged = _all_records(store)
        st = store.stats()
    doc = {
        "sessions": len(recs) + len(damaged), "tokens": sum(r.n_tokens for r in recs),
        "policies": dict(sorted(Counter(r.policy for r in recs).items())),
        "damaged": [{"id": d.id, "reason": d.reason} for d in damaged],  # records that fail their checks
        "bytes_referenced": sum(r.stored_bytes for r in recs),  # shared blocks counted once per session
        "bytes_stored": st["total_bytes"],
        "record_bytes": st["record_bytes"], "token_bytes": st["token_bytes"], "kv_blob_bytes": st["blob_bytes"],
        "pointer_bytes": st["pointer_bytes"], "kv_blocks": st["kv_blocks"], "kv_blobs": st["blobs"],
        "shared_blobs": st["shared_blobs"], "shared_blob_bytes": st["shared_blob_bytes"],
        "bytes_saved_by_sharing": st["logical_blob_bytes"] - st["blob_bytes"],
        "used_bytes": st["used_bytes"],  # the backend's space: LMDB pages in use, PostgreSQL's tables on disk
        **({"lmdb_used_bytes": st["used_bytes"], "lmdb_map_size": st["map_size"]} if "map_size" in st else {}),
        "block_cache": None,  # per server process, in memory: GetStats and /metrics report it
    }
    if as_json:
        click.echo(json.dumps(doc))
        return
    lines = [
        ("sessions", f"{doc['sessions']}" + (" (" + ", ".join(f"{p} {n}" for p, n in doc["policies"].items()) + ")"
                                             if recs else "") + (f", {len(damaged)} DAMAGED" if damaged else "")),
        ("tokens", str(doc["tokens"])),
        ("bytes stored", f"{doc['bytes_stored']} ({_human_bytes(doc['bytes_stored'])})"),
        ("  records", _human_bytes(doc["record_bytes"])),
        ("  token ids", _human_bytes(doc["token_bytes"])),
        ("  kv blobs", f"{_human_bytes(doc['kv_blob_bytes'])} in {doc['kv_blobs']} blobs, {doc['shared_blobs']} "
                       f"shared ({_human_bytes(doc['shared_blob_bytes'])})"),
        ("  kv pointers", f"{_human_bytes(doc['pointer_bytes'])} ({doc['kv_blocks']} blocks of sessions)"),
        ("referenced", f"{_human_bytes(doc['bytes_referenced'])} (sessions' bytes, shared blocks in each)"),
        ("saved by sharing", _human_bytes(doc["bytes_saved_by_sharing"])),
        ("lmdb map", f"{_human_bytes(doc['used_bytes'])} used of {_human_bytes(doc['lmdb_map_size'])}")
        if "lmdb_map_size" in doc else ("tables on disk", _human_bytes(doc["used_bytes"])),
        ("block cache", "not kept offline: a server's GetStats and /metrics report its hits and misses"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        click.echo(f"{k.ljust(width)}  {v}")
    for d in damaged:
        click.echo(f"DAMAGED {d.id}: {d.reason}")
    if damaged:
        click.echo(_damaged_note(damaged))


@click.command("gc")
@store_option
@click.option("--json", "as_json", is_flag=True)
def sessions_gc(store_spec: str, as_json: bool) -> None:
    """Remove KV blobs no session points to and entries of sessions without a record; fix reference counts.

    An LMDB store: refused while a server holds the data dir (stop it first); LMDB reuses the freed pages, the
    file does not shrink. A PostgreSQL store: safe beside running replicas (one write transaction)."""
    with _open_store(store_spec, readonly=False, writer="`memsvc sessions gc`") as store:
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
