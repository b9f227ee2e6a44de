"""One writer per session at a time: the calls on one session take turns, in the order they arrived.

    with holds.hold(session_id, "an append"):
        ...  # no other call holds session_id until this block ends

A call that finds the session held waits in line (first come, first served) for at most `wait` seconds; past
that it is refused with `SessionBusy` (ABORTED), naming what holds the session and since when. A streaming
Generate holds its session until it ends or is cancelled. `hold(..., wait=0)` takes the session only if no
call holds or waits for it (idle-session housekeeping: unloading, expiry).

The hold is in-process, and it is the only exclusion between this process's calls on a session. A store shared
by several servers adds a lease on each session a server has in memory (memsvc.sessions.leases: a database row
with a fencing epoch). A lease spans the session's stay in memory, not one call, so it is not taken here: a
call that holds the session takes its lease when it loads the session and gives it up when it drops it.

Knows threads and time; knows nothing about sessions' contents.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..errors import Aborted

DEFAULT_HOLD_WAIT = 60.0


class SessionBusy(Aborted):
    """Another call held the session for longer than this call could wait."""


@dataclass
class _Line:
    """The calls on one session: the one at the front holds it, the others wait behind it."""

    turn: threading.Condition
    tickets: deque = field(default_factory=deque)
    what: str = ""  # what the front call is, e.g. "a generate"
    since: float = 0.0  # when it took the session (time.monotonic())


class Holds:
    """wait: seconds a call may wait for a session another call holds (0: refuse at once; must be finite)."""

    def __init__(self, wait: float = DEFAULT_HOLD_WAIT):
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not math.isfinite(wait) or wait < 0:
            raise ValueError(f"hold wait must be a finite number of seconds >= 0, got {wait!r}")
        self.wait = float(wait)
        self.waited: Callable[[float], None] | None = None  # told how long each call waited in line (s)
        self._mutex = threading.Lock()
        self._lines: dict[str, _Line] = {}

    @contextlib.contextmanager
    def hold(self, sid: str, what: str = "a call", wait: float | None = None) -> Iterator[None]:
        """Hold sid for the block; wait: this call's bound (None: the Holds' own)."""
        limit = self.wait if wait is None else wait
        ticket = object()
        with self._mutex:
            line = self._lines.get(sid)
            if line is None:
                line = self._lines[sid] = _Line(threading.Condition(self._mutex))
            if limit == 0 and line.tickets:
                raise self._busy(sid, line, what, 0.0)
            line.tickets.append(ticket)
            arrived = time.monotonic()
            while line.tickets[0] is not ticket:
                left = arrived + limit - time.monotonic()
                if left <= 0:
                    line.tickets.remove(ticket)
                    self._tell(limit)
                    raise self._busy(sid, line, what, limit)
                line.turn.wait(left)
            line.what, line.since = what, time.monotonic()
        if limit > 0:  # a call (housekeeping takes idle sessions only: wait 0)
            self._tell(line.since - arrived)
        try:
            yield
        finally:
            with self._mutex:
                line.tickets.popleft()
                if line.tickets:
                    line.turn.notify_all()
                else:
                    del self._lines[sid]

    def _tell(self, seconds: float) -> None:
        if self.waited is not None:
            self.waited(seconds)

    def held(self, sid: str) -> bool:
        """Whether a call holds or waits for sid now."""
        with self._mutex:
            return sid in self._lines

    @staticmethod
    def _busy(sid: str, line: _Line, what: str, waited: float) -> SessionBusy:
        age = time.monotonic() - line.since
        return SessionBusy(
            f"session {sid!r} is held by another call ({line.what}, for {age:.1f} s, {len(line.tickets) - 1} more "
            f"waiting) and this call ({what}) waited {waited:g} s for it (the server's --hold-wait): calls on one "
            f"session run one at a time, in arrival order; retry later, or give each client its own session "
            f"(ForkSession)")
