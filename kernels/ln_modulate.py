"""LayerNorm (no affine) + adaLN modulation: y = LN(x) * (1 + scale[s]) + shift[s].

Token layout: x (T, D) with the token->sample map ``seg`` (T,) int32; shift, scale (N, D) (row stride
free, unit column stride, e.g. chunks of the adaLN GEMM output).  Statistics in fp32.  The forward
saves x and the per-token mean/rstd (2 floats a token); the backward recomputes x_hat and gives dx and
the per-sample dshift, dscale (fp32 partial sums in registers over runs of same-sample tokens, one
atomic add per run and program; in deterministic mode, ``_common.deterministic``, each run's sum is
stored in its own row and the rows are added per sample in a fixed order: that mode needs the samples in
order, ``seg`` never decreasing, as the packed layout has them, and checks it).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    autograd_op,
    backward_options,
    block_size,
    cast_sums,
    cdiv,
    check_ordered_samples,
    check_out_dtype,
    check_samples,
    check_tensor,
    column_blocks,
    deterministic,
    forward_warps,
    new_output,
    per_sample_sums,
    per_sample_sums_buffer,
    row_samples_buffer,
    rows_per_program,
    same_samples,
)

LN_EPS = 1e-6
FWD_ROWS = 1  # tokens per forward program (a launch parameter: ``bench/kernels.py`` times 1, 2 and 4)
BWD_ROWS = 32  # tokens per backward program (fewer on a GPU that would be left idle: ``rows_per_program``)
# software-pipeline stages of the backward's row loop (1: each row loaded when it is processed; more: the next
# rows' loads issued first) and warps of a backward program.  H200, D 1152, CUDA-graph times of
# bench/kernels.py's launch-parameter rows: 0.188 ms with 1 stage and 8 warps (``num_warps``' rule), 0.153
# with 4 warps, 0.134 with 4 warps and 3 stages
BWD_STAGES = 3
BWD_WARPS = 4
# the backward's row as two power-of-two column blocks where they cover it more tightly (``column_blocks``:
# 1024 + 128 at D 1152 instead of 2048).  Offline sm_90 build of the training step's variant (fp32 x, bf16 dy;
# 4 warps, 3 stages): 72 instead of 108 registers a thread and 17.5 instead of 32.9 KB of shared memory, so 7
# programs an SM instead of 4, and 822 instead of 978 SASS instructions.  A launch parameter bench/kernels.py
# times; not yet timed on a GPU.  (The forwards stay in one block: split, the same build gave them 396
# instead of 316 instructions and 19 instead of 5 barriers, their one-row programs being short already.)
BWD_SPLIT_COLUMNS = False


@triton.jit
def _ln_modulate_rows(x, mask, D, eps, shift, scale):
    """LayerNorm of each row of the fp32 tile ``x`` [ROWS, BLOCK_D] (zero where not ``mask``), modulated:
    (y, mean, rstd), mean and rstd [ROWS]."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    return xc * rstd[:, None] * (1.0 + scale) + shift, mean, rstd


@triton.jit
def _add_pairs(a, b, c, d):
    return a + c, b + d


@triton.jit
def _ln_bwd_terms(dy, x, mean, rstd, scale, cmask):
    """One column block of a row's LayerNorm backward: g = dy * (1 + scale) and x_hat (zero outside cmask)."""
    xhat = tl.where(cmask, (x - mean) * rstd, 0.0)
    return dy * (1.0 + scale), xhat


@triton.jit
def _ln_bwd_sums(g, xhat):
    """A column block's share of a row's two sums, sum(g) and sum(g * x_hat): one reduction over pairs (one
    exchange between warps, two barriers) instead of two."""
    return tl.reduce((g, g * xhat), 0, _add_pairs)


@triton.jit
def _ln_bwd_dx(g, xhat, rstd, mean_g, mean_gx):
    """The LayerNorm's input gradient on a column block, from the row's means of g and g * x_hat."""
    return rstd * (g - mean_g - xhat * mean_gx)


@triton.jit
def _flush_partial(PTR, s, pid, D, cols, acc, mask, DETERMINISTIC: tl.constexpr):
    """Add a run's partial sum to sample ``s``'s row (atomic), or, deterministic, store it in row pid + s of
    the (programs + N, D) buffer that the launcher reduces per sample in a fixed order
    (``_common.per_sample_sums_buffer``)."""
    if DETERMINISTIC:
        tl.store(PTR + (pid + s) * D + cols, acc, mask=mask)
    else:
        tl.atomic_add(PTR + s * D + cols, acc, mask=mask, sem="relaxed")


@triton.jit
def _ln_modulate_fwd_kernel(X, Y, SHIFT, SCALE, SEG, MEAN, RSTD, T, D, stride_x, stride_y, stride_shift,
                            stride_scale, eps, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < T
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SEG + rows, mask=rmask, other=0).to(tl.int64)
    shift = tl.load(SHIFT + s[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = _ln_modulate_rows(x, mask, D, eps, shift, scale)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _flush_shift_scale(DSHIFT, DSCALE, s, pid, D, cols, acc_shift, acc_scale, mask, DETERMINISTIC: tl.constexpr):
    """``_flush_partial`` of a column block's dshift and dscale sums; returns the accumulators zeroed."""
    _flush_partial(DSHIFT, s, pid, D, cols, acc_shift, mask, DETERMINISTIC)
    _flush_partial(DSCALE, s, pid, D, cols, acc_scale, mask, DETERMINISTIC)
    return tl.zeros_like(acc_shift), tl.zeros_like(acc_scale)


@triton.jit
def _ln_modulate_bwd_part(X, DY, SCALE, r, s, cols, cmask, valid, stride_x, stride_dy, stride_scale, mean, rstd):
    """One column block of row r: (dy, g, x_hat) in fp32 (``_ln_bwd_terms``)."""
    x = tl.load(X + r * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r * stride_dy + cols, mask=cmask & valid, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + s * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    g, xhat = _ln_bwd_terms(dy, x, mean, rstd, scale, cmask)
    return dy, g, xhat


@triton.jit
def _ln_modulate_bwd_kernel(X, DY, DX, SCALE, SEG, MEAN, RSTD, DSHIFT, DSCALE, ROW_SAMPLES, T, D, stride_x,
                            stride_dy, stride_dx, stride_scale, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                            ROWS: tl.constexpr, DETERMINISTIC: tl.constexpr, STAGES: tl.constexpr):
    # a row's columns as one power-of-two block [0, BLOCK_A), or two (BLOCK_B > 0: [BLOCK_A, BLOCK_A + BLOCK_B)
    # too, ``_common.column_blocks``); each "if BLOCK_B > 0" is resolved at compile time
    pid = tl.program_id(0).to(tl.int64)
    ca = tl.arange(0, BLOCK_A)
    ma = ca < D
    zero_a = tl.zeros([BLOCK_A], dtype=tl.int64)  # scalar conditions are broadcast to vectors before use
    acc_shift_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_scale_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    if BLOCK_B > 0:
        cb = BLOCK_A + tl.arange(0, BLOCK_B)
        mb = cb < D
        zero_b = tl.zeros([BLOCK_B], dtype=tl.int64)
        acc_shift_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_scale_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    for i in tl.range(ROWS, num_stages=STAGES):
        row = pid * ROWS + i
        r = tl.minimum(row, T - 1)
        s = tl.load(SEG + r).to(tl.int64)
        mean = tl.load(MEAN + r)
        rstd = tl.load(RSTD + r)
        va = (zero_a + row) < T
        dy_a, g_a, xh_a = _ln_modulate_bwd_part(X, DY, SCALE, r, s, ca, ma, va, stride_x, stride_dy, stride_scale,
                                                mean, rstd)
        sum_g, sum_gx = _ln_bwd_sums(g_a, xh_a)
        if BLOCK_B > 0:
            vb = (zero_b + row) < T
            dy_b, g_b, xh_b = _ln_modulate_bwd_part(X, DY, SCALE, r, s, cb, mb, vb, stride_x, stride_dy,
                                                    stride_scale, mean, rstd)
            sum_g_b, sum_gx_b = _ln_bwd_sums(g_b, xh_b)
            sum_g += sum_g_b
            sum_gx += sum_gx_b
        mean_g, mean_gx = sum_g / D, sum_gx / D
        dx_a = _ln_bwd_dx(g_a, xh_a, rstd, mean_g, mean_gx)
        acc_shift_a += dy_a
        acc_scale_a += dy_a * xh_a
        tl.store(DX + r * stride_dx + ca, dx_a.to(DX.dtype.element_ty), mask=ma & va)
        if BLOCK_B > 0:
            dx_b = _ln_bwd_dx(g_b, xh_b, rstd, mean_g, mean_gx)
            acc_shift_b += dy_b
            acc_scale_b += dy_b * xh_b
            tl.store(DX + r * stride_dx + cb, dx_b.to(DX.dtype.element_ty), mask=mb & vb)
        # flush the partial sums at the end of a sample's run of tokens and at the end of the program
        s_next = tl.load(SEG + tl.minimum(row + 1, T - 1)).to(tl.int64)
        if (row < T) & ((i == ROWS - 1) | (row + 1 >= T) | (s_next != s)):
            acc_shift_a, acc_scale_a = _flush_shift_scale(DSHIFT, DSCALE, s, pid, D, ca, acc_shift_a, acc_scale_a,
                                                          ma, DETERMINISTIC)
            if BLOCK_B > 0:
                acc_shift_b, acc_scale_b = _flush_shift_scale(DSHIFT, DSCALE, s, pid, D, cb, acc_shift_b,
                                                              acc_scale_b, mb, DETERMINISTIC)
            if DETERMINISTIC:
                tl.store(ROW_SAMPLES + pid + s, s.to(tl.int32))


def _validate(x, shift, scale, seg, out_dtype=None):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_stride_one=True)
    t, d = x.shape
    check_tensor("shift", shift, ndim=2, shape=(None, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    check_tensor("scale", scale, ndim=2, shape=(None, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    n = same_samples(shift=shift, scale=scale)
    check_tensor("seg", seg, shape=(t,), dtypes=(torch.int32,), device=x.device, contiguous=True)
    check_samples(seg, n)
    check_out_dtype(out_dtype)


def _fwd_impl(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor, eps: float,
              out_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, d = x.shape
    y = new_output((t, d), out_dtype or x.dtype, x.device)
    mean = new_output((t,), torch.float32, x.device)
    rstd = new_output((t,), torch.float32, x.device)
    if t:
        _ln_modulate_fwd_kernel[(cdiv(t, FWD_ROWS),)](
            x, y, shift, scale, seg, mean, rstd, t, d, x.stride(0), y.stride(0), shift.stride(0), scale.stride(0),
            eps, BLOCK_D=block_size(d), ROWS=FWD_ROWS, num_warps=forward_warps(FWD_ROWS * block_size(d)))
    return y, mean, rstd


_fwd = torch.library.custom_op("maskdit::ln_modulate_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _fwd_fake(x, shift, scale, seg, eps, out_dtype):
    t, d = x.shape
    return x.new_empty((t, d), dtype=out_dtype or x.dtype), x.new_empty(t, dtype=torch.float32), \
        x.new_empty(t, dtype=torch.float32)


def _bwd_impl(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's dtype) and the fp32 (2, N, D) per-sample sums dshift, dscale."""
    t, d = x.shape
    det = deterministic(x.device)
    if det:
        check_ordered_samples(seg)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = new_output((t, d), x.dtype, x.device)
    rows = rows_per_program(t, x.device, BWD_ROWS)
    programs = cdiv(t, rows)
    sums = per_sample_sums_buffer(programs, num_samples, d, x.device, det, count=2)
    row_samples = row_samples_buffer(programs, num_samples, x.device, det)
    if t:
        _ln_modulate_bwd_kernel[(programs,)](
            x, dy, dx, scale, seg, mean, rstd, sums[0], sums[1], row_samples, t, d, x.stride(0), dy.stride(0),
            dx.stride(0), scale.stride(0), **column_blocks(d, BWD_SPLIT_COLUMNS), ROWS=rows, DETERMINISTIC=det,
            STAGES=BWD_STAGES, **backward_options(BWD_WARPS, BWD_STAGES))
    return dx, per_sample_sums(sums, row_samples, num_samples, det)


_bwd = torch.library.custom_op("maskdit::ln_modulate_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _bwd_fake(dy, x, scale, seg, mean, rstd, num_samples):
    d = x.shape[1]
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        x.new_empty((2, num_samples, d), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, shift, scale, seg, eps, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, seg, mean, rstd)
    ctx.shift_dtype, ctx.num_samples = shift.dtype, shift.shape[0]
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero tensors made for mean and rstd, which get no gradient


def _backward(ctx, bwd, dy, _dmean, _drstd):
    if dy is None:  # y did not reach the loss
        return None, None, None, None, None, None
    x, scale, seg, mean, rstd = ctx.saved_tensors
    dx, sums = bwd(dy, x, scale, seg, mean, rstd, ctx.num_samples)
    return dx, *cast_sums(sums, (ctx.shift_dtype, scale.dtype)), None, None, None


_call = autograd_op("LnModulate", _fwd, _fwd_impl, _bwd, _bwd_impl, _setup_context, _backward)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor,
                eps: float = LN_EPS, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused LN(x) * (1 + scale[seg]) + shift[seg] over (T, D) tokens; output in ``out_dtype`` (default x's)."""
    _validate(x, shift, scale, seg, out_dtype)
    return _call(x, shift, scale, seg, eps, out_dtype)[0]


def ln_modulate_recompute(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor,
                          eps: float = LN_EPS, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``ln_modulate``'s output again, inside a backward, from inputs a forward ``ln_modulate`` already took:
    no validation and no autograd (host time: a backward recomputes two of these a block)."""
    if torch.compiler.is_compiling():
        return _fwd(x, shift, scale, seg, eps, out_dtype)[0]
    return _fwd_impl(x, shift, scale, seg, eps, out_dtype)[0]


def ln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor,
                          eps: float = LN_EPS, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch reference of ``ln_modulate`` (fp32 math)."""
    s = seg.long()
    y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    y = y * (1 + scale.float()[s]) + shift.float()[s]
    return y.to(out_dtype or x.dtype)
