"""LayerNorm (no affine) + adaLN modulation: y = LN(x) * (1 + scale[s]) + shift[s].

Token layout: x (T, D) with the token->sample map ``seg`` (T,) int32; shift, scale (N, D) (row stride
free, unit column stride, e.g. chunks of the adaLN GEMM output).  Statistics in fp32.  Programs own
tiles of token rows and walk D in chunks (``_tiles``).  The forward saves x and the per-token mean/rstd
(2 floats a token); the backward recomputes x_hat and gives dx and the per-sample dshift, dscale (fp32
sums over each tile's rows of a sample, one atomic add per tile, sample and chunk; in deterministic mode,
``_common.deterministic``, each such sum is stored in its own row and the rows are added per sample in a
fixed order).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_tensor, deterministic, new_output, per_sample_sums, per_sample_sums_buffer
from ._tiles import add_sample_sums, merge_chunk_stats, tile

LN_EPS = 1e-6


@triton.jit
def _ln_modulate_fwd_kernel(X, Y, SHIFT, SCALE, SEG, MEAN, RSTD, T, D, stride_x, stride_y, stride_shift,
                            stride_scale, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    chunk = tl.arange(0, BLOCK_D)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(0, D, BLOCK_D):
        cols = c + chunk
        m = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        mean, m2, count = merge_chunk_stats(mean, m2, count, x, m)
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    s = tl.load(SEG + rows, mask=rmask, other=0).to(tl.int64)
    for c in range(0, D, BLOCK_D):
        cols = c + chunk
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + s[:, None] * stride_shift + cols[None, :], mask=m, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None] * (1.0 + scale) + shift
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_modulate_bwd_kernel(X, DY, DX, SCALE, SEG, MEAN, RSTD, DSHIFT, DSCALE, T, D, stride_x, stride_dy,
                            stride_dx, stride_scale, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                            DETERMINISTIC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    chunk = tl.arange(0, BLOCK_D)
    s_rows = tl.load(SEG + rows, mask=rmask, other=0)
    s_lo = tl.min(tl.where(rmask, s_rows, 2147483647), axis=0)
    s_hi = tl.max(tl.where(rmask, s_rows, -1), axis=0)
    s = s_rows.to(tl.int64)
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    # the row sums of the LayerNorm gradient: sum(g) and sum(g * x_hat), g = dy * (1 + scale)
    sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_gx = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(0, D, BLOCK_D):
        cols = c + chunk
        m = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=m, other=0.0).to(tl.float32)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * (1.0 + scale)
        sum_g += tl.sum(g, axis=1)
        sum_gx += tl.sum(g * xhat, axis=1)
    for c in range(0, D, BLOCK_D):
        cols = c + chunk
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=m, other=0.0).to(tl.float32)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * (1.0 + scale)
        dx = rstd[:, None] * (g - (sum_g / D)[:, None] - xhat * (sum_gx / D)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
        add_sample_sums(DSHIFT, dy, DSCALE, dy * xhat, DSCALE, dy, s_rows, rows, rmask, cols, cmask, D, s_lo, s_hi,
                        NUM=2, DETERMINISTIC=DETERMINISTIC)


def _validate(x, shift, scale, seg):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_stride_one=True)
    t, d = x.shape
    check_tensor("shift", shift, ndim=2, shape=(None, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    n = shift.shape[0]
    check_tensor("scale", scale, shape=(n, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    check_tensor("seg", seg, shape=(t,), dtypes=(torch.int32,), device=x.device, contiguous=True)


@torch.library.custom_op("maskdit::ln_modulate_fwd", mutates_args=())
def _fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor, eps: float,
         out_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, d = x.shape
    y = new_output((t, d), out_dtype or x.dtype, x.device)
    mean = new_output((t,), torch.float32, x.device)
    rstd = new_output((t,), torch.float32, x.device)
    if t:
        cfg = tile(d)
        _ln_modulate_fwd_kernel[(triton.cdiv(t, cfg.block_m),)](
            x, y, shift, scale, seg, mean, rstd, t, d, x.stride(0), y.stride(0), shift.stride(0), scale.stride(0),
            eps, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return y, mean, rstd


@_fwd.register_fake
def _fwd_fake(x, shift, scale, seg, eps, out_dtype):
    t, d = x.shape
    return x.new_empty((t, d), dtype=out_dtype or x.dtype), x.new_empty(t, dtype=torch.float32), \
        x.new_empty(t, dtype=torch.float32)


@torch.library.custom_op("maskdit::ln_modulate_bwd", mutates_args=())
def _bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor, mean: torch.Tensor,
         rstd: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, d = x.shape
    det = deterministic(x.device)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = new_output((t, d), x.dtype, x.device)
    dshift = per_sample_sums_buffer(t, num_samples, d, x.device, det)
    dscale = per_sample_sums_buffer(t, num_samples, d, x.device, det)
    if t:
        cfg = tile(d)
        _ln_modulate_bwd_kernel[(triton.cdiv(t, cfg.block_m),)](
            x, dy, dx, scale, seg, mean, rstd, dshift, dscale, t, d, x.stride(0), dy.stride(0), dx.stride(0),
            scale.stride(0), BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, DETERMINISTIC=det, num_warps=cfg.num_warps)
    return dx, per_sample_sums(dshift, seg, num_samples, det), per_sample_sums(dscale, seg, num_samples, det)


@_bwd.register_fake
def _bwd_fake(dy, x, scale, seg, mean, rstd, num_samples):
    d = x.shape[1]
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty((num_samples, d), dtype=torch.float32), x.new_empty((num_samples, d), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, shift, scale, seg, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, seg, mean, rstd)
    ctx.shift_dtype, ctx.num_samples = shift.dtype, shift.shape[0]
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, seg, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _bwd(dy, x, scale, seg, mean, rstd, ctx.num_samples)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor,
                eps: float = LN_EPS, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused LN(x) * (1 + scale[seg]) + shift[seg] over (T, D) tokens; output in ``out_dtype`` (default x's)."""
    _validate(x, shift, scale, seg)
    return _fwd(x, shift, scale, seg, eps, out_dtype)[0]


def ln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor,
                          eps: float = LN_EPS, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch reference of ``ln_modulate`` (fp32 math)."""
    s = seg.long()
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    y = y * (1 + scale.float()[s]) + shift.float()[s]
    return y.to(out_dtype or x.dtype)
