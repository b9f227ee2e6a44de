"""TurboQuant codec: round trips, bytes, registry names, attention hooks, QJL, outliers, config errors."""
import pytest
import torch

from memsvc.kernels import lloyd_max
from memsvc.kernels.codec import Packed
from memsvc.kernels.registry import CODECS, get_codec
from memsvc.kernels.turboquant_codec import TurboQuant, turbo_kv

TURBO = sorted(n for n in CODECS if n.startswith("turbo"))


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("MEMSVC_KERNELS", "reference")
    torch.manual_seed(0)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", TURBO)
@pytest.mark.parametrize("shape", [(17, 64), (2, 3, 17, 96), (3, 65, 128)])
def test_round_trip_shape_dtype_bytes(name, shape, kv_like):
    codec = get_codec(name)
    x = kv_like(shape, dtype=torch.float16)
    p = codec.encode(x)
    y = codec.decode(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert codec.nbytes(p) == len(p.to_bytes())
    assert torch.equal(codec.decode(Packed.from_bytes(p.to_bytes())), y)
    assert _rel(y, x) < 0.5


@pytest.mark.parametrize("bits,limit", [(2, 0.36), (3, 0.2), (4, 0.11)])
def test_error_falls_with_bits_and_bytes_are_real(bits, limit, kv_like):
    x = kv_like((3, 64, 128), dtype=torch.float16)
    p = TurboQuant(bits=bits).encode(x)
    assert _rel(TurboQuant(bits=bits).decode(p), x) < limit
    assert p.tensors["codes"].shape == (3, 64, 128 * bits // 8)
    assert p.tensors["scales"].dtype == torch.float16
    payload = sum(t.numel() * t.element_size() for t in p.tensors.values())
    assert payload * 8 / x.numel() == pytest.approx(bits + 16 / 128)


def test_norm_correction_restores_norms():
    x = torch.randn(2, 33, 64)
    y = TurboQuant(bits=2).decode(TurboQuant(bits=2).encode(x))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=2e-3, atol=1e-3)
    y0 = TurboQuant(bits=2, norm_correction=False).decode(TurboQuant(bits=2, norm_correction=False).encode(x))
    assert (y0.norm(dim=-1) / x.norm(dim=-1)).mean() < 0.97  # the MSE code shrinks (~sqrt(1 - 0.117))


def test_zero_vectors_decode_to_zero():
    x = torch.zeros(2, 5, 64)
    x[0, 1] = 1.0
    y = TurboQuant().decode(TurboQuant().encode(x))
    assert torch.all(y[1] == 0) and torch.all(y[0, 0] == 0)


@pytest.mark.parametrize("rotation", ["hadamard", "haar"])
def test_attention_hooks(rotation):
    """Scores and outputs in the rotated domain equal those of decode()."""
    codec = TurboQuant(bits=3, rotation=rotation, layer=5)
    k = torch.randn(3, 40, 96)  # [H, T, D]
    v = torch.randn(3, 40, 96)
    q = torch.randn(3, 96)  # [H, D]
    pk, pv = codec.encode(k), codec.encode(v)
    kr, vr = codec.decode_rotated(pk), codec.decode_rotated(pv)  # [H, T, 128]
    assert kr.shape == (3, 40, 128)
    qr = codec.rotate(q, head_axis=-2)  # [H, 128]
    w = torch.softmax(torch.einsum("hd,htd->ht", qr, kr), dim=-1)
    out = codec.unrotate(torch.einsum("ht,htd->hd", w, vr), 96, head_axis=-2)
    kd, vd = codec.decode(pk), codec.decode(pv)
    w_ref = torch.softmax(torch.einsum("hd,htd->ht", q, kd), dim=-1)
    torch.testing.assert_close(out, torch.einsum("ht,htd->hd", w_ref, vd), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(codec.unrotate(codec.rotate(k), 96), k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codec.inner_product(q, pk), torch.einsum("hd,htd->ht", q, kd), atol=1e-3, rtol=1e-3)


def test_outlier_channels_keep_the_heavy_channels_better(kv_like):
    x = kv_like((2, 64, 64), heavy=(3, 17, 40), scale=8.0)
    plain = TurboQuant(bits=2)
    out = TurboQuant(bits=2, outlier_channels=8)
    p = out.encode(x)
    assert p.tensors["idx"].shape == (2, 8)
    for h in range(2):
        assert {3, 17, 40} <= set(p.tensors["idx"][h].tolist())
    assert _rel(out.decode(p), x) < _rel(plain.decode(plain.encode(x)), x)
    with pytest.raises(ValueError):
        out.decode_rotated(p)


def test_qjl_record_layout():
    x = torch.randn(2, 17, 64)
    p = TurboQuant(bits=3, qjl=True).encode(x)
    assert p.tensors["codes"].shape == (2, 17, 64 * 2 // 8)  # 2-bit MSE part
    assert p.tensors["qjl"].shape == (2, 17, 8)  # 1 bit per coordinate
    assert p.tensors["rnorms"].dtype == torch.float16


def test_turbo_kv_pair():
    k, v = turbo_kv(4, 3, layer=2)
    assert (k.bits, v.bits, k.layer, v.name) == (4, 3, 2, "turbo3")


@pytest.mark.parametrize(
    "config",
    [
        dict(bits=5),
        dict(bits=0),
        dict(bits=1, qjl=True),
        dict(rotation="dct"),
        dict(outlier_channels=-1),
        dict(bits=4, outlier_channels=4),  # 5-bit outliers do not pack
        dict(bits=3, qjl=True, outlier_channels=4),
    ],
)
def test_bad_config_is_a_value_error(config):
    with pytest.raises(ValueError):
        TurboQuant(**config)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError):
        TurboQuant().encode(torch.zeros(64))
    with pytest.raises(ValueError):
        TurboQuant().encode(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError):
        TurboQuant(outlier_channels=8).encode(torch.zeros(4, 8))


def test_codes_are_bucketize_of_the_rotated_unit_vector():
    from memsvc.kernels.packing import unpack_bits_reference as unpack_bits
    from memsvc.kernels.rotation import rotate

    x = torch.randn(3, 9, 64)
    p = TurboQuant(bits=3, norm_correction=False).encode(x)
    y = rotate(x, "hadamard", 0, 0)
    u = y / y.norm(dim=-1, keepdim=True)
    want = torch.bucketize(u, lloyd_max.boundaries(3, 64))
    got = unpack_bits(p.tensors["codes"], 3, 64).long()
    assert (got != want).float().mean() < 1e-4
    torch.testing.assert_close(p.tensors["scales"].float(), x.norm(dim=-1), rtol=1e-3, atol=1e-3)
