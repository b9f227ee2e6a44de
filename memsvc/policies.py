"""Compression policies, by name: the registry lives in `memsvc.cache.policies` (one file each)."""
from memsvc.cache.policies import DEFAULT_POLICY, EVICTION, POLICIES, get_policy, policy_config, stored_policy

__all__ = ["DEFAULT_POLICY", "EVICTION", "POLICIES", "get_policy", "policy_config", "stored_policy"]
