"""torch's threads go to the one thread that runs the model; every other thread of the server computes on one.

PyTorch's OpenMP on Linux (libgomp) gives each thread that starts a parallel region a team of threads of its own
(its matrix products through MKL too). Once the teams' threads outnumber the cores, libgomp's idle threads stop
spinning between regions and sleep, so each parallel region of the model's thread waits for a thread to be woken:
on this project's 2 cores a full decode step at 4k took 73 ms instead of 50 ms (the time of one thread) for as long
as the server ran, once a gRPC thread had loaded a session (a fork, a Resume) with 2 threads.

`single_threaded()` sets the calling thread's own OpenMP and MKL thread counts to 1 (libgomp's
omp_set_num_threads and MKL's MKL_Set_Num_Threads_Local, both per thread), so it never starts a team; torch's
global setting, and with it every other thread's, is left as it is. Where the libraries are not these (another
platform's OpenMP), it does nothing and says so.
"""
from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger("memsvc.threads")


@functools.lru_cache(maxsize=1)
def _setters() -> tuple:
    """(omp_set_num_threads, MKL_Set_Num_Threads_Local or None) of the libraries this process loaded, or ()."""
    paths = {}
    try:
        with open("/proc/self/maps") as f:  # the files mapped: the very libgomp torch uses, not another copy
            for line in f:
                path = line.split()[-1]
                for lib in ("libgomp", "libtorch_cpu"):
                    if f"/{lib}" in path and ".so" in path:
                        paths.setdefault(lib, path)
    except OSError:
        return ()
    if "libgomp" not in paths:
        return ()
    omp = ctypes.CDLL(paths["libgomp"]).omp_set_num_threads
    omp.argtypes, omp.restype = [ctypes.c_int], None
    # MKL's C interface, the int by value (its lower-case name is the Fortran one, which takes a pointer)
    mkl = getattr(ctypes.CDLL(paths["libtorch_cpu"]), "MKL_Set_Num_Threads_Local", None) \
        if "libtorch_cpu" in paths else None
    if mkl is not None:
        mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
    return omp, mkl


def single_threaded() -> bool:
    """Make the calling thread's torch work run on this thread alone; whether it could."""
    torch.get_num_threads()  # torch's per-thread setup first (it sets this thread's count from the global one)
    setters = _setters()
    if not setters:
        log.debug("no libgomp in this process: thread counts left as they are")
        return False
    omp, mkl = setters
    omp(1)
    if mkl is not None:
        mkl(1)
    return True
