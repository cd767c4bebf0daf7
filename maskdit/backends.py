"""The token operations a network runs, chosen by backend: "torch" (plain PyTorch, ``maskdit.ops``, the
reference) or "triton" (the fused kernels of ``kernels/``).  Both work on packed (T, D) tokens described
by a ``TokenLayout`` and take per-sample (N, D) shift/scale/gate:

    embed_patches(x, weight, bias, pos_embed, patch_size, layout)  -> (T, D)
    ln_modulate(x, shift, scale, layout)                            -> y = LN(x) * (1 + scale) + shift
    residual_ln_modulate(x, h, gate, shift, scale, layout)          -> (x + gate * h, y of that), h a branch
                                                                       output (of mlp or output_projection)
    insert_mask_tokens(x_kept, layout, mask_token, pos_embed)       -> (N*L, D_dec)
    scatter_tokens(x_kept, layout)                                  -> (N*L, D), zeros where masked
    linear(y, layer)                                                -> layer(y), y from one of the two above
    qkv(y, layer, num_heads)                                        -> q, k, v (T, heads, head_dim) views of it
    self_attention(y, qkv_layer, num_heads, layout)                 -> attention of qkv(...) (T, heads, head_dim)
    mlp(y, fc1, fc2)                                                -> fc2(gelu_tanh(fc1(y))), y as for linear
    output_projection(x, layer)                                     -> layer(x), the attention's output projection
    dense(x, layer)                                                 -> layer(x), x a plain tensor
    checkpointed_outputs(x, y)                                      -> a checkpointed block's (x, y), see TritonOps

The modulated output comes in the autocast dtype when autocast is on (it feeds a matrix product); the
residual stream keeps its dtype.  Every modulated output feeds one Linear (qkv, fc1, the bridge, the final
layer) through ``linear``, ``qkv`` or ``mlp`` and nothing else: the triton backend returns it as a
``ModulatedLN`` (the output with what it was computed from), and those keep the LayerNorm's input for that
Linear's backward and recompute the modulated output from it, instead of storing it, eager and under
``torch.compile`` alike.
The triton backend's Linear layers give an fp32 weight its gradient straight from the product's fp32
accumulator on CUDA under autocast (``_weight_grad``), not rounded to the compute dtype and cast back.
Both backends recompute the MLP's GELU output in its backward instead of storing it; the triton backend runs
the whole MLP backward as one Function with the fused GELU backward kernel (``kernels.gelu_tanh_grad``).
The triton backend's two branch outputs (the MLP's and the attention's output projection) leave their Linear
layer's bias to ``residual_ln_modulate``, as a ``BranchOutput``: its kernel adds the bias and, under autograd,
sums the bias gradient from the values it computes anyway, where the Linear's backward would read its output
gradient once more (``kernels.bias_grad``).  (In every mode, activation checkpointing and inference included,
so that they compute exactly what the training forward does.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import ops
from .attention import attention, choose_path, triton_qkv_attention

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

    def mlp(self, y, fc1, fc2):
        """``fc2(gelu_tanh(fc1(y)))`` for a modulated LayerNorm output y of these ops; with ``recompute`` the
        GELU output is recomputed in the backward instead of kept (``_GeluLinear``)."""
        a = self.linear(y, fc1)  # in the autocast dtype under autocast: fc2 runs in it too, as nn.Linear would
        if not self.recompute:
            return fc2(F.gelu(a, approximate="tanh"))
        return _GeluLinear.apply(a, fc2.weight.to(a.dtype), fc2.bias.to(a.dtype))

    def qkv(self, y, layer, num_heads: int):
        """q, k, v (T, heads, head_dim): views of the packed projection ``layer`` on a modulated LayerNorm
        output y of these ops."""
        qkv = self.linear(y, layer)
        return qkv.view(qkv.shape[0], 3, num_heads, -1).unbind(1)

    def self_attention(self, y, qkv_layer, num_heads: int, layout):
        """``maskdit.attention.attention`` of ``qkv(y, qkv_layer, num_heads)``: (T, heads, head_dim)."""
        return attention(*self.qkv(y, qkv_layer, num_heads), layout)

    @staticmethod
    def dense(x, layer):
        """``layer(x)`` for a Linear layer on a plain tensor (the adaLN modulation's one GEMM)."""
        return layer(x)

    def output_projection(self, x, layer):
        """``layer(x)`` for the attention's output projection on its (T, D) output, a branch output for
        ``residual_ln_modulate``."""
        return self.dense(x, layer)


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


class BranchOutput(NamedTuple):
    """A block branch's output from the triton backend without its Linear layer's bias, which
    ``residual_ln_modulate`` adds (and sums the gradient of) in its kernel."""

    h: torch.Tensor
    bias: torch.Tensor


def _kernels():
    """The ``kernels`` package, imported on first use (building the triton ops needs no triton); a RuntimeError
    naming the missing package where triton is not installed."""
    try:
        import kernels
    except ImportError as e:
        raise RuntimeError(f"backend 'triton' needs the triton package ({e}); use backend='torch'") from e
    return kernels


class TritonOps(_Ops):
    """The fused Triton kernels."""

    name = "triton"
    scatter_tokens = staticmethod(ops.scatter_tokens)

    def __init__(self, recompute: bool = True, keep_norm_outputs: bool = False):
        self.keep_norm_outputs = keep_norm_outputs  # see _recomputed_from
        super().__init__(recompute)

    @property
    def k(self):
        """The ``kernels`` package (``_kernels``)."""
        return _kernels()

    def embed_patches(self, x, weight, bias, pos_embed, patch_size, layout):
        return self.k.embed_kept_patches(x.contiguous(), layout.ids, layout.seg, weight, bias, pos_embed, patch_size)

    def ln_modulate(self, x, shift, scale, layout):
        y = self.k.ln_modulate(x, shift, scale, layout.seg, out_dtype=_autocast_dtype(x))
        return ModulatedLN(y, x, shift, scale, layout.seg)

    def residual_ln_modulate(self, x, h, gate, shift, scale, layout):
        """As the torch backend's; h a tensor or a ``BranchOutput``, whose bias the kernel adds."""
        h, bias = h if isinstance(h, BranchOutput) else (h, None)
        x, y = self.k.gated_residual_ln_modulate(x, h, gate, shift, scale, layout.seg, out_dtype=_autocast_dtype(x),
                                                 bias=bias)
        return x, ModulatedLN(y, x, shift, scale, layout.seg)

    def _recomputed_from(self, y: ModulatedLN) -> tuple:
        """What the Linear Functions on y save instead of y to recompute it in their backward (x, shift, scale
        and seg, which the LayerNorm's own backward keeps anyway); nothing with ``keep_norm_outputs``: they
        keep y."""
        return () if self.keep_norm_outputs else (y.x, y.shift, y.scale, y.seg)

    def linear(self, y: ModulatedLN, layer):
        """``layer(y.y)``, not keeping y.y for the backward (see ``_Linear``) when recomputing (unless
        ``keep_norm_outputs``)."""
        if not (self.recompute and torch.is_grad_enabled()):
            return layer(y.y)
        return _Linear.apply(y.y, layer.weight, layer.bias, *self._recomputed_from(y))

    def qkv(self, y: ModulatedLN, layer, num_heads: int):
        """As ``_Ops.qkv``; when recomputing, the projection runs without its bias gradient (``_Linear`` on the
        detached bias) and ``_SplitQkv`` gives the views, whose backward stacks dq, dk, dv and sums the bias
        gradient in one pass (``kernels.stack_qkv_grad``) where autograd would stack them and ``bias_grad``
        would read the stacked gradient again."""
        if not (self.recompute and torch.is_grad_enabled()):
            return super().qkv(y, layer, num_heads)
        return _SplitQkv.apply(self._projection_without_bias_grad(y, layer), layer.bias, num_heads)

    def self_attention(self, y: ModulatedLN, qkv_layer, num_heads: int, layout):
        """As ``_Ops.self_attention``; on the "triton" attention path, when recomputing, the packed projection
        output goes to the kernel whole (``maskdit.attention.triton_qkv_attention``), whose backward writes its
        gradient in one piece and sums the projection's bias gradient (the projection leaving it out) where
        the views' backward would stack dq, dk and dv (``qkv``)."""
        if not (self.recompute and torch.is_grad_enabled()) or choose_path(y.y, layout) != "triton":
            return super().self_attention(y, qkv_layer, num_heads, layout)
        qkv = self._projection_without_bias_grad(y, qkv_layer)
        return triton_qkv_attention(qkv.view(qkv.shape[0], 3, num_heads, -1), layout, bias=qkv_layer.bias)

    def _projection_without_bias_grad(self, y: ModulatedLN, layer):
        """``layer(y.y)`` as ``linear`` runs it, its bias detached: the caller's Function sums its gradient."""
        return _Linear.apply(y.y, layer.weight, layer.bias.detach(), *self._recomputed_from(y))

    def dense(self, x, layer):
        """``layer(x)``, its weight gradient in the weight's dtype and its bias gradient summed by
        ``kernels.bias_grad`` (``_Linear``)."""
        if not torch.is_grad_enabled() or layer.bias is None:
            return layer(x)
        return _Linear.apply(x.to(_autocast_dtype(x) or x.dtype), layer.weight, layer.bias)

    def output_projection(self, x, layer):
        """``layer(x)`` as a ``BranchOutput``: the product without the bias (by ``_Linear`` under autograd)."""
        if not torch.is_grad_enabled():
            return BranchOutput(F.linear(x, layer.weight), layer.bias)
        return BranchOutput(_Linear.apply(x.to(_autocast_dtype(x) or x.dtype), layer.weight, None), layer.bias)

    def mlp(self, y: ModulatedLN, fc1, fc2):
        """``fc2(gelu_tanh(fc1(y.y)))`` as a ``BranchOutput`` (fc2's bias left out); when recomputing, one
        Function (``_MlpOnRecomputedLN``) that keeps the LayerNorm's input and the GELU's input and runs the GELU
        backward as one kernel; without autograd, with ``kernels.gelu_gemm.INFERENCE`` (on), the GELU in fc1's
        product's epilogue (``linear_gelu_output``)."""
        if self.recompute and torch.is_grad_enabled():
            h = _MlpOnRecomputedLN.apply(y.y, fc1.weight, fc1.bias, fc2.weight, *self._recomputed_from(y))
            return BranchOutput(h, fc2.bias)
        g = None
        if not torch.is_grad_enabled() and self.k.gelu_gemm.INFERENCE:  # (no weight cast for nothing when off)
            w1 = fc1.weight.to(y.y.dtype)
            if _fused_gelu_gemm("INFERENCE", y.y, w1):
                g = self.k.gelu_gemm.linear_gelu_output(y.y, w1, fc1.bias.to(y.y.dtype))
        if g is None:
            g = F.gelu(self.linear(y, fc1), approximate="tanh")
        return BranchOutput(F.linear(g, fc2.weight), fc2.bias)

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


def _saved_input(kept: list, dtype: torch.dtype) -> torch.Tensor:
    """A Linear's input in its backward from what its Function saved: the input itself, or (x, shift, scale,
    seg) to recompute it, ``ln_modulate``'s output, with the forward's kernel."""
    if len(kept) == 1:
        return kept[0]
    import kernels

    return kernels.ln_modulate_recompute(*kept, out_dtype=dtype)


# torch.mm's out_dtype overload (fp32 results from 16-bit operands on CUDA) came in torch 2.8
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _weight_grad(dout2: torch.Tensor, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Linear's weight gradient ``dout2^T @ x2`` in the weight's ``dtype``.  For an fp32 weight and 16-bit
    inputs on CUDA it comes straight from the product's fp32 accumulator (``torch.mm``'s ``out_dtype``):
    autocast's 16-bit product would round it and a cast would then read it and write it again in fp32 (2 + 6
    bytes a weight instead of 4, and a launch and an autograd node per weight: most of the 228 ToCopyBackward
    a profiled MaskDiT-XL/2 step at batch 256 ran, 2.8 ms of H200 time and about 10 ms of host time)."""
    if _MM_OUT_DTYPE and dtype == torch.float32 and dout2.dtype in (torch.float16, torch.bfloat16) and dout2.is_cuda:
        return torch.mm(dout2.t(), x2, out_dtype=torch.float32)
    return (dout2.t() @ x2).to(dtype)


class _Linear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` in x's dtype (the compute dtype; the weight and bias cast to it) whose
    backward gives the weight its gradient in the weight's own dtype (``_weight_grad``) and sums the bias
    gradient in fp32 with ``kernels.bias_grad`` (one pass at the copy rate, where PyTorch's column sums
    averaged about a third of it in a profiled step), when the bias needs one (``TritonOps.qkv`` passes it
    detached: ``_SplitQkv`` sums it); without a bias (``TritonOps.output_projection``: the residual kernel adds
    it) none.  It saves the cast weight and x, as autograd's Linear does, or,
    given ``recomputed_from`` = (x0, shift, scale, seg) with x = ln_modulate(x0, shift, scale, seg), those
    instead of x: the backward recomputes x with the forward kernel for the weight gradient.  A block then
    keeps neither of its two modulated outputs (the qkv and fc1 inputs): 12% of the triton backend's
    activations at XL/2.  Under ``torch.compile`` the Function is traced into the graph and the partitioner
    keeps what its backward uses: x0, shift and scale, not x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, *recomputed_from):
        w = weight.to(x.dtype)
        ctx.save_for_backward(w, *(recomputed_from or (x,)))
        ctx.x_dtype, ctx.num_extra = x.dtype, len(recomputed_from)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dout):
        import kernels

        kernels.refuse_double_backward("_Linear")
        w, *kept = ctx.saved_tensors
        x = _saved_input(kept, ctx.x_dtype)
        dout2 = dout.reshape(-1, dout.shape[-1])
        dweight = _weight_grad(dout2, x.reshape(-1, x.shape[-1]), ctx.dtypes[0]) if ctx.needs_input_grad[1] else None
        dbias = kernels.bias_grad(dout2).to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None
        return dout @ w, dweight, dbias, *[None] * ctx.num_extra


class _SplitQkv(torch.autograd.Function):
    """q, k, v (T, heads, head_dim) views of a packed (T, 3 * heads * head_dim) projection output ``qkv``,
    whose backward gives ``qkv`` its gradient and ``bias`` (the projection's, which the forward does not use:
    it was added by the projection, whose own backward then leaves it out) its fp32-summed gradient, both
    from one pass over dq, dk, dv (``kernels.stack_qkv_grad``)."""

    @staticmethod
    def forward(ctx, qkv, bias, num_heads):
        ctx.bias_dtype = bias.dtype
        return qkv.view(qkv.shape[0], 3, num_heads, -1).unbind(1)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        import kernels

        kernels.refuse_double_backward("_SplitQkv")
        t, heads, head_dim = dq.shape  # (an unused output's gradient comes as zeros: materialized by autograd)
        dqkv, dbias = kernels.stack_qkv_grad(*(g.reshape(t, heads * head_dim) for g in (dq, dk, dv)))
        return dqkv, dbias.to(ctx.bias_dtype), None


@torch.library.custom_op("maskdit::gelu_tanh", mutates_args=())
def _gelu_tanh(a: torch.Tensor) -> torch.Tensor:
    """GELU(tanh) as an op ``torch.compile`` does not look into, for ``_GeluLinear``'s backward: traced as
    the plain GELU it would be merged with the forward's, and the partitioner then keeps that output (it
    does not recompute a value a backward matrix product reads) instead of recomputing it."""
    return F.gelu(a, approximate="tanh")


@_gelu_tanh.register_fake
def _(a):
    return torch.empty_like(a)


class _GeluLinear(torch.autograd.Function):
    """``F.linear(gelu_tanh(a), weight, bias)`` saving ``a`` alone for the backward.

    Autograd would keep both the GELU's input and its output (the second Linear's input), 2 x 4D values a
    token: the largest activations of a block.  Here the output is recomputed in the backward (one cheap
    elementwise pass) instead, the same math and dtypes, a fifth less activation memory per block, eager
    and under ``torch.compile``.
    """

    @staticmethod
    def forward(ctx, a, weight, bias):
        ctx.save_for_backward(a, weight)
        return F.linear(F.gelu(a, approximate="tanh"), weight, bias)

    @staticmethod
    def backward(ctx, dout):
        a, weight = ctx.saved_tensors
        g = _gelu_tanh(a) if torch.compiler.is_compiling() else F.gelu(a, approximate="tanh")  # eager: no op overhead
        dout2 = dout.reshape(-1, dout.shape[-1])
        dweight = dout2.t() @ g.reshape(-1, g.shape[-1])
        da = torch.ops.aten.gelu_backward(dout @ weight, a, approximate="tanh")
        return da, dweight, dout2.sum(0)


def _fused_gelu_gemm(direction: str, *operands: torch.Tensor) -> bool:
    """Whether the MLP's product in ``direction`` ("FORWARD", "BACKWARD" or "INFERENCE") takes
    ``kernels.gelu_gemm`` (the GELU in its epilogue) for these operands.  Where the kernels do not run
    (``fused_on``: GPUs other than Hopper) its ops compute the unfused chain themselves, as the MLP would."""
    import kernels

    fused = kernels.gelu_gemm
    return getattr(fused, direction) and fused.supported(*operands, addresses=not torch.compiler.is_compiling())


class _MlpOnRecomputedLN(torch.autograd.Function):
    """``fc2(gelu_tanh(fc1(y)))`` without fc2's bias (the residual kernel adds it: ``BranchOutput``) for
    y = ln_modulate(x, shift, scale), keeping what ``_Linear`` and ``_GeluLinear`` keep together (given
    ``recomputed_from``: x, shift, scale and the GELU input a; not y, not the GELU output; without it y and a).
    The backward recomputes y with the LayerNorm kernel and runs the GELU backward as one kernel
    (``kernels.gelu_tanh_grad``: the recomputed GELU output for fc2's weight gradient, a's gradient and fc1's
    bias gradient from one read of a and of its incoming gradient, where the unfused backward reads a twice and
    a's gradient once more).  fc1's bias comes in its own (fp32) dtype, its
    gradient summed in fp32; the weights come in theirs too (cast to y's dtype for the products) and get their
    gradients in it (``_weight_grad``).  With ``kernels.gelu_gemm.FORWARD`` and ``BACKWARD`` the GELU goes into
    the epilogues of fc1's product and of the product that gives fc2's input gradient (``kernels.gelu_gemm``),
    where the operands suit it.
    """

    @staticmethod
    def forward(ctx, y, w1, b1, w2, *recomputed_from):
        import kernels

        w1c, w2c, b1c = w1.to(y.dtype), w2.to(y.dtype), b1.to(y.dtype)
        if _fused_gelu_gemm("FORWARD", y, w1c):
            a, g = kernels.gelu_gemm.linear_gelu(y, w1c, b1c)
        else:
            a = F.linear(y, w1c, b1c)
            g = F.gelu(a, approximate="tanh")
        ctx.save_for_backward(w1c, w2c, a, *(recomputed_from or (y,)))
        ctx.y_dtype, ctx.num_extra = y.dtype, len(recomputed_from)
        ctx.dtypes = w1.dtype, b1.dtype, w2.dtype
        return F.linear(g, w2c)

    @staticmethod
    def backward(ctx, dout):
        import kernels

        kernels.refuse_double_backward("_MlpOnRecomputedLN")
        w1, w2, a, *kept = ctx.saved_tensors
        y = _saved_input(kept, ctx.y_dtype)
        dout2 = dout.reshape(-1, dout.shape[-1])
        if _fused_gelu_gemm("BACKWARD", dout2, w2, a):
            g, da, db1 = kernels.gelu_gemm.gelu_grad_gemm(dout2, w2, a)
        else:
            g, da, db1 = kernels.gelu_tanh_grad(a.reshape(-1, a.shape[-1]), (dout2 @ w2).to(a.dtype))
        dw2 = _weight_grad(dout2, g, ctx.dtypes[2])
        dw1, dy = _weight_grad(da, y.reshape(-1, y.shape[-1]), ctx.dtypes[0]), (da @ w1).view(y.shape)
        return dy, dw1, db1.to(ctx.dtypes[1]), dw2, *[None] * ctx.num_extra


# Built once here, not on first use: a cache filled inside a forward that torch.compile traces becomes a guard
# that the next call fails (one more whole compilation).
_TORCH = TorchOps()
_TRITON = {keep: TritonOps(keep_norm_outputs=keep) for keep in (False, True)}  # by keep_norm_outputs


def get_ops(backend: str, device: torch.device, keep_norm_outputs: bool = False):
    """The ops for ``backend``; "auto" is "triton" on CUDA and "torch" elsewhere.  ``keep_norm_outputs``
    (triton): keep the modulated LayerNorm outputs that the Linear layers read instead of recomputing them in
    the backward (the torch backend keeps them anyway)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return _TORCH
    _kernels()  # where triton is missing, the error comes here rather than from the first op
    return _TRITON[bool(keep_norm_outputs)]
