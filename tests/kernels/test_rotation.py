"""Rotations: orthogonal, invertible, seeded per (seed, layer, head), zero-padded to a power of two."""
import math

import pytest
import torch

from memsvc.kernels.rotation import ROTATIONS, derive_seed, fwht, hadamard_signs, next_pow2, rotate, unrotate


def _hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128])
def test_fwht_matches_dense_hadamard(n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(fwht(x), x @ _hadamard(n), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fwht(fwht(x)), x, atol=1e-5, rtol=1e-5)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError):
        fwht(torch.zeros(3, 96))


@pytest.mark.parametrize("kind", ROTATIONS)
@pytest.mark.parametrize("d", [64, 96, 128])
def test_rotation_is_orthogonal_and_inverts(kind, d):
    x = torch.randn(2, 3, 17, d, generator=torch.Generator().manual_seed(d))  # [B, H, T, D]
    y = rotate(x, kind, seed=7, layer=2)
    assert y.shape == (2, 3, 17, next_pow2(d))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unrotate(y, kind, 7, 2, d), x, atol=1e-5, rtol=1e-5)
    # inner products survive: <Rq, Rk> == <q, k>, queries given as [..., H, D]
    q = torch.randn(2, 3, d)
    qy = rotate(q, kind, 7, 2, head_axis=-2)
    torch.testing.assert_close(torch.einsum("bhd,bhtd->bht", qy, y), torch.einsum("bhd,bhtd->bht", q, x), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kind", ROTATIONS)
def test_each_head_and_layer_has_its_own_rotation(kind):
    x = torch.randn(17, 64).expand(3, 17, 64)  # the same block in 3 heads
    y = rotate(x, kind, seed=0, layer=0)
    assert not torch.allclose(y[0], y[1]) and not torch.allclose(y[1], y[2])
    torch.testing.assert_close(rotate(x[1:2], kind, 0, 0)[0], y[0])  # head index, not slice position
    torch.testing.assert_close(rotate(x[0], kind, 0, 0), y[0])  # a [T, D] block is head 0
    assert not torch.allclose(rotate(x, kind, 0, 1), y)
    assert not torch.allclose(rotate(x, kind, 1, 0), y)
    torch.testing.assert_close(rotate(x, kind, 0, 0), y)  # deterministic


def test_seeds_are_stable_and_distinct():
    assert derive_seed(0, 0, 0) == derive_seed(0, 0, 0)
    assert len({derive_seed(s, l, h) for s in range(3) for l in range(3) for h in range(3)}) == 27
    s = hadamard_signs(64, 0, 0, 2)
    assert set(s.unique().tolist()) == {-1.0, 1.0}


def test_unknown_rotation_is_an_error():
    with pytest.raises(ValueError, match="hadamard"):
        rotate(torch.zeros(4, 8), "dct", 0, 0)
