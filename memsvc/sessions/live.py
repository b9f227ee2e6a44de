"""What the session manager keeps of each session, and what it shows of it.

`_Live`: a session in memory (its record, token ids, cache and feeds log), measured by the call that holds it;
`SessionView`: what a view or listing reports; `Counters`: the manager's totals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from memsvc.cache import SessionCache
from memsvc.store.records import SessionRecord

# A caller's admission check: admit(record, n) runs while the call holds the session, before
# the model reads anything, with n the most tokens the call can add to the session;
# it raises (e.g. ResourceExhausted) to refuse, and then nothing has changed.
Admit = Callable[[SessionRecord, int], None]


@dataclass
class Counters:
    model_tokens_processed: int = 0
    tokens_appended: int = 0
    tokens_generated: int = 0
    resumes: int = 0  # Resume calls
    loads: int = 0  # sessions read back from the store into memory (by any call)
    unloads: int = 0  # idle sessions dropped from memory to keep within the resident budget
    expired: int = 0  # sessions deleted because their ttl passed
    repairs: int = 0  # sessions rebuilt from their token ids because stored KV entries were damaged
    blocks_repaired: int = 0  # KV entries those repairs wrote again
    kv_entries_written: int = 0  # KV entries commits wrote (new cold blocks, changed layer state parts)
    kv_bytes_written: int = 0  # their payload bytes, before compression


@dataclass
class _Live:
    record: SessionRecord
    tokens: list[int]
    kv: SessionCache  # holds every token but the last (the pending one)
    feeds: list[int] | None = None  # the model calls kv took (tokens each, 0 = end_prompt); None: not known
    resident_bytes: int = 0  # kv's, as last measured by the call holding the session
    tier_tokens: dict[str, float] = field(default_factory=dict)
    tier_bytes: dict[str, int] = field(default_factory=dict)
    epoch: int | None = None  # the fencing epoch of the lease held on it (None: the store needs no leases)

    def measure(self) -> None:
        """The caller holds the session."""
        self.resident_bytes = self.kv.resident_bytes()
        self.tier_tokens = self.kv.tier_tokens()
        self.tier_bytes = self.kv.tier_bytes()


@dataclass
class SessionView:
    record: SessionRecord
    resident: bool
    resident_bytes: int = 0
    tier_tokens: dict[str, float] = field(default_factory=dict)
    default_ttl: float = 0.0  # the manager's ttl, for sessions without their own

    @property
    def ttl(self) -> float:
        """Seconds without a change after which the session expires (0 = never)."""
        return self.record.ttl or self.default_ttl

    @property
    def expires(self) -> float:
        """Unix time at which the session expires (infinity = never)."""
        return self.record.expires(self.default_ttl)

    @property
    def fp16_bytes_per_token(self) -> int:
        lay = self.record.layout
        return 2 * 2 * lay.get("layers", 0) * lay.get("kv_heads", 0) * lay.get("head_dim", 0)
