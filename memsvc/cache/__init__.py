"""memsvc.cache: the tiered, attention-guided KV cache a session's model attends over."""
from .attention import active, use_memsvc_attention
from .cache import TierCache, fp16_bytes_per_token
from .cold import ColdStore, FileBlocks, MemoryBlocks
from .policies import DEFAULT_POLICY, EVICTION, POLICIES, get_policy

__all__ = ["TierCache", "ColdStore", "FileBlocks", "MemoryBlocks", "active", "use_memsvc_attention",
           "fp16_bytes_per_token", "POLICIES", "DEFAULT_POLICY", "EVICTION", "get_policy"]
