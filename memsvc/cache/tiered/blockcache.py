"""`BlockCache`: a bounded, thread-safe LRU of byte-sized entries, shared by many cold stores.

The service keeps two: cold blocks' bytes read back from the store (--block-cache) and each tiered layer's
recently decoded cold keys and values (--decoded-cache, `fair`).
"""
from __future__ import annotations

import threading
from collections import OrderedDict


class BlockCache:
    """A bounded LRU of cold blocks' bytes (`block_bytes`), shareable by many `ColdStore`s; thread-safe.

    Keys are (owner, layer, index): `owner` is whatever the ColdStore was given (the
    service passes the session id), so stores with different owners never see each
    other's blocks. A stored block never changes under its key; an owner whose blocks
    go away (a deleted or replaced session) is dropped with `drop(owner)`.
    hits / misses count `get` calls; `skipped` counts puts that `fair` left out.

    fair: owners share the capacity. An entry that does not fit in the free room is stored only if its owner
    then holds at most its share (capacity / owners holding entries, itself included), and room is made
    from the least recently used entries of owners above their share. So owners that cycle through more than
    the capacity between them (sessions generating at once, each re-reading all its layers every step) each
    keep a stable part of their entries, where plain LRU evicts every entry just before its next use.
    """

    def __init__(self, capacity: int, *, fair: bool = False):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"the block cache needs an integer capacity >= 0 (bytes), got {capacity!r}")
        self.capacity = capacity
        self.fair = bool(fair)
        self._lru: OrderedDict[tuple, tuple[bytes, int]] = OrderedDict()
        self._owned: dict[object, set[tuple]] = {}
        self._owner_bytes: dict[object, int] = {}
        self._size = 0
        self.skipped = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: tuple, count: bool = True) -> bytes | None:
        """count=False: not counted in hits / misses (a lookup of something other than a block)."""
        with self._lock:
            hit = self._lru.get(key)
            if hit is None:
                self.misses += count
                return None
            self._lru.move_to_end(key)
            self.hits += count
            return hit[0]

    def put(self, key: tuple, raw, size: int | None = None) -> None:
        """raw: a block's bytes (size: their length), or any value whose bytes `size` gives."""
        size = len(raw) if size is None else size
        owner = key[0]
        with self._lock:
            self._pop(key)
            if size > self.capacity:
                return
            if self.fair and self._size + size > self.capacity and not self._make_fair_room(owner, size):
                self.skipped += 1
                return
            self._lru[key] = (raw, size)
            self._owned.setdefault(owner, set()).add(key)
            self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + size
            self._size += size
            while self._size > self.capacity:
                self._pop(next(iter(self._lru)))
                self.evictions += 1

    def _make_fair_room(self, owner, size: int) -> bool:
        """Evict entries of owners above their share, least recently used first, until `size` more bytes fit;
        False (nothing evicted) when `owner` would then hold more than its share. Under the lock."""
        share = self.capacity / (len(self._owned) + (owner not in self._owned))
        if self._owner_bytes.get(owner, 0) + size > share:
            return False
        for key in list(self._lru):  # least recently used first
            if self._size + size <= self.capacity:
                break
            if key[0] != owner and self._owner_bytes.get(key[0], 0) > share:
                self._pop(key)
                self.evictions += 1
        return self._size + size <= self.capacity

    def _pop(self, key: tuple) -> None:
        old = self._lru.pop(key, None)
        if old is None:
            return
        self._size -= old[1]
        self._owner_bytes[key[0]] -= old[1]
        keys = self._owned.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._owned[key[0]]
                del self._owner_bytes[key[0]]

    def discard(self, owner, layer: int, index: int) -> None:
        """Forget owner's blocks of `layer` from `index` on, and the layer's entries named other than by an
        index (memsvc.cache.tiered.memo)."""
        with self._lock:
            for key in [k for k in self._owned.get(owner, ()) if k[1] == layer and
                        (not isinstance(k[2], int) or k[2] >= index)]:
                self._pop(key)

    def drop(self, owner) -> int:
        """Forget every block of `owner`; returns how many went."""
        with self._lock:
            keys = list(self._owned.get(owner, ()))
            for key in keys:
                self._pop(key)
            return len(keys)

    def owner_bytes(self, owner) -> int:
        with self._lock:
            return self._owner_bytes.get(owner, 0)

    @property
    def nbytes(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._lru)

    def stats(self) -> dict:
        with self._lock:
            return {"capacity": self.capacity, "bytes": self._size, "blocks": len(self._lru), "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions, "skipped": self.skipped}
