"""Kept-patch embedding: out[t] = patch(x, seg[t], ids[t]) @ weight^T + bias + pos_embed[ids[t]].

x (N, C, H, W) contiguous; kept tokens in token layout: ``ids`` (T,) the token index within its image
(row-major over the (H/p, W/p) grid) and ``seg`` (T,) int32 its sample.  A patch's p*p*C values are
read in ``maskdit.ops.patchify``'s order (row in patch, column in patch, channel); masked patches are
never read.  weight (D, p*p*C), bias (D,), pos_embed (L, D) a fixed buffer (no gradient).  The forward
is one kernel over (block of tokens) x (block of D): the tile's gathered patches times the weight
columns (``tl.dot`` in fp32, ieee by default, chunks of up to 32 patch values), then bias and the positional row, one
write of (T, D).

Backward: a small Triton kernel gathers the kept patches into an fp32 (T, p*p*C + pad) matrix with a
column of ones after them, so one fp32 GEMM dout^T @ [patches, 1] reads dout once for dweight and dbias
(its last used column) instead of a GEMM and a column sum each reading it; when x needs a gradient,
dpatches = dout @ weight (fp32 GEMM) is scattered back by a Triton kernel (fp32 atomic adds into a
zeroed buffer, so repeated ids add up like the reference), zero at masked patches.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    alert_nondeterministic,
    autograd_op,
    block_size,
    cdiv,
    check_out_dtype,
    check_tensor,
    new_output,
    readable_on_host,
)

# a forward program's tile: H100, D 1152, 32768 tokens, tf32x3: 0.080 ms at 64 x 64 against 0.086 at 32 x 128
# (and 0.141 against 0.157 with "ieee" products; CUDA-graph times, bench/results/nvidia-h100-80gb-hbm3)
FWD_TOKENS = 64  # tokens per forward program
FWD_BLOCK_D = 64  # output columns per forward program
FWD_BLOCK_K = 32  # patch values per step of the forward's product (at least 16, for tl.dot)
GATHER_TOKENS = 32  # tokens per gather/scatter program
FWD_WARPS = 4  # warps of a forward program (H200, D 1152: 0.151 ms against 0.202 with 8, CUDA-graph times)
# the forward product's precision for fp32 operands: "ieee" (CUDA-core FMAs, whose operand fragments take a
# 32 x 128 tile to 166 registers: three programs an SM, offline sm_90 build), or "tf32x3" (tensor cores, three
# tf32 products whose sum keeps about fp32's precision: 139 registers at 32 x 128, 80 at 16 x 128).  tf32x3 it
# is: H100, D 1152, 32768 tokens, 32 x 128 tiles, 0.086 ms against 0.157 with "ieee" (CUDA-graph times,
# bench/results/nvidia-h100-80gb-hbm3/retuned/kernels.md).  (Unrolled outer products instead of a dot spilled
# kilobytes: not offered.)
FWD_PRECISION = "tf32x3"


@triton.jit
def _patch_offsets(X_OFF, tok, s, k, C, H, W, GW, P: tl.constexpr):
    """Element offsets into x (N, C, H, W) of input ``k`` (patchify order) of token ``tok`` of sample ``s``."""
    gh = tok // GW
    gw = tok - gh * GW
    i = k // (P * C)
    j = (k // C) % P
    c = k % C
    return X_OFF + s * (C * H * W) + c * (H * W) + (gh * P + i) * W + gw * P + j


@triton.jit
def _patch_embed_fwd_kernel(X, IDS, SEG, WT, B, POS, OUT, T, D, H, W, GW, stride_w, stride_pos, stride_out,
                            C: tl.constexpr, P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    tok = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
    s = tl.load(SEG + rows, mask=rmask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    # the tile's patches (BLOCK_T, BLOCK_K) and weight columns (BLOCK_K, BLOCK_D), each loaded at once (a
    # loop of one patch value at a time was latency-bound), multiplied in fp32 (no plain tf32 rounding)
    for k0 in range(0, P * P * C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < P * P * C
        offs = _patch_offsets(0, tok[:, None], s[:, None], ks[None, :], C, H, W, GW, P)
        xt = tl.load(X + offs, mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        wt = tl.load(WT + cols[None, :] * stride_w + ks[:, None], mask=kmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    mask2 = rmask[:, None] & cmask[None, :]
    pos = tl.load(POS + tok[:, None] * stride_pos + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
    out = acc + b[None, :] + pos
    tl.store(OUT + rows[:, None] * stride_out + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask2)


@triton.jit
def _patch_tile(IDS, SEG, T, C, H, W, GW, K, stride_m, P: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """This program's tile of (token, patch value): x offsets, offsets in a (T, stride_m) matrix, the mask of
    the K patch values of real tokens, and the rows' mask and the column indices."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    tok = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)
    s = tl.load(SEG + rows, mask=rmask, other=0).to(tl.int64)
    offs = _patch_offsets(0, tok[:, None], s[:, None], ks[None, :], C, H, W, GW, P)
    return offs, rows[:, None] * stride_m + ks[None, :], rmask[:, None] & (ks < K)[None, :], rmask, ks


@triton.jit
def _patch_gather_kernel(X, IDS, SEG, PATCHES, T, C, H, W, GW, K, KP, P: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """PATCHES (T, KP) fp32 = the kept patches of x in columns < K, then a column of ones (column K), then
    zeros: one product dout^T @ PATCHES gives the weight gradient and, in column K, the bias gradient."""
    offs, moffs, mask2, rmask, ks = _patch_tile(IDS, SEG, T, C, H, W, GW, K, KP, P, BLOCK_T, BLOCK_K)
    vals = tl.load(X + offs, mask=mask2, other=0.0).to(tl.float32)
    vals = tl.where((ks == K)[None, :], 1.0, vals)
    tl.store(PATCHES + moffs, vals, mask=rmask[:, None] & (ks < KP)[None, :])


@triton.jit
def _patch_scatter_kernel(DPATCHES, IDS, SEG, DX, T, C, H, W, GW, K, P: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """DX (N, C, H, W) fp32, zeroed, += DPATCHES (T, K) fp32 at the kept patches."""
    offs, moffs, mask2, _, _ = _patch_tile(IDS, SEG, T, C, H, W, GW, K, K, P, BLOCK_T, BLOCK_K)
    tl.atomic_add(DX + offs, tl.load(DPATCHES + moffs, mask=mask2, other=0.0), mask=mask2, sem="relaxed")


def _validate(x, ids, seg, weight, bias, pos_embed, patch_size, out_dtype):
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES, contiguous=True)
    n, c, h, w = x.shape
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"x's height and width must be divisible by patch_size={p}, got shape {tuple(x.shape)}")
    num_tokens, k = (h // p) * (w // p), p * p * c
    check_tensor("ids", ids, ndim=1, dtypes=(torch.int64, torch.int32), device=x.device, contiguous=True)
    t = ids.shape[0]
    check_tensor("seg", seg, shape=(t,), dtypes=(torch.int32,), device=x.device, contiguous=True)
    check_tensor("weight", weight, ndim=2, shape=(None, k), dtypes=FLOAT_DTYPES, device=x.device,
                 last_stride_one=True)
    d = weight.shape[0]
    check_tensor("bias", bias, shape=(d,), dtypes=FLOAT_DTYPES, device=x.device, contiguous=True)
    check_tensor("pos_embed", pos_embed, shape=(num_tokens, d), dtypes=FLOAT_DTYPES, device=x.device,
                 last_stride_one=True)
    if pos_embed.requires_grad and torch.is_grad_enabled():
        raise ValueError("pos_embed must not require grad: it is a fixed buffer and gets no gradient")
    check_out_dtype(out_dtype)
    # Value checks only where they cost no device sync (CPU tensors) and outside torch.compile tracing.
    if t and readable_on_host(x):
        bad_ids = (ids.min() < 0) | (ids.max() >= num_tokens)
        bad_seg = (seg.min() < 0) | (seg.max() >= n)
        bad = torch.stack([bad_ids, bad_seg]).tolist()
        if bad[0]:
            raise ValueError(f"ids must lie in [0, {num_tokens}) (tokens of a {h // p}x{w // p} grid), "
                             f"got range [{int(ids.min())}, {int(ids.max())}]")
        if bad[1]:
            raise ValueError(f"seg must lie in [0, {n}) (the samples of x), got range [{int(seg.min())}, "
                             f"{int(seg.max())}]")


def _fwd_impl(x: torch.Tensor, ids: torch.Tensor, seg: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              pos_embed: torch.Tensor, patch_size: int, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    _, c, h, w = x.shape
    t, d = ids.shape[0], weight.shape[0]
    out = new_output((t, d), out_dtype or x.dtype, x.device)
    if t and d:
        grid = (cdiv(t, FWD_TOKENS), cdiv(d, FWD_BLOCK_D))
        _patch_embed_fwd_kernel[grid](x, ids, seg, weight, bias, pos_embed, out, t, d, h, w, w // patch_size,
                                      weight.stride(0), pos_embed.stride(0), out.stride(0),
                                      C=c, P=patch_size, BLOCK_T=FWD_TOKENS, BLOCK_D=FWD_BLOCK_D,
                                      BLOCK_K=min(FWD_BLOCK_K, block_size(patch_size * patch_size * c)),
                                      PRECISION=FWD_PRECISION, num_warps=FWD_WARPS)
    return out


_fwd = torch.library.custom_op("maskdit::patch_embed_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _fwd_fake(x, ids, seg, weight, bias, pos_embed, patch_size, out_dtype):
    return x.new_empty((ids.shape[0], weight.shape[0]), dtype=out_dtype or x.dtype)


def _padded_width(k: int) -> int:
    """Columns of the gathered patches: the K patch values, the column of ones, zeros up to a multiple of 8
    (aligned rows for the product)."""
    return (k // 8 + 1) * 8


def _gather_patches(x, ids, seg, patch_size):
    """The kept patches in fp32, patchify's order, with a column of ones after them: (T, _padded_width(K)),
    K = p*p*C, zeros beyond column K."""
    _, c, h, w = x.shape
    t, k = ids.shape[0], patch_size * patch_size * c
    kp = _padded_width(k)
    patches = new_output((t, kp), torch.float32, x.device)
    if t:
        _patch_gather_kernel[(cdiv(t, GATHER_TOKENS),)](
            x, ids, seg, patches, t, c, h, w, w // patch_size, k, kp, P=patch_size, BLOCK_T=GATHER_TOKENS,
            BLOCK_K=block_size(kp))
    return patches


def _bwd_impl(dout: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, seg: torch.Tensor, weight: torch.Tensor,
              patch_size: int, needs_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx or an empty tensor, fp32 (D, K_pad) with dweight in columns < K and dbias in column K)."""
    _, c, h, w = x.shape
    t, k = ids.shape[0], patch_size * patch_size * c
    dout32 = dout.float()
    # one pass over dout for both: dout^T @ [patches, 1]
    dweight_bias = dout32.t() @ _gather_patches(x, ids, seg, patch_size)
    if not needs_dx:
        return x.new_empty((0,)), dweight_bias
    dpatches = (dout32 @ weight.float()).contiguous()
    alert_nondeterministic("maskdit::embed_kept_patches backward to x", x.device)  # only when x needs a gradient
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if t:
        _patch_scatter_kernel[(cdiv(t, GATHER_TOKENS),)](
            dpatches, ids, seg, dx, t, c, h, w, w // patch_size, k, P=patch_size, BLOCK_T=GATHER_TOKENS,
            BLOCK_K=block_size(k))
    return dx.to(x.dtype), dweight_bias


_bwd = torch.library.custom_op("maskdit::patch_embed_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _bwd_fake(dout, x, ids, seg, weight, patch_size, needs_dx):
    dx = x.new_empty(x.shape if needs_dx else (0,))
    return dx, weight.new_empty((weight.shape[0], _padded_width(weight.shape[1])), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, ids, seg, weight, bias, pos_embed, patch_size, out_dtype = inputs
    ctx.save_for_backward(x, ids, seg, weight)
    ctx.patch_size, ctx.bias_dtype = patch_size, bias.dtype


def _backward(ctx, bwd, dout):
    x, ids, seg, weight = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx, dweight_bias = bwd(dout, x, ids, seg, weight, ctx.patch_size, needs_dx)
    k = weight.shape[1]
    return (dx if needs_dx else None), None, None, dweight_bias[:, :k].to(weight.dtype), \
        dweight_bias[:, k].to(ctx.bias_dtype), None, None, None


_call = autograd_op("EmbedKeptPatches", _fwd, _fwd_impl, _bwd, _bwd_impl, _setup_context, _backward)


def embed_kept_patches(x: torch.Tensor, ids: torch.Tensor, seg: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, pos_embed: torch.Tensor, patch_size: int,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused patchify + linear + positional embedding of the kept tokens: (T, D) in ``out_dtype`` (default x's).

    x (N, C, H, W) contiguous; ids (T,) int64 token index in its image; seg (T,) int32 its sample;
    weight (D, p*p*C); bias (D,); pos_embed (L, D), L = (H/p)*(W/p), no gradient.
    """
    _validate(x, ids, seg, weight, bias, pos_embed, patch_size, out_dtype)
    return _call(x, ids, seg, weight, bias, pos_embed, patch_size, out_dtype)


def embed_kept_patches_reference(x: torch.Tensor, ids: torch.Tensor, seg: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor, pos_embed: torch.Tensor, patch_size: int,
                                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch reference of ``embed_kept_patches`` (fp32 math)."""
    from maskdit.ops import patchify

    ids_l = ids.long()
    patches = patchify(x.float(), patch_size)[seg.long(), ids_l]
    out = patches @ weight.float().t() + bias.float() + pos_embed.float()[ids_l]
    return out.to(out_dtype or x.dtype)
