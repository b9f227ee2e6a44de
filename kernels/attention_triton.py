"""Triton twin of `attention.packed_attention_reference`: the per-block math as kernels.

Same signature, and the same result within float rounding; the block loop,
decoding, rotation and sparse-V selection are shared (`attention.attend`),
the kernels do the scores, the fused online-softmax update and the weighted sum
of values over one dequantized tile of keys/values at a time. One program per
query head; it reads KV head `hq // G`. A query is one vector, so the inner
products are broadcast-multiply-and-sum rather than `tl.dot`.

On CPU the kernels run only under `TRITON_INTERPRET=1`, which Triton reads when
this module is imported (at `@triton.jit`): set it before importing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _Ops, attend


@triton.jit
def _scores_kernel(q_ptr, k_ptr, s_ptr, T, DK, G, scale,
                   BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr):
    # q: [H_kv*G, DK], k: [H_kv, T, DK], s: [H_kv*G, T]; grid (H_q, cdiv(T, BLOCK_T))
    hq = tl.program_id(0)
    tb = tl.program_id(1)
    h = hq // G
    dk = tl.arange(0, BLOCK_DK)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    q = tl.load(q_ptr + hq * DK + dk, mask=dk < DK, other=0.0)
    k = tl.load(k_ptr + h * T * DK + t[:, None] * DK + dk[None, :],
                mask=tm[:, None] & (dk[None, :] < DK), other=0.0)
    s = tl.sum(k * q[None, :], axis=1) * scale
    tl.store(s_ptr + hq * T + t, s, mask=tm)


@triton.jit
def _online_kernel(q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, T, DK, DV, G, scale,
                   BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    # q: [H_kv*G, DK], k: [H_kv, T, DK], v: [H_kv, T, DV], m/l: [H_kv*G], acc: [H_kv*G, DV]
    hq = tl.program_id(0)
    h = hq // G
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + hq * DK + dk, mask=dk < DK, other=0.0)
    m = tl.load(m_ptr + hq)
    l = tl.load(l_ptr + hq)
    acc = tl.load(acc_ptr + hq * DV + dv, mask=dv < DV, other=0.0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        k = tl.load(k_ptr + h * T * DK + t[:, None] * DK + dk[None, :],
                    mask=tm[:, None] & (dk[None, :] < DK), other=0.0)
        s = tl.sum(k * q[None, :], axis=1) * scale
        s = tl.where(tm, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_ptr + h * T * DV + t[:, None] * DV + dv[None, :],
                    mask=tm[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(m_ptr + hq, m)
    tl.store(l_ptr + hq, l)
    tl.store(acc_ptr + hq * DV + dv, acc, mask=dv < DV)


@triton.jit
def _weighted_kernel(p_ptr, v_ptr, acc_ptr, T, DV, G,
                     BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr):
    # p: [H_kv*G, T], v: [H_kv, T, DV], acc: [H_kv*G, DV]; acc += p @ v
    hq = tl.program_id(0)
    h = hq // G
    dv = tl.arange(0, BLOCK_DV)
    acc = tl.load(acc_ptr + hq * DV + dv, mask=dv < DV, other=0.0)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < T
        p = tl.load(p_ptr + hq * T + t, mask=tm, other=0.0)
        v = tl.load(v_ptr + h * T * DV + t[:, None] * DV + dv[None, :],
                    mask=tm[:, None] & (dv[None, :] < DV), other=0.0)
        acc += tl.sum(p[:, None] * v, axis=0)
    tl.store(acc_ptr + hq * DV + dv, acc, mask=dv < DV)


_BLOCK_T = 16


def _scores_triton(q, k, scale):
    # q: [H_kv, G, DK], k: [H_kv, T, DK] -> s: [H_kv, G, T]
    h_kv, g, dk = q.shape
    t = k.shape[1]
    s = torch.empty(h_kv, g, t, device=q.device, dtype=torch.float32)
    grid = (h_kv * g, triton.cdiv(t, _BLOCK_T))
    _scores_kernel[grid](q, k, s, t, dk, g, scale, BLOCK_T=_BLOCK_T, BLOCK_DK=triton.next_power_of_2(dk))
    return s


def _online_triton(q, k, v, m, l, acc, scale):
    h_kv, g, dk = q.shape
    t, dv = k.shape[1], v.shape[-1]
    _online_kernel[(h_kv * g,)](
        q, k, v, m, l, acc, t, dk, dv, g, scale,
        BLOCK_T=_BLOCK_T, BLOCK_DK=triton.next_power_of_2(dk), BLOCK_DV=triton.next_power_of_2(dv),
    )


def _weighted_triton(p, v, acc):
    h_kv, g, t = p.shape
    dv = v.shape[-1]
    _weighted_kernel[(h_kv * g,)](p, v, acc, t, dv, g, BLOCK_T=_BLOCK_T, BLOCK_DV=triton.next_power_of_2(dv))


TRITON_OPS = _Ops(_scores_triton, _online_triton, _weighted_triton)


def packed_attention_triton(q, keys, values, *, key_codec, value_codec, scale=None, v_skip_threshold=0.0):
    """The Triton twin of `attention.packed_attention_reference` (same signature; `dispatch.packed_attention` picks)."""
    return attend(q, keys, values, key_codec, value_codec, scale, v_skip_threshold, TRITON_OPS)
