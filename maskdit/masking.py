"""Random token masking (MAE-style per-sample shuffling) and the packed token layout.

Packed layout: the kept tokens of all samples in one (T, D) tensor, sample after sample.  A
``TokenLayout`` describes it: per token its index in the image (``ids``) and its sample (``seg``,
int32), the cumulative lengths ``cu_seqlens`` (int32, N+1), and host ints: the sample count, the
longest sample and, when every sample keeps K tokens (the dense (N, K) case), ``uniform_len`` = K.
No field needs a device sync, and no per-sample host list enters a compiled graph.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class Mask(NamedTuple):
    """``ids_keep``: (N, K) token indices the encoder sees, or a list of N 1-D tensors when samples keep
    different numbers of tokens; ``ids_restore`` (N, L) the inverse of each sample's shuffle; ``mask``
    (N, L) bool, True at masked (removed) tokens."""

    ids_keep: torch.Tensor | list[torch.Tensor]
    ids_restore: torch.Tensor
    mask: torch.Tensor


class TokenLayout(NamedTuple):
    """Where each packed token comes from."""

    ids: torch.Tensor          # (T,) int64: token index within its image, row-major
    seg: torch.Tensor          # (T,) int32: sample of each token
    cu_seqlens: torch.Tensor   # (N + 1,) int32: start of each sample's tokens
    num_samples: int           # N
    num_tokens: int            # L, tokens per image
    max_len: int               # the longest sample's length (an upper bound is allowed)
    uniform_len: int | None    # K when every sample keeps K tokens, else None

    def lengths(self) -> list[int]:
        """Tokens kept per sample (reads ``cu_seqlens``: a device sync on CUDA)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def masked(self) -> torch.Tensor:
        """(N, L) bool, True at the tokens not in the layout."""
        n, L = self.num_samples, self.num_tokens
        mask = torch.ones(n * L, dtype=torch.bool, device=self.ids.device)
        return mask.index_fill(0, self.seg.long() * L + self.ids, False).view(n, L)


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), as the official code."""
    return int(num_tokens * (1 - mask_ratio))


def _check_ratio(r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1) (or an (N,) tensor of them), got {r!r}")
    return float(r)


def random_mask(batch: int, num_tokens: int, mask_ratio: float | torch.Tensor,
                generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Mask:
    """Keep a uniformly random subset of K = int(L * (1 - ratio)) tokens per sample.

    ``mask_ratio`` is a float, or an (N,) tensor / sequence of per-sample ratios (then ``ids_keep`` is a
    list of N tensors of different lengths).  ``ids_keep`` lists the kept tokens in shuffle order (the
    official order).  The draw happens on ``device`` (default: the generator's device, else CPU).
    """
    if batch < 1 or num_tokens < 1:
        raise ValueError(f"batch and num_tokens must be positive, got {batch} and {num_tokens}")
    if isinstance(mask_ratio, (torch.Tensor, list, tuple)):
        ratios = [_check_ratio(r) for r in torch.as_tensor(mask_ratio, dtype=torch.float64).tolist()]
        if len(ratios) != batch:
            raise ValueError(f"mask_ratio has {len(ratios)} per-sample ratios for a batch of {batch}")
    else:
        ratios = [_check_ratio(mask_ratio)] * batch
    keep = [num_kept(num_tokens, r) for r in ratios]
    if min(keep) < 1:
        raise ValueError(f"mask_ratio {max(ratios)} keeps no token of {num_tokens}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    if len(set(keep)) == 1:  # no host->device copy: a CUDA step draws its mask without a sync
        return Mask(ids_shuffle[:, :keep[0]], ids_restore, ids_restore >= keep[0])
    keep_t = torch.tensor(keep).to(device, non_blocking=True)
    return Mask([ids_shuffle[i, :k] for i, k in enumerate(keep)], ids_restore, ids_restore >= keep_t[:, None])


def host_value_range(t: torch.Tensor) -> tuple[int, int] | None:
    """(min, max) of an index tensor where reading them costs no device sync (a non-empty CPU tensor outside
    tracing), else None: value checks of every call read host tensors only."""
    if t.device.type != "cpu" or not t.numel() or torch.compiler.is_compiling():
        return None
    return int(t.min()), int(t.max())


def _check_token_ids(ids: torch.Tensor, num_tokens: int) -> None:
    """ValueError unless each sample's (a row's, or a 1-D tensor's) token indices ``ids`` are distinct and in
    [0, num_tokens) (host tensors only: ``host_value_range``)."""
    found = host_value_range(ids)
    if found is None:
        return
    if found[0] < 0 or found[1] >= num_tokens:
        raise ValueError(f"ids_keep must hold token indices in [0, {num_tokens}), got values in "
                         f"[{found[0]}, {found[1]}]")
    ids = ids.sort(dim=-1).values
    repeated = (ids[..., 1:] == ids[..., :-1]).nonzero()
    if len(repeated):
        where = "" if ids.ndim == 1 else f" of sample {int(repeated[0, 0])}"
        raise ValueError(f"ids_keep must hold distinct token indices per sample, token {int(ids[tuple(repeated[0])])}"
                         f"{where} is listed twice")


def token_layout(ids_keep: torch.Tensor | Sequence[torch.Tensor] | TokenLayout | None, batch: int, num_tokens: int,
                 device) -> TokenLayout:
    """The packed layout of ``ids_keep``: an (N, K) tensor, a list of N 1-D tensors, None (all tokens), or
    already a ``TokenLayout`` (returned as it is)."""
    if isinstance(ids_keep, TokenLayout):
        if (ids_keep.num_samples, ids_keep.num_tokens) != (batch, num_tokens):
            raise ValueError(f"ids_keep is a TokenLayout of {ids_keep.num_samples} samples of "
                             f"{ids_keep.num_tokens} tokens, expected {batch} of {num_tokens}")
        return ids_keep
    if ids_keep is None:
        ids_keep = torch.arange(num_tokens, device=device).expand(batch, num_tokens)
    if isinstance(ids_keep, torch.Tensor):
        if ids_keep.dtype != torch.int64 or ids_keep.ndim != 2 or ids_keep.shape[0] != batch \
                or not 0 < ids_keep.shape[1] <= num_tokens:
            raise ValueError(f"ids_keep must be an int64 tensor of shape ({batch}, K) with 0 < K <= {num_tokens}, "
                             f"got {tuple(ids_keep.shape)} {ids_keep.dtype}")
        _check_token_ids(ids_keep, num_tokens)
        ids_keep = ids_keep.to(device)  # as the list's: on the input's device
        k = ids_keep.shape[1]
        seg = torch.arange(batch, device=device, dtype=torch.int32)[:, None].expand(batch, k).contiguous().view(-1)
        cu = torch.arange(0, batch * k + 1, k, device=device, dtype=torch.int32)
        return TokenLayout(ids_keep.reshape(-1).contiguous(), seg, cu, batch, num_tokens, k, k)
    ids_keep = list(ids_keep)
    if len(ids_keep) != batch or any(not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype != torch.int64
                                     or not 0 < t.numel() <= num_tokens for t in ids_keep):
        raise ValueError(f"ids_keep as a list must hold {batch} 1-D int64 tensors of 1..{num_tokens} token indices")
    for t in ids_keep:
        _check_token_ids(t, num_tokens)
    lengths = [t.numel() for t in ids_keep]
    lens = torch.tensor(lengths, device=device, dtype=torch.int32)
    seg = torch.repeat_interleave(torch.arange(batch, device=device, dtype=torch.int32), lens,
                                  output_size=sum(lengths))
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    uniform = lengths[0] if all(n == lengths[0] for n in lengths) else None
    return TokenLayout(torch.cat(ids_keep).to(device), seg, cu, batch, num_tokens, max(lengths), uniform)


def mask_from_ids_keep(ids_keep: torch.Tensor | Sequence[torch.Tensor] | TokenLayout, num_tokens: int) -> torch.Tensor:
    """(N, L) bool mask, True at the tokens NOT listed in ``ids_keep`` ((N, K), a list of 1-D tensors or a
    ``TokenLayout``)."""
    if isinstance(ids_keep, TokenLayout):
        return ids_keep.masked()
    if isinstance(ids_keep, torch.Tensor):
        mask = torch.ones(ids_keep.shape[0], num_tokens, dtype=torch.bool, device=ids_keep.device)
        return mask.scatter(1, ids_keep, False)
    return token_layout(ids_keep, len(ids_keep), num_tokens, ids_keep[0].device).masked()
