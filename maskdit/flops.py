"""Compute counts of the networks, measured by ``torch.utils.flop_counter`` on the meta device."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .attention import forced_path, sdpa_backend
from .masking import num_kept
from .models import create_model


def _counted_flops(name: str, input_size: int, in_channels: int, num_classes: int, mask_ratio: float,
                   backward: bool, **overrides) -> int:
    """FLOPs the counter sees for one image: the forward, and the backward too when ``backward``.  Attention runs
    PyTorch's SDPA whatever kernel the caller chose (``maskdit.attention.set_sdpa_backend``): the counter knows
    SDPA's FLOPs, and a Triton kernel or compiled FlexAttention cannot run on the meta device."""
    with torch.device("meta"), sdpa_backend(None), forced_path(None):
        model = create_model(name, input_size, in_channels, num_classes, **overrides)
        x = torch.empty(1, in_channels, input_size, input_size)
        ids_keep = None
        if mask_ratio > 0:
            ids_keep = torch.zeros(1, num_kept(model.num_tokens, mask_ratio), dtype=torch.int64)
        with FlopCounterMode(display=False) as counter:
            out = model(x, torch.empty(1), torch.zeros(1, dtype=torch.int64), ids_keep)
            if backward:
                out.sum().backward()
    return counter.get_total_flops()


def forward_gmacs(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                  mask_ratio: float = 0.0, **overrides) -> float:
    """Multiply-accumulates (1e9) of one forward pass at batch 1 -- the DiT paper's "Gflops".

    Counts matrix products and attention (the counter's FLOPs / 2); elementwise work is not counted.
    ``mask_ratio`` > 0 gives the training forward of MaskDiT (the encoder sees K = int(L(1-r)) tokens).
    """
    return _counted_flops(name, input_size, in_channels, num_classes, mask_ratio, False, **overrides) / 2e9


def train_gflops(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 mask_ratio: float = 0.0, **overrides) -> float:
    """FLOPs (1e9, 2 per multiply-accumulate) of one training step's forward + backward per image.

    Counted like ``forward_gmacs`` over the forward and the backward (input and weight gradients).
    """
    return _counted_flops(name, input_size, in_channels, num_classes, mask_ratio, True, **overrides) / 1e9


def count_parameters(name: str, **kwargs) -> int:
    """Trainable parameters of a named model (built on the meta device)."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
