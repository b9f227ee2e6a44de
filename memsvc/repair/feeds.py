"""The feeds log: the model calls a session's cache took, so a rebuild can replay them exactly.

A tiered layer's retrieval and scores depend on how the prompt was cut, so to get *the same* cache back the
model must see the tokens in the same pieces. The session manager logs every model call (the tokens of each
forward call, 0 for an `end_prompt`), undoes the log with the cache when a call is rolled back, and stores it
run-length encoded in the record's `extra["feeds"]`.
"""
from __future__ import annotations

from typing import Sequence

from memsvc.store.records import SessionRecord

FEEDS = "feeds"  # record.extra key: the run-length encoded model calls of the cache


def rle(sizes: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for n in sizes:
        if out and out[-1][0] == n:
            out[-1][1] += 1
        else:
            out.append([n, 1])
    return out


def unrle(pairs) -> list[int] | None:
    """The sizes of a run-length encoded log, or None when it is not one."""
    if not isinstance(pairs, list):
        return None
    out: list[int] = []
    for p in pairs:
        if (not isinstance(p, list) or len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               for x in p) or p[0] < 0 or p[1] < 1):
            return None
        out.extend([p[0]] * p[1])
    return out


def recorded_feeds(rec: SessionRecord) -> list[int] | None:
    """The record's feeds log when it covers exactly the cached tokens (all but the last), else None."""
    feeds = unrle(rec.extra.get(FEEDS))
    if feeds is None or sum(feeds) != max(rec.n_tokens - 1, 0):
        return None
    return feeds


def schedule(rec: SessionRecord, prefill_chunk: int) -> tuple[list[int], bool]:
    """(model calls to rebuild the cache with, exact): the recorded log, or chunks of prefill_chunk."""
    feeds = recorded_feeds(rec)
    if feeds is not None:
        return feeds, True
    n = max(rec.n_tokens - 1, 0)
    return [min(prefill_chunk, n - lo) for lo in range(0, n, prefill_chunk)], False
