"""Bit packing: the byte layout, round trips, errors, and Triton (interpreted) == reference bit for bit."""
import pytest
import torch

from memsvc.kernels import dispatch
from memsvc.kernels.dispatch import pack_bits, unpack_bits
from memsvc.kernels.packing import SUPPORTED_BITS, pack_bits_reference, packed_size, unpack_bits_reference


def random_codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)


def slow_pack(codes: torch.Tensor, bits: int) -> bytes:
    """The layout by definition: code i at stream bits [i*bits, (i+1)*bits), little-endian."""
    stream = 0
    for i, c in enumerate(codes.tolist()):
        stream |= c << (i * bits)
    return stream.to_bytes(packed_size(len(codes), bits), "little")


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [1, 5, 8, 17, 63, 64, 65])
def test_layout_matches_definition(bits, n):
    codes = random_codes((n,), bits, seed=n)
    packed = pack_bits_reference(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_size(n, bits),)
    assert bytes(packed.tolist()) == slow_pack(codes, bits)


def test_dense_cells():
    assert packed_size(8, 3) == 3 and packed_size(4, 6) == 3 and packed_size(2, 4) == 1
    assert packed_size(1, 3) == 1 and packed_size(9, 3) == 4
    # 3-bit: codes 0..7 -> a known 24-bit stream
    codes = torch.arange(8, dtype=torch.uint8)
    assert pack_bits_reference(codes, 3).tolist() == list(sum(i << (3 * i) for i in range(8)).to_bytes(3, "little"))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(17,), (3, 17, 64), (2, 3, 65), (4, 0), (2, 1)])
def test_round_trip(bits, shape):
    codes = random_codes(shape, bits)
    packed = pack_bits_reference(codes, bits)
    assert packed.shape == shape[:-1] + (packed_size(shape[-1], bits),)
    out = unpack_bits_reference(packed, bits, shape[-1])
    assert out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, codes)


def test_non_contiguous_input():
    codes = random_codes((64, 17), 3).t()  # [17, 64], non-contiguous
    assert torch.equal(unpack_bits_reference(pack_bits_reference(codes, 3), 3, 64), codes)


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("bits", [0, 5, 7, 9, 16])
def test_bad_bits(bits, path, monkeypatch):
    monkeypatch.setenv("MEMSVC_KERNELS", path)  # both paths check their input (no kernel is reached)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(8, dtype=torch.uint8), bits, 8)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_bad_codes(path, monkeypatch):
    monkeypatch.setenv("MEMSVC_KERNELS", path)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([0, 8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.tensor([0, 1], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1,), (17,), (3, 63), (2, 65), (2, 17, 96)])
def test_triton_matches_reference(bits, shape, require_interpreted):
    from memsvc.kernels import packing_triton

    require_interpreted(packing_triton._pack_kernel)
    codes = random_codes(shape, bits, seed=bits)
    ref = pack_bits_reference(codes, bits)
    tri = packing_triton.pack_bits_triton(codes, bits)
    assert torch.equal(tri.view(torch.uint8), ref.view(torch.uint8))
    back = packing_triton.unpack_bits_triton(ref, bits, shape[-1])
    assert torch.equal(back, codes)


def test_dispatch_follows_switch(monkeypatch):
    from memsvc.kernels import packing_triton

    calls = []
    monkeypatch.setattr(dispatch, "pack_bits_reference", lambda c, b: calls.append("ref"))
    monkeypatch.setattr(packing_triton, "pack_bits_triton", lambda c, b: calls.append("triton"))
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    dispatch.pack_bits(torch.zeros(8, dtype=torch.uint8), 2)
    monkeypatch.setenv("MEMSVC_KERNELS", "triton")
    dispatch.pack_bits(torch.zeros(8, dtype=torch.uint8), 2)
    assert calls == ["ref", "triton"]
