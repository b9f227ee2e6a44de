"""The codec contract shared by every compression method in `memsvc.kernels`.

A codec turns a block of keys or values `x: [..., T, D]` into a `Packed` record
of real packed bytes (uint8 codes, fp16 scales, norms, ...) and back. It is
stateless apart from its frozen config (and, for low-rank, a fitted basis that
is stored inside the Packed record), so the same codec object serves every
session, layer and head.

This module knows nothing about sessions, tiers, storage or models. It defines:
- `Packed`: the encoded block, with an exact byte serialization (`to_bytes` /
  `from_bytes`) so that `nbytes(p) == len(p.to_bytes())`: what we report is
  what would be stored;
- `Codec`: the protocol each codec file implements;
- `nest_packed` / `unnest_packed`: one record stored inside another (codecs that
  compose another codec: low-rank latents, the dense part of sparse outliers).

Which implementation (pure torch or Triton) runs is `dispatch.py`'s business.
"""
from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass, field
from typing import Protocol

import torch

_MAGIC = b"MKVP"
_FORMAT_VERSION = 1
# magic(4) version(u16) json_len(u32) n_tensors(u16)
_HEAD = struct.Struct("<4sHIH")
# per tensor: name_len(u8) dtype_code(u8) ndim(u8) then ndim x u32 dims, then name bytes
_TENSOR_HEAD = struct.Struct("<BBB")

_DTYPES: dict[torch.dtype, int] = {
    torch.uint8: 1,
    torch.int8: 2,
    torch.int16: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.float16: 6,
    torch.bfloat16: 7,
    torch.float32: 8,
}
_DTYPE_BY_CODE = {v: k for k, v in _DTYPES.items()}
_DTYPE_NAMES = {str(k).removeprefix("torch."): k for k in _DTYPES}


@dataclass
class Packed:
    """One encoded block.

    codec:   registry name of the codec that made it
    shape:   the original shape [..., T, D]
    dtype:   the original floating dtype (decode returns it)
    tensors: the stored arrays (codes as uint8, scales/norms as fp16, ...)
    meta:    small JSON-serializable parameters needed to decode
    """

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def _header_json(self) -> bytes:
        doc = {
            "codec": self.codec,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "meta": self.meta,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    def nbytes(self) -> int:
        """Every byte `to_bytes` writes: headers, metadata and all tensors."""
        total = _HEAD.size + len(self._header_json())
        for name, t in self.tensors.items():
            total += _TENSOR_HEAD.size + 4 * t.dim() + len(name.encode())
            total += t.numel() * t.element_size()
        return total

    def to_bytes(self) -> bytes:
        head = self._header_json()
        parts = [_HEAD.pack(_MAGIC, _FORMAT_VERSION, len(head), len(self.tensors)), head]
        for name, t in self.tensors.items():
            if t.dtype not in _DTYPES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {t.dtype}")
            nb = name.encode()
            parts.append(_TENSOR_HEAD.pack(len(nb), _DTYPES[t.dtype], t.dim()))
            parts.append(struct.pack(f"<{t.dim()}I", *t.shape))
            parts.append(nb)
            parts.append(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, buf: bytes | memoryview) -> "Packed":
        buf = memoryview(buf)
        codec, shape, dtype, meta, layout = _layout(buf)
        tensors: dict[str, torch.Tensor] = {}
        for name, dtype_t, dims, off, size in layout:
            raw = bytearray(buf[off : off + size])
            tensors[name] = (torch.frombuffer(raw, dtype=dtype_t).reshape(dims) if size
                             else torch.empty(dims, dtype=dtype_t))
        return cls(codec=codec, shape=shape, dtype=dtype, tensors=tensors, meta=dict(meta))

    @classmethod
    def stack_from_bytes(cls, bufs: list[bytes | memoryview]) -> "Packed":
        """Records of one layout (the blocks of one layer: same codec, shape, metadata and tensor sizes) ->
        one Packed of shape [U, *shape], as `stack_packed` of their `from_bytes` would give: tensors of two
        or more dims stacked on a new first axis, flat ones concatenated. Parses the first record and checks
        that every other one has its length and the same bytes outside the tensor data; ValueError if not."""
        if not bufs:
            raise ValueError("stack_from_bytes needs at least one record")
        views = [memoryview(b) for b in bufs]
        first = views[0]
        codec, shape, dtype, meta, layout = _layout(first)
        fixed, at = [], 0  # the byte ranges outside tensor data
        for _, _, _, off, size in layout:
            fixed.append((at, off))
            at = off + size
        heads = [bytes(first[lo:hi]) for lo, hi in fixed]
        for v in views[1:]:
            if len(v) != len(first) or any(bytes(v[lo:hi]) != h for (lo, hi), h in zip(fixed, heads)):
                raise ValueError("stack_from_bytes needs records of one layout (codec, shape, metadata, sizes)")
        tensors: dict[str, torch.Tensor] = {}
        U = len(views)
        for name, dtype_t, dims, off, size in layout:
            if not size:
                tensors[name] = torch.empty((U, *dims) if len(dims) > 1 else (0,), dtype=dtype_t)
                continue
            raw = bytearray().join(v[off : off + size] for v in views)
            flat = torch.frombuffer(raw, dtype=dtype_t)
            tensors[name] = flat.reshape(U, *dims) if len(dims) > 1 else flat
        return cls(codec=codec, shape=(U, *shape), dtype=dtype, tensors=tensors, meta=dict(meta))


def _layout(buf: memoryview) -> tuple[str, tuple[int, ...], torch.dtype, dict, list]:
    """A record's fields and, per tensor, (name, dtype, dims, data offset, data bytes); ValueError for a record
    that is truncated, has trailing bytes, or is not one."""
    if len(buf) < _HEAD.size:
        raise ValueError("packed record is truncated")
    magic, version, json_len, n = _HEAD.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise ValueError("not a packed KV record (bad magic)")
    if version != _FORMAT_VERSION:
        raise ValueError(f"packed record format version {version} is not supported (expected {_FORMAT_VERSION})")
    off = _HEAD.size
    codec, shape, dtype, meta = _header(bytes(buf[off : off + json_len]))
    off += json_len
    layout = []
    try:
        for _ in range(n):
            name_len, code, ndim = _TENSOR_HEAD.unpack_from(buf, off)
            off += _TENSOR_HEAD.size
            dims = struct.unpack_from(f"<{ndim}I", buf, off)
            off += 4 * ndim
            name = bytes(buf[off : off + name_len]).decode()
            off += name_len
            dtype_t = _DTYPE_BY_CODE[code]
            count = 1
            for d in dims:
                count *= d
            size = count * dtype_t.itemsize
            if off + size > len(buf):
                raise ValueError(f"packed record is truncated in tensor {name!r}")
            layout.append((name, dtype_t, dims, off, size))
            off += size
    except (struct.error, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"packed record is malformed: {exc}") from exc
    if off != len(buf):
        raise ValueError("packed record has trailing bytes")
    return codec, shape, dtype, meta, layout


@functools.lru_cache(maxsize=256)
def _header(head: bytes) -> tuple[str, tuple[int, ...], torch.dtype, dict]:
    """A record's JSON header -> (codec, shape, dtype, meta); the blocks of one layer share theirs, so
    it is parsed once (callers copy meta before handing it out)."""
    doc = json.loads(head)
    return doc["codec"], tuple(doc["shape"]), _DTYPE_NAMES[doc["dtype"]], doc["meta"]


class Codec(Protocol):
    """What every codec file provides (a frozen dataclass config is the codec)."""

    name: str

    def encode(self, x: torch.Tensor) -> Packed:
        """x: [..., T, D] floating -> Packed."""
        ...

    def decode(self, p: Packed) -> torch.Tensor:
        """Packed -> x_hat: p.shape, p.dtype."""
        ...

    def nbytes(self, p: Packed) -> int:
        """All bytes stored for p (== len(p.to_bytes()))."""
        ...


def nest_packed(prefix: str, inner: Packed) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten `inner` into (tensors, meta) entries of an outer record under `prefix.`."""
    tensors = {f"{prefix}.{k}": v for k, v in inner.tensors.items()}
    meta = {
        "codec": inner.codec,
        "shape": list(inner.shape),
        "dtype": str(inner.dtype).removeprefix("torch."),
        "meta": inner.meta,
    }
    return tensors, meta


def unnest_packed(prefix: str, outer: Packed, meta: dict) -> Packed:
    """Inverse of `nest_packed`: rebuild the inner record from `outer`."""
    cut = len(prefix) + 1
    tensors = {k[cut:]: v for k, v in outer.tensors.items() if k.startswith(prefix + ".")}
    return Packed(
        codec=meta["codec"],
        shape=tuple(meta["shape"]),
        dtype=getattr(torch, meta["dtype"]),
        tensors=tensors,
        meta=meta["meta"],
    )
