"""Leases in the PostgreSQL store: functions over one `Tx`, each the body of one transaction (Db.write).

Expiry is the database's clock (now()), never a replica's. A new owner gets a new epoch from the sequence
lease_epochs (migration 003), so epochs only grow and are never reused; an owner that takes its own lease again
keeps its epoch. A lease keeps the address its owner gave (migration 004: where clients reach it). A commit
checks the epoch inside its transaction (writes.check_epoch, FOR SHARE on the lease row): a takeover's UPDATE
waits for a commit that has passed the check, and a commit waits for a takeover that came first, then fails
the check. A takeover waits at most LOCK_WAIT for the lease row: a commit that does not finish (its replica
paused in its middle) makes it LeaseHeld, naming the owner, rather than a call that hangs; the database ends
such a transaction once it idles past db.IDLE_IN_TRANSACTION, and the takeover goes through.

Knows the leases table; nothing about what a session holds.
"""
from __future__ import annotations

from ..base import Lease
from ..errors import LeaseHeld, LeaseLost
from .db import IDLE_IN_TRANSACTION, Tx

LOCK_WAIT = "1s"  # lock_timeout of a takeover

_ACQUIRE = """
INSERT INTO leases AS l (session_id, owner, epoch, expires_at, address)
VALUES (%(s)s, %(o)s, nextval('lease_epochs'), now() + make_interval(secs => %(t)s), %(a)s)
ON CONFLICT (session_id) DO UPDATE
    SET epoch = CASE WHEN l.owner = EXCLUDED.owner THEN l.epoch ELSE EXCLUDED.epoch END,
        owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at, address = EXCLUDED.address
    WHERE l.owner = EXCLUDED.owner OR l.expires_at <= now()
RETURNING epoch, extract(epoch FROM expires_at - now())::float8"""


def holder(tx: Tx, sid: str) -> tuple[str, int, float, str] | None:
    """(owner, epoch, seconds left, address) of sid's lease, None when there is none."""
    return tx.one("SELECT owner, epoch, extract(epoch FROM expires_at - now())::float8, address FROM leases "
                  "WHERE session_id = %s", (sid,))


def acquire(tx: Tx, sid: str, owner: str, seconds: float, address: str = "") -> Lease:
    """The lease (LockNotAvailable after LOCK_WAIT while a transaction of another holds its row: see `busy`)."""
    tx.write(f"SET LOCAL lock_timeout = '{LOCK_WAIT}'")
    row = tx.one(_ACQUIRE, {"s": sid, "o": owner, "t": seconds, "a": address})
    if row is not None:
        return Lease(sid, owner, row[0], row[1])
    held = holder(tx, sid)  # the row is locked by the INSERT's conflict check until the transaction ends
    at = f" (at {held[3]})" if held[3] else ""
    raise LeaseHeld(f"session {sid!r} is served by {held[0]!r}{at}, whose lease runs {max(held[2], 0.0):.1f} s "
                    f"more", sid=sid, owner=held[0], seconds_left=max(held[2], 0.0), address=held[3])


def busy(tx: Tx, sid: str) -> LeaseHeld:
    """What a takeover that found the lease row locked past LOCK_WAIT says (read outside that transaction)."""
    held = holder(tx, sid)
    owner = "" if held is None else held[0]
    return LeaseHeld(f"session {sid!r} is being changed by {owner or 'another replica'!r}, whose transaction on it "
                     f"did not finish within {LOCK_WAIT} (a replica paused or cut off in the middle of a commit: the "
                     f"database ends it after {IDLE_IN_TRANSACTION:g} s idle); retry", sid=sid, owner=owner,
                     seconds_left=0.0 if held is None else max(held[2], 0.0),
                     address="" if held is None else held[3])


def renew(tx: Tx, lease: Lease, seconds: float) -> Lease:
    row = tx.one("UPDATE leases SET expires_at = now() + make_interval(secs => %s) WHERE session_id = %s AND "
                 "owner = %s AND epoch = %s RETURNING extract(epoch FROM expires_at - now())::float8",
                 (seconds, lease.sid, lease.owner, lease.epoch))
    if row is not None:
        return Lease(lease.sid, lease.owner, lease.epoch, row[0])
    held = holder(tx, lease.sid)
    now = "nobody holds it" if held is None else f"{held[0]!r} holds it at epoch {held[1]}"
    raise LeaseLost(f"the lease of {lease.owner!r} on session {lease.sid!r} at epoch {lease.epoch} was lost: {now}",
                    sid=lease.sid, epoch=lease.epoch, found=None if held is None else held[1],
                    owner=None if held is None else held[0], address="" if held is None else held[3])


def release(tx: Tx, lease: Lease) -> None:
    tx.write("DELETE FROM leases WHERE session_id = %s AND owner = %s AND epoch = %s",
             (lease.sid, lease.owner, lease.epoch))
