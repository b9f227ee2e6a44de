"""Which cache holds a session: one registry from a policy's `cache` name to its class, and the calls that use it.

    cache = new_cache(policy, KVShape.of(model), Backing(...))      # a new session
    cache = load_cache(policy, shape, record_layout, n_cached, backing)   # a stored one

Nothing outside memsvc/cache asks which policy or cache class a session has: it asks these functions, or
the cache itself (memsvc.cache.base.SessionCache).
"""
from __future__ import annotations

from .base import Backing, KVShape, SessionCache
from .full import FullCache
from .tiered.cache import TieredCache
from .tiered.pages import part_name

CACHES = {"full": FullCache, "tiered": TieredCache}


def cache_class(policy):
    try:
        return CACHES[policy.cache]
    except (AttributeError, KeyError):
        raise ValueError(f"policy {getattr(policy, 'name', policy)!r} names no cache class; valid: "
                         f"{', '.join(sorted(CACHES))}") from None


def new_cache(policy, shape: KVShape, backing: Backing | None = None) -> SessionCache:
    """An empty cache of `policy` for a model of `shape`."""
    return cache_class(policy)(policy, shape, backing)


def load_cache(policy, shape: KVShape, layout: dict, n_cached: int, backing: Backing) -> SessionCache:
    """The cache of a stored session (its record's layout, n_cached tokens) from backing.source; an empty
    session gets a new cache."""
    if not n_cached:
        return new_cache(policy, shape, backing)
    return cache_class(policy).load(policy, shape, layout, n_cached, backing)


def expected_entries(policy, source, layout: dict, n_cached: int, damaged: dict) -> tuple[set | None, str | None]:
    """The KV entries a stored session should have, from what is stored; (None, why) when that cannot be told
    (a damaged layer state: only a rebuild knows). damaged: the entries known to be damaged."""
    if not n_cached:
        return set(), None
    return cache_class(policy).expected_entries(source, layout, n_cached, damaged)


def same_entry(policy, key, stored: bytes | None, rebuilt: bytes | None) -> bool:
    """Whether a stored entry holds what a rebuild made (by content where equal states may differ in bytes)."""
    return cache_class(policy).same_entry(key, stored, rebuilt)


def is_final(policy, key) -> bool:
    """Whether an entry never changes once made (a tiered cache's cold blocks)."""
    return cache_class(policy).is_final(key)


def entry_name(key) -> str:
    """A KV entry for people: layer/index ("3/17" for a block, "3/state", "3/sum0", "3/hot5" for a layer state's
    parts)."""
    layer, index = key
    return f"{layer}/{part_name(index)}"
