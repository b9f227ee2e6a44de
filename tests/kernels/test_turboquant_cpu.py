"""The CPU fast paths of TurboQuant against their plain definitions, bit for bit.

The 4-bit encode finds the magnitude index with a table gather (_magnitude_lut) instead of one
compare per boundary, and counts the levels of a row with a byte table (_level_counts); both
must give exactly what the compares and a plain count give, for every float bit pattern.
"""
import pytest
import torch

from memsvc.kernels import lloyd_max
from memsvc.kernels import turboquant_cpu_encode as enc
from memsvc.kernels.packing import unpack_bits_reference as unpack_bits
from memsvc.kernels.turboquant_codec import TurboQuant


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")


def _patterns(bits: int, dp: int) -> torch.Tensor:
    """int32 bit patterns of |u| in [0, 2^31): random ones, every boundary and its neighbours, the edges of
    the table's runs, zeros, fp16 subnormals and normals widened to float32, floats in [0, 1], inf and NaN."""
    g = torch.Generator().manual_seed(bits * 1000 + dp)
    b = torch.tensor(enc._positive_bounds(bits, dp), dtype=torch.int64)
    s, _ = enc._magnitude_lut(bits, dp)
    lo = torch.arange(1 << (31 - s), dtype=torch.int64) << s
    f16 = torch.arange(0, 0x7C01, dtype=torch.int64).to(torch.int16).view(torch.float16).float()  # +0 .. inf
    parts = [
        torch.randint(0, 1 << 31, (1 << 18,), generator=g, dtype=torch.int64),
        (b[:, None] + torch.arange(-8, 9)[None, :]).reshape(-1),
        lo, lo - 1, lo + 1, lo + (1 << s) - 1,
        torch.tensor([0, 1, 2, 0x7F800000, 0x7FC00000, 0x7FFFFFFF]),
        f16.view(torch.int32).to(torch.int64),
        torch.rand(1 << 16, generator=g).view(torch.int32).to(torch.int64),
        (torch.rand(1 << 16, generator=g) * 0.5).view(torch.int32).to(torch.int64),
    ]
    return torch.cat(parts).clamp(0, (1 << 31) - 1).to(torch.int32)


@pytest.mark.parametrize("dp", [8, 16, 32, 64, 128])
def test_magnitude_lut_equals_boundary_compares(dp):
    a = _patterns(4, dp)
    s, e = enc._magnitude_lut(4, dp)
    got = (torch.index_select(e, 0, a >> s) + a) >> (s + 1)
    want = torch.zeros_like(a)
    for bound in enc._positive_bounds(4, dp):
        want += (a > bound).to(torch.int32)
    assert torch.equal(got, want)
    # the same count as the float comparison |u| > b for the patterns that are floats (not NaN)
    f = a.view(torch.float32)
    ok = ~torch.isnan(f)
    fb = lloyd_max.boundaries(4, dp)[8:]
    assert torch.equal(got[ok], (f[ok, None] > fb[None, :]).sum(1).to(torch.int32))


def test_level_counts_equal_a_plain_count():
    g = torch.Generator().manual_seed(1)
    for dp in (8, 64, 128):
        packed = torch.randint(0, 256, (3, 37, dp // 2), generator=g, dtype=torch.uint8)
        packed[0, 0] = 0x00  # all codes 0 (level 7)
        packed[0, 1] = 0x77  # all codes 7 (level 0)
        packed[0, 2] = 0xFF  # all codes 15 (level 7)
        got = enc._level_counts(packed, 4, dp)
        codes = unpack_bits(packed.reshape(-1, dp // 2), 4, dp).long().view(3, 37, dp)
        level = torch.where(codes >= 8, codes - 8, 7 - codes)
        want = torch.nn.functional.one_hot(level, 8).sum(-2).to(torch.uint8)
        assert torch.equal(got, want)


def _awkward_blocks():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 65, 64, generator=g)
    x[0, 3] = 0  # a zero vector
    x[0, 4, 5] = 1  # one nonzero coordinate
    x[1, 7] = 6e-8  # fp16 subnormals only
    x[1, 8, ::2] = 1e4  # large and tiny mixed
    x[1, 8, 1::2] = 1e-6
    x[..., 17] *= 30  # a heavy channel
    return [
        x.to(torch.float16),
        x,
        torch.randn(3, 17, 96, generator=g).to(torch.float16),
        torch.randn(2, 3, 63, 128, generator=g).to(torch.bfloat16),
        torch.randn(1, 1, 8, generator=g).to(torch.float16),
        torch.randn(4, 33, 40, generator=g),
    ]


@pytest.mark.parametrize("norm_correction", [True, False])
def test_four_bit_encode_table_path_equals_compare_path(monkeypatch, norm_correction):
    """The encode with the table gives the same packed codes and scales, bit for bit, as with the compares."""
    for x in _awkward_blocks():
        fast = enc.encode_hadamard_cpu(x, 4, 3, 5, norm_correction)
        with monkeypatch.context() as mp:
            mp.setattr(enc, "_magnitude_lut", lambda bits, dp: None)
            slow = enc.encode_hadamard_cpu(x, 4, 3, 5, norm_correction)
        assert torch.equal(fast[0].view(torch.uint8), slow[0].view(torch.uint8))
        assert torch.equal(fast[1].view(torch.int16), slow[1].view(torch.int16))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_kron_decode_equals_the_generic_decode(bits):
    """The CPU decode (byte-table gathers for 4 bits) against centroids gathered one by one and unrotated."""
    from memsvc.kernels.rotation import next_pow2, unrotate
    from memsvc.kernels.turboquant import centroid_values

    g = torch.Generator().manual_seed(bits)
    for shape in [(3, 17, 64), (2, 2, 65, 96), (1, 8), (4, 33, 128)]:
        x = torch.randn(shape, generator=g)
        codec = TurboQuant(bits=bits, seed=2, layer=9)
        p = codec.encode(x)
        y = codec.decode(p)
        lead, d = tuple(p.shape[:-1]), p.shape[-1]
        codes = unpack_bits(p.tensors["codes"], bits, next_pow2(d)).reshape(*lead, next_pow2(d))
        want = unrotate(centroid_values(codes, p.tensors["scales"], bits), "hadamard", 2, 9, d, dense=True)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
