"""Attention over packed blocks: torch reference and Triton (interpreted on CPU) against dense attention.

Two codecs stand in for the real ones so these tests need nothing else:
`_Fp16` (decode = fp16 round trip) and `_Rotated` (a per-head Haar rotation,
zero-padded to a power of two, with the `rotate` / `unrotate` / `decode_rotated`
surface that TurboQuant offers). Low-rank blocks go through as a real codec.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when attention_triton is imported

import math
from dataclasses import dataclass

import pytest
import torch

from memsvc.kernels.attention import packed_attention_reference
from memsvc.kernels.attention_triton import packed_attention_triton
from memsvc.kernels.codec import Packed
from memsvc.kernels.dispatch import packed_attention
from memsvc.kernels.lowrank_codec import LowRankCodec

BACKENDS = {"reference": packed_attention_reference, "triton": packed_attention_triton}


@dataclass(frozen=True)
class _Fp16:
    name: str = "test_fp16"

    def encode(self, x):
        return Packed(self.name, tuple(x.shape), x.dtype, {"x": x.to(torch.float16).contiguous()})

    def decode(self, p):
        return p.tensors["x"].to(p.dtype)

    def nbytes(self, p):
        return p.nbytes()


@dataclass(frozen=True)
class _Rotated:
    """Stores R·x (fp32, padded to D_pad) per KV head; decode_rotated hands back R·x."""

    n_heads: int
    d: int
    name: str = "test_rotated"

    @property
    def r(self):  # [H, D_pad, D_pad] orthogonal
        d_pad = 1 << (self.d - 1).bit_length()
        g = torch.Generator().manual_seed(7)
        return torch.linalg.qr(torch.randn(self.n_heads, d_pad, d_pad, generator=g))[0]

    def rotate(self, x):  # [H, T, D] -> [H, T, D_pad]
        r = self.r
        x = torch.nn.functional.pad(x.float(), (0, r.shape[-1] - x.shape[-1]))
        return x @ r.transpose(-1, -2)

    def unrotate(self, y, d):  # [H, T, D_pad] -> [H, T, d]
        return (y @ self.r)[..., :d]

    def encode(self, x):
        return Packed(self.name, tuple(x.shape), x.dtype, {"y": self.rotate(x).contiguous()})

    def decode_rotated(self, p):
        return p.tensors["y"]

    def decode(self, p):
        return self.unrotate(p.tensors["y"], self.d).to(p.dtype)

    def nbytes(self, p):
        return p.nbytes()


def _dense(q, k, v, scale=None):
    """q: [H_q, D], k/v: [H_kv, T, D] -> softmax attention [H_q, D] in fp64."""
    h_q, d = q.shape
    g = h_q // k.shape[0]
    k = k.double().repeat_interleave(g, dim=0)
    v = v.double().repeat_interleave(g, dim=0)
    s = torch.einsum("hd,htd->ht", q.double(), k) * (scale or 1 / math.sqrt(d))
    return torch.einsum("ht,htd->hd", s.softmax(-1), v)


def _case(h_kv, groups, ts, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(h_kv * groups, d, generator=g)
    ks = [torch.randn(h_kv, t, d, generator=g) * 1.5 for t in ts]
    vs = [torch.randn(h_kv, t, d, generator=g) for t in ts]
    return q, ks, vs


def _err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


SHAPES = [  # (H_kv, groups, block lengths, D)
    (2, 1, (1,), 64),
    (2, 3, (17, 63), 96),
    (1, 3, (65, 1, 17), 128),
    (3, 1, (63, 65), 64),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_kv,groups,ts,d", SHAPES)
def test_matches_dense_attention_on_decoded_blocks(backend, h_kv, groups, ts, d):
    q, ks, vs = _case(h_kv, groups, ts, d)
    codec = _Fp16()
    pk, pv = [codec.encode(k) for k in ks], [codec.encode(v) for v in vs]
    out, stats = BACKENDS[backend](q, pk, pv, key_codec=codec, value_codec=codec)
    dec_k = torch.cat([codec.decode(p) for p in pk], dim=1)
    dec_v = torch.cat([codec.decode(p) for p in pv], dim=1)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _err(out, _dense(q, dec_k, dec_v)) < 1e-5  # tight: same decoded tensors
    assert _err(out, _dense(q, torch.cat(ks, 1), torch.cat(vs, 1))) < 2e-2  # looser: fp16 storage
    assert stats.blocks == len(ts) and stats.v_rows_total == h_kv * sum(ts) and stats.v_rows_skipped == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_kv,groups,ts,d", [(2, 3, (17, 65), 96), (1, 1, (63,), 64)])
def test_rotated_codec_reads_blocks_in_the_rotated_basis(backend, h_kv, groups, ts, d):
    q, ks, vs = _case(h_kv, groups, ts, d, seed=1)
    codec = _Rotated(h_kv, d)
    out, _ = BACKENDS[backend](q, [codec.encode(k) for k in ks], [codec.encode(v) for v in vs],
                               key_codec=codec, value_codec=codec)
    assert _err(out, _dense(q, torch.cat(ks, 1), torch.cat(vs, 1))) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_plain_rotated_and_lowrank_blocks(backend):
    # cold blocks rotated, a low-rank key block with fp16 values, and an fp32 hot window
    h_kv, groups, d = 2, 3, 64
    q, ks, vs = _case(h_kv, groups, (17, 63, 1, 5), d, seed=2)
    rot, lr, fp = _Rotated(h_kv, d), LowRankCodec(), _Fp16()
    keys = [rot.encode(ks[0]), rot.encode(ks[1]), ks[2], ks[3]]
    values = [rot.encode(vs[0]), rot.encode(vs[1]), vs[2], vs[3]]
    out, _ = BACKENDS[backend](q, keys, values, key_codec=rot, value_codec=rot)
    assert _err(out, _dense(q, torch.cat(ks, 1), torch.cat(vs, 1))) < 1e-5
    # low-rank keys (full rank) + fp16 values, next to a plain hot window
    keys = [lr.encode(ks[0]), ks[1]]
    values = [fp.encode(vs[0]), vs[1]]
    out, _ = BACKENDS[backend](q, keys, values, key_codec=lr, value_codec=fp)
    dec_k = torch.cat([lr.decode(keys[0]), ks[1]], 1)
    dec_v = torch.cat([fp.decode(values[0]), vs[1]], 1)
    assert _err(out, _dense(q, dec_k, dec_v)) < 1e-5
    assert _err(out, _dense(q, torch.cat(ks[:2], 1), torch.cat(vs[:2], 1))) < 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotated", [False, True])
def test_sparse_v_skip(backend, rotated):
    h_kv, groups, d, ts = 2, 3, 64, (17, 63, 65)
    q, ks, vs = _case(h_kv, groups, ts, d, seed=3)
    q = q * 3  # peaked attention: most weights are tiny
    codec = _Rotated(h_kv, d) if rotated else _Fp16()
    pk, pv = [codec.encode(k) for k in ks], [codec.encode(v) for v in vs]
    run = BACKENDS[backend]
    base, s0 = run(q, pk, pv, key_codec=codec, value_codec=codec, v_skip_threshold=0.0)
    assert s0.v_rows_skipped == 0 and s0.v_blocks_skipped == 0

    thr = 1e-3
    out, s1 = run(q, pk, pv, key_codec=codec, value_codec=codec, v_skip_threshold=thr)
    assert s1.v_rows_total == h_kv * sum(ts) and 0 < s1.v_rows_skipped < s1.v_rows_total
    # error bound: per query head, (weight of the skipped rows) x max |v|
    dec_k = torch.cat([codec.decode(p) for p in pk], 1).double()
    dec_v = torch.cat([codec.decode(p) for p in pv], 1).double()
    w = torch.einsum("hd,htd->ht", q.double(), dec_k.repeat_interleave(groups, 0)) / math.sqrt(d)
    w = w.softmax(-1).reshape(h_kv, groups, -1)
    skipped = (w < thr).all(dim=1)                                   # [H_kv, T]
    assert int(skipped.sum()) == s1.v_rows_skipped
    mass = (w * skipped.unsqueeze(1)).sum(-1).reshape(-1)            # [H_q]
    bound = mass * dec_v.abs().amax()
    err = (out.double() - base.double()).abs().amax(-1)
    assert (err <= bound + 1e-5).all() and err.max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_with_no_surviving_row_is_not_decoded(backend):
    h_kv, d = 1, 64
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, d, generator=g)
    hot_k = (q * 4).reshape(1, 1, d).expand(1, 8, d).clone()          # all the attention
    cold_k = -(q * 4).reshape(1, 1, d).expand(1, 17, d).clone()       # none of it
    vs = [torch.randn(1, 17, d, generator=g), torch.randn(1, 8, d, generator=g)]
    decoded = []

    class Counting(_Fp16):
        def decode(self, p):
            decoded.append(p.shape)
            return super().decode(p)

    codec = Counting()
    keys = [codec.encode(cold_k), hot_k]
    values = [codec.encode(vs[0]), vs[1]]
    decoded.clear()
    out, stats = BACKENDS[backend](q, keys, values, key_codec=codec, value_codec=codec, v_skip_threshold=1e-4)
    assert stats.v_blocks_skipped == 1 and stats.v_rows_skipped == 17
    assert decoded == [(1, 17, d)]  # the cold keys were scored; their values never decoded
    torch.testing.assert_close(out, vs[1].mean(1), atol=1e-4, rtol=1e-4)


def test_dispatch_and_dtype():
    q, ks, vs = _case(2, 3, (17,), 64)
    out, _ = packed_attention(q.half(), [k.half() for k in ks], [v.half() for v in vs], key_codec=None, value_codec=None)
    assert out.dtype == torch.float16
    assert _err(out, _dense(q.half(), ks[0].half(), vs[0].half())) < 1e-3


@pytest.mark.parametrize(
    "bad",
    [
        dict(q=torch.zeros(3, 64)),                        # 3 not a multiple of H_kv=2
        dict(q=torch.zeros(2, 32)),                        # D mismatch
        dict(q=torch.zeros(64)),                           # not [H_q, D]
        dict(values=[]),                                   # count mismatch
        dict(v_skip_threshold=1.5),
        dict(keys=[_Fp16().encode(torch.zeros(2, 4, 64))]),  # packed block but no codec
    ],
)
def test_bad_input_is_a_value_error(bad):
    args = dict(q=torch.zeros(2, 64), keys=[torch.zeros(2, 4, 64)], values=[torch.zeros(2, 4, 64)], v_skip_threshold=0.0)
    args.update(bad)
    with pytest.raises(ValueError):
        packed_attention_reference(args["q"], args["keys"], args["values"], key_codec=None, value_codec=None,
                                   v_skip_threshold=args["v_skip_threshold"])


TURBO = [  # (key codec, value codec) registry names: the tiered default K4/V3, QJL keys, Haar, outlier channels
    ("turbo4", "turbo3"),
    ("turbo3_qjl", "turbo3"),
    ("turbo3_haar", "turbo3_haar"),
    ("turbo3_out8", "turbo3"),  # outlier channels: no rotated read, decoded whole instead
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kname,vname", TURBO)
@pytest.mark.parametrize("h_kv,groups,ts,d", [(2, 3, (17, 65), 96), (3, 1, (1, 63), 64), (1, 3, (17,), 128)])
def test_turboquant_blocks_rotate_the_query_once(backend, kname, vname, h_kv, groups, ts, d):
    from memsvc.kernels.registry import get_codec

    kc, vc = get_codec(kname, layer=5), get_codec(vname, layer=5)
    q, ks, vs = _case(h_kv, groups, ts, d, seed=5)
    pk, pv = [kc.encode(k) for k in ks], [vc.encode(v) for v in vs]
    hot_k, hot_v = torch.randn(h_kv, 4, d), torch.randn(h_kv, 4, d)  # an uncompressed hot window
    out, _ = BACKENDS[backend](q, pk + [hot_k], pv + [hot_v], key_codec=kc, value_codec=vc)
    dec_k = torch.cat([kc.decode(p) for p in pk] + [hot_k], 1)
    dec_v = torch.cat([vc.decode(p) for p in pv] + [hot_v], 1)
    # tight against the decoded tensors: rotation is exact up to fp32 rounding
    assert _err(out, _dense(q, dec_k, dec_v)) < 1e-4
    # loose against full precision: 3-4 bit codes (QJL keys are unbiased but noisy through softmax: not held to it)
    if not kc.qjl:
        full = _dense(q, torch.cat(ks + [hot_k], 1), torch.cat(vs + [hot_v], 1))
        assert ((out.double() - full).norm() / full.norm()).item() < 0.4  # measured 0.2-0.34 at 3-4 bits
