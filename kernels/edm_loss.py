"""MaskDiT's EDM loss fused in token layout, forward and backward (no unpatchify/patchify round trip).

Inputs: the final layer's raw output ``f_tok`` (N, L, P_out), each token's vector ordered (row in patch,
column in patch, channel) with C_out = C or 2C (learn_sigma: only channels c < C are used); the clean
images ``y`` and the noisy input ``noisy`` = y + n, both (N, C, H, W) (any strides); ``sigma`` (N,);
``mask`` (N, L) bool, True at masked tokens.  With P = p*p*C, per sample s and token t:

    D = c_skip noisy_patch + c_out F                 (EDM preconditioning, F's first C channels)
    dsm[t] = lambda mean_P (D - y_patch)^2           lambda = (s^2 + sd^2) / (s sd)^2
    mae[t] = mean_P (D - (x - mean) / sqrt(var + 1e-6))^2, x the noisy patch, var unbiased
    loss[s] = sum_visible dsm / n_visible + mae_coef sum_masked mae / max(n_masked, 1)

A sample without a masked token has no MAE term; a sample without a visible token has DSM term 0
(``EDMLoss.from_denoised`` would give 0/0 = NaN there).  Math in fp32 whatever the input dtypes.

Forward grid (N,): a program walks its sample in tiles of BLOCK_T tokens x BLOCK_P >= P_out columns,
gathers the matching image pixels of y and noisy directly from (N, C, H, W) and stores the sample's loss.
The per-sample coefficients (c_skip, c_out, lambda / max(n_visible, 1), mae_coef / max(n_masked, 1)) are
computed in the kernels from sigma and the sample's mask row, so a call is one launch (the small torch ops
that computed them cost more host and GPU time than the kernel at N = 256).  The backward saves no
activation (only references to the inputs): on the grid (N, cdiv(L, BLOCK_T)) each program recomputes the
coefficients, reloads its tile, recomputes D, the patch statistics and the target, and writes d f_tok in
f_tok's dtype (zero in the unused channels c >= C).  y, noisy, sigma and mask get no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    autograd_op,
    block_size,
    cdiv,
    check_tensor,
    new_output,
    next_power_of_2,
)

MAE_EPS = 1e-6  # the MAE target's variance epsilon (maskdit.edm.MAE_EPS)
# upper bounds on BLOCK_T * BLOCK_P, the elements of a tile: the forward's programs walk their sample's tiles,
# the backward has a program per tile (launch parameters: ``bench/kernels.py`` times smaller backward tiles)
TILE_ELEMS = 2048
BWD_TILE_ELEMS = 4096  # H100, F (256, 256, 16): 6 us against 7 with 2048 (CUDA graph)


@triton.jit
def _coefficients(SIGMA, MASK, s, L, stride_sig, stride_mn, stride_ml, sigma_data, mae_coef,
                  BLOCK_L: tl.constexpr):
    """Sample s's c_skip, c_out, lambda / max(n_visible, 1) and mae_coef / max(n_masked, 1)."""
    sig = tl.load(SIGMA + s * stride_sig).to(tl.float32)
    den = sig * sig + sigma_data * sigma_data
    c_skip = sigma_data * sigma_data / den
    c_out = sig * sigma_data / tl.sqrt(den)
    lam = den / ((sig * sigma_data) * (sig * sigma_data))
    offs = tl.arange(0, BLOCK_L)
    m = tl.load(MASK + s * stride_mn + offs.to(tl.int64) * stride_ml, mask=offs < L, other=0)
    n_masked = tl.sum((m != 0).to(tl.float32), axis=0)
    return c_skip, c_out, lam / tl.maximum(L - n_masked, 1.0), mae_coef / tl.maximum(n_masked, 1.0)


@triton.jit
def _tile(F, Y, NOISY, MASK, s, tb, L, WP, C, C_OUT, P, P_OUT, stride_fn, stride_fl,
          stride_yn, stride_yc, stride_yh, stride_yw, stride_xn, stride_xc, stride_xh, stride_xw,
          stride_mn, stride_ml, c_skip, c_out, PATCH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
          EPS: tl.constexpr):
    """Load tile tb of sample s and return (in-range tokens, masked flags, columns, D - y, D - target)."""
    toks = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_P)
    tmask = toks < L
    ch = cols % C_OUT
    ij = cols // C_OUT
    used = (cols < P_OUT) & (ch < C)
    m2 = tmask[:, None] & used[None, :]
    t64 = toks.to(tl.int64)
    row = ((toks // WP) * PATCH)[:, None] + (ij // PATCH)[None, :]
    col = ((toks % WP) * PATCH)[:, None] + (ij % PATCH)[None, :]
    row = row.to(tl.int64)
    col = col.to(tl.int64)
    ch64 = ch.to(tl.int64)[None, :]
    f = tl.load(F + s * stride_fn + t64[:, None] * stride_fl + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    y = tl.load(Y + s * stride_yn + ch64 * stride_yc + row * stride_yh + col * stride_yw, mask=m2,
                other=0.0).to(tl.float32)
    x = tl.load(NOISY + s * stride_xn + ch64 * stride_xc + row * stride_xh + col * stride_xw, mask=m2,
                other=0.0).to(tl.float32)
    masked = tl.load(MASK + s * stride_mn + t64 * stride_ml, mask=tmask, other=0) != 0
    d = c_skip * x + c_out * f
    mean = tl.sum(x, axis=1) / P
    xc = tl.where(m2, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / (P - 1) + EPS)
    e_dsm = tl.where(m2, d - y, 0.0)
    e_mae = tl.where(m2, d - xc * rstd[:, None], 0.0)
    return tmask, masked, cols, e_dsm, e_mae


@triton.jit
def _edm_loss_fwd_kernel(F, Y, NOISY, SIGMA, MASK, LOSS, L, WP, C, C_OUT, P, P_OUT, stride_fn, stride_fl,
                         stride_yn, stride_yc, stride_yh, stride_yw, stride_xn, stride_xc, stride_xh, stride_xw,
                         stride_sig, stride_mn, stride_ml, sigma_data, mae_coef, PATCH: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, EPS: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    c_skip, c_out, w_vis, w_mask = _coefficients(SIGMA, MASK, s, L, stride_sig, stride_mn, stride_ml, sigma_data,
                                                 mae_coef, BLOCK_L)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for tb in range(0, tl.cdiv(L, BLOCK_T)):
        tmask, masked, cols, e_dsm, e_mae = _tile(
            F, Y, NOISY, MASK, s, tb, L, WP, C, C_OUT, P, P_OUT, stride_fn, stride_fl,
            stride_yn, stride_yc, stride_yh, stride_yw, stride_xn, stride_xc, stride_xh, stride_xw,
            stride_mn, stride_ml, c_skip, c_out, PATCH, BLOCK_T, BLOCK_P, EPS)
        dsm = tl.sum(e_dsm * e_dsm, axis=1) / P
        mae = tl.sum(e_mae * e_mae, axis=1) / P
        tok = tl.where(masked, w_mask * mae, w_vis * dsm)
        total += tl.where(tmask, tok, 0.0)
    tl.store(LOSS + s, tl.sum(total, axis=0))


@triton.jit
def _edm_loss_bwd_kernel(G, F, Y, NOISY, SIGMA, MASK, DF, L, WP, C, C_OUT, P, P_OUT, stride_g, stride_fn, stride_fl,
                         stride_yn, stride_yc, stride_yh, stride_yw, stride_xn, stride_xc, stride_xh, stride_xw,
                         stride_sig, stride_mn, stride_ml, stride_dn, stride_dl, sigma_data, mae_coef,
                         PATCH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr,
                         EPS: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    c_skip, c_out, w_vis, w_mask = _coefficients(SIGMA, MASK, s, L, stride_sig, stride_mn, stride_ml, sigma_data,
                                                 mae_coef, BLOCK_L)
    tmask, masked, cols, e_dsm, e_mae = _tile(
        F, Y, NOISY, MASK, s, tb, L, WP, C, C_OUT, P, P_OUT, stride_fn, stride_fl,
        stride_yn, stride_yc, stride_yh, stride_yw, stride_xn, stride_xc, stride_xh, stride_xw,
        stride_mn, stride_ml, c_skip, c_out, PATCH, BLOCK_T, BLOCK_P, EPS)
    g = tl.load(G + s * stride_g).to(tl.float32)
    base = g * c_out * 2.0 / P
    df = tl.where(masked[:, None], (base * w_mask) * e_mae, (base * w_vis) * e_dsm)  # 0 where c >= C
    toks = (tb * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    smask = tmask[:, None] & (cols < P_OUT)[None, :]
    tl.store(DF + s * stride_dn + toks[:, None] * stride_dl + cols[None, :], df.to(DF.dtype.element_ty), mask=smask)


def _validate(f_tok, y, noisy, sigma, mask, patch_size, sigma_data, mae_coef):
    check_tensor("f_tok", f_tok, ndim=3, dtypes=FLOAT_DTYPES, last_stride_one=True)
    n, num_tokens, p_out = f_tok.shape
    dev = f_tok.device
    check_tensor("y", y, ndim=4, shape=(n, None, None, None), dtypes=FLOAT_DTYPES, device=dev)
    _, c, h, w = y.shape
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image size {h}x{w} of y")
    if c < 1 or patch_size * patch_size * c < 2:
        raise ValueError(f"patch_size {patch_size} with {c} channels gives patches of fewer than 2 values "
                         "(the unbiased variance of the MAE target needs 2)")
    pp = patch_size * patch_size
    want_l = (h // patch_size) * (w // patch_size)
    if num_tokens != want_l or p_out not in (pp * c, 2 * pp * c):
        raise ValueError(f"f_tok must have shape ({n}, {want_l}, {pp * c} or {2 * pp * c}) for y of shape "
                         f"{tuple(y.shape)} and patch_size {patch_size}, got {tuple(f_tok.shape)}")
    check_tensor("noisy", noisy, shape=tuple(y.shape), dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("sigma", sigma, shape=(n,), dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("mask", mask, shape=(n, num_tokens), dtypes=(torch.bool,), device=dev)
    if not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
        raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
    if not isinstance(mae_coef, (int, float)) or not mae_coef >= 0:
        raise ValueError(f"mae_coef must be a number >= 0, got {mae_coef!r}")


def _block_tokens(num_tokens: int, block_p: int, tile_elems: int) -> int:
    return max(1, min(next_power_of_2(num_tokens), tile_elems // block_p))


def _geometry(f_tok, y, patch_size, tile_elems):
    n, num_tokens, p_out = f_tok.shape
    c, w = y.shape[1], y.shape[3]
    block_p = block_size(p_out)
    block_t = _block_tokens(num_tokens, block_p, tile_elems)
    return dict(L=num_tokens, WP=w // patch_size, C=c, C_OUT=p_out // (patch_size * patch_size),
                P=patch_size * patch_size * c, P_OUT=p_out), cdiv(num_tokens, block_t), \
        dict(PATCH=patch_size, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_L=next_power_of_2(num_tokens), EPS=MAE_EPS)


def _fwd_impl(f_tok: torch.Tensor, y: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor,
              patch_size: int, sigma_data: float, mae_coef: float) -> torch.Tensor:
    n = f_tok.shape[0]
    args, _, meta = _geometry(f_tok, y, patch_size, TILE_ELEMS)
    loss = new_output((n,), torch.float32, f_tok.device)
    if n:
        m8 = mask.view(torch.uint8)
        _edm_loss_fwd_kernel[(n,)](f_tok, y, noisy, sigma, m8, loss, *args.values(), f_tok.stride(0), f_tok.stride(1),
                                   *y.stride(), *noisy.stride(), sigma.stride(0), m8.stride(0), m8.stride(1),
                                   sigma_data, mae_coef, **meta)
    return loss


_fwd = torch.library.custom_op("maskdit::edm_loss_fwd", _fwd_impl, mutates_args=())


@_fwd.register_fake
def _fwd_fake(f_tok, y, noisy, sigma, mask, patch_size, sigma_data, mae_coef):
    return f_tok.new_empty((f_tok.shape[0],), dtype=torch.float32)


def _bwd_impl(g: torch.Tensor, f_tok: torch.Tensor, y: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
              mask: torch.Tensor, patch_size: int, sigma_data: float, mae_coef: float) -> torch.Tensor:
    args, tiles, meta = _geometry(f_tok, y, patch_size, BWD_TILE_ELEMS)
    df = new_output(tuple(f_tok.shape), f_tok.dtype, f_tok.device)
    if f_tok.shape[0]:
        m8 = mask.view(torch.uint8)
        _edm_loss_bwd_kernel[(f_tok.shape[0], tiles)](
            g, f_tok, y, noisy, sigma, m8, df, *args.values(), g.stride(0), f_tok.stride(0), f_tok.stride(1),
            *y.stride(), *noisy.stride(), sigma.stride(0), m8.stride(0), m8.stride(1), df.stride(0), df.stride(1),
            sigma_data, mae_coef, **meta)
    return df


_bwd = torch.library.custom_op("maskdit::edm_loss_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _bwd_fake(g, f_tok, y, noisy, sigma, mask, patch_size, sigma_data, mae_coef):
    return f_tok.new_empty(f_tok.shape)


def _setup_context(ctx, inputs, output):
    f_tok, y, noisy, sigma, mask, patch_size, sigma_data, mae_coef = inputs
    ctx.save_for_backward(f_tok, y, noisy, sigma, mask)
    ctx.constants = patch_size, sigma_data, mae_coef


def _backward(ctx, bwd, g):
    f_tok, y, noisy, sigma, mask = ctx.saved_tensors
    return bwd(g, f_tok, y, noisy, sigma, mask, *ctx.constants), None, None, None, None, None, None, None


_call = autograd_op("EdmLoss", _fwd, _fwd_impl, _bwd, _bwd_impl, _setup_context, _backward)


def edm_loss(f_tok: torch.Tensor, y: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor,
             patch_size: int, sigma_data: float = 0.5, mae_coef: float = 0.1) -> torch.Tensor:
    """Fused per-sample MaskDiT EDM loss (N,) fp32 from the raw token output ``f_tok`` (see the module doc).

    Differentiable w.r.t. ``f_tok`` only.
    """
    _validate(f_tok, y, noisy, sigma, mask, patch_size, sigma_data, mae_coef)
    return _call(f_tok, y, noisy, sigma, mask, patch_size, float(sigma_data), float(mae_coef))


def edm_loss_reference(f_tok: torch.Tensor, y: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
                       mask: torch.Tensor, patch_size: int, sigma_data: float = 0.5,
                       mae_coef: float = 0.1) -> torch.Tensor:
    """Plain-PyTorch reference of ``edm_loss`` in token layout (fp32 math, differentiable w.r.t. f_tok)."""
    from maskdit.ops import patchify

    n, num_tokens, p_out = f_tok.shape
    c = y.shape[1]
    p = patch_size
    f = f_tok.float().reshape(n, num_tokens, p * p, p_out // (p * p))[..., :c].reshape(n, num_tokens, p * p * c)
    s = sigma.float()[:, None, None]
    sd = sigma_data
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
    lam = ((s ** 2 + sd ** 2) / (s * sd) ** 2)[:, :, 0]
    x = patchify(noisy.float(), p)
    d = c_skip * x + c_out * f
    dsm = lam * (d - patchify(y.float(), p)).square().mean(dim=-1)
    masked = mask.float()
    visible = 1 - masked
    loss = (dsm * visible).sum(dim=1) / visible.sum(dim=1).clamp(min=1)
    target = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + MAE_EPS).sqrt()
    mae = (d - target).square().mean(dim=-1)
    return loss + mae_coef * (mae * masked).sum(dim=1) / masked.sum(dim=1).clamp(min=1)
