"""Gated residual + LayerNorm (no affine) + adaLN modulation, fused:

    x_new = x + gate[s] * h
    y     = LN(x_new) * (1 + scale[s]) + shift[s]

Token layout: x, h (T, D) (h may have another float dtype than x, e.g. bf16 under autocast) with the
token->sample map ``seg`` (T,) int32; gate, shift, scale (N, D) (row stride free, unit column stride, e.g.
chunks of the adaLN GEMM output).  One forward pass writes x_new (x's dtype) and y (``out_dtype``); the LN
statistics are taken in fp32 over x_new as stored (rounded to x's dtype), so forward and backward agree
with the unfused ``x = x + gate * h; y = modulate(norm(x))``.  The forward saves its input x (which the op
before it keeps for its own backward anyway), h and the per-token mean/rstd (2 floats a token), not x_new:
one backward pass recomputes x_new exactly as the forward rounded it, then x_hat, and gives dx, dh and the
per-sample dgate, dshift, dscale (fp32 sums over each tile's rows of a sample, one atomic add per tile,
sample and chunk, or deterministic as in ``ln_modulate``).  Programs own tiles of token rows and walk D in
chunks (``_tiles``): the forward's second walk and the backward's two walks recompute x_new from x, gate
and h.  A missing gradient of either output (output unused) counts as zeros.
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
def _gated_residual_fwd_kernel(X, H, GATE, SHIFT, SCALE, SEG, XN, Y, MEAN, RSTD, T, D, stride_x, stride_h,
                               stride_gate, stride_shift, stride_scale, stride_xn, stride_y, eps,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    chunk = tl.arange(0, BLOCK_D)
    s = tl.load(SEG + rows, mask=rmask, other=0).to(tl.int64)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(0, D, BLOCK_D):
        cols = c + chunk
        m = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gate = tl.load(GATE + s[:, None] * stride_gate + cols[None, :], mask=m, other=0.0).to(tl.float32)
        # x_new rounded to its storage dtype: the statistics (and the backward's x_hat) use what is stored
        xn = (x + gate * h).to(XN.dtype.element_ty)
        tl.store(XN + rows[:, None] * stride_xn + cols[None, :], xn, mask=m)
        mean, m2, count = merge_chunk_stats(mean, m2, count, xn.to(tl.float32), m)
    rstd = 1.0 / tl.sqrt(m2 / D + eps)
    for c in range(0, D, BLOCK_D):  # x_new recomputed from the inputs (bit for bit) rather than read back
        cols = c + chunk
        m = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gate = tl.load(GATE + s[:, None] * stride_gate + cols[None, :], mask=m, other=0.0).to(tl.float32)
        xn = (x + gate * h).to(XN.dtype.element_ty).to(tl.float32)
        shift = tl.load(SHIFT + s[:, None] * stride_shift + cols[None, :], mask=m, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = (xn - mean[:, None]) * rstd[:, None] * (1.0 + scale) + shift
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _gated_residual_bwd_kernel(DXN, DY, X, H, GATE, SCALE, SEG, MEAN, RSTD, DX, DH, DGATE, DSHIFT, DSCALE, T, D,
                               stride_dxn, stride_dy, stride_x, stride_h, stride_gate, stride_scale, stride_dx,
                               stride_dh, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DXN: tl.constexpr,
                               HAS_DY: tl.constexpr, DETERMINISTIC: tl.constexpr):
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
    if HAS_DY:
        for c in range(0, D, BLOCK_D):
            cols = c + chunk
            m = rmask[:, None] & (cols < D)[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
            gate = tl.load(GATE + s[:, None] * stride_gate + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xn = (x + gate * h).to(X.dtype.element_ty).to(tl.float32)  # x_new as the forward stored it
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
            scale = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (xn - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * (1.0 + scale)
            sum_g += tl.sum(g, axis=1)
            sum_gx += tl.sum(g * xhat, axis=1)
    for c in range(0, D, BLOCK_D):
        cols = c + chunk
        cmask = cols < D
        m = rmask[:, None] & cmask[None, :]
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gate = tl.load(GATE + s[:, None] * stride_gate + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_DXN:
            dxn = tl.load(DXN + rows[:, None] * stride_dxn + cols[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            dxn = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if HAS_DY:
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xn = (x + gate * h).to(X.dtype.element_ty).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
            scale = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (xn - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * (1.0 + scale)
            dxn += rstd[:, None] * (g - (sum_g / D)[:, None] - xhat * (sum_gx / D)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dxn.to(DX.dtype.element_ty), mask=m)
        tl.store(DH + rows[:, None] * stride_dh + cols[None, :], (dxn * gate).to(DH.dtype.element_ty), mask=m)
        if HAS_DY:
            add_sample_sums(DGATE, dxn * h, DSHIFT, dy, DSCALE, dy * xhat, s_rows, rows, rmask, cols, cmask, D,
                            s_lo, s_hi, NUM=3, DETERMINISTIC=DETERMINISTIC)
        else:
            add_sample_sums(DGATE, dxn * h, DGATE, h, DGATE, h, s_rows, rows, rmask, cols, cmask, D, s_lo, s_hi,
                            NUM=1, DETERMINISTIC=DETERMINISTIC)


def _validate(x, h, gate, shift, scale, seg, out_dtype):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_stride_one=True)
    t, d = x.shape
    check_tensor("h", h, shape=(t, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    check_tensor("gate", gate, ndim=2, shape=(None, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    n = gate.shape[0]
    check_tensor("shift", shift, shape=(n, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    check_tensor("scale", scale, shape=(n, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    check_tensor("seg", seg, shape=(t,), dtypes=(torch.int32,), device=x.device, contiguous=True)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(dt) for dt in FLOAT_DTYPES]} or None, got {out_dtype}")


@torch.library.custom_op("maskdit::gated_residual_ln_modulate_fwd", mutates_args=())
def _fwd(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
         seg: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype]
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    t, d = x.shape
    x_new = new_output((t, d), x.dtype, x.device)
    y = new_output((t, d), out_dtype or x.dtype, x.device)
    mean = new_output((t,), torch.float32, x.device)
    rstd = new_output((t,), torch.float32, x.device)
    if t:
        cfg = tile(d)
        _gated_residual_fwd_kernel[(triton.cdiv(t, cfg.block_m),)](
            x, h, gate, shift, scale, seg, x_new, y, mean, rstd, t, d, x.stride(0), h.stride(0), gate.stride(0),
            shift.stride(0), scale.stride(0), x_new.stride(0), y.stride(0), eps, BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)
    return x_new, y, mean, rstd


@_fwd.register_fake
def _fwd_fake(x, h, gate, shift, scale, seg, eps, out_dtype):
    t, d = x.shape
    return x.new_empty((t, d)), x.new_empty((t, d), dtype=out_dtype or x.dtype), \
        x.new_empty(t, dtype=torch.float32), x.new_empty(t, dtype=torch.float32)


@torch.library.custom_op("maskdit::gated_residual_ln_modulate_bwd", mutates_args=())
def _bwd(dx_new: Optional[torch.Tensor], dy: Optional[torch.Tensor], x: torch.Tensor, h: torch.Tensor,
         gate: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x's dtype), dh (h's dtype) and fp32 (N, D) dgate, dshift, dscale; a None gradient is zeros."""
    t, d = x.shape
    n = gate.shape[0]
    det = deterministic(x.device)
    if dx_new is not None and dx_new.stride(-1) != 1:
        dx_new = dx_new.contiguous()
    if dy is not None and dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = new_output((t, d), x.dtype, x.device)
    dh = new_output((t, d), h.dtype, h.device)
    dgate, dshift, dscale = (per_sample_sums_buffer(t, n, d, x.device, det) for _ in range(3))
    if t:
        has_dxn, has_dy = dx_new is not None, dy is not None
        dxn_arg = dx_new if has_dxn else x  # unused placeholders when a gradient is missing
        dy_arg = dy if has_dy else x
        cfg = tile(d)
        _gated_residual_bwd_kernel[(triton.cdiv(t, cfg.block_m),)](
            dxn_arg, dy_arg, x, h, gate, scale, seg, mean, rstd, dx, dh, dgate, dshift, dscale, t, d,
            dxn_arg.stride(0), dy_arg.stride(0), x.stride(0), h.stride(0), gate.stride(0), scale.stride(0),
            dx.stride(0), dh.stride(0), BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, HAS_DXN=has_dxn, HAS_DY=has_dy,
            DETERMINISTIC=det, num_warps=cfg.num_warps)
    return (dx, dh, *(per_sample_sums(b, seg, n, det) for b in (dgate, dshift, dscale)))


@_bwd.register_fake
def _bwd_fake(dx_new, dy, x, h, gate, scale, seg, mean, rstd):
    t, d = x.shape
    n = gate.shape[0]
    return x.new_empty((t, d)), h.new_empty((t, d)), x.new_empty((n, d), dtype=torch.float32), \
        x.new_empty((n, d), dtype=torch.float32), x.new_empty((n, d), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, h, gate, shift, scale, seg, eps, out_dtype = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, h, gate, scale, seg, mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zero (T, D) tensor is read


def _backward(ctx, dx_new, dy, _dmean, _drstd):
    x, h, gate, scale, seg, mean, rstd = ctx.saved_tensors
    dx, dh, dgate, dshift, dscale = _bwd(dx_new, dy, x, h, gate, scale, seg, mean, rstd)
    return dx, dh, dgate.to(gate.dtype), dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def gated_residual_ln_modulate(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, seg: torch.Tensor, eps: float = LN_EPS,
                               out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``x_new = x + gate[seg] * h`` and ``y = LN(x_new) * (1 + scale[seg]) + shift[seg]`` over (T, D)
    tokens; returns (x_new in x's dtype, y in ``out_dtype``, default x's)."""
    _validate(x, h, gate, shift, scale, seg, out_dtype)
    x_new, y, _, _ = _fwd(x, h, gate, shift, scale, seg, eps, out_dtype)
    return x_new, y


def gated_residual_ln_modulate_reference(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                         scale: torch.Tensor, seg: torch.Tensor, eps: float = LN_EPS,
                                         out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of ``gated_residual_ln_modulate`` (fp32 math; x_new rounded to x's dtype
    before the LayerNorm, as it is stored)."""
    s = seg.long()
    x_new = (x.float() + gate.float()[s] * h.float()).to(x.dtype)
    y = torch.nn.functional.layer_norm(x_new.float(), x.shape[-1:], eps=eps)
    y = y * (1 + scale.float()[s]) + shift.float()[s]
    return x_new, y.to(out_dtype or x.dtype)
