"""A layer state part's bytes: safetensors, written and read here, and its digest.

A part is (tensors, metadata, tokens it holds). `encode` writes the safetensors layout (header with the
metadata and each tensor's dtype, shape and data offsets in name order, padded to 8 bytes; then the data);
`decode` reads it back with one copy of the data; `digest` is 16 bytes over metadata and tensors, by which a
commit tells a changed part from an unchanged one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math

import torch

Part = tuple[dict[str, torch.Tensor], dict[str, str], int]  # tensors, metadata, tokens it holds


def _data(t: torch.Tensor):
    """A CPU tensor's bytes, as a buffer (no copy when it is contiguous)."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()


def digest(part: Part) -> bytes:
    """16 bytes over a part's metadata and tensors (names, dtypes, shapes, contents)."""
    tensors, meta, _ = part
    h = hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_data(t))  # the bytes, through the buffer protocol
    return h.digest()


def encode(part: Part) -> bytes:
    """A part as safetensors bytes: the header (metadata, then each tensor's dtype, shape and data offsets, in
    name order; padded with spaces to 8 bytes), then the tensors' data in that order. Written here rather than by
    safetensors.torch.save, which takes about twice as long for parts this small; `safetensors` reads it
    alike."""
    tensors, meta, _ = part
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"safetensors metadata maps strings to strings, got {meta!r}")
    header: dict = {"__metadata__": meta} if meta else {}
    data, at = [], 0
    for name in sorted(tensors):
        t = tensors[name].cpu()
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r} has a dtype safetensors does not store: {t.dtype}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        data.append(_data(t))
        at += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return b"".join([len(head).to_bytes(8, "little"), head, *data])


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}


def decode(raw: bytes) -> Part:
    """Stored bytes (safetensors, as `encode` writes them) -> part (tokens unknown: 0). ValueError when they do
    not parse. One copy of the data for the whole part: its tensors are views of that copy. Parts of one kind
    share their header (a layer's summary pages, hot pages, ...): it is parsed and checked once."""
    try:
        n = int.from_bytes(raw[:8], "little")
        if len(raw) < 8 + n:
            raise ValueError("the header runs past the end")
        meta, specs, end = _layout(bytes(raw[8:8 + n]))
        data = bytearray(raw[8 + n:])
        if end > len(data):
            raise ValueError(f"the tensors need {end} bytes of data, the part has {len(data)}")
        tensors = {name: torch.frombuffer(data, dtype=dtype, count=count, offset=lo).reshape(shape) if count
                   else torch.empty(shape, dtype=dtype) for name, dtype, shape, lo, count in specs}
    except Exception as exc:  # noqa: BLE001 - bad JSON, keys, types or offsets
        raise ValueError(f"a layer state part does not parse: {exc}") from exc
    return tensors, dict(meta), 0


@functools.lru_cache(maxsize=1024)
def _layout(header: bytes) -> tuple[dict, tuple, int]:
    """A safetensors header -> (metadata, ((name, dtype, shape, offset, count), ...), bytes of data it needs)."""
    doc = json.loads(header)
    meta = doc.pop("__metadata__", None) or {}
    specs, end = [], 0
    for name, spec in doc.items():
        dtype, shape = _ST_DTYPES[spec["dtype"]], [int(x) for x in spec["shape"]]
        lo, hi = (int(x) for x in spec["data_offsets"])
        count = math.prod(shape)
        if not 0 <= lo <= hi or hi - lo != count * dtype.itemsize:
            raise ValueError(f"tensor {name!r} has data offsets {lo}..{hi} for shape {shape} {spec['dtype']}")
        specs.append((name, dtype, shape, lo, count))
        end = max(end, hi)
    return meta, tuple(specs), end
