"""The MLP's GELU fused into the epilogues of its matrix products (persistent Triton GEMMs, TMA loads and stores):

    forward   (``linear_gelu``):    a = y @ w1^T + b1,   g = gelu_tanh(a)      (``linear_gelu_output``: g alone)
    backward  (``gelu_grad_gemm``): dg = dout @ w2,      g = gelu_tanh(a),   da = gelu_tanh'(a) * dg,
                                    db1 = sum over rows of da

y (T, D), w1 (H, D) and b1 (H,): the first Linear (a is kept for the backward, g is the second Linear's
input); dout (T, D) and w2 (D, H): the second Linear's output gradient and weight; a (T, H).  The unfused
chain writes a (or dg) from cuBLAS and reads it back in a separate elementwise pass; here the product's
tile goes through the GELU (or its derivative, with a's tile loaded) before it leaves the registers, which
saves that pass's traffic over the (T, H) activations (H is 4D), at bf16 2 bytes an element forward (6 -> 4:
a is not read back) and 4 backward (10 -> 6: dg is neither written nor read), and a launch each way.
Same math and roundings as the unfused chain (``linear_gelu_reference``, ``gelu_grad_gemm_reference``): a and
dg rounded to the inputs' dtype before the GELU, the GELU (``kernels.gelu``'s formulas) in fp32, db1 summed in
fp32 over da as stored; the row sums go through a (row tiles, H) buffer that one ``sum`` reduces in order, so
the result is deterministic.

fp16/bf16 inputs with TMA-compatible layouts only (``supported``: unit last stride, row strides and the base
address 16-byte aligned, i.e. D and H multiples of 8); ``maskdit.backends`` takes the unfused path otherwise.
Built and tuned for Hopper (sm_90: TMA, wgmma); on other GPUs (``fused_on``) the ops give the same results from
cuBLAS and the separate passes.  Timed on an H200 (``bench/results/nvidia-h200/gemm-2026-11-28``): the inference
forward beats cuBLAS + GELU (0.66 vs 0.70 ms at MaskDiT-XL/2's decoder shape), the training forward is 4%
slower (0.72 vs 0.69 ms) and the backward half as fast (1.53 vs 0.82 ms with ``gelu_tanh_grad``), so only
``INFERENCE`` is on.
Grid: one program per multiprocessor (at most one per tile), walking output tiles in grouped order (``GROUP_M``
row tiles share the weight tiles in L2); each tile's products loop over K in ``BLOCK_K`` steps, and its
epilogue works on four (or two) column parts of the accumulator in turn (fewer live registers).  No autograd:
pieces of ``maskdit.backends``'s MLP Function (``linear_gelu_output``: of its inference path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import cdiv, check_tensor, multiprocessors, new_output
from .gelu import gelu_tanh_and_derivative, gelu_tanh_grad

HALF_DTYPES = (torch.float16, torch.bfloat16)
# whether ``maskdit.backends``' MLP takes these kernels (where ``supported``) instead of cuBLAS and the separate GELU
# passes: in its training forward (``linear_gelu``), in its backward (``gelu_grad_gemm``) and without autograd
# (``linear_gelu_output``: sampling).  Set from ``make gpu-check`` part gemm on an H200 (2026-11-28): batch-256
# XL/2 training steps 0.5% slower with the forward fused, 6% with the backward; 40-step sampling 1.1-1.3% faster
FORWARD = False
BACKWARD = False
INFERENCE = True
# launch parameters (``bench/kernels.py`` varies them): Triton's persistent TMA matmul tutorial's Hopper tile
BLOCK_M = 128
BLOCK_N = 256
BLOCK_K = 64
GROUP_M = 8  # row tiles walked together (L2 reuse of the weight's column tiles)
STAGES = 3  # software-pipeline stages of the K loop (TMA loads in flight)
NUM_WARPS = 8
# the tile loop's pipelining: flattened with the K loop (the next tile's loads overlap this one's epilogue), or
# warp-specialized (loads, products and epilogue in separate warps; triton 3.6 compiles it for sm_90)
WARP_SPECIALIZE = False
EPILOGUE_PARTS = 4  # column parts of a tile's epilogue, one after the other (2 or 4; offline sm_90 builds of the
# 128 x 256 tile: 2 parts took 255 registers forward and backward, 16-40 spilled bytes backward with triton 3.9;
# 4 parts 165-180 forward, 175-255 backward, none spilled)
INTERPRETER_PROGRAMS = 3  # programs of a CPU-interpreted launch (a few, so that each walks several tiles)


@triton.jit
def _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile index ``tile`` in grouped order."""
    group = GROUP_M * tiles_n
    first_m = (tile // group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % group) % rows_in_group, (tile % group) // rows_in_group


@triton.jit
def _epilogue_part(acc, off_m, off_n, N, a_desc, g_desc, out_desc, BIAS, PARTIALS, row_tile,
                   BACKWARD: tl.constexpr, STORE_A: tl.constexpr, BLOCK_N: tl.constexpr):
    """One column part (BLOCK_N wide) of a tile's epilogue.  Forward: a = acc + bias (stored if ``STORE_A``) and
    g = gelu(a).  Backward: dg = acc, g = gelu(a) and da = gelu'(a) * dg, da's column sums into the row tile's
    row of PARTIALS."""
    dtype = g_desc.dtype
    cols = off_n + tl.arange(0, BLOCK_N)
    if BACKWARD:
        dg = acc.to(dtype).to(tl.float32)  # rounded as the unfused product's output
        a = a_desc.load([off_m, off_n]).to(tl.float32)  # zeros beyond the edges: da = 0 there
        g, dgelu = gelu_tanh_and_derivative(a)
        da = (dg * dgelu).to(dtype)
        g_desc.store([off_m, off_n], g.to(dtype))
        out_desc.store([off_m, off_n], da)
        tl.store(PARTIALS + row_tile * N + cols, tl.sum(da.to(tl.float32), axis=0), mask=cols < N)
    else:
        bias = tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
        a = (acc + bias[None, :]).to(dtype)
        g, _ = gelu_tanh_and_derivative(a.to(tl.float32))
        if STORE_A:
            out_desc.store([off_m, off_n], a)
        g_desc.store([off_m, off_n], g.to(dtype))


@triton.jit
def _gelu_gemm_kernel(x_desc, w_desc, a_desc, g_desc, out_desc, BIAS, PARTIALS, M, N, K, programs,
                      BACKWARD: tl.constexpr, STORE_A: tl.constexpr, W_KN: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      WARP_SPECIALIZE: tl.constexpr, EPILOGUE_PARTS: tl.constexpr):
    """x (M, K) @ w, w given as (N, K) (the forward's nn.Linear weight) or, ``W_KN``, as (K, N) (the backward's
    second weight), then the epilogue (``_epilogue_part``) on each of ``EPILOGUE_PARTS`` column parts of the
    tile (2 or 4: fewer live registers)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs, flatten=not WARP_SPECIALIZE,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coordinates(tile, tiles_m, tiles_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ks in range(k_steps):
            x = x_desc.load([off_m, ks * BLOCK_K])
            if W_KN:
                acc = tl.dot(x, w_desc.load([ks * BLOCK_K, off_n]), acc)
            else:
                acc = tl.dot(x, w_desc.load([off_n, ks * BLOCK_K]).T, acc)
        if EPILOGUE_PARTS == 2:
            left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _epilogue_part(left, off_m, off_n, N, a_desc, g_desc, out_desc, BIAS, PARTIALS, pid_m,
                           BACKWARD, STORE_A, BLOCK_N // 2)
            _epilogue_part(right, off_m, off_n + BLOCK_N // 2, N, a_desc, g_desc, out_desc, BIAS, PARTIALS, pid_m,
                           BACKWARD, STORE_A, BLOCK_N // 2)
        else:  # four column quarters: columns i * BLOCK_N / 2 + j * BLOCK_N / 4 + c as (m, c, i, j)
            quarter: tl.constexpr = BLOCK_N // 4
            j0, j1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, 2, quarter)), (0, 3, 1, 2)))
            q00, q10 = tl.split(j0)
            _epilogue_part(q00, off_m, off_n, N, a_desc, g_desc, out_desc, BIAS, PARTIALS, pid_m,
                           BACKWARD, STORE_A, quarter)
            _epilogue_part(q10, off_m, off_n + 2 * quarter, N, a_desc, g_desc, out_desc, BIAS, PARTIALS, pid_m,
                           BACKWARD, STORE_A, quarter)
            q01, q11 = tl.split(j1)
            _epilogue_part(q01, off_m, off_n + quarter, N, a_desc, g_desc, out_desc, BIAS, PARTIALS, pid_m,
                           BACKWARD, STORE_A, quarter)
            _epilogue_part(q11, off_m, off_n + 3 * quarter, N, a_desc, g_desc, out_desc, BIAS, PARTIALS, pid_m,
                           BACKWARD, STORE_A, quarter)


def supported(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor, addresses: bool = True) -> bool:
    """Whether the operands of ``linear_gelu`` (y, weight) or ``gelu_grad_gemm`` (dout, weight, a) can take the
    fused path: fp16/bf16 (one dtype), 2-D with unit last stride and 16-byte aligned rows at least a row apart,
    and (``addresses``; not known while ``torch.compile`` traces) 16-byte aligned base addresses: TMA's rules,
    also for the outputs, whose rows are as wide as one of the weight's sizes."""
    tensors = (x, weight, *others)
    return all(
        t.dtype == x.dtype and x.dtype in HALF_DTYPES and t.ndim == 2 and t.stride(1) == 1
        and t.stride(0) >= t.shape[1] and (t.stride(0) * t.element_size()) % 16 == 0
        and (not addresses or t.data_ptr() % 16 == 0)
        for t in tensors) and all((size * x.element_size()) % 16 == 0 for size in weight.shape)


def fused_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused GEMMs run on ``device`` for ``dtype`` operands: a Hopper GPU (compute capability 9.x: TMA
    and wgmma, what they are built and tuned for; an sm_80 build of the default tile spills 64-320 bytes and
    pipelines nothing, offline triton 3.6; later GPUs are untimed), or the CPU interpreter with fp16 (it
    computes bf16 products wrongly).  Elsewhere the ops compute the same unfused."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] == 9
    return dtype == torch.float16


def _descriptor(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, cols])


def _validate(name_x: str, x: torch.Tensor, name_w: str, w: torch.Tensor, w_shape: tuple, extra: dict):
    check_tensor(name_x, x, ndim=2, dtypes=HALF_DTYPES, last_stride_one=True)
    check_tensor(name_w, w, shape=w_shape, dtypes=(x.dtype,), device=x.device, last_stride_one=True)
    for name, (t, shape) in extra.items():
        check_tensor(name, t, shape=shape, dtypes=(x.dtype,), device=x.device, last_stride_one=True)


def _validate_forward(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    _validate("y", y, "weight", weight, (None, y.shape[1]), {"bias": (bias, (weight.shape[0],))})


def _check_aligned(**operands: torch.Tensor):
    """(In the launcher: addresses are known at run time only, not while ``torch.compile`` traces.)"""
    if not supported(*operands.values()):
        got = ", ".join(f"{name} strides {t.stride()} at offset {t.data_ptr() % 16}" for name, t in operands.items())
        raise ValueError(f"{', '.join(operands)} need 16-byte aligned rows and addresses (TMA), got {got}: "
                         "check kernels.gelu_gemm.supported first")


def _launch(x, w, a, g, out, bias, partials, n: int, backward: bool, store_a: bool = True):
    m, k = x.shape
    if not (m and n):
        return
    part = BLOCK_N // EPILOGUE_PARTS
    w_kn = backward
    w_desc = _descriptor(w, BLOCK_K, BLOCK_N) if w_kn else _descriptor(w, BLOCK_N, BLOCK_K)
    tiles = cdiv(m, BLOCK_M) * cdiv(n, BLOCK_N)
    programs = min(tiles, multiprocessors(x.device) if x.is_cuda else INTERPRETER_PROGRAMS)
    _gelu_gemm_kernel[(programs,)](
        _descriptor(x, BLOCK_M, BLOCK_K), w_desc, _descriptor(a, BLOCK_M, part), _descriptor(g, BLOCK_M, part),
        _descriptor(out, BLOCK_M, part), bias, partials, m, n, k, programs,
        BACKWARD=backward, STORE_A=store_a, W_KN=w_kn, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        GROUP_M=GROUP_M, WARP_SPECIALIZE=WARP_SPECIALIZE, EPILOGUE_PARTS=EPILOGUE_PARTS,
        num_warps=NUM_WARPS, num_stages=STAGES)


def _forward(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, store_a: bool):
    """(a, g) of the forward; without ``store_a``, a is not written (g stands in its place)."""
    if not fused_on(y.device, y.dtype):
        return linear_gelu_reference(y, weight, bias)
    _check_aligned(y=y, weight=weight)
    t, h = y.shape[0], weight.shape[0]
    g = new_output((t, h), y.dtype, y.device)
    a = new_output((t, h), y.dtype, y.device) if store_a else g
    _launch(y, weight, a, g, a, bias, bias, h, backward=False, store_a=store_a)
    return a, g


def _linear_gelu_impl(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(y, weight, bias, store_a=True)


def _linear_gelu_output_impl(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _forward(y, weight, bias, store_a=False)[1]


def _gelu_grad_gemm_impl(dout: torch.Tensor, weight: torch.Tensor,
                         a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not fused_on(a.device, a.dtype):
        return gelu_tanh_grad(a, dout @ weight)
    _check_aligned(dout=dout, weight=weight, a=a)
    t, h = a.shape
    g = new_output((t, h), a.dtype, a.device)
    da = new_output((t, h), a.dtype, a.device)
    partials = new_output((cdiv(t, BLOCK_M), h), torch.float32, a.device)  # (no rows: sums to zeros)
    _launch(dout, weight, a, g, da, partials, partials, h, backward=True)
    return g, da, partials.sum(0)


_linear_gelu_op = torch.library.custom_op("maskdit::linear_gelu", _linear_gelu_impl, mutates_args=())
_linear_gelu_output_op = torch.library.custom_op("maskdit::linear_gelu_output", _linear_gelu_output_impl,
                                                 mutates_args=())
_gelu_grad_gemm_op = torch.library.custom_op("maskdit::gelu_grad_gemm", _gelu_grad_gemm_impl, mutates_args=())


@_linear_gelu_op.register_fake
def _(y, weight, bias):
    shape = (y.shape[0], weight.shape[0])
    return y.new_empty(shape), y.new_empty(shape)


@_linear_gelu_output_op.register_fake
def _(y, weight, bias):
    return y.new_empty((y.shape[0], weight.shape[0]))


@_gelu_grad_gemm_op.register_fake
def _(dout, weight, a):
    return torch.empty_like(a, memory_format=torch.contiguous_format), \
        torch.empty_like(a, memory_format=torch.contiguous_format), a.new_empty((a.shape[1],), dtype=torch.float32)


def linear_gelu(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, gelu_tanh(a)) with a = y @ weight^T + bias, for (T, D) ``y``, (H, D) ``weight`` and (H,) ``bias``, all
    of one fp16/bf16 dtype (``supported``)."""
    _validate_forward(y, weight, bias)
    return _linear_gelu_op(y, weight, bias) if torch.compiler.is_compiling() else _linear_gelu_impl(y, weight, bias)


def linear_gelu_output(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``linear_gelu``'s g alone, a not written (inference: nothing is kept for a backward)."""
    _validate_forward(y, weight, bias)
    if torch.compiler.is_compiling():
        return _linear_gelu_output_op(y, weight, bias)
    return _linear_gelu_output_impl(y, weight, bias)


def gelu_grad_gemm(dout: torch.Tensor, weight: torch.Tensor,
                   a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gelu_tanh(a), gelu_tanh'(a) * (dout @ weight), the fp32 column sums of the latter) for the second
    Linear's (T, D) output gradient ``dout`` and (D, H) ``weight`` and the (T, H) GELU input ``a``, all of one
    fp16/bf16 dtype (``supported``): the MLP's backward from fc2's input gradient to fc1's output gradient."""
    _validate("dout", dout, "weight", weight, (dout.shape[1], None), {"a": (a, (dout.shape[0], weight.shape[1]))})
    if torch.compiler.is_compiling():
        return _gelu_grad_gemm_op(dout, weight, a)
    return _gelu_grad_gemm_impl(dout, weight, a)


def linear_gelu_reference(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Plain-PyTorch reference of ``linear_gelu``."""
    a = torch.nn.functional.linear(y, weight, bias)
    return a, torch.nn.functional.gelu(a, approximate="tanh")


def gelu_grad_gemm_reference(dout: torch.Tensor, weight: torch.Tensor, a: torch.Tensor):
    """Plain-PyTorch reference of ``gelu_grad_gemm``."""
    da = torch.ops.aten.gelu_backward(dout @ weight, a, approximate="tanh")
    return torch.nn.functional.gelu(a, approximate="tanh"), da, da.float().sum(0)
