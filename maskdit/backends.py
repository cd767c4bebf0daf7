"""The token operations a network runs, chosen by backend: "torch" (plain PyTorch, ``maskdit.ops``, the
reference) or "triton" (the fused kernels of ``kernels/``).  Both work on packed (T, D) tokens described
by a ``TokenLayout`` and take per-sample (N, D) shift/scale/gate:

    embed_patches(x, weight, bias, pos_embed, patch_size, layout)  -> (T, D)
    ln_modulate(x, shift, scale, layout)                            -> y = LN(x) * (1 + scale) + shift
    residual_ln_modulate(x, h, gate, shift, scale, layout)          -> (x + gate * h, y of that)
    insert_mask_tokens(x_kept, layout, mask_token, pos_embed)       -> (N*L, D_dec)
    scatter_tokens(x_kept, layout)                                  -> (N*L, D), zeros where masked
    linear(y, layer)                                                -> layer(y), y from one of the two above
    checkpointed_outputs(x, y)                                      -> a checkpointed block's (x, y), see TritonOps

The modulated output comes in the autocast dtype when autocast is on (it feeds a matrix product); the
residual stream keeps its dtype.  Every modulated output feeds one Linear (qkv, fc1, the bridge, the final
layer) through ``linear`` and nothing else: the triton backend returns it as a ``ModulatedLN`` (the output
with what it was computed from), and ``linear`` keeps the LayerNorm's input for that Linear's backward and
recomputes the modulated output from it, instead of storing it, eager and under ``torch.compile`` alike.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import ops

BACKENDS = ("auto", "torch", "triton")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class _Ops:
    """What both backends share.

    ``recompute``: the network recomputes a few cheap activations in the backward instead of keeping them (the
    MLP's GELU output; with the triton backend also each modulated LayerNorm output).  ``checkpointed`` is the
    same backend without that, for the inside of an activation-checkpointed block, whose whole forward is
    recomputed anyway (and where, compiled by torch 2.11, the autograd Functions that recompute would hide
    their ops from the checkpoint, which then kept their outputs).
    """

    def __init__(self, recompute: bool = True):
        self.recompute = recompute
        self.checkpointed = type(self)(recompute=False) if recompute else self


class TorchOps(_Ops):
    """Plain PyTorch (``maskdit.ops``)."""

    name = "torch"
    embed_patches = staticmethod(ops.embed_patches)
    ln_modulate = staticmethod(ops.ln_modulate)
    insert_mask_tokens = staticmethod(ops.insert_mask_tokens)
    scatter_tokens = staticmethod(ops.scatter_tokens)

    @staticmethod
    def linear(y, layer):
        return layer(y)

    @staticmethod
    def residual_ln_modulate(x, h, gate, shift, scale, layout):
        x = ops.gated_residual(x, gate, h, layout)
        return x, ops.ln_modulate(x, shift, scale, layout)

    @staticmethod
    def checkpointed_outputs(x, y):
        return x, y


class ModulatedLN(NamedTuple):
    """A modulated LayerNorm output of the triton backend, ``y = LN(x) * (1 + scale[seg]) + shift[seg]``, with
    the tensors that recompute it (a NamedTuple, so ``torch.compile`` traces it like a tuple of tensors)."""

    y: torch.Tensor
    x: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    seg: torch.Tensor


class TritonOps(_Ops):
    """The fused Triton kernels."""

    name = "triton"
    scatter_tokens = staticmethod(ops.scatter_tokens)

    def __init__(self, recompute: bool = True):
        try:
            import kernels
        except ImportError as e:  # triton missing
            raise RuntimeError(f"backend 'triton' needs the triton package ({e}); use backend='torch'") from e
        self.k = kernels
        super().__init__(recompute)

    def embed_patches(self, x, weight, bias, pos_embed, patch_size, layout):
        return self.k.embed_kept_patches(x, layout.ids, layout.seg, weight, bias, pos_embed, patch_size)

    def ln_modulate(self, x, shift, scale, layout):
        y = self.k.ln_modulate(x, shift, scale, layout.seg, out_dtype=_autocast_dtype(x))
        return ModulatedLN(y, x, shift, scale, layout.seg)

    def residual_ln_modulate(self, x, h, gate, shift, scale, layout):
        x, y = self.k.gated_residual_ln_modulate(x, h, gate, shift, scale, layout.seg, out_dtype=_autocast_dtype(x))
        return x, ModulatedLN(y, x, shift, scale, layout.seg)

    def linear(self, y: ModulatedLN, layer):
        """``layer(y.y)``, not keeping y.y for the backward (see ``_LinearOnRecomputedLN``) when recomputing."""
        if not (self.recompute and torch.is_grad_enabled()):
            return layer(y.y)
        weight, bias = layer.weight.to(y.y.dtype), layer.bias.to(y.y.dtype)
        return _LinearOnRecomputedLN.apply(y.y, weight, bias, y.x, y.shift, y.scale, y.seg)

    @staticmethod
    def checkpointed_outputs(x, y: ModulatedLN):
        """The outputs (x, y) of an activation-checkpointed block; x copied inside ``torch.compile``d code.

        There AOTAutograd's partitioner keeps a checkpointed region's output for the backward only when an op
        with one output made it; the fused residual + LayerNorm op has two, so without the copy nothing
        between the blocks was kept and the compiled backward recomputed the whole chain of blocks at once
        (a larger backward than without checkpointing).  The next checkpointed block starts from x alone (it
        recomputes its own y), so y needs no copy.  Eager checkpointing keeps its inputs itself."""
        if not torch.compiler.is_compiling():
            return x, y
        x = x.clone()
        return x, y._replace(x=x)

    def insert_mask_tokens(self, x_kept, layout, mask_token, pos_embed):
        # the decoder's residual stream is kept in the parameters' precision, as in the torch backend
        dtype = torch.promote_types(x_kept.dtype, pos_embed.dtype)
        out = self.k.insert_mask_tokens(x_kept.to(dtype), layout.ids, layout.seg, mask_token.to(dtype),
                                        pos_embed.to(dtype), layout.num_samples)
        return out.view(-1, out.shape[-1])


class _LinearOnRecomputedLN(torch.autograd.Function):
    """``F.linear(y, weight, bias)`` for y = ln_modulate(x, shift, scale) that saves x, shift and scale
    (which the LayerNorm's own backward keeps anyway) instead of y: the backward recomputes y with the
    forward kernel, from the same stored x, for the weight gradient.  A block no longer keeps its two
    modulated outputs (the qkv and fc1 inputs): 12% of the triton backend's activations at XL/2.  Under
    ``torch.compile`` the Function is traced into the graph and the partitioner keeps what its backward uses:
    x, shift and scale, not y.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, x, shift, scale, seg):
        ctx.save_for_backward(weight, x, shift, scale, seg)
        ctx.y_dtype = y.dtype
        return F.linear(y, weight, bias)

    @staticmethod
    def backward(ctx, dout):
        import kernels

        weight, x, shift, scale, seg = ctx.saved_tensors
        with torch.no_grad():
            y = kernels.ln_modulate(x, shift, scale, seg, out_dtype=ctx.y_dtype)
        dout2 = dout.reshape(-1, dout.shape[-1])
        return dout @ weight, dout2.t() @ y.reshape(-1, y.shape[-1]), dout2.sum(0), None, None, None, None


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
