"""`memsvc sessions upgrade|export|import`: a store brought up to date in place; one session to a file and back."""
from __future__ import annotations

import click

from ..progress import Progress
from .common import _data_dir, _open_store, describe, store_option


@click.command("upgrade")
@store_option
def sessions_upgrade(store_spec: str) -> None:
    """Bring a store up to date in place: a store written before KV blocks were shared (format 1) is
    converted in one transaction, then every tiered session whose layer states are stored in an older
    layout (whole, before parts, or in parts of another size) has them rewritten, one transaction per
    session, and every record that does not keep its policy's settings gets the ones it is read with now
    (this memsvc's defaults), so that later defaults cannot change how it is read.

    An LMDB store: refused while a server (or another writer) holds the data dir: stop it first. A PostgreSQL
    store: opening it for writing applies the schema's missing migrations (under a lock, safe beside running
    replicas); a replica serving a session while it is rewritten here keeps its in-memory copy until its next
    load."""
    with _data_dir(store_spec, "`memsvc sessions upgrade`"):
        _upgrade(store_spec)


def _upgrade(store_spec: str) -> None:
    """The upgrade, while holding the data dir (an LMDB store's)."""
    from memsvc.cache.upgrade import upgrade_session
    from memsvc.store.errors import StoreError
    from memsvc.store.open import parse_spec

    try:
        backend, where = parse_spec(store_spec)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    if backend == "lmdb":
        from memsvc.store.lmdb import STORE_FORMAT, upgrade_store

        try:
            n = upgrade_store(where)
            click.echo(f"upgraded {describe(store_spec)} to store format {STORE_FORMAT}: {n} KV blocks are now "
                       f"shared blobs")
        except StoreError as exc:
            if "already has a format stamp" not in str(exc):
                raise click.ClickException(str(exc))
    split = pinned = 0
    with _open_store(store_spec, readonly=False) as store:
        migrated = getattr(store, "migrated", None)  # PostgreSQL: the schema migrations this open applied
        if migrated is not None:
            click.echo(f"{describe(store_spec)}: schema migrations applied: {', '.join(migrated) or 'none needed'}")
        ids = store.session_ids()
        bar = Progress("upgrade", len(ids), "sessions")
        for sid in ids:
            try:
                done = upgrade_session(store, sid)
            except (StoreError, ValueError) as exc:
                click.echo(f"session {sid!r} left as it is: {exc}", err=True)
                continue
            finally:
                bar.advance(1)
            split += bool(done.entries)
            pinned += done.pinned
        bar.finish()
    click.echo(f"{split} tiered session(s) rewrote their layer states in the current layout")
    click.echo(f"{pinned} record(s) now keep their policy's settings")


@click.command("export")
@click.argument("session_id")
@click.argument("file", type=click.Path(dir_okay=False))
@store_option
def sessions_export(session_id: str, file: str, store_spec: str) -> None:
    """Write one session (record, token ids, KV blocks) to FILE: portable, versioned, checksummed."""
    from memsvc.store.archive import write_export
    from memsvc.store.errors import StoreError

    with _open_store(store_spec, readonly=True) as store:
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


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--as", "new_id", default=None, help="Store it under this id instead of the exported one.")
@store_option
@click.option("--model", default=None,
              help="The model the target server runs (as for `serve`; default SmolLM2-135M-Instruct); "
                   "a session made with another model is refused.")
def sessions_import(file: str, new_id: str | None, store_spec: str, model: str | None) -> None:
    """Store a session from an export FILE (made by `sessions export`)."""
    from memsvc.store.archive import read_export
    from memsvc.store.errors import StoreError

    from ..model import fingerprint, resolve_model

    bar = Progress(f"import {file}", 3, "steps")
    try:
        export = read_export(file)
    except StoreError as exc:
        bar.finish("failed")
        raise click.ClickException(str(exc))
    bar.advance(1, "read and checked")
    try:
        ours = fingerprint(resolve_model(model))
    except (OSError, ValueError) as exc:
        bar.finish("failed")
        raise click.ClickException(f"cannot fingerprint the model {model or 'default'!r}: {exc}")
    theirs = str(export.header.get("model_fingerprint", ""))
    bar.advance(1, "model compared")
    if theirs != ours:
        bar.finish("refused")
        raise click.ClickException(
            f"{file} holds a session of model {export.header.get('model_name')!r} (fingerprint {theirs[:12]}), "
            f"but the target model {model or 'default'!r} has fingerprint {ours[:12]}: a KV cache only works with "
            f"the model that made it; import it where that model is served (--model)")
    with _open_store(store_spec, readonly=False, writer="`memsvc sessions import`") as store:
        try:
            rec = store.import_session(export, new_id)
        except (StoreError, ValueError) as exc:
            bar.finish("failed")
            raise click.ClickException(f"cannot import {file}: {exc}")
    bar.advance(1)
    bar.finish(f"stored as {rec.id}")
    click.echo(f"imported {rec.id} ({rec.n_tokens} tokens, {rec.stored_bytes} bytes) into {describe(store_spec)}")
