"""Random token masking (MAE-style per-sample shuffling)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Mask(NamedTuple):
    """``ids_keep`` (N, K) token indices the encoder sees; ``ids_restore`` (N, L) the inverse of the
    per-sample shuffle; ``mask`` (N, L) bool, True at masked (removed) tokens."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), as the official code."""
    return int(num_tokens * (1 - mask_ratio))


def random_mask(batch: int, num_tokens: int, mask_ratio: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Mask:
    """Keep a uniformly random subset of K = int(L * (1 - mask_ratio)) tokens per sample.

    ``ids_keep`` lists the kept tokens in shuffle order (the order the official code uses).
    The draw happens on ``device`` (default: the generator's device, else CPU).
    """
    if not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    if batch < 1 or num_tokens < 1:
        raise ValueError(f"batch and num_tokens must be positive, got {batch} and {num_tokens}")
    keep = num_kept(num_tokens, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no token of {num_tokens}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = ids_restore >= keep
    return Mask(ids_shuffle[:, :keep], ids_restore, mask)


def mask_from_ids_keep(ids_keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(N, L) bool mask, True at the tokens NOT listed in ``ids_keep`` (N, K)."""
    mask = torch.ones(ids_keep.shape[0], num_tokens, dtype=torch.bool, device=ids_keep.device)
    return mask.scatter(1, ids_keep, False)
