"""Gated residual + LayerNorm (no affine) + adaLN modulation, fused:

    x_new = x + gate[s] * (h + bias)
    y     = LN(x_new) * (1 + scale[s]) + shift[s]

Token layout: x, h (T, D) (h may have another float dtype than x, e.g. bf16 under autocast) with the token->sample
map ``seg`` (T,) int32; gate, shift, scale (N, D) (row stride free, unit column stride, e.g. chunks of the adaLN
GEMM output); the optional bias (D,) is that of the Linear layer that produced h, left out of its product: added
here in fp32, its gradient summed here too (see below), which saves the layer's backward a pass over its output
gradient (``kernels.bias_grad``). One forward pass writes x_new (x's dtype) and y (``out_dtype``); the LN
statistics are taken in fp32 over x_new as stored (rounded to x's dtype), so forward and backward agree with the
unfused ``x = x + gate * h; y = modulate(norm(x))``. The forward saves its input x (which the op before it keeps
for its own backward anyway), h and the per-token mean/rstd (2 floats a token), not x_new: one backward pass
recomputes x_new exactly as the forward rounded it, then x_hat, and gives dx, dh and the per-sample dgate, dshift,
dscale and, with a bias, its gradient (dh summed over all tokens); fp32 partial sums in registers over runs
of same-sample tokens, one atomic add per run and program, or deterministic as in ``ln_modulate``. A missing
gradient of either output (output unused) counts as zeros.
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
from .ln_modulate import (
    LN_EPS,
    _flush_partial,
    _flush_shift_scale,
    _ln_bwd_dx,
    _ln_bwd_sums,
    _ln_bwd_terms,
    _ln_modulate_rows,
)

FWD_ROWS = 1  # tokens per forward program (a launch parameter: ``bench/kernels.py`` times 1, 2 and 4)
BWD_ROWS = 32  # tokens per backward program (fewer on a GPU that would be left idle: ``rows_per_program``)
# software-pipeline stages of the backward's row loop (1: each row loaded when it is processed; more: the next
# rows' loads issued first) and warps of a backward program, launch parameters bench/kernels.py varies.  H200,
# D 1152, CUDA-graph times: 0.326 ms with 1 stage and 8 warps (``num_warps``' rule), 0.277 with 3 stages,
# 0.246 with 3 stages and 4 warps
BWD_STAGES = 3
BWD_WARPS = 4
# the backward's row as two power-of-two column blocks where they cover it more tightly, a launch parameter as
# in ``ln_modulate``.  Offline sm_90 build of the training step's variant (fp32 x and x_new gradient, bf16 h
# and dy; D 1152, 4 warps, 3 stages): 154 instead of 212 registers a thread and 39.0 instead of 69.7 KB of
# shared memory, so 3 programs an SM instead of 2, and 1119 instead of 1372 SASS instructions.  Not yet timed
# on a GPU.
BWD_SPLIT_COLUMNS = False
# programs an SM that a pipelined backward's register cap leaves room for (``backward_options``; 4 at 4 warps
# caps at 128 registers: the two-block variant then spills 16 bytes, fits 4 programs; a launch parameter)
BWD_PROGRAMS = 2


@triton.jit
def _gated_residual_fwd_kernel(X, H, BIAS, GATE, SHIFT, SCALE, SEG, XN, Y, MEAN, RSTD, T, D, stride_x, stride_h,
                               stride_gate, stride_shift, stride_scale, stride_xn, stride_y, eps,
                               BLOCK_D: tl.constexpr, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < T
    cols = tl.arange(0, BLOCK_D)
    mask = rmask[:, None] & (cols < D)[None, :]
    s = tl.load(SEG + rows, mask=rmask, other=0).to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(BIAS + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    gate = tl.load(GATE + s[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # x_new rounded to its storage dtype: the statistics below (and the backward's x_hat) use what is stored
    xn_st = (x + gate * h).to(XN.dtype.element_ty)
    tl.store(XN + rows[:, None] * stride_xn + cols[None, :], xn_st, mask=mask)
    shift = tl.load(SHIFT + s[:, None] * stride_shift + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + s[:, None] * stride_scale + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = _ln_modulate_rows(xn_st.to(tl.float32), mask, D, eps, shift, scale)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _gated_residual_bwd_part(DXN, DY, X, H, BIAS, GATE, SCALE, r, s, cols, cmask, valid, stride_dxn, stride_dy,
                             stride_x, stride_h, stride_gate, stride_scale, mean, rstd, HAS_DXN: tl.constexpr,
                             HAS_DY: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One column block of row r in fp32: h (plus the bias), gate, the incoming x_new gradient, and (with HAS_DY;
    zeros otherwise) dy, g and x_hat of the LayerNorm backward (``_ln_bwd_terms``)."""
    vmask = cmask & valid
    h = tl.load(H + r * stride_h + cols, mask=vmask, other=0.0).to(tl.float32)
    if HAS_BIAS:  # loaded with each row (from L1/L2), not once a program: held across the row loop it took the
        # training step's variant from 209 to 254 registers a thread in triton 3.6's sm_90 build, 211 this way
        h += tl.load(BIAS + cols, mask=vmask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + s * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DXN:
        dxn = tl.load(DXN + r * stride_dxn + cols, mask=vmask, other=0.0).to(tl.float32)
    else:
        dxn = tl.zeros(h.shape, dtype=tl.float32)
    if HAS_DY:
        dy = tl.load(DY + r * stride_dy + cols, mask=vmask, other=0.0).to(tl.float32)
        x = tl.load(X + r * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
        xn = (x + gate * h).to(X.dtype.element_ty).to(tl.float32)  # x_new as the forward stored it
        scale = tl.load(SCALE + s * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
        g, xhat = _ln_bwd_terms(dy, xn, mean, rstd, scale, cmask)
    else:
        dy = tl.zeros(h.shape, dtype=tl.float32)
        g = dy
        xhat = dy
    return h, gate, dxn, dy, g, xhat


@triton.jit
def _gated_residual_bwd_kernel(DXN, DY, X, H, BIAS, GATE, SCALE, SEG, MEAN, RSTD, DX, DH, DGATE, DSHIFT, DSCALE, DHSUM,
                               ROW_SAMPLES, T, D, stride_dxn, stride_dy, stride_x, stride_h, stride_gate, stride_scale,
                               stride_dx, stride_dh, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, ROWS: tl.constexpr,
                               HAS_DXN: tl.constexpr, HAS_DY: tl.constexpr, HAS_BIAS: tl.constexpr,
                               DETERMINISTIC: tl.constexpr, STAGES: tl.constexpr):
    # a row's columns as one or two power-of-two blocks, as in ``_ln_modulate_bwd_kernel``
    pid = tl.program_id(0).to(tl.int64)
    ca = tl.arange(0, BLOCK_A)
    ma = ca < D
    zero_a = tl.zeros([BLOCK_A], dtype=tl.int64)  # scalar conditions are broadcast to vectors before use
    acc_gate_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_shift_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_scale_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_dh_a = tl.zeros([BLOCK_A], dtype=tl.float32)  # (with HAS_BIAS)
    if BLOCK_B > 0:
        cb = BLOCK_A + tl.arange(0, BLOCK_B)
        mb = cb < D
        zero_b = tl.zeros([BLOCK_B], dtype=tl.int64)
        acc_gate_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_shift_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_scale_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        acc_dh_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    for i in tl.range(ROWS, num_stages=STAGES):
        row = pid * ROWS + i
        r = tl.minimum(row, T - 1)
        s = tl.load(SEG + r).to(tl.int64)
        mean = tl.load(MEAN + r)
        rstd = tl.load(RSTD + r)
        va = (zero_a + row) < T
        h_a, gate_a, dxn_a, dy_a, g_a, xh_a = _gated_residual_bwd_part(
            DXN, DY, X, H, BIAS, GATE, SCALE, r, s, ca, ma, va, stride_dxn, stride_dy, stride_x, stride_h,
            stride_gate, stride_scale, mean, rstd, HAS_DXN, HAS_DY, HAS_BIAS)
        if BLOCK_B > 0:
            vb = (zero_b + row) < T
            h_b, gate_b, dxn_b, dy_b, g_b, xh_b = _gated_residual_bwd_part(
                DXN, DY, X, H, BIAS, GATE, SCALE, r, s, cb, mb, vb, stride_dxn, stride_dy, stride_x, stride_h,
                stride_gate, stride_scale, mean, rstd, HAS_DXN, HAS_DY, HAS_BIAS)
        if HAS_DY:
            sum_g, sum_gx = _ln_bwd_sums(g_a, xh_a)
            if BLOCK_B > 0:
                sum_g_b, sum_gx_b = _ln_bwd_sums(g_b, xh_b)
                sum_g += sum_g_b
                sum_gx += sum_gx_b
            mean_g, mean_gx = sum_g / D, sum_gx / D
            dxn_a += _ln_bwd_dx(g_a, xh_a, rstd, mean_g, mean_gx)
            acc_shift_a += dy_a
            acc_scale_a += dy_a * xh_a
            if BLOCK_B > 0:
                dxn_b += _ln_bwd_dx(g_b, xh_b, rstd, mean_g, mean_gx)
                acc_shift_b += dy_b
                acc_scale_b += dy_b * xh_b
        acc_gate_a += dxn_a * h_a
        dh_a = dxn_a * gate_a
        if HAS_BIAS:
            acc_dh_a += dh_a
        tl.store(DX + r * stride_dx + ca, dxn_a.to(DX.dtype.element_ty), mask=ma & va)
        tl.store(DH + r * stride_dh + ca, dh_a.to(DH.dtype.element_ty), mask=ma & va)
        if BLOCK_B > 0:
            acc_gate_b += dxn_b * h_b
            dh_b = dxn_b * gate_b
            if HAS_BIAS:
                acc_dh_b += dh_b
            tl.store(DX + r * stride_dx + cb, dxn_b.to(DX.dtype.element_ty), mask=mb & vb)
            tl.store(DH + r * stride_dh + cb, dh_b.to(DH.dtype.element_ty), mask=mb & vb)
        # flush the partial sums at the end of a sample's run of tokens and at the end of the program
        s_next = tl.load(SEG + tl.minimum(row + 1, T - 1)).to(tl.int64)
        if (row < T) & ((i == ROWS - 1) | (row + 1 >= T) | (s_next != s)):
            _flush_partial(DGATE, s, pid, D, ca, acc_gate_a, ma, DETERMINISTIC)
            acc_gate_a = tl.zeros([BLOCK_A], dtype=tl.float32)
            if BLOCK_B > 0:
                _flush_partial(DGATE, s, pid, D, cb, acc_gate_b, mb, DETERMINISTIC)
                acc_gate_b = tl.zeros([BLOCK_B], dtype=tl.float32)
            if DETERMINISTIC:
                tl.store(ROW_SAMPLES + pid + s, s.to(tl.int32))
            if HAS_DY:
                acc_shift_a, acc_scale_a = _flush_shift_scale(DSHIFT, DSCALE, s, pid, D, ca, acc_shift_a,
                                                              acc_scale_a, ma, DETERMINISTIC)
                if BLOCK_B > 0:
                    acc_shift_b, acc_scale_b = _flush_shift_scale(DSHIFT, DSCALE, s, pid, D, cb, acc_shift_b,
                                                                  acc_scale_b, mb, DETERMINISTIC)
    if HAS_BIAS:  # the bias gradient, summed over the samples: one flush a program, into row 0 (deterministic: row pid)
        _flush_partial(DHSUM, 0, pid, D, ca, acc_dh_a, ma, DETERMINISTIC)
        if BLOCK_B > 0:
            _flush_partial(DHSUM, 0, pid, D, cb, acc_dh_b, mb, DETERMINISTIC)


def _validate(x, h, gate, shift, scale, seg, bias, out_dtype):
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_stride_one=True)
    t, d = x.shape
    check_tensor("h", h, shape=(t, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    if bias is not None:
        check_tensor("bias", bias, shape=(d,), dtypes=FLOAT_DTYPES, device=x.device, contiguous=True)
    for name, m in (("gate", gate), ("shift", shift), ("scale", scale)):
        check_tensor(name, m, ndim=2, shape=(None, d), dtypes=FLOAT_DTYPES, device=x.device, last_stride_one=True)
    n = same_samples(gate=gate, shift=shift, scale=scale)
    check_tensor("seg", seg, shape=(t,), dtypes=(torch.int32,), device=x.device, contiguous=True)
    check_samples(seg, n)
    check_out_dtype(out_dtype)


def _fwd_impl(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              seg: torch.Tensor, bias: Optional[torch.Tensor], eps: float, out_dtype: Optional[torch.dtype]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    t, d = x.shape
    x_new = new_output((t, d), x.dtype, x.device)
    y = new_output((t, d), out_dtype or x.dtype, x.device)
    mean = new_output((t,), torch.float32, x.device)
    rstd = new_output((t,), torch.float32, x.device)
    if t:
        _gated_residual_fwd_kernel[(cdiv(t, FWD_ROWS),)](
            x, h, h if bias is None else bias, gate, shift, scale, seg, x_new, y, mean, rstd, t, d, x.stride(0),
            h.stride(0), gate.stride(0), shift.stride(0), scale.stride(0), x_new.stride(0), y.stride(0), eps,
            BLOCK_D=block_size(d), ROWS=FWD_ROWS, HAS_BIAS=bias is not None,
            num_warps=forward_warps(FWD_ROWS * block_size(d)))
    return x_new, y, mean, rstd


_fwd = torch.library.custom_op("maskdit::gated_residual_ln_modulate_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _fwd_fake(x, h, gate, shift, scale, seg, bias, eps, out_dtype):
    t, d = x.shape
    return x.new_empty((t, d)), x.new_empty((t, d), dtype=out_dtype or x.dtype), \
        x.new_empty(t, dtype=torch.float32), x.new_empty(t, dtype=torch.float32)


def _bwd_impl(dx_new: Optional[torch.Tensor], dy: Optional[torch.Tensor], x: torch.Tensor, h: torch.Tensor,
              gate: torch.Tensor, scale: torch.Tensor, seg: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x's dtype), dh (h's dtype), the fp32 per-sample sums dgate, dshift, dscale (3, N, D) and the bias's fp32
    gradient, dh's column sums (D,), in a tensor of its own (a parameter's .grad, which a view would make keep
    the whole sums buffer; empty without a bias); a None gradient is zeros."""
    t, d = x.shape
    n = gate.shape[0]
    det = deterministic(x.device)
    if det:
        check_ordered_samples(seg)
    if dx_new is not None and dx_new.stride(-1) != 1:
        dx_new = dx_new.contiguous()
    if dy is not None and dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = new_output((t, d), x.dtype, x.device)
    dh = new_output((t, d), h.dtype, h.device)
    rows = rows_per_program(t, x.device, BWD_ROWS)
    programs = cdiv(t, rows)
    sums = per_sample_sums_buffer(programs, n, d, x.device, det, count=3 if bias is None else 4)
    row_samples = row_samples_buffer(programs, n, x.device, det)
    if t:
        has_dxn, has_dy = dx_new is not None, dy is not None
        dxn_arg = dx_new if has_dxn else x  # unused placeholders when a gradient is missing
        dy_arg = dy if has_dy else x
        _gated_residual_bwd_kernel[(programs,)](
            dxn_arg, dy_arg, x, h, h if bias is None else bias, gate, scale, seg, mean, rstd, dx, dh, sums[0],
            sums[1], sums[2], sums[-1], row_samples, t, d, dxn_arg.stride(0), dy_arg.stride(0), x.stride(0),
            h.stride(0), gate.stride(0), scale.stride(0), dx.stride(0), dh.stride(0),
            **column_blocks(d, BWD_SPLIT_COLUMNS), ROWS=rows, HAS_DXN=has_dxn, HAS_DY=has_dy,
            HAS_BIAS=bias is not None, DETERMINISTIC=det, STAGES=BWD_STAGES,
            **backward_options(BWD_WARPS, BWD_STAGES, BWD_PROGRAMS))
    sums = per_sample_sums(sums, row_samples, n, det)
    if bias is None:
        dbias = sums.new_empty(0)
    else:  # deterministic: the programs' rows landed in several samples' rows, added here in a fixed order
        dbias = sums[3].sum(0) if det else sums[3, 0].clone()
    return dx, dh, sums[:3], dbias


_bwd = torch.library.custom_op("maskdit::gated_residual_ln_modulate_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _bwd_fake(dx_new, dy, x, h, gate, scale, seg, mean, rstd, bias):
    t, d = x.shape
    n = gate.shape[0]
    return (x.new_empty((t, d)), h.new_empty((t, d)), x.new_empty((3, n, d), dtype=torch.float32),
            x.new_empty(0 if bias is None else d, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, h, gate, shift, scale, seg, bias, eps, out_dtype = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, h, gate, scale, seg, mean, rstd, bias)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zero (T, D) tensor is read


def _backward(ctx, bwd, dx_new, dy, _dmean, _drstd):
    x, h, gate, scale, seg, mean, rstd, bias = ctx.saved_tensors
    dx, dh, sums, dbias = bwd(dx_new, dy, x, h, gate, scale, seg, mean, rstd, bias)
    dbias = None if bias is None else dbias.to(bias.dtype)
    return dx, dh, *cast_sums(sums, (gate.dtype, ctx.shift_dtype, scale.dtype)), None, dbias, None, None


_call = autograd_op("GatedResidualLnModulate", _fwd, _fwd_impl, _bwd, _bwd_impl, _setup_context, _backward)


def gated_residual_ln_modulate(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor, seg: torch.Tensor, eps: float = LN_EPS,
                               out_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``x_new = x + gate[seg] * (h + bias)`` (no bias: 0) and ``y = LN(x_new) * (1 + scale[seg]) +
    shift[seg]`` over (T, D) tokens; returns (x_new in x's dtype, y in ``out_dtype``, default x's)."""
    _validate(x, h, gate, shift, scale, seg, bias, out_dtype)
    x_new, y, _, _ = _call(x, h, gate, shift, scale, seg, bias, eps, out_dtype)
    return x_new, y


def gated_residual_ln_modulate_reference(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                         scale: torch.Tensor, seg: torch.Tensor, eps: float = LN_EPS,
                                         out_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None
                                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of ``gated_residual_ln_modulate`` (fp32 math; x_new rounded to x's dtype
    before the LayerNorm, as it is stored)."""
    s = seg.long()
    h = h.float() if bias is None else h.float() + bias.float()
    x_new = (x.float() + gate.float()[s] * h).to(x.dtype)
    y = torch.nn.functional.layer_norm(x_new.float(), x.shape[-1:], eps=eps)
    y = y * (1 + scale.float()[s]) + shift.float()[s]
    return x_new, y.to(out_dtype or x.dtype)
