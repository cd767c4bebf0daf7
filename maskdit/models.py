"""DiT and MaskDiT networks (adaLN-Zero transformers on patch tokens), readable top to bottom.

``DiT`` is the network of Peebles & Xie; with ``use_decoder=True`` it is MaskDiT (Zheng et al.):
the complete DiT backbone runs as an encoder on the kept tokens only, then a bridge layer, learnable
mask tokens at the masked positions, a second fixed positional embedding, a small DiT decoder and
the final layer produce an output for every token.  ``forward`` returns the raw network output
F(x; noise_label, class); ``maskdit.edm.EDMPrecond`` turns it into a denoiser.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops as token_ops
from .backends import BACKENDS, get_ops
from .config import ModelConfig, model_config
from .masking import TokenLayout, host_value_range, token_layout

CHECKPOINTING = ("none", "decoder", "encoder", "all")  # DiT.set_activation_checkpointing
IdsKeep = Union[torch.Tensor, Sequence[torch.Tensor], TokenLayout, None]


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding (MAE), (grid_size**2, embed_dim), row-major tokens.

    For the token at (row, col): [sin(col*w), cos(col*w), sin(row*w), cos(row*w)] with
    w_k = 10000^(-k / (embed_dim/4)), k < embed_dim/4 (the official code's meshgrid puts the column
    coordinate in the first half).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64, device=device)
    row = pos.repeat_interleave(grid_size)
    col = pos.repeat(grid_size)

    def emb_1d(p):
        out = p[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb_1d(col), emb_1d(row)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (N,) float noise labels -> (N, dim) in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Noise label -> Linear(256, D) - SiLU - Linear(D, D) of its sinusoidal embedding."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class label -> D-vector.  The label ``num_classes`` is the null class (CFG / label dropout).

    null_class="learned": an (num_classes + 1, D) table whose last row is trained (DiT).
    null_class="zero": an (num_classes, D) table and the null class embeds to exactly 0
    (MaskDiT's Linear on a one-hot vector, whose null class is the all-zero vector).
    """

    def __init__(self, num_classes: int, hidden_size: int, null_class: str):
        super().__init__()
        self.num_classes = num_classes
        self.null_class = null_class
        rows = num_classes + 1 if null_class == "learned" else num_classes
        self.embedding_table = nn.Embedding(rows, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.null_class == "learned":
            return self.embedding_table(labels)
        is_real = (labels < self.num_classes).unsqueeze(1)
        emb = self.embedding_table(labels.clamp(max=self.num_classes - 1))
        return emb * is_real.to(emb.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (bias) and an output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, y, layout: TokenLayout, ops):
        """y: a modulated LayerNorm output of ``ops`` (T tokens); returns (T, dim), a branch output of ``ops``."""
        out = ops.self_attention(y, self.qkv, self.num_heads, layout)
        return ops.output_projection(out.reshape(out.shape[0], -1), self.proj)


class Mlp(nn.Module):
    """Linear - GELU(tanh) - Linear, run by ``ops.mlp``: the GELU output is recomputed in the backward, not
    stored (unless the ops say otherwise: inside a checkpointed block)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, y, ops):
        """y: a modulated LayerNorm output of ``ops``; returns a branch output of ``ops``."""
        return ops.mlp(y, self.fc1, self.fc2)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block.

    Its six modulation vectors (shift/scale/gate for attention and MLP) come from the network's
    batched adaLN GEMM.  The block receives ``y`` = its first LayerNorm + modulation of ``x`` (computed
    by whoever produced ``x``) and returns the residual stream together with the NEXT LayerNorm +
    modulation of it (``next_shift``, ``next_scale``), so every gated residual is fused with the
    LayerNorm that follows it.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, y, mod, next_shift, next_scale, layout, ops):
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x, y = ops.residual_ln_modulate(x, self.attn(y, layout, ops), gate_msa, shift_mlp, scale_mlp, layout)
        return ops.residual_ln_modulate(x, self.mlp(y, ops), gate_mlp, next_shift, next_scale, layout)


def _checkpointed_block(block: DiTBlock, x, mod, next_shift, next_scale, layout, ops):
    """A block inside ``torch.utils.checkpoint``: from the residual stream x alone (the block's first LayerNorm
    + modulation is recomputed here, so only x is kept), with the ``checkpointed`` variant of ``ops``."""
    ops = ops.checkpointed
    y = ops.ln_modulate(x, mod[0], mod[1], layout)
    return ops.checkpointed_outputs(*block(x, y, mod, next_shift, next_scale, layout, ops))


class DiT(nn.Module):
    """DiT, or MaskDiT when ``config.use_decoder``.  Build one with ``maskdit.create_model``.

    Every adaLN modulation (encoder blocks, bridge, decoder blocks, final layer) is one ``Linear`` of
    SiLU(c), ``adaLN_modulation``, evaluated as a single GEMM per forward; ``_mod_layout`` lists the
    (chunks, width) of its consecutive output slices: encoder blocks (6, D) each, then for MaskDiT the
    bridge (2, D) and decoder blocks (6, D_dec) each, then the final layer (2, width).
    """

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        cfg = config.validate()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = cfg
        self.backend = backend
        self.activation_checkpointing = "none"  # see set_activation_checkpointing
        self.keep_norm_outputs = False  # see set_keep_norm_outputs
        self.patch_size = cfg.patch_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.num_classes = cfg.num_classes
        self.input_size = cfg.input_size
        self.num_tokens = cfg.num_tokens
        d, p = cfg.hidden_size, cfg.patch_size

        self.x_embedder = nn.Linear(p * p * cfg.in_channels, d)  # the patch Conv2d as a Linear on patches
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.null_class) if cfg.num_classes else None
        self.register_buffer("pos_embed", torch.empty(self.num_tokens, d))
        self.blocks = nn.ModuleList([DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        layout = [(6, d)] * cfg.depth  # (chunks, width) of each consumer of the adaLN GEMM, in order

        final_dim = d
        if cfg.use_decoder:
            dd = cfg.decoder_hidden_size
            self.decoder_layer = nn.Linear(d, dd)  # the bridge: LN + modulate (2d) -> Linear to decoder width
            if cfg.learn_mask_token:
                self.mask_token = nn.Parameter(torch.empty(dd))
            else:  # zeros at the masked positions, not trained and not saved (the official code without MAE)
                self.register_buffer("mask_token", torch.zeros(dd), persistent=False)
            self.register_buffer("decoder_pos_embed", torch.empty(self.num_tokens, dd))
            self.decoder_blocks = nn.ModuleList(
                [DiTBlock(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)])
            layout += [(2, d)] + [(6, dd)] * cfg.decoder_depth
            final_dim = dd
        self.final_layer = nn.Linear(final_dim, p * p * self.out_channels)  # after LN + modulate (2 final_dim)
        layout += [(2, final_dim)]
        self._mod_layout = layout
        self.adaLN_modulation = nn.Linear(d, sum(k * w for k, w in layout))
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official initialisation (also fills the fixed positional embeddings).  Safe on meta tensors."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        grid = self.input_size // self.patch_size
        self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[1], grid, self.pos_embed.device))
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_init = [self.adaLN_modulation, self.final_layer]  # adaLN-Zero: every modulation starts at 0
        if self.config.use_decoder:
            self.decoder_pos_embed.copy_(
                sincos_pos_embed_2d(self.decoder_pos_embed.shape[1], grid, self.decoder_pos_embed.device))
            if self.config.learn_mask_token:
                nn.init.normal_(self.mask_token, std=0.02)
            else:
                self.mask_token.zero_()
            zero_init.append(self.decoder_layer)
        for m in zero_init:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _check_inputs(self, x, noise_labels, class_labels):
        expect = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"x must have shape (N, {expect[0]}, {expect[1]}, {expect[2]}), got {tuple(x.shape)}")
        weights = self.x_embedder.weight.dtype
        if weights != torch.float32:
            raise ValueError(f"the network's parameters must be float32 (mixed precision is torch.autocast's), "
                             f"got {weights}")
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x must be float32 as the parameters (other dtypes under torch.autocast), got {x.dtype}")
        n = x.shape[0]
        if noise_labels.shape != (n,):
            raise ValueError(f"noise_labels must have shape ({n},), got {tuple(noise_labels.shape)}")
        if self.y_embedder is not None:
            if class_labels is None or class_labels.shape != (n,) or class_labels.dtype != torch.int64:
                got = None if class_labels is None else (tuple(class_labels.shape), class_labels.dtype)
                raise ValueError(f"class_labels must be an int64 tensor of shape ({n},), got {got}")
            found = host_value_range(class_labels)
            if found is not None and (found[0] < 0 or found[1] > self.num_classes):
                raise ValueError(f"class_labels must be in [0, {self.num_classes}] ({self.num_classes}: the null "
                                 f"class), got values in [{found[0]}, {found[1]}]")
        elif class_labels is not None:
            raise ValueError("class_labels must be None for an unconditional network (num_classes=0)")

    def forward_tokens(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                       ids_keep: IdsKeep = None) -> torch.Tensor:
        """Network output in token layout, (N, L, p*p*C_out) (see ``forward``)."""
        self._check_inputs(x, noise_labels, class_labels)
        ops = get_ops(self.backend, x.device, self.keep_norm_outputs)
        n = x.shape[0]
        layout = token_layout(ids_keep, n, self.num_tokens, x.device)  # the encoder's packed tokens
        c = self.t_embedder(noise_labels)
        if self.y_embedder is not None:
            c = c + self.y_embedder(class_labels)
        # One GEMM for all modulations, then views: each consumer gets its (N, width) shift/scale/gate chunks.
        mods = ops.dense(F.silu(c), self.adaLN_modulation).split([k * w for k, w in self._mod_layout], dim=1)
        mods = [m.chunk(k, dim=1) for m, (k, _) in zip(mods, self._mod_layout)]
        enc_mods, rest = mods[:self.config.depth], mods[self.config.depth:]

        tokens = ops.embed_patches(x, self.x_embedder.weight, self.x_embedder.bias, self.pos_embed,
                                   self.patch_size, layout)
        recompute = self.activation_checkpointing
        tokens, y = self._run_blocks(self.blocks, enc_mods, rest[0], tokens, layout, ops,
                                     recompute in ("encoder", "all"))
        if self.config.use_decoder:
            tokens = ops.insert_mask_tokens(ops.linear(y, self.decoder_layer), layout, self.mask_token,
                                            self.decoder_pos_embed)
            full = token_layout(None, n, self.num_tokens, x.device)  # the decoder sees every token
            tokens, y = self._run_blocks(self.decoder_blocks, rest[1:-1], rest[-1], tokens, full, ops,
                                         recompute in ("decoder", "all"))
            out = ops.linear(y, self.final_layer)
        elif ids_keep is None:
            out = ops.linear(y, self.final_layer)
        else:  # DiT trained with masking: masked tokens output zeros
            out = ops.scatter_tokens(ops.linear(y, self.final_layer), layout)
        return out.view(n, self.num_tokens, -1)

    @staticmethod
    def _run_blocks(blocks, block_mods, after_mod, tokens, layout, ops, recompute: bool):
        """The blocks' chain of fused residual + LN-modulate; ``after_mod`` (shift, scale) is the LayerNorm
        modulation that follows the last block.  Returns the residual stream and its last modulated LN.
        ``recompute``: activation checkpointing of every block (only its residual-stream input is kept for the
        backward; its first modulated LayerNorm is recomputed from it, one extra LayerNorm pass a block)."""
        recompute = recompute and torch.is_grad_enabled() and len(blocks) > 0
        first = block_mods[0] if len(blocks) else after_mod
        y = None if recompute else ops.ln_modulate(tokens, first[0], first[1], layout)
        for i, block in enumerate(blocks):
            nxt = block_mods[i + 1] if i + 1 < len(blocks) else after_mod
            if recompute:  # the blocks draw no random numbers: no RNG state to save and restore
                tokens, y = checkpoint(_checkpointed_block, block, tokens, block_mods[i], nxt[0], nxt[1], layout, ops,
                                       use_reentrant=False, preserve_rng_state=False)
            else:
                tokens, y = block(tokens, y, block_mods[i], nxt[0], nxt[1], layout, ops)
        return tokens, y

    def set_activation_checkpointing(self, which: str) -> "DiT":
        """Recompute the forward of a stack's blocks in the backward instead of keeping their activations:
        "none" (default), "decoder" (MaskDiT's decoder: a sixth of MaskDiT-XL/2's activations for about
        4% more training FLOPs), "encoder" or "all" (about a third more FLOPs; at XL/2 a sixth of the
        activations are left, see ``bench/activation_memory.py``).  Returns the model."""
        choices = CHECKPOINTING if self.config.use_decoder else ("none", "encoder", "all")
        if which not in choices:
            raise ValueError(f"activation checkpointing must be one of {choices} for {self.config.name}, "
                             f"got {which!r}")
        self.activation_checkpointing = which
        return self

    def set_keep_norm_outputs(self, keep: bool = True) -> "DiT":
        """With the triton backend, keep each block's two modulated LayerNorm outputs (the qkv and fc1 inputs)
        for the backward instead of recomputing them there: one LayerNorm pass less per Linear on them (the
        recomputations took about 5 ms of the 248 ms of kernels of a MaskDiT-XL/2 step at batch 256 on an H200)
        for 13% more activation memory (MaskDiT-XL/2 at batch 256: 44.3 instead of 39.1 GB; DiT-XL/2: 69.4
        instead of 61.1; ``bench/activation_memory.py``).  The torch backend always keeps them.  Returns the
        model."""
        if not isinstance(keep, bool):
            raise ValueError(f"keep must be a bool, got {keep!r}")
        self.keep_norm_outputs = keep
        return self

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                ids_keep: IdsKeep = None) -> torch.Tensor:
        """Network output for all tokens, (N, C_out, H, W).

        x (N, C, H, W); noise_labels (N,) float; class_labels (N,) int64 where ``num_classes`` is the
        null class; ids_keep: the token indices the encoder sees, row-major -- an (N, K) int64 tensor,
        a list of N 1-D int64 tensors of different lengths, a ``TokenLayout``, or None (all tokens).
        The encoder runs on the packed kept tokens; the decoder on all tokens.
        """
        out = self.forward_tokens(x, noise_labels, class_labels, ids_keep)
        return token_ops.unpatchify(out, self.patch_size, self.out_channels, self.input_size, self.input_size)


def create_model(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 backend: str = "auto", **overrides) -> DiT:
    """Build a named network, e.g. ``create_model("MaskDiT-XL/2")``.

    ``backend``: "torch" (plain PyTorch), "triton" (fused kernels) or "auto" (triton for CUDA inputs,
    torch otherwise); all load the same state dicts.  Overrides set any ``ModelConfig`` field
    (``learn_sigma``, ``decoder_depth``, ``null_class``, ...).  Works under ``with torch.device("meta"):``.
    """
    return DiT(model_config(name, input_size, in_channels, num_classes, **overrides), backend=backend)
