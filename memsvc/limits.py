"""Service limits and per-tenant quotas.

`Limits` is the operator's configuration (0 = no limit). `Quotas` keeps each
tenant's session count and stored bytes: counted from the store the first time
the tenant shows up, then moved by every call that changes them. A call first
*reserves* what it may add (refused with ResourceExhausted if the reservation
would pass the quota), then *settles* what it really added; the reservation
is released either way, so concurrent calls cannot jointly overshoot.

Knows nothing about gRPC, models or LMDB: the caller hands in a scan function.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, fields
from typing import Callable, Iterator

from .errors import ResourceExhausted


@dataclass(frozen=True)
class Limits:
    max_append_tokens: int = 0        # tokens one Append may add
    max_session_tokens: int = 1 << 20  # tokens one session may hold (Append and committed Generate; 0 = no limit)
    max_request_bytes: int = 16 << 20  # one serialized request message (gRPC refuses larger ones)
    max_sessions_per_tenant: int = 0
    max_bytes_per_tenant: int = 0     # stored bytes of all of a tenant's sessions

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"limit {f.name} must be an integer >= 0 (0 = no limit), got {v!r}")
        if self.max_request_bytes == 0:
            raise ValueError("max_request_bytes must be >= 1")

    @property
    def has_quotas(self) -> bool:
        return bool(self.max_sessions_per_tenant or self.max_bytes_per_tenant)


class LimitExceeded(ResourceExhausted):
    """A limit or quota refused the call; `limit` names it (e.g. 'max_append_tokens')."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


def _words(tenant: str) -> str:
    return f"tenant {tenant!r}" if tenant else "this server"


@dataclass
class _Usage:
    sessions: int = 0
    bytes: int = 0
    held_sessions: int = 0
    held_bytes: int = 0


class Quotas:
    """Per-tenant session and byte accounting. scan(tenant) -> (sessions, stored bytes)."""

    def __init__(self, limits: Limits, scan: Callable[[str], tuple[int, int]]):
        self.limits = limits
        self._scan = scan
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    def _get(self, tenant: str) -> _Usage:
        u = self._usage.get(tenant)
        if u is None:
            n, b = self._scan(tenant)
            u = self._usage[tenant] = _Usage(n, b)
        return u

    def usage(self, tenant: str) -> tuple[int, int]:
        """(sessions, stored bytes) of the tenant as counted now."""
        with self._lock:
            u = self._get(tenant)
            return u.sessions, u.bytes

    def _check(self, tenant: str, u: _Usage, sessions: int, nbytes: int) -> None:
        lim = self.limits
        if sessions > 0 and lim.max_sessions_per_tenant:
            have = u.sessions + u.held_sessions
            if have + sessions > lim.max_sessions_per_tenant:
                raise LimitExceeded(
                    "max_sessions_per_tenant",
                    f"session quota exceeded: {_words(tenant)} has {have} sessions, the limit is "
                    f"{lim.max_sessions_per_tenant} sessions per tenant (max_sessions_per_tenant); "
                    f"delete some first")
        if nbytes > 0 and lim.max_bytes_per_tenant:
            have = u.bytes + u.held_bytes
            if have + nbytes > lim.max_bytes_per_tenant:
                raise LimitExceeded(
                    "max_bytes_per_tenant",
                    f"byte quota exceeded: {_words(tenant)} stores {have} bytes, this call may add about "
                    f"{nbytes} more, the limit is {lim.max_bytes_per_tenant} bytes per tenant "
                    f"(max_bytes_per_tenant); delete or shorten sessions first")

    @contextlib.contextmanager
    def hold(self, tenant: str, sessions: int = 0, nbytes: int = 0) -> Iterator[None]:
        """Reserve room for the duration of a call; ResourceExhausted if there is none."""
        if not self.limits.has_quotas:
            yield
            return
        with self._lock:
            u = self._get(tenant)
            self._check(tenant, u, sessions, nbytes)
            u.held_sessions += sessions
            u.held_bytes += nbytes
        try:
            yield
        finally:
            with self._lock:
                u.held_sessions -= sessions
                u.held_bytes -= nbytes

    def forget(self, tenant: str) -> None:
        """Count the tenant from the store again at its next call (after a change no call made: expiry)."""
        with self._lock:
            self._usage.pop(tenant, None)

    def settle(self, tenant: str, sessions: int = 0, nbytes: int = 0) -> None:
        """Record what a call really changed."""
        if not self.limits.has_quotas:
            return
        with self._lock:
            u = self._get(tenant)
            u.sessions = max(u.sessions + sessions, 0)
            u.bytes = max(u.bytes + nbytes, 0)
