"""Dense-and-sparse outliers: the top entries come back exactly, the rest through the dense codec."""
import math

import pytest
import torch

from memsvc.kernels.codec import Packed
from memsvc.kernels.registry import get_codec
from memsvc.kernels.sparse_outliers_codec import SparseOutlierCodec

# dense codecs to compose with (by registry name; the codec itself takes the codec object)
UNIFORM = ["kivi4_k", "kivi4_v", "kivi2_k", "k8v8_v"]
DENSE = UNIFORM + ["turbo3", "lowrank"]


def _heavy_tailed(shape, seed=0):
    """Gaussian block with a sprinkle of 20x spikes, like the outliers KVQuant removes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    spikes = torch.rand(shape, generator=g) < 0.005
    return torch.where(spikes, 20 * torch.randn(shape, generator=g), x)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dense", DENSE)
@pytest.mark.parametrize("shape", [(3, 17, 64), (2, 3, 65, 128), (1, 1, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_outliers_are_exact_and_the_record_decodes_alone(dense, shape, dtype):
    x = _heavy_tailed(shape).to(dtype)
    codec = SparseOutlierCodec(outlier_fraction=0.01, dense=get_codec(dense))
    p = codec.encode(x)
    k = math.ceil(0.01 * x.numel())
    assert p.tensors["outlier_value"].shape == (k,) and p.tensors["outlier_index"].shape == (k,)
    raw = p.to_bytes()
    assert codec.nbytes(p) == len(raw)
    y = codec.decode(Packed.from_bytes(raw))
    assert y.shape == x.shape and y.dtype == x.dtype
    # the k largest magnitudes come back exactly (bit-exact for half input, fp16-rounded for fp32)
    top = x.reshape(-1).float().abs().topk(k).indices
    want = x.reshape(-1)[top]
    got = y.reshape(-1)[top]
    if dtype == torch.float32:
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)
    else:
        assert torch.equal(got, want)


def test_index_width_follows_block_size():
    dense = get_codec(DENSE[0])
    small = SparseOutlierCodec(dense=dense).encode(_heavy_tailed((2, 256, 128)))   # 65536 entries
    large = SparseOutlierCodec(dense=dense).encode(_heavy_tailed((2, 257, 128)))   # 65792 entries
    assert small.tensors["outlier_index"].dtype == torch.int16
    assert large.tensors["outlier_index"].dtype == torch.int32
    # int16 holds uint16 bits: indices past 32767 survive
    x = torch.zeros(2, 256, 128)
    x[1, 255, 127] = 50.0
    c = SparseOutlierCodec(outlier_fraction=1e-5, dense=dense)
    assert c.decode(c.encode(x))[1, 255, 127] == 50.0


@pytest.mark.parametrize("dense", UNIFORM)
def test_outliers_cut_the_dense_error(dense):
    x = _heavy_tailed((3, 64, 64), seed=1)
    base = get_codec(dense)
    err_dense = _rel(base.decode(base.encode(x)), x)
    codec = SparseOutlierCodec(outlier_fraction=0.01, dense=base)
    p = codec.encode(x)
    err = _rel(codec.decode(p), x)
    assert err < 0.7 * err_dense
    # the price: ~1% of entries at 2 + 2 bytes each
    extra = p.nbytes() - base.encode(x).nbytes()
    assert extra <= 4 * math.ceil(0.01 * x.numel()) + 400


def test_zero_fraction_is_the_dense_codec_alone():
    inner = get_codec(DENSE[0])
    x = _heavy_tailed((3, 17, 64))
    p = SparseOutlierCodec(outlier_fraction=0.0, dense=inner).encode(x)
    assert p.tensors["outlier_value"].numel() == 0
    torch.testing.assert_close(SparseOutlierCodec(outlier_fraction=0.0, dense=inner).decode(p), inner.decode(inner.encode(x)))


@pytest.mark.parametrize("name,dense", [("sparse_outliers", "kivi4_k"), ("sparse_outliers_v", "kivi4_v")])
def test_registered_defaults(name, dense):
    c = get_codec(name)
    assert c.dense == get_codec(dense)
    x = _heavy_tailed((3, 17, 64))
    p = c.encode(x)
    assert p.codec == name and p.meta["dense"]["codec"] == dense
    assert c.decode(p).shape == x.shape
    # a dense codec named in the config is built by the registry
    assert get_codec(name, dense="kivi2_k").encode(x).to_bytes() == SparseOutlierCodec(
        name=name, dense=get_codec("kivi2_k")).encode(x).to_bytes()


@pytest.mark.parametrize("kwargs", [{"outlier_fraction": -0.1}, {"outlier_fraction": 1.0}, {"dense": "kivi4_k"},
                                    {"dense": None}])
def test_bad_config_is_a_value_error(kwargs):
    with pytest.raises(ValueError):
        SparseOutlierCodec(**{"dense": get_codec(DENSE[0]), **kwargs})


def test_a_sparse_codec_cannot_be_its_own_dense_part():
    with pytest.raises(ValueError, match="sparse"):
        SparseOutlierCodec(dense=get_codec("sparse_outliers"))
    with pytest.raises(ValueError, match="valid codecs"):
        get_codec("sparse_outliers", dense="nope")


def test_bad_input_is_a_value_error():
    c = SparseOutlierCodec(dense=get_codec(DENSE[0]))
    with pytest.raises(ValueError):
        c.encode(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError):
        c.encode(torch.zeros(64))


@pytest.mark.parametrize("dense", ["kivi4_k", "kivi2_v", "k8v8_v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stacked_blocks_decode_as_each_alone(dense, dtype):
    """Blocks of one layout stacked on a first axis (as the tiered cache reads many cold blocks in one decode:
    shaped tensors stacked, the sparse lists concatenated) decode to each block's own decode, bit for bit."""
    from memsvc.cache.tiered.cold import stack_packed

    codec = SparseOutlierCodec(dense=get_codec(dense))
    blocks = [_heavy_tailed((3, 64, 64), seed=s).to(dtype) for s in range(5)]
    packed = [codec.encode(b) for b in blocks]
    want = torch.stack([codec.decode(p) for p in packed])
    for stacked in (stack_packed(packed), Packed.stack_from_bytes([p.to_bytes() for p in packed])):
        assert stacked.shape == (5, 3, 64, 64)
        assert torch.equal(codec.decode(stacked), want)
    assert torch.equal(codec.decode(stack_packed(packed[:1]))[0], want[0])
