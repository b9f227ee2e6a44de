"""Where cold blocks live, and the LRU of packed blocks in front of them (`blockcache.BlockCache`).

A cold block is the packed keys and values of `block` tokens of one layer
(all KV heads), as the codecs wrote them. Backends:
- `MemoryBlocks`: a dict in this process (the blocks count as resident);
- `FileBlocks`: an append-only file on disk, read back with pread;
- a session's entries in the service's store (`memsvc.cache.storage.StoreEntries`).
`ColdStore` puts new blocks in `pending` until the owner flushes them to the
backend (the service does that inside its commit transaction), and keeps
recently read (and just flushed) blocks' bytes in a `BlockCache`: its own of
`cache_bytes`, or one LRU shared by every session of a server, keyed by owner
(the session id), layer and index. `get_stacked` parses the keys (or values)
of many blocks of a layer at once, into the one record the codec decodes.
Pending blocks, a private cache and in-memory backends count as a store's
resident bytes; a shared cache is bounded and counted on its own.
"""
from __future__ import annotations

import os
import struct
import tempfile
import threading
from typing import Protocol

import torch

from memsvc.kernels.codec import Packed

from .blockcache import BlockCache

_LEN = struct.Struct("<I")


def block_bytes(k: Packed, v: Packed) -> bytes:
    kb = k.to_bytes()
    return _LEN.pack(len(kb)) + kb + v.to_bytes()


def _halves(raw: bytes | memoryview) -> tuple[memoryview, memoryview]:
    """A block's bytes -> its keys' and values' records."""
    raw = memoryview(raw)
    if len(raw) < _LEN.size:
        raise ValueError("cold block is truncated")
    (n,) = _LEN.unpack_from(raw, 0)
    if _LEN.size + n > len(raw):
        raise ValueError("cold block is truncated")
    return raw[_LEN.size:_LEN.size + n], raw[_LEN.size + n:]


def block_from_bytes(raw: bytes | memoryview) -> tuple[Packed, Packed]:
    k, v = _halves(raw)
    return Packed.from_bytes(k), Packed.from_bytes(v)


class Backend(Protocol):
    resident: bool  # its blocks count as resident bytes
    writable: bool  # the cold store may write pending blocks to it (else a commit stores them)

    def read(self, layer: int, index: int) -> bytes | None: ...

    def write(self, blocks: dict[tuple[int, int], bytes]) -> None: ...

    def nbytes(self) -> int: ...


class MemoryBlocks:
    """Blocks kept decoded-ready (as `Packed` pairs) in this process."""

    resident = True
    writable = True

    def __init__(self):
        self.blocks: dict[tuple[int, int], tuple[Packed, Packed, int]] = {}

    def read(self, layer, index):
        hit = self.blocks.get((layer, index))
        return None if hit is None else block_bytes(hit[0], hit[1])

    def write(self, blocks):
        for key, raw in blocks.items():
            k, v = block_from_bytes(raw)
            self.blocks[key] = (k, v, len(raw))

    def nbytes(self):
        return sum(s for _, _, s in self.blocks.values())


class FileBlocks:
    """Blocks appended to one file (a temporary one unless a path is given)."""

    resident = False
    writable = True

    def __init__(self, path: str | None = None):
        if path is None:
            fd, path = tempfile.mkstemp(prefix="memsvc-cold-")
            os.unlink(path)  # gone when closed
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.fd = fd
        self.where: dict[tuple[int, int], tuple[int, int]] = {}
        self.size = os.fstat(fd).st_size
        self._lock = threading.Lock()

    def read(self, layer, index):
        at = self.where.get((layer, index))
        return None if at is None else os.pread(self.fd, at[1], at[0])

    def write(self, blocks):
        with self._lock:
            for key, raw in blocks.items():
                os.write(self.fd, raw)
                self.where[key] = (self.size, len(raw))
                self.size += len(raw)

    def nbytes(self):
        return sum(n for _, n in self.where.values())

    def close(self):
        os.close(self.fd)

    def __del__(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


class ColdStore:
    """pending blocks + a `BlockCache` of read blocks over a backend.

    cache: a BlockCache shared with other stores (its bytes are the cache's, not this
    store's resident bytes), read and written under `owner`; without one the store
    keeps a private cache of `cache_bytes`, counted as resident. hits / misses count
    this store's reads (pending blocks and in-memory backends count as hits).
    decoded: a BlockCache (shared too, bounded on its own) where each layer's recently decoded keys and values
    stay (in room for twice a read's blocks), so that the next calls' retrieval, which picks mostly the same
    blocks, decodes only the new ones, and the layer's tensors derived from its state (memsvc.cache.tiered.memo);
    None: every read decodes.
    """

    def __init__(self, backend=None, cache_bytes: int = 1 << 20, *, cache: BlockCache | None = None,
                 owner=None, decoded: BlockCache | None = None):
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.backend = backend if backend is not None else MemoryBlocks()
        self.shared = cache is not None
        self.cache = cache if cache is not None else BlockCache(cache_bytes)
        self.owner = owner if owner is not None else object()
        self.pending: dict[tuple[int, int], bytes] = {}
        self.decoded = decoded
        self.hits = 0
        self.misses = 0

    @property
    def cache_bytes(self) -> int:
        return self.cache.capacity

    def put(self, layer: int, index: int, k: Packed, v: Packed) -> None:
        if isinstance(self.backend, MemoryBlocks):  # nothing to flush: keep the objects
            self.backend.blocks[(layer, index)] = (k, v, k.nbytes() + v.nbytes() + _LEN.size)
            return
        self.pending[(layer, index)] = block_bytes(k, v)

    def get(self, layer: int, index: int) -> tuple[Packed, Packed]:
        return self.get_many(layer, [index])[0]

    def get_many(self, layer: int, indices: list[int]) -> list[tuple[Packed, Packed]]:
        """get() of each index, in order; the blocks not in memory are read from the backend together
        (one store transaction for a backend with read_many)."""
        if isinstance(self.backend, MemoryBlocks):
            return [self._held(layer, index) for index in indices]
        return [block_from_bytes(raw) for raw in self._raw_many(layer, indices)]

    def get_stacked(self, layer: int, indices: list[int], half: int) -> Packed:
        """The keys (half 0) or values (half 1) of blocks `indices` of `layer`, in order, as one Packed
        [U, ...]: `stack_packed` of get_many's, parsed once for all of them."""
        if half not in (0, 1):
            raise ValueError(f"half must be 0 (keys) or 1 (values), got {half!r}")
        if isinstance(self.backend, MemoryBlocks):
            return stack_packed([self._held(layer, index)[half] for index in indices])
        return Packed.stack_from_bytes([_halves(raw)[half] for raw in self._raw_many(layer, indices)])

    def _held(self, layer: int, index: int) -> tuple[Packed, Packed]:
        hit = self.backend.blocks.get((layer, index))
        if hit is None:
            raise KeyError(f"cold block (layer {layer}, block {index}) is not stored")
        self.hits += 1
        return hit[0], hit[1]

    def _raw_many(self, layer: int, indices: list[int]) -> list[bytes]:
        """The bytes of each block, in order: pending, cached, or read from the backend together (one store
        transaction for a backend with read_many), then cached."""
        out: list = [None] * len(indices)
        missing = []
        for i, index in enumerate(indices):
            hit = self.pending.get((layer, index))
            if hit is None:
                hit = self.cache.get((self.owner, layer, index))
            if hit is None:
                missing.append(i)
            else:
                self.hits += 1
                out[i] = hit
        if missing:
            wanted = [indices[i] for i in missing]
            read_many = getattr(self.backend, "read_many", None)
            raws = read_many(layer, wanted) if read_many else [self.backend.read(layer, x) for x in wanted]
            for i, index, raw in zip(missing, wanted, raws):
                if raw is None:
                    raise KeyError(f"cold block (layer {layer}, block {index}) is not stored")
                self.misses += 1
                self.cache.put((self.owner, layer, index), raw)
                out[i] = raw
        return out

    def last_decoded(self, layer: int, half: int) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """The blocks of `layer` whose keys (half 0) or values (half 1) are held decoded, and what they decoded
        to: (block indices, [H, room, B, D]), the i-th block in slot i (room >= the blocks); None without a
        decoded cache or once it let them go."""
        return None if self.decoded is None else self.decoded.get((self.owner, layer, half))

    def remember_decoded(self, layer: int, half: int, indices: tuple[int, ...], x: torch.Tensor) -> None:
        if self.decoded is not None:
            self.decoded.put((self.owner, layer, half), (indices, x), x.numel() * x.element_size())

    def discard_from(self, layer: int, index: int) -> None:
        """Forget pending blocks of `layer` from `index` on (undo of an uncommitted step), and what the layer
        last decoded (it may hold them)."""
        if self.decoded is not None:
            self.decoded.discard(self.owner, layer, 0)
        if isinstance(self.backend, MemoryBlocks):
            for key in [k for k in self.backend.blocks if k[0] == layer and k[1] >= index]:
                del self.backend.blocks[key]
        for key in [k for k in self.pending if k[0] == layer and k[1] >= index]:
            del self.pending[key]
        # The cache holds stored blocks only, and a stored block is never undone: nothing to drop there.

    def take_pending(self) -> dict[tuple[int, int], bytes]:
        return dict(self.pending)

    def flushed(self) -> None:
        """The owner wrote the pending blocks to the backend's storage itself (in its own transaction).
        They move to the cache: the next steps are likely to read recent blocks."""
        for key, raw in self.pending.items():
            self.cache.put((self.owner, *key), raw)
        self.pending.clear()

    def flush(self) -> None:
        self.backend.write(self.pending)
        self.flushed()

    def close(self) -> None:
        """Drop this store's blocks from the caches (its session left memory or is gone)."""
        self.cache.drop(self.owner)
        if self.decoded is not None:
            self.decoded.drop(self.owner)

    def resident_bytes(self) -> int:
        total = sum(len(b) for b in self.pending.values())
        if not self.shared:
            total += self.cache.nbytes
        if self.backend.resident:
            total += self.backend.nbytes()
        return total

    def stored_bytes(self) -> int:
        return self.backend.nbytes() + sum(len(b) for b in self.pending.values())


def stack_packed(blocks: list[Packed]) -> Packed:
    """Blocks encoded alike, [..., T, D] each -> one Packed of shape [U, ..., T, D] that decodes in one call.

    Shaped tensors (TurboQuant codes, every codec's scales) stack on a new first
    axis; flat tensors (uniform codes, bit-packed over the whole block) are
    concatenated, which is the same bytes the stacked input would pack to when
    each block fills whole bytes. Codecs, shapes and metadata must match.
    """
    first = blocks[0]
    if len(blocks) == 1:
        return Packed(first.codec, (1, *first.shape), first.dtype,
                      {k: t.unsqueeze(0) if t.dim() > 1 else t for k, t in first.tensors.items()}, first.meta)
    for b in blocks[1:]:
        if b.codec != first.codec or b.shape != first.shape or b.meta != first.meta:
            raise ValueError("stack_packed needs blocks of one codec, shape and metadata")
    tensors = {}
    for name, t in first.tensors.items():
        parts = [b.tensors[name] for b in blocks]
        tensors[name] = torch.cat(parts) if t.dim() == 1 else torch.stack(parts)
    return Packed(first.codec, (len(blocks), *first.shape), first.dtype, tensors, first.meta)
