"""Triton kernels for the low-rank key codec: same contract as the references in `lowrank.py`.

- `project_triton(x, basis, mean)`: latent [..., T, r] = (x - mean) @ basis, fp32;
- `reconstruct_triton(latent, basis, mean, dtype)`: x_hat [..., T, D] = latent @ basis^T (+ mean).

Leading dims of x / latent, basis [..., D, r] and mean [..., 1, D] broadcast as in
torch and are flattened to one head index h. One program owns one tile of one
head: `project` a [BLOCK_T, BLOCK_R] tile of the latent with the whole of D in
one tile (D masked up to a power of two); `reconstruct` a [BLOCK_T, BLOCK_D] tile
of x_hat, looping over r in chunks of BLOCK_R (r is arbitrary: masked, not
required to be a power of two). Products are `tl.dot` in IEEE fp32
(`input_precision="ieee"`: no TF32 on the GPU), so results agree with the torch
matmul within float rounding, not bit for bit (the summation order differs).

Imported lazily by `dispatch.py`: `TRITON_INTERPRET=1` must be set before this
module is first imported for the kernels to run on CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MIN_DOT = 16  # tl.dot needs every tile dimension >= 16
_MAX_R_CHUNK = 64


@triton.jit
def _project_kernel(x_ptr, b_ptr, m_ptr, out_ptr, T, D, R,
                    s_xh, s_xt, s_xd, s_bh, s_bd, s_br, s_mh, s_md,
                    HAS_MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # x: [H, T, D], basis: [H, D, R], mean: [H, 1, D], out: [H, T, R] fp32 contiguous
    # grid (H, cdiv(T, BLOCK_T), cdiv(R, BLOCK_R))
    h = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    r_ok = r < R
    x_ok = t_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + h * s_xh + t[:, None] * s_xt + d[None, :] * s_xd, mask=x_ok, other=0.0).to(tl.float32)
    if HAS_MEAN:
        m = tl.load(m_ptr + h * s_mh + d * s_md, mask=d_ok, other=0.0).to(tl.float32)
        x = tl.where(x_ok, x - m[None, :], 0.0)
    b = tl.load(b_ptr + h * s_bh + d[:, None] * s_bd + r[None, :] * s_br,
                mask=d_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.dot(x, b, input_precision="ieee")  # [BLOCK_T, BLOCK_R]
    tl.store(out_ptr + (h * T + t[:, None]) * R + r[None, :], acc, mask=t_ok[:, None] & r_ok[None, :])


@triton.jit
def _reconstruct_kernel(l_ptr, b_ptr, m_ptr, out_ptr, T, D, R,
                        s_lh, s_lt, s_lr, s_bh, s_bd, s_br, s_mh, s_md,
                        HAS_MEAN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # latent: [H, T, R], basis: [H, D, R], mean: [H, 1, D], out: [H, T, D] contiguous (fp32 or fp16)
    # grid (H, cdiv(T, BLOCK_T)); the whole of D (masked to BLOCK_D) per program, R in chunks
    h = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    d_ok = d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        lat = tl.load(l_ptr + h * s_lh + t[:, None] * s_lt + r[None, :] * s_lr,
                      mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        # basis^T tile: [BLOCK_R, BLOCK_D]
        bt = tl.load(b_ptr + h * s_bh + d[None, :] * s_bd + r[:, None] * s_br,
                     mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(lat, bt, input_precision="ieee")
    if HAS_MEAN:
        m = tl.load(m_ptr + h * s_mh + d * s_md, mask=d_ok, other=0.0).to(tl.float32)
        acc = acc + m[None, :]
    tl.store(out_ptr + (h * T + t[:, None]) * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


def _kernel_float(t: torch.Tensor) -> torch.Tensor:
    # fp16/fp32 go in as they are (loaded to fp32 in the kernel); others (bf16) through an exact fp32 copy
    return t if t.dtype in (torch.float16, torch.float32) else t.float()


def _heads(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    # [..., a, b] broadcast to [*lead, a, b] and viewed as [H, a, b] (stride 0 where broadcast, when possible)
    return t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])


def _mean_2d(mean: torch.Tensor | None, D: int) -> torch.Tensor | None:
    if mean is None:
        return None
    if mean.dim() == 1:
        mean = mean.unsqueeze(0)
    if mean.shape[-1] != D or mean.shape[-2] != 1:
        raise ValueError(f"mean must be [..., 1, D={D}], got {tuple(mean.shape)}")
    return mean


def _block_t(T: int) -> int:
    return max(_MIN_DOT, min(triton.next_power_of_2(max(T, 1)), 32))


def _block(n: int, cap: int | None = None) -> int:
    b = max(_MIN_DOT, triton.next_power_of_2(max(n, 1)))
    return min(b, cap) if cap else b


def project_triton(x: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """x [..., T, D], basis [..., D, r], mean [..., 1, D] or None -> latent [..., T, r] fp32, as `project_reference`."""
    T, D = x.shape[-2:]
    if basis.dim() < 2 or basis.shape[-2] != D:
        raise ValueError(f"basis must be [..., D={D}, r], got {tuple(basis.shape)}")
    mean = _mean_2d(mean, D)
    R = basis.shape[-1]
    lead = torch.broadcast_shapes(x.shape[:-2], basis.shape[:-2], *(() if mean is None else (mean.shape[:-2],)))
    xh = _heads(_kernel_float(x), lead)
    bh = _heads(_kernel_float(basis), lead)
    mh = None if mean is None else _heads(_kernel_float(mean), lead)
    H = xh.shape[0]
    out = torch.empty((H, T, R), dtype=torch.float32, device=x.device)
    if out.numel():
        bt, bd, br = _block_t(T), _block(D), _block(R, _MAX_R_CHUNK)
        m = mh if mh is not None else xh  # dummy pointer when there is no mean
        _project_kernel[(H, triton.cdiv(T, bt), triton.cdiv(R, br))](
            xh, bh, m, out, T, D, R,
            xh.stride(0), xh.stride(1), xh.stride(2), bh.stride(0), bh.stride(1), bh.stride(2),
            m.stride(0), m.stride(2),
            HAS_MEAN=mh is not None, BLOCK_T=bt, BLOCK_D=bd, BLOCK_R=br,
        )
    return out.reshape(*lead, T, R)


def reconstruct_triton(latent: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """latent [..., T, r], basis [..., D, r], mean [..., 1, D] or None -> x_hat [..., T, D] of `dtype`,
    as `reconstruct_reference`."""
    T, R = latent.shape[-2:]
    if basis.dim() < 2 or basis.shape[-1] != R:
        raise ValueError(f"basis must be [..., D, r={R}], got {tuple(basis.shape)}")
    D = basis.shape[-2]
    mean = _mean_2d(mean, D)
    lead = torch.broadcast_shapes(latent.shape[:-2], basis.shape[:-2], *(() if mean is None else (mean.shape[:-2],)))
    lh = _heads(_kernel_float(latent), lead)
    bh = _heads(_kernel_float(basis), lead)
    mh = None if mean is None else _heads(_kernel_float(mean), lead)
    H = lh.shape[0]
    out_dtype = dtype if dtype in (torch.float16, torch.float32) else torch.float32
    out = torch.empty((H, T, D), dtype=out_dtype, device=latent.device)
    if out.numel():
        bt, bd, br = _block_t(T), _block(D), _block(R, _MAX_R_CHUNK)
        m = mh if mh is not None else lh  # dummy pointer when there is no mean
        _reconstruct_kernel[(H, triton.cdiv(T, bt))](
            lh, bh, m, out, T, D, R,
            lh.stride(0), lh.stride(1), lh.stride(2), bh.stride(0), bh.stride(1), bh.stride(2),
            m.stride(0), m.stride(2),
            HAS_MEAN=mh is not None, BLOCK_T=bt, BLOCK_D=bd, BLOCK_R=br,
        )
    return out.reshape(*lead, T, D).to(dtype)
