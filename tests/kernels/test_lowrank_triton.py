"""Low-rank codec: Triton projection/reconstruction (interpreted on CPU) == torch reference.

On data whose products and sums are exact in fp32 (small integers, halves) the two paths agree bit for
bit, records included; on real-ish data they differ by the summation order only (float rounding).
"""
import pytest
import torch

from memsvc.kernels.lowrank import project_reference, reconstruct_reference
from memsvc.kernels.lowrank_codec import LowRankCodec
from memsvc.kernels.registry import get_codec


def project_triton(x, basis, mean):
    from memsvc.kernels.lowrank_triton import project_triton as impl

    return impl(x, basis, mean)


def reconstruct_triton(latent, basis, mean, dtype):
    from memsvc.kernels.lowrank_triton import reconstruct_triton as impl

    return impl(latent, basis, mean, dtype)


def _basis(lead, d, r, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(*lead, d, d, generator=g))
    return q[..., :r].to(torch.float16)  # the codec stores and projects with an fp16 basis


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("r", [1, 7, 32, "D"])
@pytest.mark.parametrize("T,D", [(1, 64), (17, 96), (63, 128), (65, 64), (65, 96), (17, 128)])
def test_project_and_reconstruct_match_reference(T, D, r, center, kv_like, require_interpreted):
    from memsvc.kernels import lowrank_triton

    require_interpreted(lowrank_triton._project_kernel)
    r = D if r == "D" else r
    x = kv_like((2, T, D), seed=T * D + r, dtype=torch.float16)
    basis = _basis((2,), D, r, seed=r)
    mean = x.float().mean(-2, keepdim=True).half() if center else None
    lat_ref = project_reference(x, basis, mean)
    lat_tri = project_triton(x, basis, mean)
    assert lat_tri.shape == lat_ref.shape == (2, T, r) and lat_tri.dtype == torch.float32
    torch.testing.assert_close(lat_tri, lat_ref, rtol=1e-5, atol=1e-4)
    lat16 = lat_ref.half()  # what the record stores
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y_ref = reconstruct_reference(lat16, basis, mean, dtype)
        y_tri = reconstruct_triton(lat16, basis, mean, dtype)
        assert y_tri.shape == y_ref.shape == (2, T, D) and y_tri.dtype == dtype
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]  # one output rounding
        torch.testing.assert_close(y_tri.float(), y_ref.float(), rtol=tol, atol=tol)


def test_broadcast_basis_and_mean_over_a_batch(kv_like, require_interpreted):
    from memsvc.kernels import lowrank_triton

    require_interpreted(lowrank_triton._project_kernel)
    x = kv_like((2, 3, 17, 96))                     # [B, H, T, D]
    basis = _basis((3,), 96, 12, seed=3)           # one basis per head, shared over the batch
    mean = torch.randn(3, 1, 96).half()
    lat = project_triton(x, basis, mean)
    torch.testing.assert_close(lat, project_reference(x, basis, mean), rtol=1e-5, atol=1e-4)
    flat = _basis((), 96, 12, seed=4)              # a single [D, r] basis for everything
    torch.testing.assert_close(project_triton(x, flat, None), project_reference(x, flat, None), rtol=1e-5, atol=1e-4)
    y = reconstruct_triton(lat, basis, mean, torch.float32)
    torch.testing.assert_close(y, reconstruct_reference(lat, basis, mean, torch.float32), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("codec", [LowRankCodec(rank=16), LowRankCodec(rank=24, center=True), LowRankCodec(rank=16, latent_codec=get_codec("kivi4_k"))])
def test_codec_round_trip_through_triton(codec, dtype, kv_like, require_interpreted, monkeypatch):
    from memsvc.kernels import lowrank_triton

    require_interpreted(lowrank_triton._project_kernel)
    x = kv_like((3, 65, 64), seed=5, dtype=dtype)
    basis, mean = codec.fit(x)  # one basis for both paths (eigh is the same torch call on both)
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    p_ref = codec.encode(x, basis=basis, mean=mean)
    y_ref = codec.decode(p_ref)
    monkeypatch.setenv("MEMSVC_KERNELS", "triton")
    p_tri = codec.encode(x, basis=basis, mean=mean)
    # same record format: same tensors, shapes, dtypes, meta; basis/mean bit-exact
    assert p_tri.meta == p_ref.meta and p_tri.shape == p_ref.shape and p_tri.dtype == p_ref.dtype
    assert {k: (v.shape, v.dtype) for k, v in p_tri.tensors.items()} == {k: (v.shape, v.dtype) for k, v in p_ref.tensors.items()}
    assert len(p_tri.to_bytes()) == len(p_ref.to_bytes())
    for name in ("basis", "mean"):
        if name in p_ref.tensors:
            assert torch.equal(p_tri.tensors[name].view(torch.uint8), p_ref.tensors[name].view(torch.uint8))
    if "latent" in p_ref.tensors:  # fp16 latent: equal up to one fp16 rounding step of the matmul
        torch.testing.assert_close(p_tri.tensors["latent"].float(), p_ref.tensors["latent"].float(), rtol=2e-3, atol=2e-3)
    y_tri = codec.decode(p_ref)  # decode of the very same record: differs only by the matmul order
    assert y_tri.dtype == dtype and y_tri.shape == x.shape
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y_tri.float(), y_ref.float(), rtol=tol, atol=tol)


def _exact(shape, seed, lo=-8, hi=9, step=1.0):
    # values whose products and sums stay exact in fp32 (and in fp16 where stored)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).float() * step


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("T,D,r", [(1, 64, 1), (17, 96, 7), (65, 64, 64), (33, 128, 40)])
def test_bit_exact_on_exactly_representable_data(T, D, r, center, require_interpreted):
    from memsvc.kernels import lowrank_triton

    require_interpreted(lowrank_triton._project_kernel)
    x = _exact((2, T, D), seed=T + D)
    basis = _exact((2, D, r), seed=r, lo=-2, hi=3, step=0.5).half()
    mean = _exact((2, 1, D), seed=7, lo=-4, hi=5).half() if center else None
    lat_ref, lat_tri = project_reference(x, basis, mean), project_triton(x, basis, mean)
    assert torch.equal(lat_tri, lat_ref)
    lat = _exact((2, T, r), seed=3).half()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(reconstruct_triton(lat, basis, mean, dtype), reconstruct_reference(lat, basis, mean, dtype))


@pytest.mark.parametrize("latent_codec", [None, "k8v8_k"])
def test_records_bit_exact_on_exactly_representable_data(latent_codec, require_interpreted, monkeypatch):
    from memsvc.kernels import lowrank_triton

    require_interpreted(lowrank_triton._project_kernel)
    x = _exact((3, 33, 64), seed=11).half()
    basis = _exact((3, 64, 16), seed=12, lo=-2, hi=3, step=0.5)
    codec = LowRankCodec(rank=16, latent_codec=latent_codec and get_codec(latent_codec))
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    p_ref = codec.encode(x, basis=basis)
    y_ref = codec.decode(p_ref)
    monkeypatch.setenv("MEMSVC_KERNELS", "triton")
    p_tri = codec.encode(x, basis=basis)
    assert p_tri.to_bytes() == p_ref.to_bytes()
    assert torch.equal(codec.decode(p_ref), y_ref)


def test_reference_switch_does_not_call_triton_kernels(monkeypatch, kv_like):
    from memsvc.kernels import lowrank_triton

    calls = []
    monkeypatch.setattr(lowrank_triton, "project_triton", lambda *a: calls.append(a))
    monkeypatch.setattr(lowrank_triton, "reconstruct_triton", lambda *a: calls.append(a))
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    x = kv_like((2, 17, 64))
    c = LowRankCodec(rank=8)
    c.decode(c.encode(x))
    assert calls == []
