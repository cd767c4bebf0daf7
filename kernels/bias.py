"""A Linear layer's bias gradient: the fp32 column sums of its output gradient,

    dbias = sum over rows of dy          (dy (T, D), any strides; result fp32 (D,))

In the profile of a MaskDiT-XL/2 training step at batch 256 on an H200 (``bench/profile_step.py``,
``bench/results/nvidia-h200/profile-256``) PyTorch's ``sum`` kernels took 6.6 ms a step, 58 us a call on
average, where reading a (32768, 1152) bf16 gradient takes about 18 us at the copy rate (untimed here yet:
``bench/kernels.py`` has the row).  Here each program walks ``ROWS`` rows of a ``BLOCK_D``-column block in
tiles, adds them into a 2-D fp32 accumulator, sums that once after its loop and adds the column sums to the
result with one atomic add (deterministic mode, ``_common.deterministic``: one row per row block, summed in
order).  No autograd: it is a piece of a backward (``maskdit.backends``' Linear Functions).
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
    row_tiles,
)

BLOCK_D = 512  # columns of a program
TILE_ROWS = 16  # rows of one tile (a program walks its rows tile by tile)
ROWS = 256  # most rows of a program: one atomic add of its column sums
NUM_WARPS = 2  # (512 columns, 2 warps: H100, (32768, 1152) bf16, 0.028 ms against 0.033 with 256 and 4, CUDA graph)
BWD_STAGES = 3  # software-pipeline stages of the tile loop (all five are launch parameters bench/kernels.py varies)


@triton.jit
def _column_sums_kernel(DY, OUT, T, D, stride_t, stride_d, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                        TILES: tl.constexpr, DETERMINISTIC: tl.constexpr, STAGES: tl.constexpr):
    pid_t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for i in tl.range(TILES, num_stages=STAGES):
        rows = (pid_t * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        m = (rows < T)[:, None] & cmask[None, :]
        offs = rows[:, None] * stride_t + cols.to(tl.int64)[None, :] * stride_d
        acc += tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    sums = tl.sum(acc, axis=0)
    if DETERMINISTIC:  # this row block's sums in its own row; the launcher adds the rows in order
        tl.store(OUT + pid_t * D + cols, sums, mask=cmask)
    else:
        tl.atomic_add(OUT + cols, sums, mask=cmask, sem="relaxed")


def _impl(dy: torch.Tensor) -> torch.Tensor:
    t, d = dy.shape
    det = deterministic(dy.device)
    block_t, tiles, row_blocks = row_tiles(t, TILE_ROWS, ROWS)
    out = column_sums_buffer(row_blocks, d, dy.device, det)
    if t and d:
        _column_sums_kernel[(row_blocks, cdiv(d, BLOCK_D))](
            dy, out, t, d, dy.stride(0), dy.stride(1), BLOCK_T=block_t, BLOCK_D=BLOCK_D, TILES=tiles, DETERMINISTIC=det,
            STAGES=BWD_STAGES, **backward_options(NUM_WARPS, BWD_STAGES))
    return column_sums(out, det)


_op = torch.library.custom_op("maskdit::bias_grad", _impl, mutates_args=())


@_op.register_fake
def _fake(dy):
    return dy.new_empty((dy.shape[1],), dtype=torch.float32)


def bias_grad(dy: torch.Tensor) -> torch.Tensor:
    """The fp32 column sums of a (T, D) ``dy`` (a Linear layer's bias gradient from its output gradient).

    Any strides: an output gradient may be expanded (stride 0) or transposed; Triton specialises unit
    strides, so the contiguous case keeps its vector loads."""
    check_tensor("dy", dy, ndim=2, dtypes=FLOAT_DTYPES)
    return _op(dy) if torch.compiler.is_compiling() else _impl(dy)


def bias_grad_reference(dy: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch reference of ``bias_grad``."""
    return dy.sum(0, dtype=torch.float32)
