"""Token-layout operations of the networks, in plain PyTorch.

These are the reference functions that the fused Triton kernels (``kernels/``) replace one for one.
Conventions (see ``shared/design.md``): tokens are row-major over the (H/p, W/p) patch grid; a
patch's p*p*C values are ordered (row in patch, column in patch, channel); per-sample conditioning
tensors (shift, scale, gate) are (N, D).  Index tensors are (N, K): no N x K x D index is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Rows ``ids_keep`` (N, K) of each sample of ``x`` (N, L, ...) -> (N, K, ...)."""
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, ids_keep]


def embed_patches(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  pos_embed: torch.Tensor, patch_size: int,
                  ids_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Patch embedding of the kept tokens plus their positional embedding.

    x (N, C, H, W); weight (D, p*p*C); bias (D,); pos_embed (L, D); ids_keep (N, K) or None for all
    tokens.  Returns (N, K, D).  Masked patches are never embedded.
    """
    patches = patchify(x, patch_size)
    if ids_keep is None:
        return F.linear(patches, weight, bias) + pos_embed
    return F.linear(gather_tokens(patches, ids_keep), weight, bias) + pos_embed[ids_keep]


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6) then adaLN: LN(x) * (1 + scale[s]) + shift[s].

    x (N, T, D); shift, scale (N, D).
    """
    y = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """x + gate[s] * h with x, h (N, T, D) and gate (N, D)."""
    return x + gate.unsqueeze(1) * h


def insert_mask_tokens(x_kept: torch.Tensor, ids_keep: torch.Tensor | None, mask_token: torch.Tensor,
                       pos_embed: torch.Tensor) -> torch.Tensor:
    """The decoder's full sequence: kept rows at ``ids_keep``, ``mask_token`` elsewhere, plus ``pos_embed``.

    x_kept (N, K, D); ids_keep (N, K) or None (all tokens kept, K = L); mask_token (D,);
    pos_embed (L, D).  Returns (N, L, D).
    """
    if ids_keep is None:
        return x_kept + pos_embed
    n, _, d = x_kept.shape
    rows = torch.arange(n, device=x_kept.device).unsqueeze(1)
    full = mask_token.to(x_kept.dtype).expand(n, pos_embed.shape[0], d)
    full = full.index_put((rows, ids_keep), x_kept)
    return full + pos_embed


def scatter_tokens(x_kept: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(N, K, D) kept rows placed at ``ids_keep`` in an (N, L, D) tensor of zeros."""
    n, _, d = x_kept.shape
    rows = torch.arange(n, device=x_kept.device).unsqueeze(1)
    return x_kept.new_zeros(n, num_tokens, d).index_put((rows, ids_keep), x_kept)
