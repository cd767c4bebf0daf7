"""Multi-head self-attention: the one place that chooses the attention implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over (N, heads, T, head_dim) tensors via ``F.scaled_dot_product_attention``
    (which dispatches to FlashAttention / memory-efficient kernels on CUDA)."""
    return F.scaled_dot_product_attention(q, k, v)
