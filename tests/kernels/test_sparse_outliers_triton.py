"""Dense-and-sparse codec: Triton split/merge (interpreted on CPU) == torch reference, bit for bit."""
import math

import pytest
import torch

from memsvc.kernels.registry import get_codec
from memsvc.kernels.sparse_outliers import merge_outliers_reference, select_outliers, split_outliers_reference
from memsvc.kernels.sparse_outliers_codec import SparseOutlierCodec

DENSE = ["kivi4_k", "kivi2_v", "k8v8_v"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _heavy_tailed(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    spikes = torch.rand(shape, generator=g) < 0.01
    return torch.where(spikes, 20 * torch.randn(shape, generator=g), x).to(dtype)


def split_outliers_triton(x, index):
    from memsvc.kernels.sparse_outliers_triton import split_outliers_triton as impl

    return impl(x, index)


def merge_outliers_triton(dense, index, values):
    from memsvc.kernels.sparse_outliers_triton import merge_outliers_triton as impl

    return impl(dense, index, values)


def _bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("frac", [1e-4, 0.01, 0.1])
@pytest.mark.parametrize("T,D", [(1, 64), (17, 96), (63, 128), (65, 64), (65, 96), (65, 128)])
def test_split_and_merge_match_reference_bit_exact(T, D, frac, dtype, require_interpreted):
    from memsvc.kernels import sparse_outliers_triton

    require_interpreted(sparse_outliers_triton._split_kernel)
    x = _heavy_tailed((2, T, D), seed=T * D, dtype=dtype)
    k = math.ceil(frac * x.numel())
    idx = select_outliers(x, k)
    v_ref, in_ref = split_outliers_reference(x, idx)
    v_tri, in_tri = split_outliers_triton(x, idx)
    assert v_tri.dtype == v_ref.dtype and v_tri.shape == (k,)
    assert in_tri.dtype == in_ref.dtype == dtype and in_tri.shape == x.shape
    assert torch.equal(_bits(v_tri), _bits(v_ref))
    assert torch.equal(_bits(in_tri), _bits(in_ref))
    # merge: back over a perturbed "decoded" block, with the index as stored (int16 holding uint16 bits, or int32)
    dense = (in_ref.float() + 0.01).to(dtype)
    stored = torch.where(idx >= 1 << 15, idx - (1 << 16), idx).to(torch.int16) if x.numel() <= 1 << 16 else idx.to(torch.int32)
    for index in (stored, idx.to(torch.int32), idx):
        m_ref = merge_outliers_reference(dense, index, v_ref)
        m_tri = merge_outliers_triton(dense, index, v_ref)
        assert m_tri.dtype == dtype and m_tri.shape == x.shape
        assert torch.equal(_bits(m_tri), _bits(m_ref))


def test_uint16_positions_past_32767_and_int32_blocks(require_interpreted):
    from memsvc.kernels import sparse_outliers_triton

    require_interpreted(sparse_outliers_triton._merge_kernel)
    x = torch.zeros(2, 257, 128)  # 65792 entries: int32 index
    x[1, 255, 127], x[1, 256, 5] = 50.0, -70.0
    idx = select_outliers(x, 2)
    v, inl = split_outliers_triton(x, idx)
    assert v.tolist() == [50.0, -70.0] and not inl.any()
    back = merge_outliers_triton(inl, idx.to(torch.int32), v)
    assert torch.equal(back, x)
    small = x[:, :256]  # 65536 entries: int16 index with positions >= 32768
    idx = select_outliers(small, 1)
    stored = (idx - (1 << 16)).to(torch.int16)
    assert stored.item() < 0
    v, inl = split_outliers_triton(small, idx)
    assert torch.equal(merge_outliers_triton(inl, stored, v), merge_outliers_reference(inl, stored, v))
    assert merge_outliers_triton(inl, stored, v)[1, 255, 127] == 50.0


def test_empty_outlier_list(require_interpreted):
    from memsvc.kernels import sparse_outliers_triton

    require_interpreted(sparse_outliers_triton._split_kernel)
    x = _heavy_tailed((1, 17, 64))
    idx = select_outliers(x, 0)
    v, inl = split_outliers_triton(x, idx)
    assert v.numel() == 0 and torch.equal(inl, x)
    assert torch.equal(merge_outliers_triton(x, idx.to(torch.int16), v), x)


# per-channel dense codecs in every dtype; the per-token ones (one interpreted program per row) once, smaller
CODEC_CASES = [(d, t, (3, 65, 64)) for d in DENSE if d.endswith("_k") for t in DTYPES] + [
    (d, torch.float16, (2, 17, 64)) for d in DENSE if not d.endswith("_k")]


@pytest.mark.parametrize("dense,dtype,shape", CODEC_CASES)
def test_codec_records_identical_between_paths(dense, dtype, shape, require_interpreted, monkeypatch):
    from memsvc.kernels import sparse_outliers_triton

    require_interpreted(sparse_outliers_triton._split_kernel)
    x = _heavy_tailed(shape, seed=7, dtype=dtype)
    codec = SparseOutlierCodec(outlier_fraction=0.02, dense=get_codec(dense))
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    p_ref = codec.encode(x)
    y_ref = codec.decode(p_ref)
    monkeypatch.setenv("MEMSVC_KERNELS", "triton")
    p_tri = codec.encode(x)
    # the uniform dense codec is itself bit-exact between paths, so the whole record is
    assert p_tri.to_bytes() == p_ref.to_bytes()
    y_tri = codec.decode(p_ref)
    assert y_tri.dtype == dtype and y_tri.shape == x.shape
    idx = select_outliers(x, p_ref.tensors["outlier_value"].numel())
    assert torch.equal(_bits(y_tri.reshape(-1)[idx]), _bits(y_ref.reshape(-1)[idx]))  # outliers: bit-exact
    torch.testing.assert_close(y_tri.float(), y_ref.float(), rtol=1e-2, atol=1e-2)  # dense part: its own kernels


def test_reference_switch_does_not_call_triton(monkeypatch):
    from memsvc.kernels import sparse_outliers_triton as so

    calls = []
    monkeypatch.setattr(so, "split_outliers_triton", lambda *a: calls.append(a))
    monkeypatch.setattr(so, "merge_outliers_triton", lambda *a: calls.append(a))
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    c = SparseOutlierCodec(dense=get_codec(DENSE[0]))
    x = _heavy_tailed((2, 17, 64))
    c.decode(c.encode(x))
    assert calls == []
