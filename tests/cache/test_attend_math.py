"""The tiered layer's attention arithmetic: softmax over parts laid end to end, cold p.v in bf16."""
import math

import pytest
import torch

from memsvc.cache.layer import _PV_DTYPE, _softmax_parts


@pytest.mark.parametrize("sizes", [(5,), (7, 130), (3, 64, 9), (1, 1, 1)])
def test_softmax_parts_equal_the_softmax_of_their_concatenation(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    parts = [torch.randn(2, 3, 4, n, generator=g) * 6 for n in sizes]
    parts[-1][..., 0] = float("-inf")  # masked entries get weight 0
    if len(parts) > 1:
        parts[1][1] = float("-inf")  # a part masked whole in some rows: the others carry them
    ref = torch.softmax(torch.cat(parts, -1), -1)
    got = _softmax_parts([p.clone() for p in parts])
    assert [p.shape for p in got] == [p.shape for p in parts]
    assert torch.allclose(torch.cat(got, -1), ref, atol=1e-6, rtol=1e-5)
    assert bool((torch.cat(got, -1)[..., sum(sizes) - sizes[-1]] == 0).all())


def test_softmax_parts_work_in_place():
    x = torch.randn(3, 10)
    out = _softmax_parts([x])
    assert out[0] is x and torch.allclose(x.sum(-1), torch.ones(3))


def test_cold_pv_in_its_dtype_stays_within_the_bf16_rounding_bound():
    # weights over 8,192 tokens (a 128-block union) and 3-bit-like values: the bf16 operands' error is bounded by
    # 2^-8 relative per operand, far below what 3-bit values lose
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 123, 8192, generator=g) * 3, -1)
    v = torch.randn(3, 8192, 64, generator=g)
    ref = torch.bmm(p.double(), v.double())
    got = torch.bmm(p.to(_PV_DTYPE), v.to(_PV_DTYPE)).double()
    bound = 2 * 2 ** -8 * torch.bmm(p.double(), v.double().abs())  # |Σ p v| error <= Σ p |v| (δp + δv)
    assert bool(((got - ref).abs() <= bound + 1e-6).all())
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.01 and math.isfinite(rel)
