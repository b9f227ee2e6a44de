"""Decode-step attention that reads packed KV blocks directly.

`packed_attention_reference(q [H_q, D], keys, values, key_codec=..., value_codec=...)`
computes softmax(q·kᵀ·scale)·v over a list of blocks `[H_kv, T_i, D]` (GQA:
query head h reads KV head h // (H_q / H_kv)). A block is either a `Packed`
record of the given codec or a plain float tensor (the uncompressed hot window,
sinks); the two mix freely. Blocks are dequantized one at a time and folded into
an online softmax (running max m, running sum l, accumulator acc), so
full-precision keys for the whole block set never exist at once.

Rotated codecs (TurboQuant: `rotate(x)`, `unrotate(y, d)`, `decode_rotated(p)`) are read
in their rotated basis: the query is rotated once (⟨Rq, Rk⟩ = ⟨q, k⟩) and the
rotated-value accumulator is unrotated once at the end (Σ p·Rv = R·Σ p·v);
plain and non-rotated blocks accumulate separately in the original basis.

Sparse-V skip (`v_skip_threshold > 0`) runs two passes: scores for every block
first (only [H_q, T] scalars are kept), then values, where a value row (KV head,
token) whose final normalized weight is below the threshold for *every* query
head of its group is left out of the sum; a value block none of whose rows
survive is never dequantized. The output is not renormalized, so its error is at
most (skipped mass) × max|v| per query head. Rows are skipped at block
granularity for dequantization: a block with at least one surviving row is
decoded whole (the codecs have no row-wise decode).

The math of each block (scores; fused online update; weighted sum of values) is
an `_Ops` backend: pure torch here, Triton in `attention_triton.py`
(`packed_attention_triton`, same signature); `dispatch.packed_attention` picks.
This module knows nothing of sessions, tiers, retrieval or which blocks to
include: callers pass the blocks to attend. (The service attends in
memsvc/cache/layer.py; this path serves benchmarks/codecs.py's cross-check.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .codec import Packed

Block = Packed | torch.Tensor


@dataclass
class AttentionStats:
    """What one call did.

    blocks:           number of (key, value) block pairs attended
    v_rows_total:     value rows (KV head × token) in the block set
    v_rows_skipped:   rows left out of the sum by the sparse-V threshold
    v_blocks_skipped: value blocks never dequantized (every row below threshold)
    """

    blocks: int = 0
    v_rows_total: int = 0
    v_rows_skipped: int = 0
    v_blocks_skipped: int = 0


class _Ops(NamedTuple):
    """Per-block math, all in fp32, shapes with G = query heads per KV head.

    scores(q [H_kv, G, Dk], k [H_kv, T, Dk], scale) -> s [H_kv, G, T]
    online(q, k, v [H_kv, T, Dv], m [H_kv, G], l [H_kv, G], acc [H_kv, G, Dv], scale)
        -> None; folds the block into m, l, acc in place (running-max softmax)
    weighted(p [H_kv, G, T], v [H_kv, T, Dv], acc [H_kv, G, Dv]) -> None; acc += p @ v
    """

    scores: Callable
    online: Callable
    weighted: Callable


# ---------------------------------------------------------------------------
# torch reference ops, in the kernel's operation order


def _scores_torch(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [H_kv, G, Dk], k: [H_kv, T, Dk] -> s: [H_kv, G, T]
    return (q @ k.transpose(-1, -2)) * scale


def _online_torch(q, k, v, m, l, acc, scale) -> None:
    s = _scores_torch(q, k, scale)                      # [H_kv, G, T]
    m_new = torch.maximum(m, s.amax(dim=-1))            # [H_kv, G]
    alpha = torch.exp(m - m_new)                        # 0 on the first block (m = -inf)
    p = torch.exp(s - m_new.unsqueeze(-1))              # [H_kv, G, T]
    acc.mul_(alpha.unsqueeze(-1)).add_(p @ v)           # [H_kv, G, Dv]
    l.mul_(alpha).add_(p.sum(dim=-1))
    m.copy_(m_new)


def _weighted_torch(p, v, acc) -> None:
    acc.add_(p @ v)


TORCH_OPS = _Ops(_scores_torch, _online_torch, _weighted_torch)


# ---------------------------------------------------------------------------
# the reference entry point


def packed_attention_reference(q, keys, values, *, key_codec, value_codec, scale=None, v_skip_threshold=0.0):
    """q: [H_q, D]; keys/values: blocks [H_kv, T_i, D] (Packed of key_codec / value_codec, or float tensors)
    -> (out [H_q, D] in q.dtype, AttentionStats). key_codec / value_codec: a codec or None (plain blocks only)."""
    return attend(q, keys, values, key_codec, value_codec, scale, v_skip_threshold, TORCH_OPS)


# ---------------------------------------------------------------------------
# the block loop, shared by both backends


def _rotates(codec) -> bool:
    # TurboQuant's hooks; with outlier channels it has two rotated spaces and reads via decode()
    hooks = all(hasattr(codec, a) for a in ("rotate", "unrotate", "decode_rotated"))
    return hooks and not getattr(codec, "outlier_channels", 0)


def _decode(block: Block, codec, rotated_ok: bool, device) -> tuple[torch.Tensor, bool]:
    """block -> (x [H_kv, T, D or D_pad] fp32 contiguous, whether x is in the codec's rotated basis)."""
    if isinstance(block, torch.Tensor):
        x, rotated = block, False
    elif codec is None:
        raise ValueError(f"a packed block ({block.codec!r}) needs its codec; got key/value codec None")
    elif rotated_ok:
        x, rotated = codec.decode_rotated(block), True
    else:
        x, rotated = codec.decode(block), False
    return x.to(device=device, dtype=torch.float32).contiguous(), rotated


def _shape_of(block: Block) -> tuple[int, ...]:
    return tuple(block.shape)


def attend(q, keys, values, key_codec, value_codec, scale, v_skip_threshold, ops: _Ops):
    """Shared driver: validation, decoding, rotation, skipping; `ops` does the math."""
    if q.dim() != 2:
        raise ValueError(f"q must be [H_q, D], got shape {tuple(q.shape)}")
    if len(keys) != len(values):
        raise ValueError(f"got {len(keys)} key blocks but {len(values)} value blocks")
    if not keys:
        raise ValueError("attention needs at least one key/value block")
    if not 0.0 <= v_skip_threshold < 1.0:
        raise ValueError(f"v_skip_threshold must be in [0, 1), got {v_skip_threshold!r}")
    h_q, d = q.shape
    h_kv = _shape_of(keys[0])[0]
    for kb, vb in zip(keys, values):
        ks, vs = _shape_of(kb), _shape_of(vb)
        if len(ks) != 3 or len(vs) != 3 or ks[0] != h_kv or vs[0] != h_kv or ks[2] != d or vs[2] != d or ks[1] != vs[1]:
            raise ValueError(f"blocks must be [H_kv={h_kv}, T, D={d}] with matching T; got keys {ks}, values {vs}")
    if h_q % h_kv:
        raise ValueError(f"H_q={h_q} is not a multiple of H_kv={h_kv}")
    g = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    # qg: [H_kv, G, D]; the rotated query only if some key block is read rotated
    dev = q.device
    qg = q.float().reshape(h_kv, g, d).contiguous()
    k_rot = _rotates(key_codec)
    v_rot = _rotates(value_codec)
    qg_rot = None
    if k_rot and any(isinstance(b, Packed) for b in keys):
        qg_rot = key_codec.rotate(qg).to(device=dev, dtype=torch.float32).contiguous()  # [H_kv, G, D_pad]

    stats = AttentionStats(blocks=len(keys), v_rows_total=h_kv * sum(_shape_of(b)[1] for b in keys))
    accs: dict[bool, torch.Tensor] = {}  # rotated? -> accumulator [H_kv, G, Dv]

    def acc_for(rotated: bool, dv: int) -> torch.Tensor:
        if rotated not in accs:
            accs[rotated] = torch.zeros(h_kv, g, dv, device=dev)
        return accs[rotated]

    m = torch.full((h_kv, g), -math.inf, device=dev)
    l = torch.zeros(h_kv, g, device=dev)

    if v_skip_threshold == 0.0:
        # one pass: online softmax over (decoded key, decoded value) block pairs
        for kb, vb in zip(keys, values):
            k, kr = _decode(kb, key_codec, k_rot, dev)
            v, vr = _decode(vb, value_codec, v_rot, dev)
            acc = acc_for(vr, v.shape[-1])
            m_old = m.clone()
            ops.online(qg_rot if kr else qg, k, v, m, l, acc, scale)
            other = accs.get(not vr)
            if other is not None:  # the other basis' accumulator follows the new running max
                other.mul_(torch.exp(m_old - m).unsqueeze(-1))
        norm = l.unsqueeze(-1)
    else:
        # pass 1: scores only ([H_kv, G, T_i] per block), with the running max and sum
        scores = []
        for kb in keys:
            k, kr = _decode(kb, key_codec, k_rot, dev)
            s = ops.scores(qg_rot if kr else qg, k, scale)
            m_new = torch.maximum(m, s.amax(dim=-1))
            l = l * torch.exp(m - m_new) + torch.exp(s - m_new.unsqueeze(-1)).sum(dim=-1)
            m = m_new
            scores.append(s)
        # pass 2: values, only for rows some query head of the group weighs >= threshold
        for s, vb in zip(scores, values):
            p = torch.exp(s - m.unsqueeze(-1)) / l.unsqueeze(-1)   # [H_kv, G, T], final weights
            keep = (p >= v_skip_threshold).any(dim=1)              # [H_kv, T]
            stats.v_rows_skipped += int((~keep).sum())
            if not keep.any():
                stats.v_blocks_skipped += 1
                continue
            v, vr = _decode(vb, value_codec, v_rot, dev)
            p = p * keep.unsqueeze(1)
            ops.weighted(p.contiguous(), v, acc_for(vr, v.shape[-1]))
        norm = torch.ones(h_kv, g, 1, device=dev)

    # out: [H_kv, G, D] = (acc + R⁻¹ acc_rot) / l
    out = torch.zeros(h_kv, g, d, device=dev)
    if False in accs:
        out += accs[False]
    if True in accs:
        out += value_codec.unrotate(accs[True], d).float()
    return (out / norm).reshape(h_q, d).to(q.dtype), stats
