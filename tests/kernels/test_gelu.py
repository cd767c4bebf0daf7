import pytest
import torch

from kernels import _common
from kernels import gelu as gelu_module
from kernels.gelu import _op, gelu_tanh_grad, gelu_tanh_grad_reference
from tests.kernels.conftest import DEVICE, DTYPES, TOL

# (rows T, columns H): a single row, rows that are not a multiple of the 16-row tile, row counts crossing the
# 256-row programs, column counts that are not powers of two or cross the 256-column blocks (MLP widths
# 4 * 72 and 4 * 100), and an XL decoder width.
CASES = [(1, 64), (37, 100), (300, 288), (517, 400), (20, 2048)]


def _inputs(t, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(t, h, generator=g) * 3).to(DEVICE, dtype)  # +-9: both tails of the tanh
    dh = torch.randn(t, h, generator=g).to(DEVICE, dtype)
    return a, dh


def _check(a, dh, dtype):
    g, da, dbias = gelu_tanh_grad(a, dh)
    g_ref, da_ref, _ = gelu_tanh_grad_reference(a.float(), dh.float())
    tol = TOL[dtype]["fwd"]
    assert g.dtype == da.dtype == a.dtype and dbias.dtype == torch.float32 and dbias.shape == (a.shape[1],)
    torch.testing.assert_close(g.float(), g_ref, **tol)
    torch.testing.assert_close(da.float(), da_ref, **tol)
    # the bias gradient: the fp32 sums of da as returned
    torch.testing.assert_close(dbias, da.float().sum(0), atol=1e-4, rtol=1e-5)
    return g, da, dbias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", CASES)
def test_against_reference(t, h, dtype):
    _check(*_inputs(t, h, dtype), dtype)


def test_fp32_close_to_float64_math():
    """In fp32 the kernel is within a few ulp of the float64 formulas, tails included (|a| up to 9), where
    PyTorch's own fp32 1 + tanh(z) cancels."""
    a, dh = _inputs(64, 96, torch.float32)
    g, da, dbias = gelu_tanh_grad(a, dh)
    g64, da64, dbias64 = gelu_tanh_grad_reference(a.double(), dh.double())
    torch.testing.assert_close(g, g64.float(), atol=1e-6, rtol=2e-6)
    torch.testing.assert_close(da, da64.float(), atol=1e-6, rtol=2e-6)
    torch.testing.assert_close(dbias, dbias64.float(), atol=1e-5, rtol=1e-6)


def test_row_strided_inputs():
    """a and dh as column slices of wider tensors (row stride != H)."""
    a, dh = _inputs(40, 160, torch.float32)
    a_wide, dh_wide = torch.randn(40, 200, device=DEVICE), torch.randn(40, 170, device=DEVICE)
    a_wide[:, 20:180], dh_wide[:, 5:165] = a, dh
    _check(a_wide[:, 20:180], dh_wide[:, 5:165], torch.float32)


@pytest.mark.parametrize("stages", [1, 2])  # (3 by default)
def test_pipeline_depths(stages, monkeypatch):
    monkeypatch.setattr(gelu_module, "BWD_STAGES", stages)
    _check(*_inputs(300, 288, torch.float32), torch.float32)


def test_fewer_rows_a_program(monkeypatch):
    monkeypatch.setattr(gelu_module, "ROWS", 32)
    _check(*_inputs(100, 300, torch.float32), torch.float32)


def test_deterministic_mode_sums_in_order(monkeypatch):
    monkeypatch.setattr(_common, "FORCE_DETERMINISTIC", True)
    monkeypatch.setattr(gelu_module, "ROWS", 32)
    a, dh = _inputs(100, 300, torch.float32)
    first = _check(a, dh, torch.float32)[2]
    assert torch.equal(first, gelu_tanh_grad(a, dh)[2])


def test_no_rows():
    a = torch.empty(0, 48, device=DEVICE)
    g, da, dbias = gelu_tanh_grad(a, a)
    assert g.shape == da.shape == (0, 48) and torch.equal(dbias, torch.zeros(48, device=DEVICE))


def test_opcheck():
    torch.library.opcheck(_op, _inputs(37, 100, torch.float32))


def test_bad_inputs_are_named():
    a, dh = _inputs(8, 32, torch.float32)
    cases = [
        ("a must have dtype", (a.double(), dh)),
        ("a must be 2-D", (a[None], dh)),
        ("dh must have shape", (a, dh[:, :16])),
        ("dh must have dtype", (a, dh.half())),
        ("a must have unit stride", (a.t(), dh.t())),
    ]
    for msg, args in cases:
        with pytest.raises(ValueError, match=msg):
            gelu_tanh_grad(*args)
