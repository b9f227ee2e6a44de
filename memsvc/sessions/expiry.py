"""Sessions that expire: deleted once `ttl` seconds pass without a change (a mixin of `SessionManager`).

A session's own ttl (set at create) overrides the manager's; 0 = never. An expired session is deleted when a
call, a view or a listing meets it, and by a sweep every `sweep_every` seconds; the store checks the expiry
again inside its delete transaction, so a commit that just refreshed the session wins. A session a call is
using is left for later.
"""
from __future__ import annotations

import contextlib
import logging
import time

from memsvc.store.errors import CorruptRecord, StoreError
from memsvc.store.records import SessionRecord

from ..errors import NotFound
from .hold import SessionBusy

log = logging.getLogger("memsvc.sessions")


class Expiry:
    def _expired(self, rec: SessionRecord) -> bool:
        return rec.expires(self.ttl) <= time.time()

    def _try_expire(self, sid: str, *, locked: bool = False) -> bool:
        """Delete sid if it has expired; True when it was. Without `locked` (the caller holds sid) a
        session that a call is using or waiting for is left alone."""
        with contextlib.ExitStack() as stack:
            if not locked:
                try:
                    stack.enter_context(self.holds.hold(sid, "an expiry", wait=0))
                except SessionBusy:
                    return False
            try:
                rec = self.store.get(sid)
            except CorruptRecord:
                return False
            if rec is None or not self.store.delete(sid, expired_at=time.time(), default_ttl=self.ttl):
                return False
            self._forget(sid)
        self._count(expired=1)
        if self.on_expire is not None:
            self.on_expire(rec)
        return True

    def _gone(self, sid: str) -> NotFound:
        return NotFound(f"no session {sid!r} (it expired and was deleted)")

    def sweep(self) -> int:
        """Delete every expired session that no call is using; returns how many went."""
        return sum(self._try_expire(sid) for sid in self.store.expired(time.time(), self.ttl))

    def _sweep_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.sweep()
            except StoreError as exc:
                if self.store.closed:
                    return  # the server stopped
                log.warning("ttl sweep failed: %s", exc)
            except Exception:
                log.exception("ttl sweep failed")
