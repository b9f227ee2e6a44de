"""Low-rank keys: full rank is exact, rank selection, a given basis, composition, bytes."""
import pytest
import torch

from memsvc.kernels.codec import Packed
from memsvc.kernels.lowrank_codec import LowRankCodec
from memsvc.kernels.registry import get_codec


def _keys(shape, rank=None, seed=0):
    """Key-like block: a few strong directions, a channel bias, a little noise."""
    g = torch.Generator().manual_seed(seed)
    *lead, t, d = shape
    r = rank or d
    z = torch.randn(*lead, t, r, generator=g)
    w = torch.randn(*lead, r, d, generator=g) / r**0.5
    return z @ w + 0.5 * torch.randn(d, generator=g)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", [(3, 17, 64), (2, 3, 65, 128), (2, 1, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("center", [False, True])
def test_full_rank_is_exact(shape, dtype, center):
    x = _keys(shape).to(dtype)
    codec = LowRankCodec(center=center)
    p = codec.encode(x)
    y = codec.decode(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert p.meta["rank"] == shape[-1]
    # fp16 latent and basis: error at fp16 rounding level (plus the output dtype's own)
    tol = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]
    assert _rel(y, x) < tol


def test_round_trip_through_bytes_and_nbytes():
    x = _keys((3, 17, 64))
    codec = get_codec("lowrank_ev99")
    p = codec.encode(x)
    raw = p.to_bytes()
    assert codec.nbytes(p) == len(raw)
    q = Packed.from_bytes(raw)
    torch.testing.assert_close(codec.decode(q), codec.decode(p), rtol=0, atol=0)


def test_rank_by_explained_variance_finds_the_true_rank():
    # exactly rank-8 data (no bias): 99.9% variance needs 8 directions, and they reconstruct it
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, 8, generator=g) @ torch.randn(3, 8, 64, generator=g)
    codec = LowRankCodec(explained_variance=0.999)
    p = codec.encode(x)
    assert p.meta["rank"] == 8
    assert p.tensors["basis"].shape == (3, 64, 8) and p.tensors["latent"].shape == (3, 200, 8)
    assert _rel(codec.decode(p), x) < 2e-3


def test_rank_budget_wins_and_error_falls_with_rank():
    x = _keys((2, 128, 64), rank=24)
    errs = []
    for r in (4, 8, 16, 25):  # 24 directions + the channel bias
        codec = LowRankCodec(rank=r, explained_variance=0.5)
        p = codec.encode(x)
        assert p.meta["rank"] == r
        errs.append(_rel(codec.decode(p), x))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 2e-3
    assert LowRankCodec(rank=1000).encode(x).meta["rank"] == 64


def test_fitted_basis_is_reused_on_new_blocks_and_stored():
    # a session basis fitted on earlier keys, applied to a later block of the same subspace
    seen, later = _keys((3, 256, 64), rank=16, seed=2).split([192, 64], dim=-2)
    codec = LowRankCodec(rank=17)
    basis, mean = codec.fit(seen)
    assert basis.shape == (3, 64, 17) and mean is None
    eye = basis.transpose(-1, -2) @ basis
    torch.testing.assert_close(eye, torch.eye(17).expand(3, 17, 17), atol=1e-5, rtol=0)
    p = codec.encode(later, basis=basis)
    torch.testing.assert_close(p.tensors["basis"], basis.half())
    # the record decodes on its own (basis inside), and the later block lies in the span
    assert _rel(codec.decode(Packed.from_bytes(p.to_bytes())), later) < 3e-3


def test_broadcast_basis_over_a_batch():
    x = _keys((2, 3, 33, 64))
    codec = LowRankCodec()
    basis, _ = codec.fit(x[0])  # [3, 64, 64] for all batch entries
    assert _rel(codec.decode(codec.encode(x, basis=basis)), x) < 2e-3


def test_lowrank_saves_bytes_at_low_rank():
    x = _keys((3, 512, 64), rank=8).half()
    p = LowRankCodec(rank=8).encode(x)
    assert p.nbytes() < 0.25 * x.numel() * 2


def test_latent_through_a_composed_codec():
    x = _keys((3, 17, 64))
    codec = LowRankCodec(rank=64, latent_codec=get_codec("lowrank"))  # any codec composes
    p = codec.encode(x)
    assert "latent.latent" in p.tensors and p.meta["latent"]["codec"] == "lowrank"
    assert _rel(codec.decode(Packed.from_bytes(p.to_bytes())), x) < 5e-3


def test_latent_quantized_8bit():
    x = _keys((3, 64, 64), rank=16)
    codec = LowRankCodec(rank=17, latent_codec=get_codec("k8v8_k"))  # 16 directions + the channel bias
    p = codec.encode(x)
    assert p.meta["latent"]["codec"] == "k8v8_k" and p.tensors["latent.codes"].dtype == torch.uint8
    assert p.nbytes() < LowRankCodec(rank=17).encode(x).nbytes()
    assert _rel(codec.decode(Packed.from_bytes(p.to_bytes())), x) < 1e-2


def test_registry_builds_the_latent_codec_from_a_name():
    x = _keys((3, 64, 64), rank=16)
    by_name = get_codec("lowrank", rank=17, latent_codec="k8v8_k")
    assert by_name.latent_codec == get_codec("k8v8_k")
    assert by_name.encode(x).to_bytes() == LowRankCodec(rank=17, latent_codec=get_codec("k8v8_k")).encode(x).to_bytes()
    assert get_codec("lowrank_ev99_k8").latent_codec == get_codec("k8v8_k")
    with pytest.raises(ValueError, match="valid codecs"):
        get_codec("lowrank", latent_codec="nope")


def test_a_quantized_latent_needs_a_latent_codec_to_decode():
    p = LowRankCodec(rank=8, latent_codec=get_codec("k8v8_k")).encode(_keys((2, 17, 64)))
    with pytest.raises(ValueError, match="k8v8_k"):
        LowRankCodec(rank=8).decode(p)


def test_all_zero_block_and_single_token():
    z = torch.zeros(2, 5, 64)
    assert torch.equal(LowRankCodec(explained_variance=0.9).decode(LowRankCodec(explained_variance=0.9).encode(z)), z)
    one = _keys((3, 1, 64))
    assert _rel(LowRankCodec().decode(LowRankCodec().encode(one)), one) < 2e-3


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 0}, {"rank": -3}, {"explained_variance": 0.0}, {"explained_variance": 1.5}, {"latent_codec": "nope"}],
)
def test_bad_config_is_a_value_error(kwargs):
    with pytest.raises(ValueError):
        LowRankCodec(**kwargs)


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError):
        LowRankCodec().encode(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError):
        LowRankCodec().encode(torch.zeros(64))
    with pytest.raises(ValueError):
        LowRankCodec().encode(torch.zeros(2, 4, 64), basis=torch.zeros(2, 32, 4))
