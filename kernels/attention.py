"""FlashAttention over packed variable-length sequences, forward and backward:

    out[t, h] = softmax_u(scale * q[t, h] . k[u, h]) @ v[u, h]      u over the tokens of t's sample

q, k, v: (T, heads, head_dim) packed sample after sample (``cu_seqlens``, int32 (N + 1,)), any row and head
strides with a unit last stride (the views of one packed qkv projection output); out (T, heads, head_dim)
contiguous, i.e. the output projection's (T, heads * head_dim) input with no copy; scale head_dim ** -0.5.
Made for MaskDiT's short sequences (128 kept tokens at head dim 72 in the encoder), where the SDPA kernels'
backward runs at a fifth of their forward's rate (``bench/results/nvidia-h200/attention.md``):

- forward: a program per (query block, sample, head), online softmax over the sample's key blocks in fp32
  (exp2 with the log2(e)-folded scale), keeping each row's log-sum-exp (fp32, log2 domain) for the backward;
- backward: a program per (key block, sample, head): dK and dV of its keys over the sample's query blocks,
  then dQ of the query block with the same rows over the key blocks (FlashAttention-2's split: no atomics,
  deterministic); when every sample fits one program (``max_len <= BWD_BLOCK_N``) one pass gets all three
  from one S and P (five products a step instead of seven).  Each row's dO . O is taken in the kernel;
- the head dim as two power-of-two column chunks, 72 = 64 + 16 (8 masked), where one block would be 128 wide
  (one block where two would not be narrower: 100 in 128);
- the gradients written into one packed (T, 3, heads, head_dim) buffer: for ``qkv_attention`` that is the
  projection output's gradient with no stacking, and each program also adds up its rows' gradients in fp32
  for the projection's bias (one row of a zeroed (programs, 3 * heads * head_dim) buffer, summed after).

fp32 inputs multiply in ieee fp32 (no TF32); fp16/bf16 ones with fp32 accumulation, P and dS rounded to the
input dtype for their products, as FlashAttention does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    autograd_op,
    cdiv,
    check_tensor,
    column_blocks,
    new_output,
    readable_on_host,
)

FWD_BLOCK_M = 128  # query rows of a forward program
FWD_BLOCK_N = 64  # keys of a step of its loop
FWD_WARPS = 8
FWD_STAGES = 2  # software-pipeline stages of the forward's key loop
BWD_BLOCK_N = 128  # keys of a backward program (and the query rows of its dQ part)
BWD_BLOCK_M = 64  # queries of a step of its dK/dV loop when every sample fits one program
BWD_BLOCK_M_MULTI = 32  # ... otherwise (and keys of a step of its dQ loop)
BWD_WARPS = 8
# (launch parameters of fp16/bf16 inputs, which bench/attention.py varies; offline sm_90 builds
# (bench/kernel_resources.py), bf16 at BLOCK_N 128 and 8 warps: head dim 72 one-program samples 252 registers with
# steps of 64 queries; samples of 256 tokens 244 with steps of 32 (255 and 88 spilled bytes with 64); the forward
# at head dim 72 183)
# fp32 inputs (ieee products on the CUDA cores, operands in registers) take smaller tiles: (query rows, keys a
# step, warps) of the forward and (keys, queries a step, warps) of the backward.  With the 16-bit ones the offline
# sm_90 builds spilled 0.6-19 KB at head dims 32 and 72 and the one-pass backward wanted 238 KB of shared memory
# (232 KB allowed); with these none spills, with triton 3.6 or 3.9 (at most 73 and 128 registers)
FP32_FWD = (64, 16, 16)
FP32_BWD = (16, 16, 8)
MAX_HEAD_DIM = 256
MAX_SAMPLES = 65535  # CUDA's limit on a launch grid's second axis, which holds the samples
LOG2E = 1.4426950408889634


@triton.jit
def _load_head(PTR, tok, rmask, stride_t, off, HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr):
    """A (rows, head_dim) tile as its two column chunks, zero outside; the second is the first again when
    D_B is 0 (never used then)."""
    base = PTR + tok[:, None] * stride_t + off
    ca = tl.arange(0, D_A)
    x_a = tl.load(base + ca[None, :], mask=rmask[:, None] & (ca < HEAD_DIM)[None, :], other=0.0)
    if D_B > 0:
        cb = D_A + tl.arange(0, D_B)
        x_b = tl.load(base + cb[None, :], mask=rmask[:, None] & (cb < HEAD_DIM)[None, :], other=0.0)
    else:
        x_b = x_a
    return x_a, x_b


@triton.jit
def _store_head(PTR, tok, rmask, stride_t, off, x_a, x_b, HEAD_DIM: tl.constexpr, D_A: tl.constexpr,
                D_B: tl.constexpr):
    base = PTR + tok[:, None] * stride_t + off
    ca = tl.arange(0, D_A)
    tl.store(base + ca[None, :], x_a.to(PTR.dtype.element_ty), mask=rmask[:, None] & (ca < HEAD_DIM)[None, :])
    if D_B > 0:
        cb = D_A + tl.arange(0, D_B)
        tl.store(base + cb[None, :], x_b.to(PTR.dtype.element_ty), mask=rmask[:, None] & (cb < HEAD_DIM)[None, :])


@triton.jit
def _store_sums(ROW, s_a, s_b, HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr):
    """A head's fp32 column sums, in chunks, into ROW[0:head_dim]."""
    ca = tl.arange(0, D_A)
    tl.store(ROW + ca, s_a, mask=ca < HEAD_DIM)
    if D_B > 0:
        cb = D_A + tl.arange(0, D_B)
        tl.store(ROW + cb, s_b, mask=cb < HEAD_DIM)


@triton.jit
def _zeros_b(ROWS: tl.constexpr, D_B: tl.constexpr):
    """The second chunk's fp32 accumulator; (1, 1) when there is none (loops then carry it unchanged)."""
    if D_B > 0:
        z = tl.zeros([ROWS, D_B], tl.float32)
    else:
        z = tl.zeros([1, 1], tl.float32)
    return z


@triton.jit
def _scale_b(x_b, f, D_B: tl.constexpr):
    """x_b * f for a second chunk (x_b itself when there is none)."""
    if D_B > 0:
        x_b = x_b * f
    return x_b


@triton.jit
def _dot_nt(a_a, a_b, b_a, b_b, D_B: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b^T over the head dim, fp32: (M, d) and (N, d) tiles in chunks -> (M, N)."""
    acc = tl.dot(a_a, tl.trans(b_a), input_precision=PRECISION)
    if D_B > 0:
        acc = tl.dot(a_b, tl.trans(b_b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dot_acc(p, b_a, b_b, acc_a, acc_b, D_B: tl.constexpr, PRECISION: tl.constexpr):
    """(acc_a, acc_b) += p @ b for an (M, N) p and an (N, d) b in chunks."""
    acc_a = tl.dot(p, b_a, acc_a, input_precision=PRECISION)
    if D_B > 0:
        acc_b = tl.dot(p, b_b, acc_b, input_precision=PRECISION)
    return acc_a, acc_b


@triton.jit
def _row_dot(x_a, x_b, y_a, y_b, D_B: tl.constexpr):
    """The fp32 dot product of each row of two (rows, head_dim) tiles."""
    d = tl.sum(x_a.to(tl.float32) * y_a.to(tl.float32), 1)
    if D_B > 0:
        d += tl.sum(x_b.to(tl.float32) * y_b.to(tl.float32), 1)
    return d


@triton.jit
def _program_sample(CU):
    """A program's sample s (grid axis 1), head h (axis 2), and the sample's first token and length."""
    s = tl.program_id(1)
    start = tl.load(CU + s)
    return s, tl.program_id(2).to(tl.int64), start, tl.load(CU + s + 1) - start


@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          H, qk_scale, HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                          STAGES: tl.constexpr):
    s, h, start, n = _program_sample(CU)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 < n:
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < n
        qtok = (start + rows).to(tl.int64)
        q_a, q_b = _load_head(Q, qtok, rmask, stride_qt, h * stride_qh, HEAD_DIM, D_A, D_B)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_a = tl.zeros([BLOCK_M, D_A], tl.float32)
        acc_b = _zeros_b(BLOCK_M, D_B)
        for j in tl.range(0, n, BLOCK_N, num_stages=STAGES):
            cols = j + tl.arange(0, BLOCK_N)
            cmask = cols < n
            ktok = (start + cols).to(tl.int64)
            k_a, k_b = _load_head(K, ktok, cmask, stride_kt, h * stride_kh, HEAD_DIM, D_A, D_B)
            v_a, v_b = _load_head(V, ktok, cmask, stride_vt, h * stride_vh, HEAD_DIM, D_A, D_B)
            sc = _dot_nt(q_a, q_b, k_a, k_b, D_B, PRECISION) * qk_scale
            sc = tl.where(cmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc_a, acc_b = _dot_acc(p.to(v_a.dtype), v_a, v_b, acc_a * alpha[:, None],
                                    _scale_b(acc_b, alpha[:, None], D_B), D_B, PRECISION)
            m_i = m_new
        inv = 1.0 / l_i
        _store_head(O, qtok, rmask, H * HEAD_DIM, h * HEAD_DIM, acc_a * inv[:, None],
                    _scale_b(acc_b, inv[:, None], D_B), HEAD_DIM, D_A, D_B)
        tl.store(LSE + qtok * H + h, m_i + tl.log2(l_i), mask=rmask)


@triton.jit
def _query_block(Q, DO, O, LSE, start, n, rows, stride_qt, stride_qh, stride_dot, stride_doh, stride_ot, stride_oh,
                 h, H, HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr):
    """A query block's q, dO (chunks), log-sum-exps (+inf outside: P there is 0) and dO . O per row."""
    rmask = rows < n
    tok = (start + rows).to(tl.int64)
    q_a, q_b = _load_head(Q, tok, rmask, stride_qt, h * stride_qh, HEAD_DIM, D_A, D_B)
    do_a, do_b = _load_head(DO, tok, rmask, stride_dot, h * stride_doh, HEAD_DIM, D_A, D_B)
    o_a, o_b = _load_head(O, tok, rmask, stride_ot, h * stride_oh, HEAD_DIM, D_A, D_B)
    lse = tl.load(LSE + tok * H + h, mask=rmask, other=float("inf"))
    return q_a, q_b, do_a, do_b, lse, _row_dot(do_a, do_b, o_a, o_b, D_B)


@triton.jit
def _attention_bwd_kernel(Q, K, V, O, DO, LSE, DQKV, SUMS, CU, stride_qt, stride_qh, stride_kt, stride_kh,
                          stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh, H, qk_scale, scale,
                          HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_M: tl.constexpr, SINGLE: tl.constexpr, BIAS_SUMS: tl.constexpr,
                          PRECISION: tl.constexpr):
    s, h, start, n = _program_sample(CU)
    j0 = tl.program_id(0) * BLOCK_N
    width = 3 * H * HEAD_DIM  # a token's row of the packed gradient (q, k, v parts of heads x head_dim)
    sums = SUMS + (s.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * width + h * HEAD_DIM
    if j0 < n:
        # dK, dV of this program's BLOCK_N keys, over the sample's queries BLOCK_M at a time
        krows = j0 + tl.arange(0, BLOCK_N)
        kmask = krows < n
        ktok = (start + krows).to(tl.int64)
        k_a, k_b = _load_head(K, ktok, kmask, stride_kt, h * stride_kh, HEAD_DIM, D_A, D_B)
        v_a, v_b = _load_head(V, ktok, kmask, stride_vt, h * stride_vh, HEAD_DIM, D_A, D_B)
        dk_a = tl.zeros([BLOCK_N, D_A], tl.float32)
        dk_b = _zeros_b(BLOCK_N, D_B)
        dv_a = tl.zeros([BLOCK_N, D_A], tl.float32)
        dv_b = _zeros_b(BLOCK_N, D_B)
        dq_sum_a = tl.zeros([D_A], tl.float32)  # (SINGLE: the column sums of the dQ rows stored so far)
        dq_sum_b = tl.sum(_zeros_b(BLOCK_M, D_B), 0)
        for i in range(0, n, BLOCK_M):
            qrows = i + tl.arange(0, BLOCK_M)
            q_a, q_b, do_a, do_b, lse, delta = _query_block(
                Q, DO, O, LSE, start, n, qrows, stride_qt, stride_qh, stride_dot, stride_doh, stride_ot, stride_oh,
                h, H, HEAD_DIM, D_A, D_B)
            # transposed tiles, (keys, queries): the products below then need no transposed accumulator
            p_t = tl.exp2(_dot_nt(k_a, k_b, q_a, q_b, D_B, PRECISION) * qk_scale - lse[None, :])
            p_t = tl.where(kmask[:, None], p_t, 0.0)  # (queries outside have lse +inf: 0 already)
            dv_a, dv_b = _dot_acc(p_t.to(do_a.dtype), do_a, do_b, dv_a, dv_b, D_B, PRECISION)
            ds_t = (p_t * (_dot_nt(v_a, v_b, do_a, do_b, D_B, PRECISION) - delta[None, :])).to(q_a.dtype)
            dk_a, dk_b = _dot_acc(ds_t, q_a, q_b, dk_a, dk_b, D_B, PRECISION)
            if SINGLE:  # the program holds every key of the sample: these queries' dQ rows are complete
                dq_a, dq_b = _dot_acc(tl.trans(ds_t), k_a, k_b, tl.zeros([BLOCK_M, D_A], tl.float32),
                                      _zeros_b(BLOCK_M, D_B), D_B, PRECISION)
                dq_a, dq_b = dq_a * scale, dq_b * scale
                qtok = (start + qrows).to(tl.int64)
                _store_head(DQKV, qtok, qrows < n, width, h * HEAD_DIM, dq_a, dq_b, HEAD_DIM, D_A, D_B)
                if BIAS_SUMS:
                    dq_sum_a += tl.sum(dq_a, 0)
                    dq_sum_b += tl.sum(dq_b, 0)
        dk_a, dk_b = dk_a * scale, dk_b * scale
        _store_head(DQKV, ktok, kmask, width, (H + h) * HEAD_DIM, dk_a, dk_b, HEAD_DIM, D_A, D_B)
        _store_head(DQKV, ktok, kmask, width, (2 * H + h) * HEAD_DIM, dv_a, dv_b, HEAD_DIM, D_A, D_B)
        if BIAS_SUMS:
            _store_sums(sums + H * HEAD_DIM, tl.sum(dk_a, 0), tl.sum(dk_b, 0), HEAD_DIM, D_A, D_B)
            _store_sums(sums + 2 * H * HEAD_DIM, tl.sum(dv_a, 0), tl.sum(dv_b, 0), HEAD_DIM, D_A, D_B)
        if not SINGLE:
            # dQ of the BLOCK_N queries with this program's rows, over the sample's keys BLOCK_M at a time
            q_a, q_b, do_a, do_b, lse, delta = _query_block(
                Q, DO, O, LSE, start, n, krows, stride_qt, stride_qh, stride_dot, stride_doh, stride_ot, stride_oh,
                h, H, HEAD_DIM, D_A, D_B)
            dq_a = tl.zeros([BLOCK_N, D_A], tl.float32)
            dq_b = _zeros_b(BLOCK_N, D_B)
            for j in range(0, n, BLOCK_M):
                cols = j + tl.arange(0, BLOCK_M)
                cmask = cols < n
                ctok = (start + cols).to(tl.int64)
                kk_a, kk_b = _load_head(K, ctok, cmask, stride_kt, h * stride_kh, HEAD_DIM, D_A, D_B)
                vv_a, vv_b = _load_head(V, ctok, cmask, stride_vt, h * stride_vh, HEAD_DIM, D_A, D_B)
                p = tl.exp2(_dot_nt(q_a, q_b, kk_a, kk_b, D_B, PRECISION) * qk_scale - lse[:, None])
                p = tl.where(cmask[None, :], p, 0.0)
                ds = (p * (_dot_nt(do_a, do_b, vv_a, vv_b, D_B, PRECISION) - delta[:, None])).to(q_a.dtype)
                dq_a, dq_b = _dot_acc(ds, kk_a, kk_b, dq_a, dq_b, D_B, PRECISION)
            dq_a, dq_b = dq_a * scale, dq_b * scale
            _store_head(DQKV, ktok, kmask, width, h * HEAD_DIM, dq_a, dq_b, HEAD_DIM, D_A, D_B)
            dq_sum_a, dq_sum_b = tl.sum(dq_a, 0), tl.sum(dq_b, 0)
        if BIAS_SUMS:
            _store_sums(sums, dq_sum_a, dq_sum_b, HEAD_DIM, D_A, D_B)


def _head_chunks(head_dim: int) -> tuple[int, int]:
    """(D_A, D_B): the head dim's power-of-two column chunks (``column_blocks``: D_B = 0 where two would not be
    narrower than one)."""
    blocks = column_blocks(head_dim, split=True)
    return blocks["BLOCK_A"], blocks["BLOCK_B"]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # (16-bit inputs: the argument is not used)


def _validate(q, k, v, cu_seqlens, max_len):
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, last_stride_one=True)
    for name, x in (("k", k), ("v", v)):
        check_tensor(name, x, shape=tuple(q.shape), dtypes=(q.dtype,), device=q.device, last_stride_one=True)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device, contiguous=True)
    if not 2 <= cu_seqlens.numel() <= MAX_SAMPLES + 1:
        raise ValueError(f"cu_seqlens must hold N + 1 offsets with 1 <= N <= {MAX_SAMPLES} (the samples go on a "
                         f"launch grid axis), got {cu_seqlens.numel()}")
    if isinstance(max_len, bool) or not isinstance(max_len, (int, torch.SymInt)) or max_len < 1:
        raise ValueError(f"max_len must be a positive int (the longest sample's length or more), got {max_len!r}")
    if not 0 < q.shape[2] <= MAX_HEAD_DIM:
        raise ValueError(f"q's head dim must be in 1..{MAX_HEAD_DIM}, got {q.shape[2]}")
    if readable_on_host(cu_seqlens):  # (a device tensor's values would cost a sync)
        lengths = cu_seqlens.diff()
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or int(lengths.min()) < 0:
            raise ValueError(f"cu_seqlens must rise from 0 to the token count {q.shape[0]}, got "
                             f"{cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")
        if int(lengths.max()) > max_len:
            raise ValueError(f"max_len {max_len} is shorter than the longest sample ({int(lengths.max())} tokens)")


def _fwd_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    t, heads, d = q.shape
    out = new_output((t, heads, d), q.dtype, q.device)
    lse = new_output((t, heads), torch.float32, q.device)
    num = cu_seqlens.numel() - 1
    if t and heads:
        d_a, d_b = _head_chunks(d)
        rows, keys, warps = FP32_FWD if q.dtype == torch.float32 else (FWD_BLOCK_M, FWD_BLOCK_N, FWD_WARPS)
        _attention_fwd_kernel[(cdiv(max_len, rows), num, heads)](
            q, k, v, out, lse, cu_seqlens, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), heads, d ** -0.5 * LOG2E, HEAD_DIM=d, D_A=d_a, D_B=d_b, BLOCK_M=rows, BLOCK_N=keys,
            PRECISION=_precision(q.dtype), STAGES=FWD_STAGES, num_warps=warps)
    return out, lse


def _qkv_fwd_impl(qkv: torch.Tensor, bias: Optional[torch.Tensor], cu_seqlens: torch.Tensor, max_len: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(*qkv.unbind(1), cu_seqlens, max_len)  # (bias: an input only to get its gradient)


_fwd = torch.library.custom_op("maskdit::attention_fwd", _fwd_impl, mutates_args=())
_qkv_fwd = torch.library.custom_op("maskdit::qkv_attention_fwd", _qkv_fwd_impl, mutates_args=())


@_fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_len):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@_qkv_fwd.register_fake
def _qkv_fwd_fake(qkv, bias, cu_seqlens, max_len):
    return _fwd_fake(qkv[:, 0], None, None, cu_seqlens, max_len)


def _bwd_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, bias_sums: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    t, heads, d = q.shape
    dqkv = new_output((t, 3, heads, d), q.dtype, q.device)
    num = cu_seqlens.numel() - 1
    fp32 = q.dtype == torch.float32
    keys, warps = (FP32_BWD[0], FP32_BWD[2]) if fp32 else (BWD_BLOCK_N, BWD_WARPS)
    single = max_len <= keys  # every sample within one program: the one-pass variant
    step = FP32_BWD[1] if fp32 else BWD_BLOCK_M if single else BWD_BLOCK_M_MULTI
    blocks = cdiv(max_len, keys)
    # one row of fp32 column sums per program (zeros where a program has no rows), added up after
    sums = torch.zeros((num * blocks if bias_sums else 1, 3 * heads * d), dtype=torch.float32, device=q.device)
    if t and heads:
        d_a, d_b = _head_chunks(d)
        _attention_bwd_kernel[(blocks, num, heads)](
            q, k, v, out, dout, lse, dqkv, sums, cu_seqlens, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), heads,
            d ** -0.5 * LOG2E, d ** -0.5, HEAD_DIM=d, D_A=d_a, D_B=d_b, BLOCK_N=keys, BLOCK_M=step, SINGLE=single,
            BIAS_SUMS=bias_sums, PRECISION=_precision(q.dtype), num_warps=warps)
    return dqkv, (sums.sum(0) if bias_sums else sums.new_empty(0))


_bwd = torch.library.custom_op("maskdit::attention_bwd", _bwd_impl, mutates_args=())


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens, max_len, bias_sums):
    t, heads, d = q.shape
    return q.new_empty((t, 3, heads, d)), q.new_empty((3 * heads * d if bias_sums else 0,), dtype=torch.float32)


def _unit_last_stride(g: torch.Tensor) -> torch.Tensor:
    return g if g.stride(-1) == 1 else g.contiguous()  # (an expanded gradient has stride 0 everywhere)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_len = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.max_len = max_len


def _backward(ctx, bwd, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dqkv, _ = bwd(_unit_last_stride(dout), q, k, v, out, lse, cu_seqlens, ctx.max_len, False)
    return *dqkv.unbind(1), None, None


def _qkv_setup_context(ctx, inputs, output):
    qkv, bias, cu_seqlens, max_len = inputs
    ctx.save_for_backward(qkv, *output, cu_seqlens)
    ctx.max_len, ctx.bias_dtype = max_len, (bias.dtype if bias is not None else None)


def _qkv_backward(ctx, bwd, dout, dlse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    sums = ctx.bias_dtype is not None and ctx.needs_input_grad[1]
    dqkv, dbias = bwd(_unit_last_stride(dout), *qkv.unbind(1), out, lse, cu_seqlens, ctx.max_len, sums)
    return dqkv, (dbias.to(ctx.bias_dtype) if sums else None), None, None


_attention = autograd_op("FlashAttention", _fwd, _fwd_impl, _bwd, _bwd_impl, _setup_context, _backward)
_qkv_attention = autograd_op("QkvFlashAttention", _qkv_fwd, _qkv_fwd_impl, _bwd, _bwd_impl, _qkv_setup_context,
                             _qkv_backward)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    max_len: int) -> torch.Tensor:
    """Softmax attention within each sample of packed (T, heads, head_dim) ``q``, ``k``, ``v`` (the samples'
    offsets ``cu_seqlens``, int32 (N + 1,); ``max_len`` at least the longest sample's length) -> contiguous
    (T, heads, head_dim) in q's dtype.  The gradients of q, k, v are views of one packed (T, 3, heads,
    head_dim) tensor."""
    _validate(q, k, v, cu_seqlens, max_len)
    return _attention(q, k, v, cu_seqlens, max_len)[0]


def qkv_attention(qkv: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor, max_len: int
                  ) -> torch.Tensor:
    """``flash_attention`` of q, k, v = ``qkv.unbind(1)`` for a packed (T, 3, heads, head_dim) projection
    output: its gradient comes as one tensor, and ``bias`` ((3 * heads * head_dim,), the projection's bias,
    not used by the forward: the projection added it, and its own backward must leave it out) gets the fp32
    sums of that gradient over the tokens, in its dtype, from the same kernel."""
    check_tensor("qkv", qkv, ndim=4, last_stride_one=True)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (T, 3, heads, head_dim), got {tuple(qkv.shape)}")
    _validate(*qkv.unbind(1), cu_seqlens, max_len)
    if bias is not None:
        check_tensor("bias", bias, shape=(3 * qkv.shape[2] * qkv.shape[3],), dtypes=FLOAT_DTYPES, device=qkv.device)
    return _qkv_attention(qkv, bias, cu_seqlens, max_len)[0]


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                              max_len: int | None = None) -> torch.Tensor:
    """Plain-PyTorch reference of ``flash_attention`` (fp32 math, one sample at a time; reads ``cu_seqlens`` on
    the host).  ``max_len`` is unused: the signature is the op's, so that tests call both alike."""
    scale = 1 / math.sqrt(q.shape[-1])
    bounds = cu_seqlens.tolist()
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].float().transpose(0, 1) for x in (q, k, v))  # (heads, len, head_dim)
        att = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out.append((att @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(out) if out else q.new_empty(q.shape)
