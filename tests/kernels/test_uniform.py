"""Uniform asymmetric quantization: config validation, grouping, error, and Triton (interpreted) == reference."""
import pytest
import torch

from memsvc.kernels.codec import Packed
from memsvc.kernels.registry import CODECS, get_codec
from memsvc.kernels.uniform import dequantize_reference, group_layout, quantize_reference
from memsvc.kernels.uniform_codec import UniformCodec

UNIFORM_NAMES = [n for n, f in CODECS.items() if getattr(f, "func", f) is UniformCodec]


@pytest.mark.parametrize("config", [dict(bits=5), dict(bits=0), dict(group_size=0), dict(group_size=-32), dict(axis="head")])
def test_bad_config(config):
    with pytest.raises(ValueError):
        UniformCodec(**config)


def test_registered_presets():
    assert {"uniform", "kivi2_k", "kivi2_v", "kivi4_k", "kivi4_v", "k8v8_k", "k8v8_v", "k6v4_k", "k6v4_v"} <= set(UNIFORM_NAMES)
    k, v = get_codec("kivi2_k"), get_codec("kivi2_v")
    assert (k.bits, k.group_size, k.axis) == (2, 32, "channel")
    assert (v.bits, v.group_size, v.axis) == (2, 32, "token")
    assert (get_codec("k6v4_k").bits, get_codec("k6v4_v").bits) == (6, 4)
    assert get_codec("kivi4_k", group_size=64).group_size == 64  # config overrides a preset


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("T", [1, 17, 63, 65])
def test_scale_layout_and_small_last_group(axis, T, kv_like):
    x = kv_like((2, T, 96))
    codes, scale, mn = quantize_reference(x, 4, 32, axis)
    g, G, _ = group_layout(T, 96, 32, axis)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert scale.dtype == mn.dtype == torch.float16
    assert scale.shape == ((2, T, G) if axis == "token" else (2, G, 96))
    # the last (possibly smaller) group's min is the min over exactly its own elements
    if axis == "channel":
        last = x[:, (G - 1) * g :, :]
        assert torch.equal(mn[:, -1, :], last.amin(1).half())


def test_codes_are_min_max_asymmetric():
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    codes, scale, mn = quantize_reference(x, 2, None, "token")
    assert codes.flatten().tolist() == [0, 1, 2, 3]
    assert scale.item() == 1.0 and mn.item() == 0.0


def test_constant_group_is_exact():
    x = torch.full((1, 5, 64), 0.3)
    c = UniformCodec(bits=2, group_size=32)
    assert torch.equal(c.decode(c.encode(x)), torch.full_like(x, torch.tensor(0.3).half().item()))


@pytest.mark.parametrize("name", UNIFORM_NAMES)
def test_error_shrinks_with_bits(name, kv_like):
    x = kv_like((2, 64, 64))
    c = get_codec(name)
    rel = ((c.decode(c.encode(x)) - x).norm() / x.norm()).item()
    bound = {2: 0.7, 3: 0.35, 4: 0.15, 6: 0.04, 8: 0.01}[c.bits]  # heavy channels widen per-token ranges
    assert rel < bound


def test_bits_per_value():
    x = torch.randn(1, 64, 64)
    # 2-bit codes + (fp16 scale + fp16 min) per 32 values = 3 bits, plus a small header
    p = get_codec("kivi2_v").encode(x)
    assert p.tensors["codes"].numel() == 64 * 64 * 2 // 8
    payload = sum(t.numel() * t.element_size() for t in p.tensors.values())
    assert payload * 8 / x.numel() == 3.0
    assert p.nbytes() - payload < 200  # record header: magic, JSON meta, tensor names and shapes


def test_decode_rejects_foreign_record():
    with pytest.raises(ValueError, match="uniform"):
        UniformCodec().decode(Packed(codec="x", shape=(1, 2), dtype=torch.float32))


@pytest.mark.parametrize("axis,bits,group", [("token", 2, 32), ("channel", 2, 32), ("token", 4, 32), ("channel", 4, 32),
                                             ("token", 8, None), ("token", 6, None), ("channel", 3, 16)])
@pytest.mark.parametrize("T,D", [(1, 64), (17, 96), (63, 128), (65, 64), (65, 96)])
def test_triton_matches_reference(axis, bits, group, T, D, kv_like, require_interpreted):
    from memsvc.kernels import uniform_triton

    require_interpreted(uniform_triton._quantize_kernel)
    x = kv_like((1, T, D), seed=T * D + bits, dtype=torch.float16)
    codes, scale, mn = quantize_reference(x, bits, group, axis)
    t_codes, t_scale, t_mn = uniform_triton.quantize_triton(x, bits, group, axis)
    assert torch.equal(t_codes.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(t_scale.view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(t_mn.view(torch.uint8), mn.view(torch.uint8))
    ref = dequantize_reference(codes, scale, mn, group, axis, torch.float32)
    tri = uniform_triton.dequantize_triton(codes, scale, mn, group, axis, torch.float32)
    torch.testing.assert_close(tri, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_codec_round_trip(dtype, kv_like, require_interpreted, monkeypatch):
    from memsvc.kernels import uniform_triton

    require_interpreted(uniform_triton._quantize_kernel)
    x = kv_like((3, 17, 64), dtype=dtype)
    c = get_codec("kivi4_k")
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    p_ref = c.encode(x)
    monkeypatch.setenv("MEMSVC_KERNELS", "triton")
    p_tri = c.encode(x)
    assert p_tri.to_bytes() == p_ref.to_bytes()
    y = c.decode(p_tri)
    assert y.dtype == dtype and y.shape == x.shape
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    torch.testing.assert_close(y, c.decode(p_ref), rtol=1e-2, atol=1e-2)
