"""Keep large tensor buffers in the process heap instead of fresh zeroed pages from the kernel.

glibc's malloc serves a large request (past its mmap threshold, which grows only to the largest block freed
so far) with a fresh mmap, and returns freed heap top to the kernel past its trim threshold. A resumed
session's first prompt chunk builds tensors of megabytes per layer (its cold keys and values, the attention
logits), so a fresh process paid a page fault per 4 KiB page of many of them. With large requests served from
the heap and freed memory kept (up to `trim` bytes), they are reused instead: over three interleaved runs of a
fresh process's first question after Resume, 8k 1.13 -> 1.09 s and 32k 1.70 -> 1.65 s (page faults 37-42k ->
18-29k at 8k; BENCHMARKS.md, issue 5).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("memsvc")

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (glibc <malloc.h>)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20


def keep_heap(*, mmap_threshold: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD, top_pad: int = TOP_PAD) -> bool:
    """Set glibc malloc's thresholds for this process. Returns False (and changes nothing it could not) where
    the C library is not glibc or refuses a value."""
    for name, v in (("mmap_threshold", mmap_threshold), ("trim", trim), ("top_pad", top_pad)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0 (bytes), got {v!r}")
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("allocator: no glibc mallopt here; malloc left at its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for param, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim), (M_TOP_PAD, top_pad)):
        ok = bool(mallopt(param, value)) and ok  # mallopt returns 1 on success, 0 on a refused value
    return ok
