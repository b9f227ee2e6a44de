"""`memsvc sessions verify [--repair]`: check every stored entry; rebuild what is damaged from the token ids."""
from __future__ import annotations

import json
import sys

import click

from .common import _open_store, store_option


@click.command("verify")
@click.argument("session_ids", nargs=-1)
@store_option
@click.option("--repair", is_flag=True,
              help="Rebuild damaged KV entries from the sessions' token ids with the model, and fix reference "
                   "counts (gc). Refused while a server holds the data dir: stop it first, or let it repair sessions "
                   "itself as it meets them.")
@click.option("--model", default=None, help="The sessions' model, for --repair (as for `serve`; default "
                                             "SmolLM2-135M-Instruct).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: sessions, store, repairs, ok.")
def sessions_verify(session_ids: tuple[str, ...], store_spec: str, repair: bool, model: str | None, device: str,
                    as_json: bool) -> None:
    """Check every record, token block, KV pointer and blob and the reference counts (all sessions, or
    SESSION_IDS); with --repair rebuild what is damaged. Exits 0 when nothing is (left) damaged, 1 otherwise."""
    from memsvc.store.errors import StoreError

    from ..repair import Unrepairable, repair_session

    loaded = None
    repairs, failures = [], {}
    with _open_store(store_spec, readonly=not repair, writer="`memsvc sessions verify --repair`") as store:
        try:
            known = store.session_ids()
            ids = list(session_ids) or known
            missing = [sid for sid in ids if sid not in known]
            if missing:
                raise click.ClickException(f"no such session: {', '.join(missing)}")
            checks = _check_all(store, ids, "verify")
            refs = store.check_refs()
            if repair:
                for sid, chk in checks.items():
                    if not chk.damaged:
                        continue
                    if not chk.repairable:
                        failures[sid] = "its record or token ids are damaged: it cannot be rebuilt (delete it)"
                        continue
                    if loaded is None:
                        from ..model import load_model

                        loaded = load_model(model, device=device)
                    try:
                        done = repair_session(store, loaded, sid, check=chk, progress=_bar(f"repair {sid}", "tokens"))
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
                checks = _check_all(store, ids, "verify after repair")
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


def _bar(what: str, unit: str):
    """A Progress on stderr (a bar on a terminal, lines otherwise), made once its total is known."""
    from ..progress import Progress

    return lambda total: Progress(what, total, unit)


def _check_all(store, ids: list[str], what: str) -> dict:
    from ..repair import check_session

    bar = _bar(what, "sessions")(len(ids))
    checks = {}
    for sid in ids:
        checks[sid] = check_session(store, sid)
        bar.advance(1)
    bar.finish(f"{sum(c.damaged for c in checks.values())} damaged")
    return checks
