"""The token operations a network runs, chosen by backend: "torch" (plain PyTorch, the reference) or
"triton" (the fused kernels of ``kernels/``).  Both take and return the same dense tensors:

    embed_patches(x, weight, bias, pos_embed, patch_size, ids_keep)   -> (N, K, D)
    ln_modulate(x, shift, scale)                                       -> LN(x) * (1 + scale) + shift
    residual_ln_modulate(x, h, gate, shift, scale)                     -> (x + gate * h, LN(that) * ... )
    insert_mask_tokens(x_kept, ids_keep, mask_token, pos_embed)        -> (N, L, D_dec)

x, h (N, T, D); shift, scale, gate (N, D).  The modulated output comes in the autocast dtype when
autocast is on (it feeds a matrix product), the residual stream keeps its dtype.
"""

from __future__ import annotations

import torch

from . import ops

BACKENDS = ("auto", "torch", "triton")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class TorchOps:
    """Plain PyTorch (``maskdit.ops``)."""

    name = "torch"
    embed_patches = staticmethod(ops.embed_patches)
    insert_mask_tokens = staticmethod(ops.insert_mask_tokens)

    @staticmethod
    def ln_modulate(x, shift, scale):
        return ops.ln_modulate(x, shift, scale)

    @staticmethod
    def residual_ln_modulate(x, h, gate, shift, scale):
        x = ops.gated_residual(x, gate, h)
        return x, ops.ln_modulate(x, shift, scale)


class TritonOps:
    """The fused Triton kernels; dense (N, T, D) tensors are viewed as (N*T, D) tokens with a
    token->sample map."""

    name = "triton"

    def __init__(self):
        try:
            import kernels
        except ImportError as e:  # triton missing
            raise RuntimeError(f"backend 'triton' needs the triton package ({e}); use backend='torch'") from e
        self.k = kernels

    def _seg(self, n: int, t: int, device) -> torch.Tensor:
        return self.k.token_samples(n, t, device)

    def embed_patches(self, x, weight, bias, pos_embed, patch_size, ids_keep):
        n, num_tokens = x.shape[0], pos_embed.shape[0]
        if ids_keep is None:
            ids_keep = torch.arange(num_tokens, device=x.device).expand(n, num_tokens)
        k = ids_keep.shape[1]
        out = self.k.embed_kept_patches(x, ids_keep.reshape(-1), self._seg(n, k, x.device), weight, bias,
                                        pos_embed, patch_size)
        return out.view(n, k, -1)

    def ln_modulate(self, x, shift, scale):
        n, t, d = x.shape
        y = self.k.ln_modulate(x.reshape(n * t, d), shift, scale, self._seg(n, t, x.device),
                               out_dtype=_autocast_dtype(x))
        return y.view(n, t, d)

    def residual_ln_modulate(self, x, h, gate, shift, scale):
        n, t, d = x.shape
        x_new, y = self.k.gated_residual_ln_modulate(
            x.reshape(n * t, d), h.reshape(n * t, d), gate, shift, scale, self._seg(n, t, x.device),
            out_dtype=_autocast_dtype(x))
        return x_new.view(n, t, d), y.view(n, t, d)

    def insert_mask_tokens(self, x_kept, ids_keep, mask_token, pos_embed):
        n, k, d = x_kept.shape
        if ids_keep is None:
            return x_kept + pos_embed
        # the decoder's residual stream is kept in the parameters' precision, as in the torch backend
        dtype = torch.promote_types(x_kept.dtype, pos_embed.dtype)
        return self.k.insert_mask_tokens(x_kept.reshape(n * k, d).to(dtype), ids_keep.reshape(-1),
                                         self._seg(n, k, x_kept.device), mask_token.to(dtype), pos_embed.to(dtype), n)


_TORCH = TorchOps()
_TRITON = None


def get_ops(backend: str, device: torch.device):
    """The ops for ``backend``; "auto" is "triton" on CUDA and "torch" elsewhere."""
    global _TRITON
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return _TORCH
    if _TRITON is None:
        _TRITON = TritonOps()
    return _TRITON
