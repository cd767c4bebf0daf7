"""The gradient of a packed qkv projection's output, from the attention's dq, dk and dv, in one pass:

    dqkv[t] = [dq[t], dk[t], dv[t]]      (T, 3D) in dq's dtype
    dbias   = sum over t of dqkv[t]      fp32 (3D,)

Autograd would stack dq, dk, dv (``unbind``'s backward: one pass) and the Linear's backward would then read
the stacked gradient again for the bias (``bias_grad``: a second pass over 3D values a token).  Here each
program copies ``ROWS`` rows of a ``BLOCK_D``-column block of one of the three in tiles (``bias_grad``'s
loop, with launch parameters of its own: the copy needs more registers), adding them into a 2-D fp32
accumulator that it sums once after its loop and adds to the bias gradient with one atomic add (deterministic mode,
``_common.deterministic``: one row per row block, summed in order), as ``bias_grad`` does.  dq, dk, dv:
(T, D) with unit column stride (any row stride).  No autograd: a piece of a backward (``maskdit.backends``'
qkv Function).
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

# launch parameters (as bias_grad's; bench/kernels.py varies them): H100, 3 x (32768, 1152) bf16, 0.169 ms
# (CUDA graph).  bias_grad's 512 columns at 2 warps spill hundreds of bytes here (offline sm_90 build).
BLOCK_D = 256  # columns of a program
TILE_ROWS = 16  # rows of one tile
ROWS = 256  # most rows of a program: one atomic add of its column sums
NUM_WARPS = 4
BWD_STAGES = 3  # software-pipeline stages of the tile loop


@triton.jit
def _stack_qkv_grad_kernel(DQ, DK, DV, OUT, SUMS, T, D, stride_q, stride_k, stride_v, BLOCK_T: tl.constexpr,
                           BLOCK_D: tl.constexpr, TILES: tl.constexpr, DETERMINISTIC: tl.constexpr,
                           STAGES: tl.constexpr):
    pid_t = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(D, BLOCK_D)
    part = tl.program_id(1) // blocks  # 0: q, 1: k, 2: v (a block never straddles two of them)
    cols = (tl.program_id(1) % blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    parts = (tl.zeros([BLOCK_D], dtype=tl.int32) + part)[None, :]  # scalar conditions broadcast before use
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for i in tl.range(TILES, num_stages=STAGES):
        rows = (pid_t * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        m = (rows < T)[:, None] & cmask[None, :]
        c = cols[None, :]
        # one of the three masked loads reads (the others are predicated off: no memory traffic); selected, not
        # added, so the copy is exact
        x = tl.load(DQ + rows[:, None] * stride_q + c, mask=m & (parts == 0), other=0.0)
        x = tl.where(parts == 1, tl.load(DK + rows[:, None] * stride_k + c, mask=m & (parts == 1), other=0.0), x)
        x = tl.where(parts == 2, tl.load(DV + rows[:, None] * stride_v + c, mask=m & (parts == 2), other=0.0), x)
        tl.store(OUT + rows[:, None] * (3 * D) + part * D + c, x, mask=m)
        acc += x.to(tl.float32)
    sums = tl.sum(acc, axis=0)
    if DETERMINISTIC:  # this row block's sums in its own row; the launcher adds the rows in order
        tl.store(SUMS + pid_t * (3 * D) + part * D + cols, sums, mask=cmask)
    else:
        tl.atomic_add(SUMS + part * D + cols, sums, mask=cmask, sem="relaxed")


def _impl(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = dq.shape
    det = deterministic(dq.device)
    block_t, tiles, row_blocks = row_tiles(t, TILE_ROWS, ROWS)
    out = new_output((t, 3 * d), dq.dtype, dq.device)
    sums = column_sums_buffer(row_blocks, 3 * d, dq.device, det)
    if t and d:
        _stack_qkv_grad_kernel[(row_blocks, 3 * cdiv(d, BLOCK_D))](
            dq, dk, dv, out, sums, t, d, dq.stride(0), dk.stride(0), dv.stride(0), BLOCK_T=block_t,
            BLOCK_D=BLOCK_D, TILES=tiles, DETERMINISTIC=det, STAGES=BWD_STAGES,
            **backward_options(NUM_WARPS, BWD_STAGES))
    return out, column_sums(sums, det)


_op = torch.library.custom_op("maskdit::stack_qkv_grad", _impl, mutates_args=())


@_op.register_fake
def _fake(dq, dk, dv):
    t, d = dq.shape
    return dq.new_empty((t, 3 * d)), dq.new_empty((3 * d,), dtype=torch.float32)


def stack_qkv_grad(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dqkv (T, 3D) in dq's dtype, fp32 (3D,) bias gradient) from (T, D) ``dq``, ``dk``, ``dv`` (the same
    dtype, unit column stride)."""
    check_tensor("dq", dq, ndim=2, dtypes=FLOAT_DTYPES, last_stride_one=True)
    for name, g in (("dk", dk), ("dv", dv)):
        check_tensor(name, g, shape=tuple(dq.shape), dtypes=(dq.dtype,), device=dq.device, last_stride_one=True)
    return _op(dq, dk, dv) if torch.compiler.is_compiling() else _impl(dq, dk, dv)


def stack_qkv_grad_reference(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of ``stack_qkv_grad``."""
    dqkv = torch.cat([dq, dk, dv], dim=1)
    return dqkv, dqkv.sum(0, dtype=torch.float32)
