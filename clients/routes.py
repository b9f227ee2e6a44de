"""Where a client sends each call, and whether it sends a failed one again (used by MemoryClient and
AsyncMemoryClient, which do the sending and the sleeping).

Several replicas over one database: the replica serving a session holds its lease, and another one answers a
call on that session with ABORTED, naming the owner and its address in trailing metadata
(memsvc.proto.trailers). With `follow`, the call is sent to that address at once (one hop per try) and the
session's replica is remembered for its next calls; a remembered replica that cannot be reached is forgotten
and the call goes to the home address (the one the client was made with) again. A replica named for the first
time in a try must connect and answer a health check within CONNECT_SECONDS each (a paused one, whose kernel
still accepts connections, would hold the call until its deadline).

With `retry_seconds` > 0, a call that fails with ABORTED (nobody reachable holds the session yet: the lease of a
dead replica not expired, or the session busy) or UNAVAILABLE (the database or a replica down) is tried again
after a backoff (FIRST_DELAY doubling up to MAX_DELAY) until retry_seconds after its first try. A failed call is
sent again, followed or retried, only where repeating it cannot do anything twice:
- reads (Resume, GetSession, ListSessions, GetStats), always;
- a call the server marked retry-safe (memsvc-retry-safe: 1: it failed before any write, or its write was
  rolled back), such as an Append refused because another replica holds the session;
- a call that never left the client (gRPC could not connect to the replica, or its name did not resolve).
Anything else is raised as it came: an Append whose commit may have landed (the database lost at COMMIT),
or one cut off by a replica that died in the middle of it, is never sent twice.

Knows gRPC status codes and memsvc's trailing metadata; sends nothing itself.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from memsvc.proto import trailers

READS = frozenset({"Resume", "GetSession", "ListSessions", "GetStats"})
FIRST_DELAY, MAX_DELAY = 0.05, 1.0  # seconds between tries: doubling from the first to the most
CONNECT_SECONDS = 2.0  # a replica named by another must connect within this
MAX_ROUTES = 10_000  # sessions whose replica is remembered (the oldest forgotten first)
_UNSENT = ("failed to connect to all addresses", "DNS resolution failed", "errors resolving")
_RETRIED = (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE)


@dataclass(frozen=True)
class Failure:
    """What a failed call's status says: owner and address of the replica serving its session ("" none named);
    retry_safe: the server says it changed nothing; unsent: it never reached a server."""

    code: grpc.StatusCode
    owner: str = ""
    address: str = ""
    retry_safe: bool = False
    unsent: bool = False


def failure(err: grpc.RpcError) -> Failure:
    """The Failure of a grpc.RpcError (sync or asyncio)."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    got = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
    md = {k: v for k, v in (got or ())}
    details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    ours = any(k.startswith("memsvc-") for k in md)
    return Failure(code, md.get(trailers.OWNER, ""), md.get(trailers.OWNER_ADDRESS, ""),
                   md.get(trailers.RETRY_SAFE) == "1",
                   code == grpc.StatusCode.UNAVAILABLE and not ours and details.startswith(_UNSENT))


class Routes:
    """The home address, the options, and the replica each followed session was last served by."""

    def __init__(self, home: str, *, follow: bool, retry_seconds: float,
                 gone: Callable[[str], None] = lambda address: None):
        if not isinstance(retry_seconds, (int, float)) or isinstance(retry_seconds, bool) \
                or not math.isfinite(retry_seconds) or retry_seconds < 0:
            raise ValueError(f"retry_seconds must be a finite number of seconds >= 0 (0: no retries), "
                             f"got {retry_seconds!r}")
        self.home, self.follow, self.retry_seconds = home, bool(follow), float(retry_seconds)
        self.gone = gone  # told of a replica (not home) that could not be reached: its channel is dropped
        self._served: dict[str, str] = {}  # session id -> the replica that served it last (not home)
        self._lock = threading.Lock()

    def start(self, method: str, sid: str | None) -> "Attempt":
        """The tries of one call (sid: the session it names; None: it names none, and goes home)."""
        return Attempt(self, method, sid)

    def replica(self, sid: str | None) -> str:
        """Where a call on sid goes first."""
        if sid is None:
            return self.home
        with self._lock:
            return self._served.get(sid, self.home)

    def served(self, sid: str | None, address: str) -> None:
        """A call on sid succeeded at address: its next calls go there."""
        if sid is None or (address == self.home and sid not in self._served):
            return
        with self._lock:
            self._served.pop(sid, None)
            if address != self.home:
                self._served[sid] = address
                if len(self._served) > MAX_ROUTES:
                    del self._served[next(iter(self._served))]

    def forget(self, sid: str | None) -> None:
        if sid is not None:
            with self._lock:
                self._served.pop(sid, None)


class Attempt:
    """One call's tries: `address` is where the next goes; after a failure `retry(err)` says how long to wait
    before it (None: raise err). `following`: the address was named by a replica in this call, check that it
    connects first (`unreachable()` if it does not). `done()` once a try succeeds."""

    def __init__(self, routes: Routes, method: str, sid: str | None):
        self.routes, self.method, self.sid = routes, method, sid
        self.address = routes.replica(sid)
        self.following = False
        self._deadline = time.monotonic() + routes.retry_seconds
        self._delay = FIRST_DELAY
        self._gone: set[str] = set()  # replicas that could not be reached during this call

    def done(self) -> None:
        self.routes.served(self.sid, self.address)

    def unreachable(self) -> None:
        """Nothing could be sent to the replica at `address`: forget it (until the next backoff), go home."""
        self._gone.add(self.address)
        if self.address != self.routes.home:
            self.routes.forget(self.sid)
            self.routes.gone(self.address)
        self.address, self.following = self.routes.home, False

    def retry(self, err: grpc.RpcError) -> float | None:
        f = failure(err)
        if f.code not in _RETRIED or not (f.retry_safe or f.unsent or self.method in READS):
            return None
        hopped, self.following = self.following, False
        if f.unsent and self.address != self.routes.home:  # a remembered or followed replica is gone
            self.unreachable()
            return 0.0
        owner = f.address if (self.routes.follow and f.code == grpc.StatusCode.ABORTED and f.address
                              and f.address not in self._gone and f.address != self.address) else ""
        if owner and not hopped:  # follow at once, one hop: a second one in a row waits like a retry
            self.address, self.following = owner, True
            return 0.0
        left = self._deadline - time.monotonic()
        if left <= 0:
            return None
        wait, self._delay = min(self._delay, left), min(self._delay * 2, MAX_DELAY)
        self._gone.clear()  # after the wait, a replica that did not answer may have come back
        if owner:
            self.address, self.following = owner, True
        return wait
