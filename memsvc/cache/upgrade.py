"""`memsvc sessions upgrade` for one session: its stored form brought to today's layout, in place.

Older stored forms load (a tiered layer state of an older layout goes through memsvc.cache.tiered.upgrade);
this writes them back in today's: the session's cache is loaded from its entries and whatever its `changes()`
then holds (a tiered layer read from an older layout: every part, in today's layout) is rewritten in one store
transaction; a session already in today's layout writes nothing. A record that does not keep its policy's
settings gets the ones it is read with now (this memsvc's defaults), so that later defaults cannot change how
it is read. The cache the session loads into does not change.
"""
from __future__ import annotations

import dataclasses

import torch

from .base import Backing, KVShape
from .factory import load_cache
from .policies import POLICY_CONFIG, policy_config, record_policy
from .storage import StoreEntries


@dataclasses.dataclass
class Upgraded:
    entries: int = 0  # KV entries written again in today's layout
    pinned: bool = False  # the record now keeps its policy's settings


def upgrade_session(store, sid: str) -> Upgraded:
    """ValueError when the session's policy or settings cannot be used here (left as it is)."""
    rec = store.get(sid)
    policy = record_policy(rec)
    out = Upgraded()
    n_cached = max(rec.n_tokens - 1, 0)
    if n_cached:
        lay = rec.layout
        shape = KVShape(lay["layers"], lay["kv_heads"], lay["head_dim"], torch.float32, torch.device("cpu"))
        cache = load_cache(policy, shape, lay, n_cached, Backing(StoreEntries(store, sid)))
        ch = cache.changes()
        if ch.payloads or ch.drop:
            store.rewrite_kv(sid, n_tokens=rec.n_tokens, blocks=ch.payloads, block_tokens=ch.tokens, drop=ch.drop)
            out.entries = len(ch.payloads)
    if POLICY_CONFIG not in rec.layout:
        rec = store.get(sid)  # as the rewrite left it
        store.commit(dataclasses.replace(rec, layout={**rec.layout, POLICY_CONFIG: policy_config(policy)}),
                     first_token=rec.n_tokens, tokens=[], blocks={})
        out.pinned = True
    return out
