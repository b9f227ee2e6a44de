"""Compression policies, by name: the registry lives in `memsvc.cache.policies` (one file each)."""
from memsvc.cache.policies import DEFAULT_POLICY, EVICTION, POLICIES, get_policy, policy_config, stored_policy

POLICY_CONFIG = "policy_config"  # the record's layout key for its policy's settings


def record_policy(rec):
    """The policy a stored session (its SessionRecord) is read with: its own settings where its record keeps them
    (see `stored_policy`). ValueError for a policy or settings this memsvc cannot use."""
    return stored_policy(rec.policy, rec.layout.get(POLICY_CONFIG))


__all__ = ["DEFAULT_POLICY", "EVICTION", "POLICIES", "POLICY_CONFIG", "get_policy", "policy_config", "record_policy",
           "stored_policy"]
