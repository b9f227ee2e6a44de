"""Checking a stored session: every record, token block, KV pointer and blob, and no entry missing or stray.

Which entries a session should have comes from its cache class (memsvc.cache.expected_entries): every block of
a `full` session, the layer heads and what they list for a tiered one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from memsvc.cache import StoreEntries, entry_name, expected_entries, record_policy


@dataclass
class Check:
    """What is wrong with one session."""
    sid: str
    record: str | None = None  # the record's damage
    tokens: dict = field(default_factory=dict)  # index -> damage
    kv: dict = field(default_factory=dict)  # (layer, index) -> damage (damaged, missing or stray)
    other: list = field(default_factory=list)
    n_tokens: int = 0
    kv_entries: int = 0
    note: str | None = None  # why the expected entries could not be told (a damaged layer state)

    @property
    def damaged(self) -> bool:
        return bool(self.record or self.tokens or self.kv or self.other)

    @property
    def repairable(self) -> bool:
        return not (self.record or self.tokens)

    def as_dict(self) -> dict:
        return {"id": self.sid, "ok": not self.damaged, "repairable": self.repairable, "n_tokens": self.n_tokens,
                "kv_entries": self.kv_entries, "record": self.record,
                "tokens": {str(k): v for k, v in sorted(self.tokens.items())},
                "kv": {entry_name(k): v for k, v in sorted(self.kv.items())}, "other": self.other, "note": self.note}


def check_session(store, sid: str) -> Check:
    """Check every stored entry of a session (record, token blocks, KV pointers, blobs, reference counts)
    and that no KV entry is missing or stray."""
    raw = store.check_session(sid)
    out = Check(sid, record=raw["record"], tokens=dict(raw["tokens"]), kv=dict(raw["kv"]),
                other=list(raw["bad_keys"]), kv_entries=raw["kv_entries"])
    if out.record:
        return out
    rec = store.get(sid)
    out.n_tokens = rec.n_tokens
    try:
        policy = record_policy(rec)
    except ValueError as exc:
        out.note = f"its entries cannot be told: {exc}"
        return out
    want, out.note = expected_entries(policy, StoreEntries(store, sid), rec.layout, max(rec.n_tokens - 1, 0), out.kv)
    if want is not None:
        have = set(store.kv_keys(sid))
        for key in sorted(want - have):
            out.kv[key] = "missing"
        for key in sorted(have - want):
            out.kv.setdefault(key, "stray: the session's layout has no such entry")
    return out
