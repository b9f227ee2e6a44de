"""The Store interface: what the service asks of persistence, whatever the backend.

A store keeps sessions. A session is
    a record       `SessionRecord` (records.py): ids, model, policy, labels, messages, layout, ttl, ...
    token ids      int32, in order; `n_tokens` of the record says how many
    KV entries     addressed by (layer: int 0..65535, index: int 0..2**32-1) -> payload bytes, opaque here
Payloads are stored as block records (blocks.py: zstd, header, two checksums) and
every read checks them: damage raises CorruptBlock / CorruptRecord, never
returns wrong bytes. KV payloads are shared copy-on-write between a session and
its forks: a fork points at the same stored blobs with one more reference each;
a write of (layer, index) stores a new blob and drops that session's reference
to the old one; a blob is removed when no entry references it. Token ids are
copied by a fork (they are small, and a session appends to them).

Atomicity: every write method below (create, commit, rewrite_kv, fork, delete,
import_session, gc) is one transaction, all or nothing. If it raises, for any
reason (bad input, a damaged value it meets, a conflict, a crash, a failure
injected anywhere inside it), nothing it would have written is visible to any
reader, then or after a restart. Readers see whole writes only: each read
method runs in one snapshot.

Errors (errors.py): ValueError for bad arguments (checked before anything is
read); SessionMissing for a write naming an absent session; SessionExists for a
create/fork/import naming a stored id; CorruptRecord / CorruptBlock for damage
found; StoreError for anything else (closed store, read-only store, the backend
unreachable). `CorruptRecord.key` / `.db` name where the damage is in the
backend's own terms: diagnostics, not part of the contract; `.field` names the
check that failed (crc, index, pointer, blob, count, n_tokens, ...).

Thread-safety: one store object is shared by every worker thread of a server;
any method may be called from any thread at any time, including while another
thread writes. `close()` waits for running calls.

stored_bytes of a record is what the session references: its record, its token
blocks and every KV blob it points to, counted in full even when shared (a fork
reports its source's size); `stats()` counts what is stored physically.

Round trips: a backend that talks to a server (PostgreSQL) answers each read
method above with one statement, whatever the number of entries (a Resume reads
its record, its token ids, and every layer's entries with two kv_blocks_for), and counts its
round trips and bytes (`io_counters`).

Leases (a store shared by several processes): the process serving a session holds its lease, an expiry it
renews on the database's clock and a fencing epoch that only grows, a new one with each new owner; a commit
given that epoch is refused (LeaseLost) once another owner has taken the session over. An embedded store is
owned by one process: its lease is held by that process, always (the methods below return None).

Backends: LMDB (lmdb/, embedded, the default) and PostgreSQL (postgres/, one database shared by several
processes). Open one with `open_store(spec)` (open.py). This module knows only the stdlib and the store's plain
data types.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .archive import Export
from .errors import CorruptRecord
from .records import SessionRecord

KVKey = tuple[int, int]  # (layer, index)


@dataclass(frozen=True)
class Lease:
    """A lease held on a session: the fencing epoch to commit with, and how long it runs (database clock)."""

    sid: str
    owner: str
    epoch: int
    seconds_left: float


@dataclass(frozen=True)
class Damaged:
    """A stored session whose record does not read back: its id and what failed."""

    id: str
    reason: str


@dataclass(frozen=True)
class Page:
    """One page of `Store.list_page`: the records that read back, and the damaged ones, each in id order."""

    records: list[SessionRecord] = field(default_factory=list)
    damaged: list[Damaged] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records) + len(self.damaged)

    @property
    def last(self) -> str:
        """The last id of the page (records and damaged ones alike): the next page's `after`; "" if empty."""
        return max([r.id for r in self.records] + [d.id for d in self.damaged], default="")


class Store(ABC):
    """One store of sessions. Subclasses implement every abstract method with exactly this contract;
    tests/store/test_store_contract*.py runs the same tests over each backend."""

    readonly: bool  # opened read-only: every write raises StoreError("... read-only")

    # ---- lifecycle -----------------------------------------------------------------

    @abstractmethod
    def close(self) -> None:
        """Release the backend once every running call has finished. Idempotent. Any later call raises
        StoreError("... closed")."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once close() has run."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- records -------------------------------------------------------------------

    @abstractmethod
    def get(self, sid: str) -> SessionRecord | None:
        """The session's record, or None when there is none (also for an id that cannot exist).
        CorruptRecord when the stored record is damaged."""

    @abstractmethod
    def list(self, after: str = "", limit: int = 100, labels: Mapping[str, str] | None = None
             ) -> list[SessionRecord]:
        """Up to `limit` records with id > `after` (which need not exist), in id order (bytewise, as
        str order for our ids), whose labels include every item of `labels`. Page with after = the
        last id returned. ValueError for limit < 0; CorruptRecord when a damaged record is met."""

    def list_page(self, after: str = "", limit: int = 100, labels: Mapping[str, str] | None = None) -> Page:
        """As list(), except that a damaged record does not stop it: the page holds up to `limit` sessions
        with id > `after`, in id order, those whose record reads back (and matches `labels`) in `records`,
        those whose record is damaged in `damaged` (whatever `labels` asks: their labels cannot be read),
        both counted in `limit`. Page on with after = page.last. ValueError as list().

        This default calls list(), and only when that meets damage reads the ids after `after` one by one
        (session_ids, get); a backend may override it with one pass in one snapshot."""
        try:
            return Page(self.list(after=after, limit=limit, labels=labels))
        except CorruptRecord:
            pass
        wanted = dict(labels or {})
        records: list[SessionRecord] = []
        damaged: list[Damaged] = []
        for sid in self.session_ids():
            if len(records) + len(damaged) >= limit:
                break
            if sid <= after:
                continue
            try:
                rec = self.get(sid)
            except CorruptRecord as exc:
                damaged.append(Damaged(sid, str(exc)))
                continue
            if rec is not None and all(rec.labels.get(k) == v for k, v in wanted.items()):
                records.append(rec)
        return Page(records, damaged)

    @abstractmethod
    def session_ids(self) -> list[str]:
        """Every stored session id, in order, whether or not its record reads back (for checks)."""

    @abstractmethod
    def count(self) -> int:
        """How many sessions are stored."""

    @abstractmethod
    def expired(self, now: float, default_ttl: float = 0.0) -> list[str]:
        """Ids, in order, of the sessions whose `SessionRecord.expires(default_ttl)` is <= now (a unix
        time). A damaged record never expires here."""

    # ---- token ids and KV entries (reads) ---------------------------------------------

    @abstractmethod
    def tokens(self, sid: str) -> list[int]:
        """Every stored token id of the session, in order; [] when there is no such session.
        CorruptBlock for a damaged, missing or out-of-sequence token block; CorruptRecord when the ids
        stored disagree with the record's n_tokens (checked in the same snapshot)."""

    @abstractmethod
    def kv_keys(self, sid: str) -> list[KVKey]:
        """(layer, index) of every KV entry of the session, in (layer, index) order; no payload is read."""

    @abstractmethod
    def kv_blocks_at(self, sid: str, layer: int, indices: Sequence[int]) -> list[bytes | None]:
        """The payload of (layer, index) for each of `indices`, in that order, None where nothing is
        stored, all in one snapshot. CorruptBlock for a damaged entry (a missing blob, a failed
        checksum, a block stored under another (layer, index)). ValueError for an index out of range."""

    def kv_blocks_for(self, sid: str, keys: Sequence[KVKey]) -> list[bytes | None]:
        """The payload of each (layer, index) of `keys`, across layers, in that order, None where nothing is
        stored; CorruptBlock and ValueError as kv_blocks_at. A backend reads them in one snapshot (this
        default: one kv_blocks_at per layer)."""
        wanted = list(keys)
        by_layer: dict[int, list[int]] = {}
        for layer, index in wanted:
            by_layer.setdefault(layer, []).append(index)
        got = {layer: dict(zip(indices, self.kv_blocks_at(sid, layer, indices))) for layer, indices in by_layer.items()}
        return [got[layer][index] for layer, index in wanted]

    def kv_block(self, sid: str, layer: int, index: int) -> bytes | None:
        """One payload, as kv_blocks_at gives it."""
        return self.kv_blocks_at(sid, layer, [index])[0]

    @abstractmethod
    def kv_blocks(self, sid: str) -> dict[KVKey, bytes]:
        """{(layer, index): payload} of every KV entry of the session, in one snapshot ({} when there is
        no such session). CorruptBlock as kv_blocks_at."""

    @abstractmethod
    def session_keys(self, sid: str) -> tuple[int, int]:
        """(entries, bytes) the session references: entries = 1 (record) + token blocks + KV entries,
        bytes = the stored sizes of the record, its token blocks and every blob it points to (shared
        ones in full). When the session is unchanged, bytes == get(sid).stored_bytes."""

    @abstractmethod
    def session_blobs(self, sid: str) -> dict:
        """How the session's KV entries are stored: {"blocks": entries, "shared": entries whose blob
        other entries reference too, "shared_bytes": their blobs' bytes, "own_bytes": bytes of blobs only
        this session references (what deleting it frees)}."""

    # ---- writes --------------------------------------------------------------------------

    @abstractmethod
    def create(self, record: SessionRecord) -> SessionRecord:
        """Store a new session: `record` with n_tokens 0, no token ids, no KV entries. Returns the
        stored record (stored_bytes set by the store). SessionExists if the id is taken; ValueError
        if record is not a SessionRecord."""

    @abstractmethod
    def commit(self, record: SessionRecord, *, first_token: int, tokens: Sequence[int],
               blocks: Mapping[KVKey, bytes], block_tokens: Mapping[KVKey, int] | None = None,
               drop: Sequence[KVKey] = (), epoch: int | None = None) -> SessionRecord:
        """One turn of session record.id, all or nothing, in one transaction:

        - append `tokens` (int32 ids) after the first_token ids stored; first_token must equal the
          stored n_tokens when the transaction runs (else ValueError: another write came first);
        - for each (layer, index) -> payload of `blocks`: store the payload as a new blob (its block
          header's n_tokens from block_tokens, default 0) and point the entry at it; whatever the
          entry pointed to before loses this session's reference (and goes if nothing else holds it);
        - remove the KV entries in `drop` the same way (absent ones are ignored);
        - write `record` as the session's record, with n_tokens = first_token + len(tokens) and
          stored_bytes recounted by the store; every other field is the caller's.

        epoch (a store shared by replicas, PostgreSQL): the fencing epoch of the lease the caller holds on
        the session; checked inside the transaction against the session's lease, LeaseLost when it no
        longer holds it (another replica took the session over). None: no check (one process owns the
        store). LMDB, owned by one process, takes None only.

        Returns the record as stored. Raises before any transaction for bad input (ValueError: not a
        SessionRecord, first_token < 0, an id outside int32, a block key that is not (layer, index) in
        range, a payload that is not bytes-like, block_tokens naming an unwritten block, a key both
        written and dropped); inside it SessionMissing, ValueError (first_token), CorruptBlock when
        the stored token blocks or a reference count it must update are damaged. A failed call
        changes nothing, but for OutcomeUnknown (a server's connection lost at COMMIT): it may have landed."""

    @abstractmethod
    def rewrite_kv(self, sid: str, *, n_tokens: int, blocks: Mapping[KVKey, bytes],
                   block_tokens: Mapping[KVKey, int] | None = None, drop: Sequence[KVKey] = (),
                   extra: Mapping | None = None) -> SessionRecord:
        """Repair, in one transaction: write `blocks` as new blobs, remove the entries in `drop`, merge
        `extra` into the record's extra, only if the session still holds `n_tokens` tokens (else
        ValueError: it changed since it was rebuilt). Unlike commit, a damaged pointer or reference
        count of a replaced entry is not an error: the old blob keeps its references (gc settles
        it); other sessions sharing a replaced blob keep it. stored_bytes is recounted; `updated` and
        the token ids are left as they were. Returns the stored record. SessionMissing if absent."""

    @abstractmethod
    def fork(self, src_id: str, dst_record: SessionRecord) -> SessionRecord:
        """New session dst_record.id holding src_id's token ids (copied) and KV entries (the same
        blobs, one more reference each), in one transaction; its record is dst_record with the
        source's n_tokens and its own stored_bytes. A later write to either session never changes
        what the other reads. SessionMissing (source), SessionExists (destination), CorruptBlock
        when a reference count to raise is damaged."""

    @abstractmethod
    def delete(self, sid: str, *, expired_at: float | None = None, default_ttl: float = 0.0) -> bool:
        """Remove the session (record, token ids, KV entries) and drop its references: blobs no other
        session references go in the same transaction; shared ones stay. True if it was removed; False
        when there is no such session (or an id that cannot exist). A session whose record or counts
        are damaged can still be deleted (gc settles damaged counts). With expired_at (a unix time)
        the session is removed only if its record's expires(default_ttl) <= expired_at, checked
        inside the transaction, so a commit that has just refreshed it wins (False)."""

    @abstractmethod
    def import_session(self, export: Export, new_id: str | None = None) -> SessionRecord:
        """Store an exported session (under new_id when given), in one transaction, after checking every
        block (archive.check_import). Its KV blobs are new (not shared with anything). SessionExists
        if the id is taken; CorruptRecord / CorruptBlock for a damaged or inconsistent export."""

    # ---- export, integrity, maintenance ---------------------------------------------------

    @abstractmethod
    def export(self, sid: str) -> Export:
        """The session in one snapshot: its record bytes, token blocks and KV blocks as stored (shared
        ones in full), each checked first; header from archive.export_header. SessionMissing if absent;
        CorruptBlock for a damaged block."""

    @abstractmethod
    def check_session(self, sid: str) -> dict:
        """Check every entry of one session in one snapshot; nothing is changed. Returns
        {"record": error message or None, "tokens": {index: message}, "kv": {(layer, index): message},
        "bad_keys": [messages for entries whose key does not parse], "token_count": ids stored,
        "kv_entries": KV entries}. A KV entry is damaged when its blob is missing, has no valid
        reference count, fails its checksums or is another block; a token block when it fails its
        checks or is out of sequence; index -1 under "tokens": the ids do not add up to the record's
        n_tokens. SessionMissing when there is no such session."""

    @abstractmethod
    def check_refs(self) -> dict:
        """What gc() would find, changing nothing: {"orphan_entries": token/KV entries of sessions
        without a record, "unreferenced_blobs", "wrong_counts": reference counts that disagree with
        the entries pointing at their blob (or are missing/malformed), "dangling_pointers": KV entries
        whose blob is missing, "bad_meta": damaged store-wide metadata}. A backend whose schema makes a
        kind of damage impossible reports 0 for it."""

    @abstractmethod
    def gc(self) -> dict:
        """In one transaction: remove orphan entries and unreferenced blobs, set reference counts to the
        number of entries pointing at each blob. Returns {"orphan_entries", "freed_blobs", "freed_bytes",
        "fixed_counts", "dangling_pointers" (left alone: the session fails its reads until it is
        repaired or deleted), "blobs", "blob_bytes" (what is left)}. After clean writes there is nothing
        to do and nothing is written."""

    # ---- leases (a store shared by several processes) -----------------------------------------

    def acquire_lease(self, sid: str, owner: str, seconds: float, address: str = "") -> Lease | None:
        """Take (or keep) the lease on sid for `owner` for `seconds` from now: granted when nobody holds it, when
        its holder's expiry has passed (then with a new, greater epoch) or when owner holds it already (same
        epoch, expiry moved). LeaseHeld naming the holder (and the address it gave) otherwise. address: where
        clients reach the owner (host:port, "" unknown), kept with the lease. None: this store needs no leases."""
        return None

    def renew_lease(self, lease: Lease, seconds: float) -> Lease | None:
        """Move the expiry of a lease still held to `seconds` from now (even if it had passed, as long as nobody
        took it); LeaseLost when its epoch no longer holds the session. None: this store needs no leases."""
        return None

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up (nothing happens when it is no longer held): another owner may take it at once."""

    def io_counters(self) -> dict | None:
        """Round trips and bytes since the store was opened, for a backend that talks to a server:
        {"round_trips": {method: n}, "bytes_read": n, "bytes_written": n} (bytes of the values sent and
        received); None for an embedded one."""
        return None

    @abstractmethod
    def stats(self) -> dict:
        """What the store holds physically. Every backend gives: sessions, token_blocks, kv_blocks (KV
        entries of all sessions), blobs, shared_blobs (referenced more than once), references (sum of
        counts); bytes of stored values: record_bytes, token_bytes, blob_bytes, shared_blob_bytes,
        pointer_bytes (KV entries themselves), total_bytes; logical_blob_bytes (blob bytes once per
        reference: what they would take without sharing); used_bytes (space the backend uses). A
        backend may add its own keys (LMDB: map_size, page_size, used_pages)."""
