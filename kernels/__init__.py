"""Fused Triton kernels (forward and backward) for the memory-bound steps of MaskDiT training, and a
FlashAttention for its packed variable-length sequences (``attention.py``).

Each module holds its Triton kernels, a validating launcher, ``torch.library`` custom ops (so
``torch.compile`` traces them without graph breaks), autograd, and a plain-PyTorch reference of the
same function.  Token-wise ops take (T, D) tokens with an explicit token->sample map ``seg`` (int32),
so samples may keep different numbers of tokens.
"""

from ._common import refuse_double_backward, token_samples
from .attention import flash_attention, flash_attention_reference, qkv_attention
from .bias import bias_grad, bias_grad_reference
from .edm_loss import edm_loss, edm_loss_reference
from .gated_residual import gated_residual_ln_modulate, gated_residual_ln_modulate_reference
from .gelu import gelu_tanh_grad, gelu_tanh_grad_reference
from .gelu_gemm import (
    gelu_grad_gemm,
    gelu_grad_gemm_reference,
    linear_gelu,
    linear_gelu_output,
    linear_gelu_reference,
)
from .inductor import register_fallbacks_if_needed
from .ln_modulate import ln_modulate, ln_modulate_recompute, ln_modulate_reference
from .patch_embed import embed_kept_patches, embed_kept_patches_reference
from .qkv_grad import stack_qkv_grad, stack_qkv_grad_reference
from .unmask import insert_mask_tokens, insert_mask_tokens_reference

__all__ = [
    "refuse_double_backward", "token_samples", "flash_attention", "flash_attention_reference", "qkv_attention",
    "bias_grad", "bias_grad_reference", "edm_loss", "edm_loss_reference", "gated_residual_ln_modulate",
    "gated_residual_ln_modulate_reference", "ln_modulate", "ln_modulate_recompute", "ln_modulate_reference",
    "embed_kept_patches", "embed_kept_patches_reference", "insert_mask_tokens", "insert_mask_tokens_reference",
    "gelu_tanh_grad", "gelu_tanh_grad_reference", "stack_qkv_grad", "stack_qkv_grad_reference",
    "linear_gelu", "linear_gelu_output", "linear_gelu_reference", "gelu_grad_gemm", "gelu_grad_gemm_reference",
]

register_fallbacks_if_needed()  # (the ops above all defined: see inductor.py)
