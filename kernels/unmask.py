"""MaskDiT's mask-token insertion before the decoder: out[n, l] = (x_kept[t] if kept else mask_token) + pos_embed[l].

Token layout: x_kept (T, Dd) holds the bridge layer's output on the kept tokens, ``ids`` (T,) int64 the
position of each kept token within its image (0..L-1) and ``seg`` (T,) int32 its sample.  The output is
dense (N, L, Dd) in x_kept's dtype, every row written exactly once.

The launcher builds the inverse map ``src`` (N*L,) int32 with one torch scatter (``src[seg*L + ids] = t``,
-1 at masked positions); one Triton kernel then fills tiles of output rows (math in fp32, the mask token
rounded to x_kept's dtype first, as in ``maskdit.ops.insert_mask_tokens``).  The forward saves only
``src`` (4 bytes an output row).  The backward is one kernel over tiles of output rows that reads dout
once: kept rows are copied to dx[src] (each kept token has exactly one output row), masked rows are summed
in fp32 registers and added to an fp32 (Dd,) buffer with one atomic add per program (deterministic mode:
one row per program, summed in order); dmask_token is returned in mask_token's dtype.  When mask_token
needs no gradient (MaskDiT's fixed zero token, ``learn_mask_token=False``) the backward skips those sums
and only scatters dx.  pos_embed is meant to be fixed; if it requires grad anyway its gradient (dout
summed over samples) comes from plain PyTorch.

Assumption: ids are unique within a sample (a duplicate would leave rows of dx unwritten, and which token
wins the forward is unspecified).  Samples need not be contiguous in the packed layout.  Out-of-range ids
or seg and duplicates are rejected with a ValueError when the inputs are CPU tensors (cheap, no device
sync); on CUDA they are not checked (an out-of-range index trips the scatter's device-side assert).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    autograd_op,
    backward_options,
    block_size,
    cdiv,
    check_samples,
    check_tensor,
    column_sums,
    column_sums_buffer,
    deterministic,
    new_output,
    num_warps,
    readable_on_host,
    rows_per_program,
)

TILE_ELEMENTS = 4096  # rows x columns of one tile: BLOCK_R = TILE_ELEMENTS // BLOCK_D output rows
BWD_ROWS = 64  # output rows a backward program covers (at least one tile): one atomic add per program
BWD_STAGES = 1  # software-pipeline stages of the backward's tile loop (``bench/kernels.py`` times 2 and 3)


@triton.jit
def _unmask_fwd_kernel(X, SRC, MASK, POS, OUT, R, L, D, stride_x, stride_pos, stride_out,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    tile = rmask[:, None] & cmask[None, :]
    src = tl.load(SRC + rows, mask=rmask, other=-1).to(tl.int64)
    kept = src >= 0
    x = tl.load(X + src[:, None] * stride_x + cols[None, :], mask=kept[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    # the mask token in x_kept's dtype, as the PyTorch path does (mask_token.to(x.dtype))
    mt = tl.load(MASK + cols, mask=cmask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    pos = tl.load(POS + (rows % L)[:, None] * stride_pos + cols[None, :], mask=tile, other=0.0).to(tl.float32)
    y = tl.where(kept[:, None], x, mt[None, :]) + pos
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], y.to(OUT.dtype.element_ty), mask=tile)


@triton.jit
def _unmask_bwd_kernel(DOUT, SRC, DX, DMASK, R, L, D, stride_dn, stride_dl, stride_dx,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, TILES: tl.constexpr, DETERMINISTIC: tl.constexpr,
                       STAGES: tl.constexpr, MASK_GRAD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in tl.range(TILES, num_stages=STAGES):
        rows = (pid * TILES + i) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        rmask = rows < R
        src = tl.load(SRC + rows, mask=rmask, other=-1).to(tl.int64)
        kept = src >= 0
        n = rows // L
        tok = rows % L
        dout = tl.load(DOUT + n[:, None] * stride_dn + tok[:, None] * stride_dl + cols[None, :],
                       mask=rmask[:, None] & cmask[None, :], other=0.0)
        tl.store(DX + src[:, None] * stride_dx + cols[None, :], dout.to(DX.dtype.element_ty),
                 mask=kept[:, None] & cmask[None, :])
        if MASK_GRAD:
            acc += tl.sum(tl.where(kept[:, None], 0.0, dout.to(tl.float32)), axis=0)
    if MASK_GRAD:
        if DETERMINISTIC:  # this program's row of partial sums; the launcher adds the rows in order
            tl.store(DMASK + pid * D + cols, acc, mask=cmask)
        else:
            tl.atomic_add(DMASK + cols, acc, mask=cmask, sem="relaxed")


def _tiles(d: int) -> tuple[int, int]:
    block_d = block_size(d)
    return max(1, TILE_ELEMENTS // block_d), block_d


def _validate(x_kept, ids, seg, mask_token, pos_embed, num_samples):
    check_tensor("x_kept", x_kept, ndim=2, dtypes=FLOAT_DTYPES, last_stride_one=True)
    t, d = x_kept.shape
    dev = x_kept.device
    check_tensor("ids", ids, shape=(t,), dtypes=(torch.int64,), device=dev, contiguous=True)
    check_tensor("seg", seg, shape=(t,), dtypes=(torch.int32,), device=dev, contiguous=True)
    check_tensor("mask_token", mask_token, shape=(d,), dtypes=FLOAT_DTYPES, device=dev, last_stride_one=True)
    check_tensor("pos_embed", pos_embed, ndim=2, shape=(None, d), dtypes=FLOAT_DTYPES, device=dev,
                 last_stride_one=True)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, torch.SymInt)) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    # value checks only where they cost no device sync (CPU tensors, outside tracing)
    if t and readable_on_host(ids):
        L = pos_embed.shape[0]
        if int(ids.min()) < 0 or int(ids.max()) >= L:
            raise ValueError(f"ids must be in [0, L={L}), got values in [{int(ids.min())}, {int(ids.max())}]")
        check_samples(seg, num_samples)
        if torch.unique(seg.long() * L + ids).numel() != t:
            raise ValueError("ids must be unique within each sample")


def _fwd_impl(x_kept: torch.Tensor, ids: torch.Tensor, seg: torch.Tensor, mask_token: torch.Tensor,
              pos_embed: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, d = x_kept.shape
    L = pos_embed.shape[0]
    r = num_samples * L
    src = torch.full((r,), -1, dtype=torch.int32, device=x_kept.device)
    if t:
        src[seg.long() * L + ids] = torch.arange(t, dtype=torch.int32, device=x_kept.device)
    out = new_output((num_samples, L, d), x_kept.dtype, x_kept.device)
    if r and d:
        block_r, block_d = _tiles(d)
        _unmask_fwd_kernel[(cdiv(r, block_r),)](
            x_kept, src, mask_token, pos_embed, out, r, L, d, x_kept.stride(0), pos_embed.stride(0), d,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps(block_r * block_d))
    return out, src


_fwd = torch.library.custom_op("maskdit::insert_mask_tokens_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _fwd_fake(x_kept, ids, seg, mask_token, pos_embed, num_samples):
    L, d = pos_embed.shape[0], x_kept.shape[1]
    return x_kept.new_empty((num_samples, L, d)), x_kept.new_empty((num_samples * L,), dtype=torch.int32)


def _bwd_impl(dout: torch.Tensor, src: torch.Tensor, num_tokens: int,
              mask_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    n, L, d = dout.shape
    r = n * L
    det = deterministic(dout.device)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dx = new_output((num_tokens, d), dout.dtype, dout.device)
    block_r, block_d = _tiles(d)
    tiles = max(1, rows_per_program(r, dout.device, BWD_ROWS) // block_r)
    programs = cdiv(r, block_r * tiles)
    # without the mask token's gradient (a fixed zero token) the kernel never touches this buffer
    dmask = column_sums_buffer(programs, d, dout.device, det) if mask_grad else dout.new_empty(0, dtype=torch.float32)
    if r and d:
        _unmask_bwd_kernel[(programs,)](
            dout, src, dx, dmask, r, L, d, dout.stride(0), dout.stride(1), d,
            BLOCK_R=block_r, BLOCK_D=block_d, TILES=tiles, DETERMINISTIC=det, STAGES=BWD_STAGES, MASK_GRAD=mask_grad,
            **backward_options(num_warps(block_r * block_d), BWD_STAGES))
    return dx, (column_sums(dmask, det) if mask_grad else dmask)


_bwd = torch.library.custom_op("maskdit::insert_mask_tokens_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _bwd_fake(dout, src, num_tokens, mask_grad=True):
    d = dout.shape[2]
    return dout.new_empty((num_tokens, d)), dout.new_empty((d if mask_grad else 0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x_kept, ids, seg, mask_token, pos_embed, num_samples = inputs
    _, src = output
    ctx.save_for_backward(src)
    ctx.x_shape, ctx.x_dtype, ctx.mask_dtype, ctx.pos_dtype = x_kept.shape, x_kept.dtype, mask_token.dtype, \
        pos_embed.dtype
    ctx.mark_non_differentiable(src)


def _backward(ctx, bwd, dout, _dsrc):
    (src,) = ctx.saved_tensors
    mask_grad = ctx.needs_input_grad[3]
    dx, dmask = bwd(dout, src, ctx.x_shape[0], mask_grad)
    dpos = dout.float().sum(0).to(ctx.pos_dtype) if ctx.needs_input_grad[4] else None
    return dx.to(ctx.x_dtype), None, None, dmask.to(ctx.mask_dtype) if mask_grad else None, dpos, None


_call = autograd_op("InsertMaskTokens", _fwd, _fwd_impl, _bwd, _bwd_impl, _setup_context, _backward)


def insert_mask_tokens(x_kept: torch.Tensor, ids: torch.Tensor, seg: torch.Tensor, mask_token: torch.Tensor,
                       pos_embed: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The decoder's (N, L, Dd) sequence from packed kept tokens: x_kept[t] at (seg[t], ids[t]), mask_token
    elsewhere, plus pos_embed; in x_kept's dtype.  ids must be unique within each sample."""
    _validate(x_kept, ids, seg, mask_token, pos_embed, num_samples)
    return _call(x_kept, ids, seg, mask_token, pos_embed, num_samples)[0]


def insert_mask_tokens_reference(x_kept: torch.Tensor, ids: torch.Tensor, seg: torch.Tensor,
                                 mask_token: torch.Tensor, pos_embed: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Plain-PyTorch reference of ``insert_mask_tokens`` (fp32 math, the mask token rounded to x_kept's dtype)."""
    L, d = pos_embed.shape
    full = mask_token.to(x_kept.dtype).float().expand(num_samples * L, d)
    full = full.index_put((seg.long() * L + ids,), x_kept.float())
    return (full.view(num_samples, L, d) + pos_embed.float()).to(x_kept.dtype)
