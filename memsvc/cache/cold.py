"""Where cold blocks live, and the bounded LRU of packed blocks in front of it.

A cold block is the packed keys and values of `block` tokens of one layer
(all KV heads), as the codecs wrote them. Backends:
- `MemoryBlocks`: a dict in this process (the blocks count as resident);
- `FileBlocks`: an append-only file on disk, read back with pread;
- the service's LMDB store (`StoreBlocks` in memsvc.sessions' adapter).
`ColdStore` puts new blocks in `pending` until the owner flushes them to the
backend (the service does that inside its commit transaction), and keeps an
LRU of recently read blocks within `cache_bytes`. Only pending blocks, the LRU
and in-memory backends count as resident.
"""
from __future__ import annotations

import os
import struct
import tempfile
import threading
from collections import OrderedDict
from typing import Protocol

import torch

from memsvc.kernels.codec import Packed

_LEN = struct.Struct("<I")


def block_bytes(k: Packed, v: Packed) -> bytes:
    kb = k.to_bytes()
    return _LEN.pack(len(kb)) + kb + v.to_bytes()


def block_from_bytes(raw: bytes | memoryview) -> tuple[Packed, Packed]:
    raw = memoryview(raw)
    if len(raw) < _LEN.size:
        raise ValueError("cold block is truncated")
    (n,) = _LEN.unpack_from(raw, 0)
    if _LEN.size + n > len(raw):
        raise ValueError("cold block is truncated")
    return Packed.from_bytes(raw[_LEN.size:_LEN.size + n]), Packed.from_bytes(raw[_LEN.size + n:])


class Backend(Protocol):
    resident: bool

    def read(self, layer: int, index: int) -> bytes | None: ...

    def write(self, blocks: dict[tuple[int, int], bytes]) -> None: ...

    def nbytes(self) -> int: ...


class MemoryBlocks:
    """Blocks kept decoded-ready (as `Packed` pairs) in this process."""

    resident = True

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
    """pending blocks + an LRU of read blocks (by bytes) over a backend."""

    def __init__(self, backend=None, cache_bytes: int = 1 << 20):
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.backend = backend if backend is not None else MemoryBlocks()
        self.cache_bytes = cache_bytes
        self.pending: dict[tuple[int, int], bytes] = {}
        self._lru: OrderedDict[tuple[int, int], tuple[Packed, Packed, int]] = OrderedDict()
        self._lru_size = 0
        self.hits = 0
        self.misses = 0

    def put(self, layer: int, index: int, k: Packed, v: Packed) -> None:
        if isinstance(self.backend, MemoryBlocks):  # nothing to flush: keep the objects
            self.backend.blocks[(layer, index)] = (k, v, k.nbytes() + v.nbytes() + _LEN.size)
            return
        self.pending[(layer, index)] = block_bytes(k, v)
        self._remember((layer, index), k, v, len(self.pending[(layer, index)]))

    def get(self, layer: int, index: int) -> tuple[Packed, Packed]:
        key = (layer, index)
        if isinstance(self.backend, MemoryBlocks):
            mem = self.backend.blocks.get(key)
            if mem is not None:
                self.hits += 1
                return mem[0], mem[1]
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            self.hits += 1
            return hit[0], hit[1]
        self.misses += 1
        raw = self.pending.get(key)
        if raw is None:
            raw = self.backend.read(layer, index)
        if raw is None:
            raise KeyError(f"cold block (layer {layer}, block {index}) is not stored")
        k, v = block_from_bytes(raw)
        self._remember(key, k, v, len(raw))
        return k, v

    def _remember(self, key, k, v, size) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self._lru_size -= old[2]
        if size > self.cache_bytes:
            return
        self._lru[key] = (k, v, size)
        self._lru_size += size
        while self._lru_size > self.cache_bytes:
            _, (_, _, s) = self._lru.popitem(last=False)
            self._lru_size -= s

    def discard_from(self, layer: int, index: int) -> None:
        """Forget pending blocks of `layer` from `index` on (undo of an uncommitted step)."""
        if isinstance(self.backend, MemoryBlocks):
            for key in [k for k in self.backend.blocks if k[0] == layer and k[1] >= index]:
                del self.backend.blocks[key]
        for key in [k for k in self.pending if k[0] == layer and k[1] >= index]:
            del self.pending[key]
            old = self._lru.pop(key, None)
            if old is not None:
                self._lru_size -= old[2]

    def take_pending(self) -> dict[tuple[int, int], bytes]:
        return dict(self.pending)

    def flushed(self) -> None:
        """The owner wrote the pending blocks to the backend's storage itself (in its own transaction)."""
        self.pending.clear()

    def flush(self) -> None:
        self.backend.write(self.pending)
        self.pending.clear()

    def resident_bytes(self) -> int:
        pend = sum(len(b) for b in self.pending.values())
        lru_not_pending = sum(s for key, (_, _, s) in self._lru.items() if key not in self.pending)
        total = pend + lru_not_pending
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
