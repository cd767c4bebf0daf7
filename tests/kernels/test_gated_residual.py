import pytest
import torch

from kernels import gated_residual
from kernels.gated_residual import (
    BWD_ROWS,
    _bwd,
    _fwd,
    gated_residual_ln_modulate,
    gated_residual_ln_modulate_reference,
)
from tests.conftest import saved_storages
from tests.kernels.conftest import DEVICE, DTYPES, TOL, segments

# (hidden size, per-sample token counts): non-powers of two, a 1-token sample, counts that cross the
# backward's 32-row programs, and an XL-width row.
CASES = [(72, [3, 1, 7, 5]), (100, [33, 1, 36]), (384, [2, 2]), (1152, [5])]
# widths the backward can take as two column blocks (64 + 16, 256 + 128; 1024 + 128 on CUDA, where it is cheap)
SPLIT_CASES = [(72, [31, 2, 1, 33]), (384, [3, 2])] + ([(1152, [2, 3])] if DEVICE == "cuda" else [])
NAMES = ("dx", "dh", "dgate", "dshift", "dscale", "dbias")


def _inputs(d, lengths, dtype, h_dtype=None, mod_dtype=None, seed=0, bias_dtype=None):
    """x, h, gate, shift, scale, seg and, given ``bias_dtype``, the Linear layer's bias (None otherwise)."""
    g = torch.Generator().manual_seed(seed)
    t, n = sum(lengths), len(lengths)
    x = (torch.randn(t, d, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    h = torch.randn(t, d, generator=g).to(DEVICE, h_dtype or dtype)
    # gate/shift/scale as chunks of the adaLN GEMM output (row stride 6D)
    mod = (torch.randn(n, 6 * d, generator=g) * 0.5).to(DEVICE, mod_dtype or dtype)
    shift, scale, gate = mod[:, 3 * d:4 * d], mod[:, 4 * d:5 * d], mod[:, 5 * d:6 * d]
    bias = None if bias_dtype is None else torch.randn(d, generator=g).to(DEVICE, bias_dtype)
    return x, h, gate, shift, scale, segments(lengths), bias


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _bias_of(leaves):
    return leaves[5] if len(leaves) > 5 else None


def _check(d, lengths, dtype, h_dtype=None, mod_dtype=None, out_dtype=None, use=("x_new", "y"), tol_dtype=None,
           bias_dtype=None):
    """The op against its reference, outputs and the gradients of every input (with ``bias_dtype``, of a bias
    too); returns the gradients."""
    x, h, gate, shift, scale, seg, bias = _inputs(d, lengths, dtype, h_dtype, mod_dtype, bias_dtype=bias_dtype)
    assert gate.stride(0) == shift.stride(0) == scale.stride(0) == 6 * d  # row views of the GEMM output
    tol = TOL[tol_dtype or dtype]
    inputs = (x, h, gate, shift, scale) + (() if bias is None else (bias,))
    leaves, ref_leaves = _leaves(inputs), _leaves(inputs)
    x_new, y = gated_residual_ln_modulate(*leaves[:5], seg, out_dtype=out_dtype, bias=_bias_of(leaves))
    x_new_ref, y_ref = gated_residual_ln_modulate_reference(*ref_leaves[:5], seg, out_dtype=out_dtype,
                                                            bias=_bias_of(ref_leaves))
    assert x_new.dtype == dtype and x_new.shape == x.shape
    assert y.dtype == (out_dtype or dtype) and y.shape == x.shape
    torch.testing.assert_close(x_new, x_new_ref, **tol["fwd"])
    torch.testing.assert_close(y, y_ref, **tol["fwd"])
    g = torch.Generator().manual_seed(1)
    dxn = torch.randn(x.shape, generator=g).to(DEVICE, dtype)
    dy = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype)
    outs, ref_outs, cots = [], [], []
    for name, out, ref, cot in (("x_new", x_new, x_new_ref, dxn), ("y", y, y_ref, dy)):
        if name in use:
            outs.append(out)
            ref_outs.append(ref)
            cots.append(cot)
    grads = torch.autograd.grad(outs, leaves, cots)
    ref_grads = torch.autograd.grad(ref_outs, ref_leaves, cots, allow_unused=True)
    ref_grads = [torch.zeros_like(leaf) if gr is None else gr for leaf, gr in zip(ref_leaves, ref_grads)]
    for name, leaf, gk, gr in zip(NAMES, leaves, grads, ref_grads):
        assert gk.dtype == leaf.dtype and gk.shape == leaf.shape, name
        assert torch.isfinite(gk).all(), name
        torch.testing.assert_close(gk.float(), gr.float(), **tol["grad"], msg=lambda m: f"{name}: {m}")
    return grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,lengths", CASES)
def test_forward_backward_against_reference(d, lengths, dtype):
    _check(d, lengths, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,lengths", CASES)
def test_linear_bias_against_reference(d, lengths, dtype):
    """The bias of the Linear layer that made h, added in the kernel, its gradient summed there: in h's dtype,
    and an fp32 bias beside 16-bit h as autocast gives (the model's case)."""
    _check(d, lengths, dtype, bias_dtype=dtype)
    if dtype != torch.float32:
        _check(d, lengths, torch.float32, h_dtype=dtype, mod_dtype=dtype, out_dtype=dtype, tol_dtype=dtype,
               bias_dtype=torch.float32)


def test_bias_gradient_is_dh_summed():
    """dbias is the column sum of dh, whatever the outputs used, with one output alone included."""
    for use in (("x_new", "y"), ("y",), ("x_new",)):
        grads = _check(100, [31, 2, 1, 33], torch.float32, use=use, bias_dtype=torch.float32)
        torch.testing.assert_close(grads[5], grads[1].sum(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("det", [False, True])
def test_bias_gradient_owns_its_storage(compiled, det, monkeypatch):
    """The fp32 bias's .grad is D floats of its own, not a view into the backward's per-sample sums buffer (which
    it would keep alive, 4 N D floats an op, until the next zero_grad), eager, compiled and deterministic."""
    from kernels import _common

    monkeypatch.setattr(_common, "FORCE_DETERMINISTIC", det)
    x, h, gate, shift, scale, seg, bias = _inputs(72, [3, 1, 34], torch.float32, bias_dtype=torch.float32)
    bias.requires_grad_()
    f = gated_residual_ln_modulate
    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    x_new, y = f(x.requires_grad_(), h, gate, shift, scale, seg, bias=bias)
    (x_new.sum() + y.square().sum()).backward()
    torch._dynamo.reset()
    assert bias.grad.untyped_storage().nbytes() == 72 * 4


@pytest.mark.parametrize("rows", [2, 4])
def test_several_rows_per_forward_program(rows, monkeypatch):
    """The forward's rows-per-program launch parameter (timed by bench/kernels.py), with a partial last tile."""
    monkeypatch.setattr(gated_residual, "FWD_ROWS", rows)
    _check(100, [3, 1, 7], torch.float32)
    _check(100, [3, 1, 7], torch.float32, bias_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stages,warps", [(1, 4), (2, 4), (1, 8), (3, 8)])
def test_backward_pipeline_depths_and_warps(stages, warps, dtype, monkeypatch):
    """The backward's row loop at other depths of software pipelining (3 by default; on a GPU the next rows'
    loads go through shared memory) and warps (4 by default; at 8 pipelined programs get a register cap):
    launch parameters timed by bench/kernels.py; runs of samples crossing the programs."""
    monkeypatch.setattr(gated_residual, "BWD_STAGES", stages)
    monkeypatch.setattr(gated_residual, "BWD_WARPS", warps)
    _check(1152 if DEVICE == "cuda" else 100, [31, 2, 1, 33], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,lengths", SPLIT_CASES)
def test_backward_in_two_column_blocks(d, lengths, dtype, monkeypatch):
    """The backward's row as two power-of-two column blocks (``SPLIT_CASES``; a launch parameter timed by
    bench/kernels.py), with both outputs used and with each alone, and equal to the one-block result up to
    the order of the row sums."""
    one_block = _check(d, lengths, dtype, bias_dtype=dtype)
    monkeypatch.setattr(gated_residual, "BWD_SPLIT_COLUMNS", True)
    for got, want, name in zip(_check(d, lengths, dtype, bias_dtype=dtype), one_block, NAMES):
        torch.testing.assert_close(got, want, **TOL[dtype]["grad"], msg=lambda m: f"{name}: {m}")
    _check(d, lengths, dtype, use=("y",))
    _check(d, lengths, dtype, use=("x_new",))
    monkeypatch.setattr(gated_residual, "BWD_PROGRAMS", 4)  # registers capped for 4 programs an SM (GPU only)
    _check(d, lengths, dtype)


def test_lengths_cross_the_backward_rows():
    assert BWD_ROWS == 32  # CASES' counts are chosen around this boundary
    _check(100, [31, 2, 1, 33], torch.float32)


def test_fewer_backward_rows_a_program(monkeypatch):
    """8 rows a program, as ``rows_per_program`` picks for small batches on a GPU."""
    monkeypatch.setattr(gated_residual, "rows_per_program", lambda num_rows, device, most: 8)
    _check(100, [7, 2, 1, 9], torch.float32, bias_dtype=torch.float32)


def test_rows_of_variance_near_eps():
    """x_new rows whose variance is about eps (1e-6), and a constant one: eps inside the square root, forward
    and backward (see test_ln_modulate's test of the same name)."""
    x, h, gate, shift, scale, seg, _ = _inputs(100, [3, 4], torch.float32)
    x, h = 0.5 + 4e-4 * x, 2e-4 * h  # x_new's spread about 1e-3
    x[2], h[2] = 0.25, 0.0
    leaves, ref_leaves = _leaves((x, h, gate, shift, scale)), _leaves((x, h, gate, shift, scale))
    x_new, y = gated_residual_ln_modulate(*leaves, seg)
    x_new_ref, y_ref = gated_residual_ln_modulate_reference(*ref_leaves, seg)
    assert torch.equal(x_new, x_new_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-3)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy)
    for name, gk, gr in zip(NAMES, grads, ref_grads):  # dx and dh about 1000 dy here
        torch.testing.assert_close(gk, gr, atol=1e-3 * gr.abs().max().item(), rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_mixed_dtypes():
    """Residual stream fp32, branch output and modulation fp16 (autocast), y in fp16."""
    _check(72, [4, 1, 35], torch.float32, h_dtype=torch.float16, mod_dtype=torch.float16, out_dtype=torch.float16,
           tol_dtype=torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_y_used(dtype):
    """x_new unused downstream: its gradient arrives as None; dx still carries the LayerNorm's gradient."""
    _check(100, [3, 34, 1], dtype, use=("y",))


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_x_new_used(dtype):
    """y unused: its gradient arrives as None; dshift and dscale are exactly zero."""
    grads = _check(72, [5, 1, 33], dtype, use=("x_new",))
    assert (grads[3] == 0).all() and (grads[4] == 0).all()


@pytest.mark.parametrize("with_bias", [False, True])
def test_bwd_op_without_gradients(with_bias):
    x, h, gate, shift, scale, seg, bias = _inputs(72, [3, 1, 34], torch.float32,
                                                  bias_dtype=torch.float32 if with_bias else None)
    x_new, y, mean, rstd = _fwd(x, h, gate, shift, scale, seg, bias, 1e-6, None)  # the backward takes x, not x_new
    dy = torch.randn_like(y)
    dxn = torch.randn_like(x_new)
    saved = (x, h, gate, scale, seg, mean, rstd, bias)
    full = _bwd(dxn, dy, *saved)
    no_dxn = _bwd(None, dy, *saved)
    zero_dxn = _bwd(torch.zeros_like(dxn), dy, *saved)
    no_dy = _bwd(dxn, None, *saved)
    zero_dy = _bwd(dxn, torch.zeros_like(dy), *saved)
    assert full[2].shape == (3, 3, 72) and full[3].shape == ((72,) if with_bias else (0,))
    for a, b in zip(no_dxn, zero_dxn):
        torch.testing.assert_close(a, b)
    for a, b in zip(no_dy, zero_dy):
        torch.testing.assert_close(a, b)
    # linearity in the two cotangents (the op returns dx, dh, the stacked dgate, dshift, dscale and dbias)
    for name, f, a, b in zip(("dx", "dh", "per-sample sums", "dbias"), full, no_dxn, no_dy):
        torch.testing.assert_close(f, a + b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_backward_keeps_the_input_not_x_new():
    """x (kept by the op before anyway) and h are saved, x_new and y are not: the backward recomputes x_new."""
    x, h, gate, shift, scale, seg, _ = _inputs(72, [3, 1, 34], torch.float32)
    x, h = x.requires_grad_(), h.requires_grad_()
    (x_new, y), saved = saved_storages(lambda: gated_residual_ln_modulate(x, h, gate, shift, scale, seg))
    assert x.untyped_storage().data_ptr() in saved and h.untyped_storage().data_ptr() in saved
    assert x_new.untyped_storage().data_ptr() not in saved and y.untyped_storage().data_ptr() not in saved


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    x, h, gate, shift, scale, seg, bias = _inputs(40, [3, 2], torch.float32,
                                                  bias_dtype=torch.float32 if with_bias else None)
    if with_bias:
        bias.requires_grad_()
    args = (x.requires_grad_(), h.requires_grad_(), gate, shift, scale, seg, bias, 1e-6, None)
    torch.library.opcheck(_fwd, args)
    x_new, y, mean, rstd = _fwd(*args)
    saved = (x.detach(), h.detach(), gate, scale, seg, mean, rstd, None if bias is None else bias.detach())
    torch.library.opcheck(_bwd, (torch.randn_like(x_new), torch.randn_like(y), *saved))
    torch.library.opcheck(_bwd, (None, torch.randn_like(y), *saved))
    torch.library.opcheck(_bwd, (torch.randn_like(x_new), None, *saved))


def test_bad_inputs_are_named():
    x, h, gate, shift, scale, seg, bias = _inputs(40, [3, 2], torch.float32, bias_dtype=torch.float32)
    f = gated_residual_ln_modulate
    with pytest.raises(ValueError, match="x must have dtype"):
        f(x.double(), h, gate, shift, scale, seg)
    with pytest.raises(ValueError, match="x must be 2-D"):
        f(x[None], h, gate, shift, scale, seg)
    with pytest.raises(ValueError, match="h must have dtype"):
        f(x, h.to(torch.int32), gate, shift, scale, seg)
    with pytest.raises(ValueError, match="h must have shape"):
        f(x, h[:-1], gate, shift, scale, seg)
    with pytest.raises(ValueError, match="gate must have shape"):
        f(x, h, gate[:, :7], shift, scale, seg)
    with pytest.raises(ValueError, match="gate must have dtype"):
        f(x, h, gate.double(), shift, scale, seg)
    with pytest.raises(ValueError, match="gate, shift, scale must have one row per sample, the same number each, "
                                         "got gate 2, shift 1, scale 2"):
        f(x, h, gate, shift[:1], scale, seg)
    if seg.device.type == "cpu":  # (values read on the host only: no sync on CUDA)
        with pytest.raises(ValueError, match=r"seg must be in \[0, 2\) .* got values in \[0, 5\]"):
            f(x, h, gate, shift, scale, torch.cat([seg[:-1], seg.new_tensor([5])]))
    with pytest.raises(ValueError, match="scale must have shape"):
        f(x, h, gate, shift, scale[:, :-1], seg)
    with pytest.raises(ValueError, match="seg must have dtype"):
        f(x, h, gate, shift, scale, seg.long())
    with pytest.raises(ValueError, match="seg must have shape"):
        f(x, h, gate, shift, scale, seg[:-1])
    with pytest.raises(ValueError, match="x must have unit stride"):
        f(x.t().contiguous().t(), h, gate, shift, scale, seg)
    with pytest.raises(ValueError, match="h must have unit stride"):
        f(x, h.t().contiguous().t(), gate, shift, scale, seg)
    with pytest.raises(ValueError, match="gate must have unit stride"):
        f(x, h, gate.t().contiguous().t(), shift, scale, seg)
    with pytest.raises(ValueError, match="h must be on"):
        f(x, h.to("meta"), gate, shift, scale, seg)
    with pytest.raises(ValueError, match="gate must be on"):
        f(x, h, gate.to("meta"), shift, scale, seg)
    with pytest.raises(ValueError, match="shift must be on"):
        f(x, h, gate, shift.to("meta"), scale, seg)
    with pytest.raises(ValueError, match="scale must be on"):
        f(x, h, gate, shift, scale.to("meta"), seg)
    with pytest.raises(ValueError, match="seg must be on"):
        f(x, h, gate, shift, scale, seg.to("meta"))
    with pytest.raises(ValueError, match="out_dtype"):
        f(x, h, gate, shift, scale, seg, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"bias must have shape \(40\), got \(39,\)"):
        f(x, h, gate, shift, scale, seg, bias=bias[:-1])
    with pytest.raises(ValueError, match="bias must have dtype"):
        f(x, h, gate, shift, scale, seg, bias=bias.double())
    with pytest.raises(ValueError, match="bias must be contiguous"):
        f(x, h, gate, shift, scale, seg, bias=torch.stack([bias, bias], 1)[:, 0])
    with pytest.raises(ValueError, match="bias must be on"):
        f(x, h, gate, shift, scale, seg, bias=bias.to("meta"))
