"""A session's KV entries in a Store, as the caches read them (`EntrySource`).

`StoreEntries(store, sid)` reads one session's entries (one, a layer's many or any keys across layers in one store
read, or all);
`CheckedEntries` raises `DamagedBlock` for an entry that fails its checks, so that the session manager can
tell a damaged entry from other errors, repair the session from its token ids and run the call again. A
cache never writes through these: a session's entries are written by its commit.
"""
from __future__ import annotations

from memsvc.store.errors import CorruptRecord


class DamagedBlock(Exception):
    """A KV entry failed its checks while a call was reading it."""

    def __init__(self, sid: str, layer: int, index: int, cause: Exception):
        super().__init__(f"session {sid!r}: KV block (layer {layer}, block {index}) is damaged: {cause}")
        self.sid, self.layer, self.index, self.cause = sid, layer, index, cause


class StoreEntries:
    resident = False
    writable = False

    def __init__(self, store, sid: str):
        self.store, self.sid = store, sid

    def read(self, layer: int, index: int) -> bytes | None:
        return self.store.kv_block(self.sid, layer, index)

    def read_many(self, layer: int, indices: list[int]) -> list[bytes | None]:
        return self.store.kv_blocks_at(self.sid, layer, indices)

    def read_keys(self, keys: list[tuple[int, int]]) -> list[bytes | None]:
        """The entry of each (layer, index), across layers, in one store read (PostgreSQL: one round trip)."""
        return self.store.kv_blocks_for(self.sid, keys)

    def read_all(self) -> dict[tuple[int, int], bytes]:
        return self.store.kv_blocks(self.sid)

    def keys(self) -> list[tuple[int, int]]:
        return self.store.kv_keys(self.sid)

    def write(self, blocks) -> None:
        raise RuntimeError("a session's entries are written by its commit, not by its cache")

    def nbytes(self) -> int:
        return 0  # counted by the store (the record's stored_bytes)


class CheckedEntries(StoreEntries):
    """`StoreEntries` whose damaged reads raise `DamagedBlock`."""

    def read(self, layer: int, index: int) -> bytes | None:
        try:
            return super().read(layer, index)
        except CorruptRecord as exc:
            raise DamagedBlock(self.sid, layer, index, exc) from exc

    def read_many(self, layer: int, indices: list[int]) -> list[bytes | None]:
        try:
            return super().read_many(layer, indices)
        except CorruptRecord:  # which one: read them one by one (DamagedBlock names the first)
            return [self.read(layer, index) for index in indices]

    def read_keys(self, keys: list[tuple[int, int]]) -> list[bytes | None]:
        try:
            return super().read_keys(keys)
        except CorruptRecord:  # which one: read them one by one (DamagedBlock names the first)
            return [self.read(layer, index) for layer, index in keys]

    def read_all(self) -> dict[tuple[int, int], bytes]:
        try:
            return super().read_all()
        except CorruptRecord as exc:
            raise DamagedBlock(self.sid, -1, -1, exc) from exc


class NoEntries:
    """Nothing stored and nothing kept: new final entries stay pending (a rebuild collects them there)."""

    resident = False
    writable = False

    def read(self, layer, index):
        return None

    def read_many(self, layer, indices):
        return [None] * len(indices)

    def read_keys(self, keys):
        return [None] * len(keys)

    def read_all(self):
        return {}

    def keys(self):
        return []

    def write(self, blocks):
        raise RuntimeError("a rebuilt cache is never flushed")

    def nbytes(self):
        return 0
