"""What the `memsvc` commands share: the --store option (default: the LMDB data directory ./data), opening a
store, a record as a dict, sizes, times and durations for people, paging through every record."""
from __future__ import annotations

import contextlib
import datetime as _dt
from typing import Iterator

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


def store_option(command):
    """--store SPEC (also spelled --data-dir, or $MEMSVC_STORE): the command's store, passed as `store_spec`."""
    return click.option(
        "--store", "--data-dir", "store_spec", default=DEFAULT_DATA_DIR, show_default=True, envvar="MEMSVC_STORE",
        help="The store: an LMDB data directory (a path or lmdb://DIR, the default) or a PostgreSQL database "
             "(postgresql://user@host:port/dbname, any libpq URL).")(command)


def describe(spec: str) -> str:
    """The store a spec names, for messages: never the password a URL may hold."""
    from memsvc.store.open import describe as _describe

    return _describe(spec)


@contextlib.contextmanager
def _open_store(spec: str, readonly: bool, writer: str | None = None) -> Iterator:
    """The store, open for the block. writer (what the command is, e.g. "`memsvc sessions rm`"): a command
    that writes to an LMDB data dir has it to itself meanwhile, and is refused while a server or another writer
    holds it (None: the caller holds the lock already, or only reads; a PostgreSQL store takes no lock)."""
    from memsvc.store.errors import StoreError
    from memsvc.store.open import open_store

    with _data_dir(spec, None if readonly else writer):
        try:
            store = open_store(spec, readonly=readonly)
        except (StoreError, ValueError) as exc:
            raise click.ClickException(str(exc))
        with store:
            yield store


@contextlib.contextmanager
def _data_dir(spec: str, writer: str | None) -> Iterator[None]:
    """Hold the lock of the data dir spec names for the block (writer None, or a store that is no data dir:
    take none)."""
    from memsvc.store.errors import StoreError
    from memsvc.store.open import claim

    try:
        lock = claim(spec, writer, create=False) if writer else None
    except StoreError as exc:
        raise click.ClickException(str(exc))
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


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


def _all_records(store, labels: dict | None = None) -> tuple[list, list]:
    """(every record that reads back and matches labels, every damaged one as store.base.Damaged)."""
    recs, damaged, after = [], [], ""
    while True:
        page = store.list_page(after=after, limit=1000, labels=labels or None)
        recs.extend(page.records)
        damaged.extend(page.damaged)
        if len(page) < 1000:
            return recs, damaged
        after = page.last


def _damaged_note(damaged) -> str:
    """What to do about damaged records, for the end of a listing."""
    ids = ", ".join(d.id for d in damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
    return (f"{len(damaged)} damaged session record(s) ({ids}): `memsvc sessions verify` checks them, "
            f"`memsvc sessions rm ID` deletes one")
