"""Per-thread work buffers of TurboQuant's CPU fast paths (turboquant_cpu_encode/_decode), and the
dtypes that move n bytes as one element."""
from __future__ import annotations

import math
import threading

import torch

_SCRATCH = threading.local()
_SCRATCH_MAX_BYTES = 16 << 20

UNIT_DTYPES = {16: torch.complex128, 8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}  # n bytes moved as one element


def scratch(slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized work buffer, reused across calls by this thread (fresh pages cost more
    than the arithmetic of the fast paths). Never handed out of a kernel; buffers over 16 MiB are not kept.
    Encode and decode share slots 0-3 (their big buffers), so that the two together touch
    less memory and keep it in cache."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.numel() < nbytes:
        buf = bufs[slot] = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(shape)
