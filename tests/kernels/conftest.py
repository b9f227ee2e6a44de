"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

`TRITON_INTERPRET=1` must be in the environment before a module defining a
`@triton.jit` kernel is imported (the decorator picks the interpreter at
definition time), so it is set here, when pytest loads this conftest, before
any test module of this folder is imported. The `*_triton.py` kernel modules are
imported lazily by kernels/dispatch.py, so setting it here is early enough.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Kernel tests use small shapes; one intra-op thread keeps them fast and repeatable on a
# shared machine. (Measured here: batched torch.linalg.eigh on [6, 128, 128] float64 takes
# ~5.5 s with 2 threads against ~0.01 s with 1: an oversubscription pathology, not the math.)
torch.set_num_threads(1)


def _kv_like(shape, seed=0, heavy=(3, 17), scale=8.0, dtype=torch.float32):
    """Real-ish keys/values: Gaussian with a few heavy (outlier) channels along D, seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for c in heavy:
        if c < shape[-1]:
            x[..., c] *= scale
            x[..., c] += scale / 2
    return x.to(dtype)


def _require_interpreted(kernel):
    """Skip unless `kernel` (a @triton.jit function) runs in the Triton interpreter on CPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 is not set")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        pytest.skip("Triton kernels were defined before TRITON_INTERPRET=1 was set: not interpreted")


@pytest.fixture
def kv_like():
    """The real-ish data generator above: kv_like(shape, seed=0, dtype=...)."""
    return _kv_like


@pytest.fixture
def require_interpreted():
    """require_interpreted(kernel): skip the test unless the kernel runs in the interpreter."""
    return _require_interpreted
