import pytest
import torch

from kernels import attention as attention_module
from kernels.attention import (
    _bwd,
    _fwd,
    _qkv_fwd,
    flash_attention,
    flash_attention_reference,
    qkv_attention,
)
from tests.kernels.conftest import DEVICE, DTYPES

# (samples' token counts, heads, head dim): samples of different lengths (one token, none, a length that is no
# multiple of the blocks), head dims below 16, not powers of two (two column chunks: 24 = 16 + 16, 72 = 64 + 16,
# 100 = 64 + 64) and powers of two (one chunk); MaskDiT-XL/2's encoder head dim (72) and decoder's (32)
CASES = [([5, 17], 2, 16), ([1, 9, 0, 33], 3, 24), ([40, 3, 64], 2, 72), ([12, 50], 1, 100), ([7, 30], 2, 32),
         ([6, 11], 1, 8)]
# fp32: (forward atol/rtol, gradient atol/rtol) against the reference.  fp16/bf16: the kernel rounds P and dS
# to the input dtype for their products (FlashAttention's practice), so its error against the fp32-math reference
# is held to at most LOW_PRECISION_FACTOR times that of the same math run in the input dtype (plus a small floor),
# FlashAttention's own test criterion
FP32_TOL = dict(fwd=dict(atol=1e-5, rtol=1e-5), grad=dict(atol=1e-4, rtol=1e-4))
LOW_PRECISION_FACTOR = 3


def _input_dtype_reference(q, k, v, cu_seqlens):
    """``flash_attention_reference``'s math in the inputs' dtype (no fp32 upcast)."""
    bounds, out = cu_seqlens.tolist(), []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        att = torch.softmax(qs @ ks.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)
        out.append((att @ vs).transpose(0, 1))
    return torch.cat(out)


def _check_close(got, want, low, kind):
    """``got`` (kernel) against ``want`` (fp32-math reference); ``low``: the reference in the input dtype."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, **FP32_TOL[kind])
        return
    err, low_err = (got.float() - want.float()).abs().max(), (low.float() - want.float()).abs().max()
    scale = want.float().abs().max()
    assert err <= LOW_PRECISION_FACTOR * low_err + 1e-3 * scale, f"{kind}: error {err} against {low_err} in {got.dtype}"


def _compare(qkv, cu, out, leaves=None):
    """The kernel's output and its gradients (of ``leaves``, default the packed qkv) against the references."""
    leaves = leaves or [qkv]
    ref = flash_attention_reference(*qkv.unbind(1), cu)
    low = _input_dtype_reference(*qkv.unbind(1), cu) if qkv.dtype != torch.float32 else None
    _check_close(out, ref, low, "fwd")
    low_grads = _grads(low, leaves) if low is not None else [None] * len(leaves)
    for got, want, want_low in zip(_grads(out, leaves), _grads(ref, leaves), low_grads):
        _check_close(got, want, want_low, "grad")


def _layout(lengths):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return cu, max(lengths)


def _packed(lengths, heads, d, dtype, seed=0):
    """A packed (T, 3, heads, d) projection output (q, k, v its views), values scaled so the softmax is neither
    flat nor one-hot."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sum(lengths), 3, heads, d, generator=g) * 1.5).to(DEVICE, dtype).requires_grad_()


def _grads(out, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return torch.autograd.grad(out, leaves, weights)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths,heads,d", CASES)
def test_against_reference(lengths, heads, d, dtype):
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, heads, d, dtype)
    out = flash_attention(*qkv.unbind(1), cu, max_len)
    assert out.shape == (sum(lengths), heads, d) and out.dtype == dtype and out.is_contiguous()
    _compare(qkv, cu, out)


@pytest.mark.parametrize("lengths,heads,d", CASES)
def test_reference_is_sdpa_per_sample(lengths, heads, d):
    """The reference against PyTorch's attention, one sample at a time: a bug the kernel and the reference shared
    (the softmax scale, say) would pass the comparisons above."""
    cu, _ = _layout(lengths)
    q, k, v = _packed(lengths, heads, d, torch.float32).detach().unbind(1)
    bounds = cu.tolist()
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(flash_attention_reference(q, k, v, cu), want, **FP32_TOL["fwd"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_blocks_of_queries_and_keys(dtype, monkeypatch):
    """Small blocks, so samples span several forward query blocks and key steps, and the backward takes its
    two-part path (dK, dV over query steps, then dQ over key steps) with steps that do not divide the blocks'
    lengths (fp32 inputs take the FP32_* blocks: 64 and 16 rows forward, 32 keys and 16 queries backward)."""
    monkeypatch.setattr(attention_module, "FWD_BLOCK_M", 32)
    monkeypatch.setattr(attention_module, "FWD_BLOCK_N", 16)
    monkeypatch.setattr(attention_module, "BWD_BLOCK_N", 32)
    monkeypatch.setattr(attention_module, "BWD_BLOCK_M_MULTI", 16)
    lengths = [70, 5, 33]
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, 2, 72, dtype)
    _compare(qkv, cu, flash_attention(*qkv.unbind(1), cu, max_len))


def test_one_pass_and_two_part_backward_agree(monkeypatch):
    """The one-program backward (every sample within BWD_BLOCK_N keys) and the two-part one give the same
    gradients (up to the order of fp32 sums)."""
    lengths = [20, 31]
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, 2, 40, torch.float32)
    one = _grads(flash_attention(*qkv.unbind(1), cu, max_len), [qkv])[0]
    monkeypatch.setattr(attention_module, "FP32_BWD", (16, 16, 4))  # (fp32 inputs' blocks: keys, step, warps)
    two = _grads(flash_attention(*qkv.unbind(1), cu, max_len), [qkv])[0]
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)


def test_max_len_may_exceed_the_longest_sample():
    lengths = [9, 4]
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, 2, 16, torch.float32)
    out = flash_attention(*qkv.unbind(1), cu, max_len)
    longer = flash_attention(*qkv.unbind(1), cu, 300)  # (several forward and backward programs with no rows)
    assert torch.equal(longer, out)
    torch.testing.assert_close(_grads(longer, [qkv])[0], _grads(out, [qkv])[0], atol=1e-6, rtol=1e-5)


def test_separate_strided_inputs_and_an_expanded_gradient():
    """q, k, v need not be views of one tensor: here separate tensors, k and v with padded rows and heads; the
    incoming gradient of ``out.sum()`` is expanded (stride 0)."""
    lengths = [6, 13]
    cu, max_len = _layout(lengths)
    g = torch.Generator().manual_seed(3)
    t = sum(lengths)
    q = torch.randn(t, 2, 24, generator=g).to(DEVICE).requires_grad_()
    k_wide = torch.randn(t, 3, 40, generator=g).to(DEVICE).requires_grad_()
    v_wide = torch.randn(t + 5, 2, 30, generator=g).to(DEVICE).requires_grad_()
    k, v = k_wide[:, 1:, 8:32], v_wide[5:, :, :24]
    out = flash_attention(q, k, v, cu, max_len)
    ref = flash_attention_reference(q, k, v, cu)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out.sum(), [q, k_wide, v_wide])
    want = torch.autograd.grad(ref.sum(), [q, k_wide, v_wide])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_attention_gives_the_packed_gradient_and_the_bias_sums(dtype):
    """``qkv_attention``: the same output and packed gradient as ``flash_attention`` on the views (the same
    kernels: bitwise), and the bias gradient as fp32 sums of that gradient over the tokens, in the bias's dtype;
    without a bias (or one needing no gradient) no sums."""
    lengths = [40, 3, 64]
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, 2, 72, dtype)
    bias = torch.randn(3 * 2 * 72, device=DEVICE).requires_grad_()
    out = qkv_attention(qkv, bias, cu, max_len)
    views = flash_attention(*qkv.unbind(1), cu, max_len)
    assert torch.equal(out, views)
    dqkv, dbias = _grads(out, [qkv, bias])
    assert torch.equal(dqkv, _grads(views, [qkv])[0])
    assert dbias.dtype == torch.float32 and dbias.shape == bias.shape
    sums = dqkv.double().sum(0).view(-1)
    # the kernel sums its fp32 values before rounding them to the input dtype for dqkv
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=1e-2)
    torch.testing.assert_close(dbias.double(), sums, **tol)
    assert qkv_attention(qkv, None, cu, max_len).grad_fn is not None
    (dqkv_alone,) = _grads(qkv_attention(qkv, bias.detach(), cu, max_len), [qkv])
    assert torch.equal(dqkv_alone, dqkv)


def test_bias_sums_in_the_two_part_backward(monkeypatch):
    monkeypatch.setattr(attention_module, "FP32_BWD", (16, 16, 4))
    lengths = [37, 2, 20]
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, 3, 24, torch.float32)
    bias = torch.randn(3 * 3 * 24, device=DEVICE).requires_grad_()
    dqkv, dbias = _grads(qkv_attention(qkv, bias, cu, max_len), [qkv, bias])
    torch.testing.assert_close(dbias.double(), dqkv.double().sum(0).view(-1), atol=1e-4, rtol=1e-5)


def test_repeats_are_bitwise_equal():
    """No atomics: the forward and backward give the same bits every run."""
    lengths = [30, 17]
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, 2, 72, torch.float32)
    bias = torch.randn(3 * 2 * 72, device=DEVICE).requires_grad_()
    runs = [(out, *_grads(out, [qkv, bias])) for out in (qkv_attention(qkv, bias, cu, max_len) for _ in range(2))]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck():
    lengths = [5, 9]
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, 2, 24, torch.float32)
    q, k, v = qkv.detach().unbind(1)
    torch.library.opcheck(_fwd, (q, k, v, cu, max_len))
    bias = torch.randn(3 * 2 * 24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(_qkv_fwd, (qkv, bias, cu, max_len))
    out, lse = _fwd(q, k, v, cu, max_len)
    torch.library.opcheck(_bwd, (torch.randn_like(out), q, k, v, out, lse, cu, max_len, True))


def test_compiled_fullgraph_matches_eager():
    lengths = [6, 11]
    cu, max_len = _layout(lengths)
    qkv = _packed(lengths, 2, 24, torch.float32)
    bias = torch.randn(3 * 2 * 24, device=DEVICE).requires_grad_()

    def fn(qkv, bias):
        return qkv_attention(qkv, bias, cu, max_len) * 2

    eager = fn(qkv, bias)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(qkv, bias)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    for a, b in zip(_grads(compiled, [qkv, bias]), _grads(eager, [qkv, bias])):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bad_inputs_are_named():
    cu, max_len = _layout([3, 4])
    q, k, v = torch.randn(3, 7, 2, 16, device=DEVICE).unbind(0)
    for msg, args in [("q must be 3-D", (q[0], k, v, cu, max_len)),
                      ("q must have dtype", (q.double(), k, v, cu, max_len)),
                      ("k must have shape", (q, k[:5], v, cu, max_len)),
                      ("v must have dtype", (q, k, v.half(), cu, max_len)),
                      ("k must have unit stride", (q, k.transpose(1, 2).contiguous().transpose(1, 2), v, cu, max_len)),
                      ("cu_seqlens must have dtype", (q, k, v, cu.long(), max_len)),
                      ("cu_seqlens must hold", (q, k, v, cu[:1], max_len)),
                      (r"1 <= N <= 65535 \(the samples go on a launch grid axis\), got 65537",
                       (q, k, v, torch.cat([cu, cu.new_full((65534,), 7)]), max_len)),
                      ("max_len must be a positive int", (q, k, v, cu, 0)),
                      ("max_len must be a positive int", (q, k, v, cu, True)),
                      ("head dim must be in", tuple(torch.randn(3, 7, 1, 300, device=DEVICE).unbind(0)) + (cu, 4))]:
        with pytest.raises(ValueError, match=msg):
            flash_attention(*args)
    if DEVICE == "cpu":  # (cu_seqlens' values are read on the host only: no sync on CUDA)
        for msg, bad_cu, bad_len in [("cu_seqlens must rise from 0 to the token count 7", [0, 5], max_len),
                                     ("cu_seqlens must rise from 0 to the token count 7", [0, 3, 9], 9),
                                     ("cu_seqlens must rise from 0 to the token count 7", [0, 5, 3, 7], max_len),
                                     ("cu_seqlens must rise from 0 to the token count 7", [1, 3, 7], max_len),
                                     (r"max_len 3 is shorter than the longest sample \(4 tokens\)", [0, 3, 7], 3)]:
            with pytest.raises(ValueError, match=msg):
                flash_attention(q, k, v, torch.tensor(bad_cu, dtype=torch.int32), bad_len)
    qkv = torch.randn(7, 3, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="qkv must have shape"):
        qkv_attention(qkv[:, :2], None, cu, max_len)
    with pytest.raises(ValueError, match="bias must have shape"):
        qkv_attention(qkv, torch.zeros(95, device=DEVICE), cu, max_len)
