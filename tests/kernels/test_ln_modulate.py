import importlib

import pytest
import torch

from kernels.ln_modulate import _bwd, _fwd, ln_modulate, ln_modulate_reference
from tests.kernels.conftest import DEVICE, DTYPES, TOL, segments

ln_modulate_module = importlib.import_module("kernels.ln_modulate")  # (the package's attribute is the function)

# (hidden size, per-sample token counts): non-powers of two, a 1-token sample, counts that cross the
# backward's 32-row programs, and an XL-width row.
CASES = [(72, [3, 1, 7, 5]), (100, [33, 1, 36]), (384, [2, 2]), (1152, [5])]
# widths the backward can take as two column blocks (64 + 16, 256 + 128; 1024 + 128 on CUDA, where it is cheap)
SPLIT_CASES = [(72, [31, 2, 1, 33]), (384, [3, 2])] + ([(1152, [2, 3])] if DEVICE == "cuda" else [])


def _inputs(d, lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, n = sum(lengths), len(lengths)
    x = (torch.randn(t, d, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    mod = (torch.randn(n, 6 * d, generator=g) * 0.5).to(DEVICE, dtype)  # shift/scale as chunks of a GEMM output
    shift, scale = mod[:, d:2 * d], mod[:, 4 * d:5 * d]
    return x, shift, scale, segments(lengths)


def test_eager_calls_skip_the_custom_op_layers():
    """Outside torch.compile the op runs as a plain autograd.Function (host time, bench/host_overhead.py);
    the custom op itself is what compiled code calls (test_opcheck, tests/test_backends.py)."""
    x, shift, scale, seg = _inputs(72, [3, 2], torch.float32)
    y = ln_modulate(x.requires_grad_(), shift, scale, seg)
    assert type(y.grad_fn).__name__ == "LnModulateBackward"


def test_fewer_backward_rows_a_program(monkeypatch):
    """8 rows a program, as ``rows_per_program`` picks for small batches on a GPU."""
    monkeypatch.setattr(ln_modulate_module, "rows_per_program", lambda num_rows, device, most: 8)
    test_forward_backward_against_reference(100, [7, 2, 1, 9], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stages,warps", [(1, 4), (2, 4), (1, 8), (3, 8)])
def test_backward_pipeline_depths_and_warps(stages, warps, dtype, monkeypatch):
    """The backward's row loop at other depths of software pipelining (3 by default; on a GPU the next rows'
    loads go through shared memory) and warps (4 by default; at 8 pipelined programs get a register cap):
    launch parameters timed by bench/kernels.py; runs of samples crossing the programs."""
    monkeypatch.setattr(ln_modulate_module, "BWD_STAGES", stages)
    monkeypatch.setattr(ln_modulate_module, "BWD_WARPS", warps)
    test_forward_backward_against_reference(1152 if DEVICE == "cuda" else 100, [31, 2, 1, 33], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,lengths", SPLIT_CASES)
def test_backward_in_two_column_blocks(d, lengths, dtype, monkeypatch):
    """The backward's row as two power-of-two column blocks (``SPLIT_CASES``; a launch parameter timed by
    bench/kernels.py), against the reference, and equal to the one-block result up to the order of the row
    sums."""
    x, shift, scale, seg = _inputs(d, lengths, dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale)]
        return torch.autograd.grad(ln_modulate(*leaves, seg), leaves, dy)

    one_block = grads()
    monkeypatch.setattr(ln_modulate_module, "BWD_SPLIT_COLUMNS", True)
    for got, want in zip(grads(), one_block):
        torch.testing.assert_close(got, want, **TOL[dtype]["grad"])
    test_forward_backward_against_reference(d, lengths, dtype)


@pytest.mark.parametrize("rows", [2, 4])
def test_several_rows_per_forward_program(rows, monkeypatch):
    """The forward's rows-per-program launch parameter (timed by bench/kernels.py), with a partial last tile."""
    monkeypatch.setattr(ln_modulate_module, "FWD_ROWS", rows)
    test_forward_backward_against_reference(100, [3, 1, 7], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,lengths", CASES)
def test_forward_backward_against_reference(d, lengths, dtype):
    x, shift, scale, seg = _inputs(d, lengths, dtype)
    tol = TOL[dtype]
    leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale)]
    y = ln_modulate(*leaves, seg)
    y_ref = ln_modulate_reference(*ref_leaves, seg)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **tol["fwd"])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy)
    for name, gk, gr in zip(("dx", "dshift", "dscale"), grads, ref_grads):
        assert torch.isfinite(gk).all(), name
        torch.testing.assert_close(gk.float(), gr.float(), **tol["grad"], msg=lambda m: f"{name}: {m}")


def test_large_mean_rows():
    """Rows whose mean is 1000 times their spread (a grown residual stream): the variance must not cancel
    (E[x^2] - E[x]^2 in fp32 would be off by several percent here)."""
    x, shift, scale, seg = _inputs(1152, [3, 2], torch.float32)
    x = x * 0.5 + 1000.0
    ref = ln_modulate_reference(x.double(), shift.double(), scale.double(), seg).float()
    torch.testing.assert_close(ln_modulate(x, shift, scale, seg), ref, atol=1e-3, rtol=1e-3)


def test_rows_of_variance_near_eps():
    """Rows whose variance is about eps (1e-6), and a constant row: eps must sit inside the square root, as in
    ``layer_norm`` (eps added elsewhere changes such rows by O(1) forward and backward, where wide rows hide it)."""
    x, shift, scale, seg = _inputs(100, [3, 4], torch.float32)
    x = 0.5 + 5e-4 * x  # spread 1e-3: variance 1e-6
    x[2] = 0.25
    leaves = [t.detach().clone().requires_grad_() for t in (x, shift, scale)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    y, y_ref = ln_modulate(*leaves, seg), ln_modulate_reference(*ref_leaves, seg)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-3, rtol=1e-3)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    for name, gk, gr in zip(("dx", "dshift", "dscale"), grads, ref_grads):  # dx about 1000 dy here
        torch.testing.assert_close(gk.double(), gr, atol=1e-3 * gr.abs().max().item(), rtol=1e-3,
                                   msg=lambda m: f"{name}: {m}")


def test_out_dtype():
    x, shift, scale, seg = _inputs(72, [4, 3], torch.float32)
    y = ln_modulate(x, shift.half(), scale.half(), seg, out_dtype=torch.float16)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, ln_modulate_reference(x, shift.half(), scale.half(), seg, out_dtype=torch.float16),
                               **TOL[torch.float16]["fwd"])


def test_opcheck():
    x, shift, scale, seg = _inputs(40, [3, 2], torch.float32)
    torch.library.opcheck(_fwd, (x.requires_grad_(), shift, scale, seg, 1e-6, None))
    y, mean, rstd = _fwd(x, shift, scale, seg, 1e-6, None)
    torch.library.opcheck(_bwd, (torch.randn_like(y), x.detach(), scale, seg, mean, rstd, 2))


def test_bad_inputs_are_named():
    x, shift, scale, seg = _inputs(40, [3, 2], torch.float32)
    with pytest.raises(ValueError, match="x must have dtype"):
        ln_modulate(x.double(), shift, scale, seg)
    with pytest.raises(ValueError, match="x must be 2-D"):
        ln_modulate(x[None], shift, scale, seg)
    with pytest.raises(ValueError, match="shift must have shape"):
        ln_modulate(x, shift[:, :7], scale, seg)
    with pytest.raises(ValueError, match="shift, scale must have one row per sample, the same number each, got "
                                         "shift 2, scale 1"):
        ln_modulate(x, shift, scale[:1], seg)
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        ln_modulate(x, shift, scale, seg, out_dtype=torch.int32)
    if seg.device.type == "cpu":  # (values read on the host only: no sync on CUDA)
        with pytest.raises(ValueError, match=r"seg must be in \[0, 2\) .* got values in \[-1, 1\]"):
            ln_modulate(x, shift, scale, torch.cat([seg[:-1], seg.new_tensor([-1])]))
    with pytest.raises(ValueError, match="seg must have dtype"):
        ln_modulate(x, shift, scale, seg.long())
    with pytest.raises(ValueError, match="seg must have shape"):
        ln_modulate(x, shift, scale, seg[:-1])
    with pytest.raises(ValueError, match="unit stride"):
        ln_modulate(x.t().contiguous().t(), shift, scale, seg)
    with pytest.raises(ValueError, match="must be on"):
        ln_modulate(x, shift.to("meta"), scale, seg)


def test_recompute_gives_the_forward_output_without_autograd():
    """What a backward uses to recompute a modulated output: the same values, no graph, eager and compiled."""
    from kernels.ln_modulate import ln_modulate_recompute

    x, shift, scale, seg = _inputs(100, [3, 34, 1], torch.float32)
    x.requires_grad_()
    y = ln_modulate(x, shift, scale, seg, out_dtype=torch.float16)
    again = ln_modulate_recompute(x, shift, scale, seg, out_dtype=torch.float16)
    assert again.grad_fn is None and again.dtype == torch.float16
    torch.testing.assert_close(again, y.detach(), atol=0, rtol=0)
    compiled = torch.compile(ln_modulate_recompute, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x.detach(), shift, scale, seg, out_dtype=torch.float16), y.detach(),
                               atol=0, rtol=0)
