"""memsvc.cache: a session's KV cache. One `SessionCache` surface (base.py), the full and tiered caches beside it
(full.py, tiered/), a factory that picks one from a policy (factory.py), the policies (policies/), the one
forward path (forward.py) and where the caches read stored entries (storage.py)."""
from .base import Backing, Changes, KVShape, SessionCache, fp16_bytes_per_token
from .factory import cache_class, entry_name, expected_entries, is_final, load_cache, new_cache, same_entry
from .forward import run
from .policies import (DEFAULT_POLICY, EVICTION, POLICIES, POLICY_CONFIG, fit_policy, get_policy, policy_config,
                       record_policy)
from .storage import CheckedEntries, DamagedBlock, NoEntries, StoreEntries

__all__ = ["Backing", "Changes", "KVShape", "SessionCache", "fp16_bytes_per_token", "cache_class", "entry_name", "expected_entries",
           "is_final", "load_cache", "new_cache", "same_entry", "run", "DEFAULT_POLICY", "EVICTION", "POLICIES",
           "POLICY_CONFIG", "fit_policy", "get_policy", "policy_config", "record_policy", "CheckedEntries", "DamagedBlock",
           "NoEntries", "StoreEntries"]
