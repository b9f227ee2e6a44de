"""Lloyd–Max tables for the coordinate law of a rotated unit vector."""
import math

import pytest
import torch

from memsvc.kernels import lloyd_max

GAUSS_3BIT = [0.2451, 0.7560, 1.3439, 2.1519]
GAUSS_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497}


def test_three_bits_at_d128_match_gaussian_lloyd_max():
    c = lloyd_max.centroids(3, 128) * math.sqrt(128)
    torch.testing.assert_close(c[4:], torch.tensor(GAUSS_3BIT), rtol=0.015, atol=0.0)
    torch.testing.assert_close(c[:4], -c[4:].flip(0))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_large_d_converges_to_gaussian(bits):
    assert lloyd_max.unit_vector_mse(bits, 4096) == pytest.approx(GAUSS_MSE[bits], rel=2e-3)
    if bits == 3:
        c = lloyd_max.centroids(3, 4096) * 64
        torch.testing.assert_close(c[4:], torch.tensor(GAUSS_3BIT), rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_tables_are_sorted_with_midpoint_boundaries(bits, d):
    c = lloyd_max.centroids(bits, d)
    b = lloyd_max.boundaries(bits, d)
    assert c.numel() == 2**bits and b.numel() == 2**bits - 1
    assert torch.all(c[1:] > c[:-1])
    torch.testing.assert_close(b, 0.5 * (c[1:] + c[:-1]))
    assert lloyd_max.centroids(bits, d) is not c  # callers get their own tensor


def test_bad_bits_is_an_error():
    with pytest.raises(ValueError):
        lloyd_max.centroids(0, 64)
