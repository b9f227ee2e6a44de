"""`SessionCache`: one session's KV cache, as everything outside memsvc/cache sees it.

The session manager, repair, the evaluation and the CLI hold a session's cache through this surface only;
which policy or cache class it is stays inside memsvc/cache (the factory picks the class from the policy).
A SessionCache is a transformers `Cache` too: the model is called with `cache=` it, inside `attending()`
(memsvc.cache.forward.run does both).

Stored form: a cache's persistent part is a set of KV entries, bytes keyed by (layer, index), that a
commit writes; `changes()` says which to write and which to drop since the last `committed()`, and
`load` rebuilds the cache from them (lazily where the layout allows: a tiered cache reads its cold blocks
only when retrieval picks them). Entries `is_final` (a tiered cache's cold blocks) never change once made.

Knows tensors and the transformers Cache API; knows nothing about gRPC or which store holds the entries.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .rope import Rope

Key = tuple[int, int]  # (layer, index) of a KV entry


@dataclass(frozen=True)
class KVShape:
    """What a model's caches hold per token: layers x KV heads x head dim, in dtype, on device; and what one
    step may attend: `window` positions (the model's context; 0 = unknown) under its `rope` (None: positions
    that cannot be moved, so a session stays within the window)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    window: int = 0
    rope: Rope | None = None

    def __post_init__(self):
        if min(self.layers, self.kv_heads, self.head_dim) < 1:
            raise ValueError(f"a KV shape needs layers, kv_heads and head_dim >= 1, got {self}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0 = unknown), got {self.window}")

    @classmethod
    def of(cls, model) -> "KVShape":
        """The shape of a LoadedModel's caches."""
        return cls(model.num_layers, model.num_kv_heads, model.head_dim, model.dtype, torch.device(model.device),
                   model.max_positions, Rope.of(model.model))

    @property
    def fp16_bytes_per_token(self) -> int:
        """What one token's keys and values take at fp16 (the reference of compression ratios)."""
        return fp16_bytes_per_token(self.layers, self.kv_heads, self.head_dim)


def fp16_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    return n_layers * n_kv_heads * head_dim * 2 * 2


@dataclass
class Changes:
    """What a commit writes: new or changed entries (with the tokens each holds) and entries to drop."""

    payloads: dict[Key, bytes] = field(default_factory=dict)
    tokens: dict[Key, int] = field(default_factory=dict)
    drop: list[Key] = field(default_factory=list)


class EntrySource(Protocol):
    """A session's stored KV entries, read-only (memsvc.cache.storage.StoreEntries over a Store)."""

    resident: bool  # False: the entries live elsewhere (they are not the cache's resident bytes)

    def read(self, layer: int, index: int) -> bytes | None: ...

    def read_many(self, layer: int, indices: list[int]) -> list[bytes | None]: ...

    def read_keys(self, keys: list[Key]) -> list[bytes | None]: ...  # across layers, in one store read

    def read_all(self) -> dict[Key, bytes]: ...

    def keys(self) -> list[Key]: ...


@dataclass
class Backing:
    """Where a new or loaded cache reads its stored entries, and the caches it may share with others.

    source: the session's stored entries (None: a cache whose entries stay in this process: the evaluation,
    the tests); block_cache / decoded_cache: LRUs shared by every session of a server (memsvc.cache.tiered.
    blockcache.BlockCache; None: a private one of private_cache_bytes / none); owner: this cache's key in them
    (a session id and a load counter: a reloaded session never meets stale entries)."""

    source: object | None = None
    block_cache: object | None = None
    decoded_cache: object | None = None
    owner: object | None = None
    private_cache_bytes: int = 1 << 20


class SessionCache(Protocol):
    policy: object

    @property
    def length(self) -> int:
        """Tokens the cache holds (the session's tokens but the pending last one)."""

    def attending(self) -> AbstractContextManager:
        """Around each model call made with cache=self."""

    def end_prompt(self) -> None:
        """The prompt is complete (SnapKV-style policies compress it here)."""

    def checkpoint(self) -> object: ...

    def restore(self, snap: object) -> None:
        """Undo everything since `checkpoint()` (an uncommitted Append or Generate)."""

    def changes(self) -> Changes:
        """The entries the next commit writes or drops (all of them for a cache never committed)."""

    def committed(self) -> None:
        """The last `changes()` are stored."""

    def final_entries(self) -> Changes:
        """Entries made so far that never change again and are not committed yet (a rebuild of damaged final
        entries can stop once it made them)."""

    def flush(self) -> None:
        """Write pending final entries to a backing the cache owns itself (an evaluation's file); no-op
        where a commit writes them."""

    def close(self) -> None:
        """The session left memory: drop its entries from the shared caches."""

    def resident_bytes(self) -> int: ...

    def stored_bytes(self) -> int:
        """What the entries take where they are kept (a commit's store counts its own)."""

    def tier_tokens(self) -> dict[str, float]: ...

    def tier_bytes(self) -> dict[str, int]: ...

    def stats(self) -> dict[str, int]:
        """Counters of the cache's reads (cold blocks read, reused, skipped); {} where there are none."""

    def layout(self) -> dict:
        """What a record keeps to load the cache again (layers, heads, dims, dtype, block size, form)."""

    def max_tokens(self) -> int | None:
        """The most tokens the session can hold (the model's window for a cache that attends all it holds at
        their own positions), or None when only the store bounds it."""
