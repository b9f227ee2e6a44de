"""memsvc.alloc.keep_heap: large buffers come from the process heap, and freed ones stay there."""
import json
import subprocess
import sys

import pytest

from memsvc.alloc import keep_heap

PROBE = r"""
import json, sys, torch
from memsvc.alloc import keep_heap
kept = keep_heap() if sys.argv[1] == "keep" else None
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo, hi
    return 0, 0
t = torch.empty(4 << 20).fill_(1.0)  # 16 MiB, written
lo, hi = heap()
in_heap = lo <= t.data_ptr() < hi
del t
print(json.dumps({"kept": kept, "in_heap": in_heap, "heap_after_free": heap()[1] - heap()[0], "heap": hi - lo}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_keep_heap_serves_large_buffers_from_the_heap_and_keeps_them_after_free():
    default, kept = _probe("default"), _probe("keep")
    # glibc's default: a fresh mmap (its pages fault in at first touch), or, where its dynamic threshold has
    # grown past 16 MiB, heap memory handed back to the kernel when freed
    assert default["in_heap"] is False or default["heap_after_free"] < default["heap"]
    assert kept["kept"] is True
    assert kept["in_heap"] is True
    assert kept["heap_after_free"] == kept["heap"] >= 16 << 20  # not trimmed back to the kernel


@pytest.mark.parametrize("kw", [{"trim": -1}, {"mmap_threshold": 1.5}, {"top_pad": True}])
def test_keep_heap_refuses_bad_sizes(kw):
    with pytest.raises(ValueError):
        keep_heap(**kw)
