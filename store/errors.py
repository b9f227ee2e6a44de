"""Errors of the store. Plain exceptions; the service maps them to status codes.

Knows which database, key and field a damaged value came from; knows nothing
about gRPC or models.
"""
from __future__ import annotations


class StoreError(Exception):
    """Anything the store cannot do (missing data dir, refused write, closed store, ...)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached right now (a database down, restarting or out of connections): nothing was
    written (but see OutcomeUnknown); the same call may succeed later."""


class OutcomeUnknown(StoreUnavailable):
    """The connection was lost at COMMIT: the write may or may not have landed. Read the session again before
    repeating it (an Append repeated after one that landed would be stored twice)."""


class SessionExists(StoreError):
    """A create or fork names an id that is already stored."""


class SessionMissing(StoreError):
    """A write names a session that is not stored."""


class CorruptRecord(StoreError, ValueError):
    """A stored value failed its magic, version, length or checksum check.

    `key` is the LMDB key of the damaged value (None when decoding loose bytes),
    `db` the database it lives in, `field` the check that failed.
    """

    def __init__(self, message: str, key: bytes | None = None, *, db: str | None = None,
                 field: str | None = None):
        where = []
        if db is not None:
            where.append(f"db {db}")
        if key is not None:
            where.append(f"key {bytes(key)!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.key = None if key is None else bytes(key)
        self.db = db
        self.field = field


class CorruptBlock(CorruptRecord):
    """A token or KV block failed a check (see `field`: magic, version, crc, raw_len, ...)."""


class LeaseLost(StoreError):
    """A commit made under a fencing epoch that the session's lease no longer holds: another replica took the
    session over (or nobody holds it). `found` is the lease's epoch now (None: no lease), `owner` its holder,
    `address` where clients reach that holder ("" unknown). Nothing was written."""

    def __init__(self, message: str, *, sid: str, epoch: int, found: int | None, owner: str | None,
                 address: str = ""):
        super().__init__(message)
        self.sid, self.epoch, self.found, self.owner, self.address = sid, epoch, found, owner, address


class LeaseHeld(StoreError):
    """Another owner holds a live lease on the session: `owner` holds it `seconds_left` more seconds (by the
    database's clock); `address` is where clients reach it ("" unknown)."""

    def __init__(self, message: str, *, sid: str, owner: str, seconds_left: float, address: str = ""):
        super().__init__(message)
        self.sid, self.owner, self.seconds_left, self.address = sid, owner, seconds_left, address
