"""The leases this process holds on the sessions it has in memory, over a store shared by replicas.

Before a session is loaded into memory its lease is taken (`take`); while it stays in memory the lease is
renewed, by a background thread every third of its term and by a call that finds its last renewal older than
that (`keep`); when the session leaves memory the lease is given up (`drop`). A session whose lease was lost
(another replica took it over after this one paused past its expiry), or whose last commit failed with the
database unreachable (it may or may not have landed), is marked stale: the next call drops it from memory and
loads it again, under a lease taken anew, so what it serves is what is stored.

A lease carries `address`, where clients reach this replica (`memsvc serve --advertise`), so that a replica
that cannot take a live lease can name it to the client (Aborted's owner and address).

An embedded store (LMDB) needs no leases (acquire_lease gives None): nothing is held, nothing renewed.
Knows the store's lease methods; nothing about caches or gRPC. Calls on one session take turns through
memsvc.sessions.hold, and only a call that holds a session takes, keeps or drops its lease (the renewing thread
only renews); this adds no in-process lock of its own beyond the one that guards its bookkeeping.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable

from memsvc.store.base import Lease, Store
from memsvc.store.errors import LeaseHeld, LeaseLost, OutcomeUnknown, StoreError, StoreUnavailable

from ..errors import Aborted

log = logging.getLogger("memsvc.sessions")


def replica_name() -> str:
    """This process's name as a lease owner: host, pid and a random tag (a restarted process is a new owner)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """seconds: a lease's term; renew: whether a background thread renews the leases held (off: only calls
    renew them, as a paused replica would not); address: where clients reach this replica (host:port, ""
    unknown), kept with each lease taken (the server sets it once bound, before it serves)."""

    def __init__(self, store: Store, seconds: float = 30.0, *, owner: str | None = None, renew: bool = True,
                 resident: Callable[[], list[str]] = list, address: str = ""):
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds <= 86400:
            raise ValueError(f"lease_seconds must be a number of seconds in (0, 86400], got {seconds!r}")
        self.store, self.seconds = store, float(seconds)
        self.owner = owner or replica_name()
        self.address = address
        self.resident = resident  # the sessions in memory: only theirs are renewed
        self._held: dict[str, tuple[Lease, float]] = {}  # sid -> (lease, monotonic time of its last renewal)
        self._stale: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="memsvc-leases", daemon=True) if renew else None

    def take(self, sid: str) -> int | None:
        """Hold sid's lease before it is loaded; its epoch (None: the store needs none). Aborted naming the owner
        while another replica holds a live lease on it."""
        try:
            lease = self.store.acquire_lease(sid, self.owner, self.seconds, self.address)
        except LeaseHeld as exc:
            at = f" at {exc.address}" if exc.address else ""
            raise Aborted(f"session {sid!r} is being served by another replica, {exc.owner!r}{at} (its lease runs "
                          f"{exc.seconds_left:.1f} s more): send the call there, or retry once it expires",
                          owner=exc.owner, address=exc.address) from exc
        except OutcomeUnknown as exc:  # only this replica's own lease may have changed: the session did not
            raise StoreUnavailable(str(exc)) from exc
        with self._lock:
            self._stale.discard(sid)
            if lease is not None:
                self._held[sid] = (lease, time.monotonic())
                if self._renewer is not None and not self._renewer.is_alive() and not self._stop.is_set():
                    self._renewer.start()  # at the first lease: an embedded store never needs the thread
        return None if lease is None else lease.epoch

    def keep(self, sid: str) -> bool:
        """Whether the session in memory may still be served (renewing its lease when due); False: drop it and
        load it again."""
        with self._lock:
            if sid in self._stale:
                return False
            held = self._held.get(sid)
        if held is None or time.monotonic() - held[1] < self.seconds / 3:
            return True
        return self._renew(sid, held[0])

    def stale(self, sid: str) -> None:
        """The session's memory may differ from the store (a lost lease, an unsure commit): reload it next."""
        with self._lock:
            self._stale.add(sid)

    def drop(self, sid: str) -> None:
        """The session left memory: give its lease up (best effort: unreachable, it simply expires)."""
        with self._lock:
            held = self._held.pop(sid, None)
        if held is not None:
            try:
                self.store.release_lease(held[0])
            except StoreError as exc:
                log.info("session %s: lease not released (%s); it expires by itself", sid, exc)

    def close(self) -> None:
        """Stop renewing and give every lease up."""
        self._stop.set()
        for sid in list(self._held):
            self.drop(sid)

    def _renew(self, sid: str, lease: Lease) -> bool:
        try:
            renewed = self.store.renew_lease(lease, self.seconds)
        except OutcomeUnknown as exc:  # a renewal, repeated at will: the session itself did not change
            raise StoreUnavailable(str(exc)) from exc
        except LeaseLost as exc:
            log.warning("session %s: %s; it is dropped from memory", sid, exc)
            with self._lock:
                self._held.pop(sid, None)
                self._stale.add(sid)
            return False
        with self._lock:
            if sid in self._held:
                self._held[sid] = (renewed or lease, time.monotonic())
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            resident = set(self.resident())
            with self._lock:
                held = list(self._held.items())
            for sid, (lease, renewed) in held:
                if sid not in resident:  # being loaded (renewed once it is in memory), or a load that failed
                    if time.monotonic() - renewed > self.seconds:
                        with self._lock:  # expired by now: forget it (unless taken again meanwhile)
                            if self._held.get(sid, (None,))[0] is lease:
                                del self._held[sid]
                    continue
                try:
                    self._renew(sid, lease)
                except StoreError as exc:  # the database unreachable: try again next round
                    log.info("session %s: lease not renewed: %s", sid, exc)
