"""The contract every registered codec keeps, run over every name in `registry.CODECS`.

A codec joins this matrix by adding its registry line; nothing else. Each
registered factory must therefore be constructible with no arguments
(`CODECS[name]()`): defaults are its configuration. The names are read at
collection time, so a new codec is covered by the next test run.

Checked for each codec, on real-ish data (seeded Gaussian with a few heavy
channels, as keys have): shape and dtype survive a round trip (fp32, fp16,
bf16; [3, 17, 64] and [2, 3, 65, 128]); `nbytes(p) == len(p.to_bytes())`; a
record read back with `Packed.from_bytes` decodes to the same tensor; 8-bit
codecs lose < 1% (relative Frobenius error); the stored bits per value stay
under the codec's nominal `bits` + OVERHEAD_BITS (for codecs that have a `bits`
attribute; an 8-bit codec is one whose `bits` is 8).
"""
import pytest
import torch

from memsvc.kernels.codec import Packed
from memsvc.kernels.registry import CODECS, get_codec

NAMES = sorted(CODECS)
NOMINAL_BITS = {n: getattr(CODECS[n](), "bits", None) for n in NAMES}  # None: no nominal width (low-rank)
SHAPES = [(3, 17, 64), (2, 3, 65, 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Allowance on top of a codec's nominal `bits` per value, on [2, 3, 65, 128]:
# per-group fp16 scales and minima (KIVI group 32 along 65 tokens: 3 groups, ~1.5 bits),
# fp16 norms, outlier channels at one bit more, the QJL residual norm, and the record header.
OVERHEAD_BITS = 2.0


def rel_err(y: torch.Tensor, x: torch.Tensor) -> float:
    x, y = x.float(), y.float()
    return ((y - x).norm() / x.norm()).item()


@pytest.fixture(scope="module", params=NAMES)
def codec(request):
    return CODECS[request.param]()  # every factory must work with no arguments


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_keeps_shape_and_dtype(codec, shape, dtype, kv_like):
    x = kv_like(shape, seed=1, scale=4.0, dtype=dtype)
    p = codec.encode(x)
    assert isinstance(p, Packed)
    y = codec.decode(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert rel_err(y, x) < 1.0  # sanity: a decode, not noise (quality is each codec's own test)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nbytes_is_what_is_stored(codec, shape, kv_like):
    x = kv_like(shape, seed=2, scale=4.0, dtype=torch.float16)
    p = codec.encode(x)
    raw = p.to_bytes()
    assert codec.nbytes(p) == p.nbytes() == len(raw)
    back = Packed.from_bytes(raw)
    assert back.codec == p.codec and back.shape == p.shape and back.dtype == p.dtype
    assert torch.equal(codec.decode(back), codec.decode(p))
    assert back.to_bytes() == raw


@pytest.mark.parametrize("name", [n for n in NAMES if NOMINAL_BITS[n] == 8])
def test_eight_bit_error_below_one_percent(name, kv_like):
    codec = CODECS[name]()
    for shape in SHAPES:
        x = kv_like(shape, seed=3, scale=4.0)
        assert rel_err(codec.decode(codec.encode(x)), x) < 0.01


# codecs without a `bits` attribute (low-rank, dense-and-sparse) have no nominal width to hold them to
@pytest.mark.parametrize("name", [n for n in NAMES if NOMINAL_BITS[n] is not None])
def test_bits_per_value(name, kv_like):
    codec, bits = CODECS[name](), NOMINAL_BITS[name]
    x = kv_like((2, 3, 65, 128), seed=4, scale=4.0, dtype=torch.float16)
    p = codec.encode(x)
    bpv = p.nbytes() * 8 / x.numel()
    assert bpv < bits + OVERHEAD_BITS, f"{name}: {bpv:.3f} bits/value for nominal {bits}"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        get_codec("no-such-codec")
    msg = str(e.value)
    assert "no-such-codec" in msg
    for name in NAMES:
        assert name in msg


def test_registered_names_match_records():
    # a record names the codec that made it, so a reader can find its decoder in the registry
    x = torch.randn(1, 4, 64)
    for name in NAMES:
        assert CODECS[name]().encode(x).codec == name
