"""Triton TurboQuant kernels (Hadamard MSE path) against the torch reference, under TRITON_INTERPRET=1.

Packed codes must be bit-identical; scales and decoded floats within tolerance.
"""
import pytest
import torch

from memsvc.kernels.turboquant_codec import TurboQuant


def _both(monkeypatch, codec, x):
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    pr = codec.encode(x)
    yr = codec.decode(pr)
    monkeypatch.setenv("MEMSVC_KERNELS", "triton")
    pt = codec.encode(x)
    yt = codec.decode(pt)
    yx = codec.decode(pr)  # Triton decode of the reference record
    return pr, yr, pt, yt, yx


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("t", [1, 17, 63, 65])
def test_triton_matches_reference(monkeypatch, require_interpreted, kv_like, bits, d, t):
    from memsvc.kernels import turboquant_triton

    require_interpreted(turboquant_triton._encode_kernel)
    x = kv_like((2, t, d), seed=bits * 100 + t, dtype=torch.float16)  # [H, T, D]
    codec = TurboQuant(bits=bits, layer=3, norm_correction=(bits != 2))
    pr, yr, pt, yt, yx = _both(monkeypatch, codec, x)
    assert torch.equal(pt.tensors["codes"].view(torch.uint8), pr.tensors["codes"].view(torch.uint8))
    torch.testing.assert_close(pt.tensors["scales"], pr.tensors["scales"], rtol=1e-3, atol=1e-3)
    assert yt.dtype == x.dtype and yt.shape == x.shape
    torch.testing.assert_close(yx, yr, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(yt, yr, rtol=2e-3, atol=2e-3)


def test_triton_four_dim_block(monkeypatch, require_interpreted, kv_like):
    from memsvc.kernels import turboquant_triton

    require_interpreted(turboquant_triton._encode_kernel)
    x = kv_like((2, 3, 17, 64), dtype=torch.float32)  # [B, H, T, D]
    pr, yr, pt, yt, _ = _both(monkeypatch, TurboQuant(bits=3, seed=5), x)
    assert torch.equal(pt.tensors["codes"], pr.tensors["codes"])
    torch.testing.assert_close(yt, yr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_twin_functions_match_the_reference(require_interpreted, kv_like, bits, dtype):
    """encode_mse / decode_mse of turboquant.py and turboquant_triton.py, called directly with one signature."""
    from memsvc.kernels import turboquant_triton
    from memsvc.kernels.turboquant import decode_mse_reference, encode_mse_reference

    require_interpreted(turboquant_triton._encode_kernel)
    x = kv_like((2, 3, 17, 96), seed=bits, dtype=dtype)  # D = 96: zero-padded to 128
    codes, scales = encode_mse_reference(x, bits, 1, 4, True)
    t_codes, t_scales = turboquant_triton.encode_mse_triton(x, bits, 1, 4, True)
    assert torch.equal(t_codes, codes) and t_codes.shape == (2, 3, 17, 128 * bits // 8)
    torch.testing.assert_close(t_scales, scales, rtol=1e-3, atol=1e-3)
    y = decode_mse_reference(codes, scales, bits, 1, 4, x.shape, dtype)
    t_y = turboquant_triton.decode_mse_triton(codes, scales, bits, 1, 4, x.shape, dtype)
    assert y.dtype == t_y.dtype == dtype and y.shape == t_y.shape == x.shape
    torch.testing.assert_close(t_y.float(), y.float(), rtol=1e-2, atol=1e-2)
