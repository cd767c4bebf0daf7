"""The backward of an MLP's GELU (tanh approximation) in one pass, for an MLP that keeps only the GELU input:

    g     = gelu_tanh(a)                 (recomputed: the second Linear's input, for its weight gradient)
    da    = gelu_tanh'(a) * dh           (dh: the gradient of g, from the second Linear's backward)
    dbias = sum over rows of da          (the first Linear's bias gradient: fp32 sums of da as stored)

a, dh (T, H) with unit column stride; g and da in a's dtype, math in fp32 (PyTorch's GELU formulas, the
tanh's 1 +- t taken as sigmoids: no cancellation in the tails, where PyTorch's fp32 1 + tanhf(z) loses digits).  One
kernel reads a and dh once and writes g and da, where the unfused backward reads a twice (F.gelu and
gelu_backward) and da once more (the bias sum): 8 instead of 12 bytes an element at bf16, and one launch
instead of three.  Grid: (row blocks of ``ROWS`` rows, column blocks of ``BLOCK_H``); each program walks its
rows in tiles, sums da over them in fp32 registers and adds its column sums to the (H,) result with one
atomic add (deterministic mode, ``_common.deterministic``: one row per row block, summed in order).
No autograd: it is a piece of a backward (``maskdit.backends``'s MLP).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    backward_options,
    cdiv,
    check_tensor,
    column_sums,
    column_sums_buffer,
    deterministic,
    new_output,
    row_tiles,
)

BLOCK_H = 256  # columns of a program
TILE_ROWS = 16  # rows of one tile (a program walks its rows tile by tile)
ROWS = 256  # most rows of a program: one atomic add of its column sums
NUM_WARPS = 4  # (32 values a thread per tile tensor)
BWD_STAGES = 3  # software-pipeline stages of the tile loop (BLOCK_H, TILE_ROWS, ROWS, NUM_WARPS and BWD_STAGES
# are launch parameters that bench/kernels.py varies).  H200, (32768, 4608) bf16, CUDA-graph times: 0.761 ms with
# 8 warps and the tile's column sums taken in the loop; 0.350 with 4 warps and one 2-D sum after it; 0.321 with
# 3 stages (Inductor's compiled reference: 0.369)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # (globals a kernel reads must be constexpr)
KAPPA = tl.constexpr(0.044715)


@triton.jit
def gelu_tanh_and_derivative(a):
    """(gelu_tanh(a), gelu_tanh'(a)) of fp32 ``a``, PyTorch's formulas without cancellation in the tails."""
    # with z = sqrt(2/pi) (a + 0.044715 a^3) and t = tanh(z): (1 + t) / 2 = sigmoid(2z) and (1 - t) / 2 =
    # sigmoid(-2z), each taken without cancellation (z clamped below: exp stays finite)
    z = tl.maximum(SQRT_2_OVER_PI * (a + KAPPA * a * a * a), -30.0)
    e = tl.exp(-2.0 * z)
    half_1p = 1.0 / (1.0 + e)
    half_1m = tl.where(z >= 0, e * half_1p, 1.0 - half_1p)
    # gelu'(a) = (1 + t) / 2 + a / 2 (1 - t^2) dz/da
    return a * half_1p, half_1p + 2.0 * a * half_1p * half_1m * SQRT_2_OVER_PI * (1.0 + 3.0 * KAPPA * a * a)


@triton.jit
def _gelu_tanh_grad_kernel(A, DH, G, DA, DBIAS, T, H, stride_a, stride_dh, stride_g, stride_da,
                           BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, TILES: tl.constexpr,
                           DETERMINISTIC: tl.constexpr, STAGES: tl.constexpr):
    pid_t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)  # (summed over the tile's rows once, after the loop)
    for i in tl.range(TILES, num_stages=STAGES):
        rows = (pid_t * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        m = (rows < T)[:, None] & cmask[None, :]
        a = tl.load(A + rows[:, None] * stride_a + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dh = tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g, dgelu = gelu_tanh_and_derivative(a)
        da = (dh * dgelu).to(DA.dtype.element_ty)
        tl.store(G + rows[:, None] * stride_g + cols[None, :], g.to(G.dtype.element_ty), mask=m)
        tl.store(DA + rows[:, None] * stride_da + cols[None, :], da, mask=m)
        acc += da.to(tl.float32)  # the sums of da as stored (zero where masked)
    col_sums = tl.sum(acc, axis=0)
    if DETERMINISTIC:  # this row block's sums in its own row; the launcher adds the rows in order
        tl.store(DBIAS + pid_t * H + cols, col_sums, mask=cmask)
    else:
        tl.atomic_add(DBIAS + cols, col_sums, mask=cmask, sem="relaxed")


def _validate(a, dh):
    check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES, last_stride_one=True)
    check_tensor("dh", dh, shape=tuple(a.shape), dtypes=(a.dtype,), device=a.device, last_stride_one=True)


def _impl(a: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, h = a.shape
    det = deterministic(a.device)
    g = new_output((t, h), a.dtype, a.device)
    da = new_output((t, h), a.dtype, a.device)
    block_t, tiles, row_blocks = row_tiles(t, TILE_ROWS, ROWS)
    dbias = column_sums_buffer(row_blocks, h, a.device, det)
    if t and h:
        _gelu_tanh_grad_kernel[(row_blocks, cdiv(h, BLOCK_H))](
            a, dh, g, da, dbias, t, h, a.stride(0), dh.stride(0), g.stride(0), da.stride(0),
            BLOCK_T=block_t, BLOCK_H=BLOCK_H, TILES=tiles, DETERMINISTIC=det, STAGES=BWD_STAGES,
            **backward_options(NUM_WARPS, BWD_STAGES))
    return g, da, column_sums(dbias, det)


_op = torch.library.custom_op("maskdit::gelu_tanh_grad", _impl, mutates_args=())


@_op.register_fake
def _fake(a, dh):
    return torch.empty_like(a, memory_format=torch.contiguous_format), \
        torch.empty_like(a, memory_format=torch.contiguous_format), a.new_empty((a.shape[1],), dtype=torch.float32)


def gelu_tanh_grad(a: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gelu_tanh(a), gelu_tanh'(a) * dh, its fp32 column sums) for (T, H) ``a`` and ``dh`` of a's dtype."""
    _validate(a, dh)
    return _op(a, dh) if torch.compiler.is_compiling() else _impl(a, dh)


def gelu_tanh_grad_reference(a: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of ``gelu_tanh_grad`` (PyTorch's GELU and its backward)."""
    da = torch.ops.aten.gelu_backward(dh, a, approximate="tanh")
    return torch.nn.functional.gelu(a, approximate="tanh"), da, da.float().sum(0)
