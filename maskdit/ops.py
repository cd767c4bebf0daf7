"""Token-layout operations of the networks, in plain PyTorch (the "torch" backend).

The fused Triton kernels (``kernels/``) replace them one for one.  Conventions, shared by the kernels, the
packed encoder and the model: tokens are row-major over the (H/p, W/p) patch grid; a patch's p*p*C values
are ordered (row in patch, column in patch, channel); the kept tokens of a batch are packed as (T, D) with
a ``TokenLayout`` (``maskdit.masking``); per-sample conditioning tensors (shift, scale, gate) are (N, D).
When every sample keeps the same number of tokens, per-sample tensors broadcast over an (N, K, D) view;
otherwise they are indexed per token.  No N x K x D index tensor is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masking import TokenLayout

LN_EPS = 1e-6


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with L = (H/p)*(W/p), row-major tokens."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``patchify``: (N, L, p*p*C) -> (N, C, H, W)."""
    n = x.shape[0]
    x = x.reshape(n, h // p, w // p, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)


def per_token(v: torch.Tensor, x: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, v) shaped so that x op v applies the per-sample (N, D) ``v`` to every token of (T, D) ``x``:
    (N, K, D) and (N, 1, D) views for equal lengths, else (T, D) and the rows v[seg].

    The rows' backward sums each sample's T_i gradients: on CUDA ``v[seg]``'s (sorted, deterministic), elsewhere
    ``index_select``'s (``v[seg]``'s adds them with CPU atomics, in a different order from run to run)."""
    k = layout.uniform_len
    if k is not None:
        return x.view(layout.num_samples, k, x.shape[-1]), v.unsqueeze(1)
    seg = layout.seg.long()
    return x, (v[seg] if v.is_cuda else v.index_select(0, seg))


def embed_patches(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor,
                  patch_size: int, layout: TokenLayout) -> torch.Tensor:
    """Patch embedding of the kept tokens plus their positional embedding, (T, D).

    x (N, C, H, W); weight (D, p*p*C); bias (D,); pos_embed (L, D).  Masked patches are never embedded.
    """
    patches = patchify(x, patch_size)[layout.seg.long(), layout.ids]
    return F.linear(patches, weight, bias) + pos_embed[layout.ids]


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) then adaLN: LN(x) * (1 + scale[s]) + shift[s]; x (T, D)."""
    y = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
    y3, scale = per_token(scale, y, layout)
    shift = per_token(shift, y, layout)[1]
    return (y3 * (1 + scale) + shift).view(x.shape)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """x + gate[s] * h with x, h (T, D) and gate (N, D)."""
    h3, gate = per_token(gate, h, layout)
    return x + (gate * h3).view(h.shape)


def insert_mask_tokens(x_kept: torch.Tensor, layout: TokenLayout, mask_token: torch.Tensor,
                       pos_embed: torch.Tensor) -> torch.Tensor:
    """The decoder's full sequence (N*L, D): kept rows at their positions, ``mask_token`` elsewhere,
    plus ``pos_embed`` (L, D) on every row."""
    n, L, d = layout.num_samples, layout.num_tokens, x_kept.shape[-1]
    full = mask_token.to(x_kept.dtype).expand(n * L, d)
    full = full.index_put((layout.seg.long() * L + layout.ids,), x_kept)
    return (full.view(n, L, d) + pos_embed).view(n * L, d)


def scatter_tokens(x_kept: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(T, D) kept rows placed at their positions in an (N*L, D) tensor of zeros."""
    n, L = layout.num_samples, layout.num_tokens
    out = x_kept.new_zeros(n * L, x_kept.shape[-1])
    return out.index_put((layout.seg.long() * L + layout.ids,), x_kept)
