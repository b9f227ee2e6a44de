"""memsvc.threads: a thread made single-threaded computes on one thread; torch's global count and the other
threads' are left as they were (the step scheduler's steps keep torch's threads)."""
from __future__ import annotations

import sys
import threading

import torch

from memsvc.threads import single_threaded


def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.update(value=fn()))
    t.start()
    t.join()
    return out["value"]


def test_a_single_threaded_thread_computes_on_one_and_leaves_the_others_alone():
    before = torch.get_num_threads()

    def side():
        could = single_threaded()
        x = torch.randn(256, 256)
        y = x @ x  # MKL, on this thread alone
        return could, torch.get_num_threads(), torch.allclose(y, x.double().matmul(x.double()).float(), atol=1e-3)

    could, inside, right = _in_thread(side)
    assert right
    if sys.platform.startswith("linux"):  # PyTorch's Linux wheels use libgomp: the per-thread settings take
        assert could and inside == 1
    assert torch.get_num_threads() == before  # this thread's count, and torch's global one, unchanged
    assert _in_thread(torch.get_num_threads) == before  # a new thread gets torch's count
