"""Multi-head self-attention over packed variable-length sequences: the one place that knows the
attention implementations.

``attention(q, k, v, layout)`` takes (T, heads, head_dim) tensors packed sample after sample and picks,
per call, from what is installed and what the inputs allow:

1. "dense-sdpa": every sample has the same length -> an (N, heads, K, head_dim) view and
   ``F.scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels on CUDA);
2. "flash-attn-varlen": ``flash_attn.flash_attn_varlen_func`` (flash-attn installed, CUDA, fp16/bf16);
3. "torch-varlen": ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA, fp16/bf16);
4. "xformers-blockdiag": xformers' ``memory_efficient_attention`` with a block-diagonal mask (installed);
5. "padded-sdpa": pad to the longest sample with a key mask and use SDPA (any device, the CPU path);
6. "triton": the project's FlashAttention kernel for packed sequences (``kernels.attention``), for every
   layout, when chosen with ``set_sdpa_backend("triton")``.

The path of each call is logged (logger "maskdit.attention", INFO, when it changes) and counted in
``PATHS_USED``.  ``sdpa_backend(name)`` / ``set_sdpa_backend(name)`` make the dense path use one SDPA kernel
("cudnn", "flash", "efficient" or "math") instead of PyTorch's choice, or FlexAttention compiled ("flex"), or
make every layout use the Triton kernel ("triton"): at the short sequences of a MaskDiT step (128 kept tokens)
they differ (``bench/attention.py``).  ``triton_qkv_attention`` runs the Triton kernel on the packed projection
output instead of q, k, v views of it: its gradient then comes in one piece, with the projection bias's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections import Counter

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .masking import TokenLayout

log = logging.getLogger("maskdit.attention")
PATHS_USED: Counter = Counter()
_last_path = None
_forced_path = None
_HALF = (torch.float16, torch.bfloat16)
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# the kernels set_sdpa_backend takes: the SDPA backends, FlexAttention compiled by Inductor (Triton kernels
# generated for the shapes; torch >= 2.5; its backward runs on CUDA only) for the dense path, and the project's
# Triton kernel for every path (CUDA, or the CPU with TRITON_INTERPRET=1)
DENSE_KERNELS = (*SDPA_BACKENDS, "flex", "triton")
_sdpa_backend: str | None = None  # None: PyTorch's choice
_flex = None  # flex_attention compiled, once "flex" is chosen


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


HAS_FLASH_ATTN = _installed("flash_attn")
HAS_XFORMERS = _installed("xformers")
HAS_TORCH_VARLEN = _installed("torch.nn.attention.varlen")


def _record(path: str) -> None:
    global _last_path
    if not torch.compiler.is_compiling():
        PATHS_USED[path] += 1
        if path != _last_path:
            log.info("attention path: %s", path)
            _last_path = path


@contextlib.contextmanager
def forced_path(path: str | None):
    """Make every ``attention`` call inside the block use ``path`` (benchmarks and tests)."""
    global _forced_path
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def set_sdpa_backend(name: str | None) -> None:
    """Run the dense path's attention with this kernel only (one of ``DENSE_KERNELS``: an SDPA backend, or
    "flex"; None or "auto": PyTorch's SDPA choice), or every path's with the Triton kernel ("triton").  A kernel
    that cannot take the inputs fails with an error saying why."""
    global _sdpa_backend
    if name == "auto":
        name = None
    if name is not None and name not in DENSE_KERNELS:
        raise ValueError(f"sdpa backend must be 'auto' or one of {DENSE_KERNELS}, got {name!r}")
    if name == "flex" and _flex is None:
        _compile_flex()
    _sdpa_backend = name


@contextlib.contextmanager
def sdpa_backend(name: str | None):
    """``set_sdpa_backend(name)`` for the block (benchmarks and tests)."""
    previous = _sdpa_backend
    set_sdpa_backend(name)
    try:
        yield
    finally:
        set_sdpa_backend(previous)


FLEX_MIN_HEAD_DIM = 16  # smallest head dim Inductor lowers FlexAttention for on CUDA (torch 2.11)


def _compile_flex() -> None:
    """``_flex``: ``flex_attention`` compiled (eager, it would run a slow reference; inside a compiled model
    Dynamo traces it like the rest)."""
    global _flex
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        raise ValueError(f"sdpa backend 'flex' needs torch >= 2.5 (FlexAttention): {e}") from None
    _flex = torch.compile(flex_attention, dynamic=False)


def _dense_sdpa(q, k, v):
    if _sdpa_backend is None:
        return F.scaled_dot_product_attention(q, k, v)
    if _sdpa_backend == "flex":
        if q.is_cuda and q.shape[-1] < FLEX_MIN_HEAD_DIM:
            raise ValueError(f"sdpa backend 'flex' needs a head dim of at least {FLEX_MIN_HEAD_DIM} on CUDA "
                             f"(Inductor's FlexAttention kernels), got {q.shape[-1]}")
        return _flex(q, k, v)
    with sdpa_kernel([SDPA_BACKENDS[_sdpa_backend]]):
        return F.scaled_dot_product_attention(q, k, v)


def choose_path(q: torch.Tensor, layout: TokenLayout) -> str:
    """The implementation ``attention`` uses for these inputs."""
    if _forced_path is not None:
        return _forced_path
    if _sdpa_backend == "triton":
        return "triton"
    if layout.uniform_len is not None:
        return "dense-sdpa"
    if q.is_cuda and q.dtype in _HALF:
        if HAS_FLASH_ATTN:
            return "flash-attn-varlen"
        if HAS_TORCH_VARLEN:
            return "torch-varlen"
    if q.is_cuda and HAS_XFORMERS:
        return "xformers-blockdiag"
    return "padded-sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Softmax attention within each sample of packed (T, heads, head_dim) q, k, v -> (T, heads, head_dim), on
    ``choose_path``'s implementation (``forced_path`` picks one)."""
    path = choose_path(q, layout)
    _record(path)
    if path == "dense-sdpa":
        n, klen, (t, heads, dim) = layout.num_samples, layout.uniform_len, q.shape
        q, k, v = (x.view(n, klen, heads, dim).transpose(1, 2) for x in (q, k, v))
        return _dense_sdpa(q, k, v).transpose(1, 2).reshape(t, heads, dim)
    if path == "flash-attn-varlen":
        from flash_attn import flash_attn_varlen_func

        cu = layout.cu_seqlens
        return flash_attn_varlen_func(q, k, v, cu, cu, layout.max_len, layout.max_len)
    if path == "torch-varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu = layout.cu_seqlens
        return varlen_attn(q, k, v, cu, cu, layout.max_len, layout.max_len)
    if path == "xformers-blockdiag":
        from xformers.ops import fmha

        bias = fmha.BlockDiagonalMask.from_seqlens(layout.lengths())  # host lengths: a sync
        return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    if path == "padded-sdpa":
        return _padded_sdpa(q, k, v, layout)
    if path == "triton":
        import kernels

        return kernels.flash_attention(q, k, v, layout.cu_seqlens, layout.max_len)
    raise ValueError(f"unknown attention path {path!r}")


def triton_qkv_attention(qkv: torch.Tensor, layout: TokenLayout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The "triton" path's attention of the q, k, v in a packed (T, 3, heads, head_dim) projection output: the
    kernel's backward writes ``qkv``'s gradient in one piece and, given the projection's ``bias`` (which the
    caller's projection must then leave out of its own backward), sums the bias gradient with it."""
    _record("triton")
    import kernels

    return kernels.qkv_attention(qkv, bias, layout.cu_seqlens, layout.max_len)


def _padded_sdpa(q, k, v, layout: TokenLayout) -> torch.Tensor:
    """Pad each sample to the longest, mask the padded keys, SDPA, unpad."""
    n, m = layout.num_samples, layout.max_len
    pos = torch.arange(layout.ids.shape[0], device=q.device) - layout.cu_seqlens.long()[layout.seg.long()]
    rows = (layout.seg.long(), pos)

    def pad(t):
        return t.new_zeros(n, m, *t.shape[1:]).index_put(rows, t).transpose(1, 2)  # (N, heads, M, hd)

    lens = layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]
    key_ok = torch.arange(m, device=q.device)[None, :] < lens[:, None]  # (N, M)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_ok[:, None, None, :])
    return out.transpose(1, 2)[rows]
