import pytest
import torch

from kernels import _common
from kernels import bias as bias_module
from kernels.bias import _op, bias_grad, bias_grad_reference
from tests.kernels.conftest import DEVICE, DTYPES

# (rows T, columns D): a single row, rows that are not a multiple of the 16-row tile, row counts crossing the
# 256-row programs, column counts that are not powers of two or cross the 256-column blocks, an XL width
CASES = [(1, 64), (37, 100), (300, 288), (517, 400), (20, 1152)]


def _dy(t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, d, generator=g) + 0.5).to(DEVICE, dtype)  # not zero-mean: sums grow with T


def _check(dy):
    out = bias_grad(dy)
    assert out.dtype == torch.float32 and out.shape == (dy.shape[1],)
    # against float64 sums of the values as stored: only fp32 accumulation differs
    ref = dy.double().sum(0)
    torch.testing.assert_close(out.double(), ref, atol=1e-4 * max(1.0, dy.shape[0] ** 0.5), rtol=1e-5)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d", CASES)
def test_against_reference(t, d, dtype):
    out = _check(_dy(t, d, dtype))
    torch.testing.assert_close(out, bias_grad_reference(_dy(t, d, dtype)), atol=1e-3, rtol=1e-5)


def test_row_strided_input():
    """dy as a column slice of a wider tensor (row stride != D)."""
    wide = _dy(40, 200, torch.float32)
    _check(wide[:, 30:190])


def test_transposed_and_expanded_inputs():
    """Output gradients autograd may pass: a transposed view, and an expanded one (stride 0, as from .sum())."""
    _check(_dy(120, 40, torch.float32).t())
    ones = torch.ones((), device=DEVICE).expand(300, 72)
    assert ones.stride() == (0, 0)
    torch.testing.assert_close(bias_grad(ones), torch.full((72,), 300.0, device=DEVICE), atol=0, rtol=0)


@pytest.mark.parametrize("stages", [1, 2])
def test_pipeline_depths(stages, monkeypatch):
    monkeypatch.setattr(bias_module, "BWD_STAGES", stages)
    _check(_dy(300, 288, torch.float32))


def test_fewer_rows_a_program(monkeypatch):
    monkeypatch.setattr(bias_module, "ROWS", 32)
    _check(_dy(100, 300, torch.float32))


def test_deterministic_mode_sums_in_order(monkeypatch):
    monkeypatch.setattr(_common, "FORCE_DETERMINISTIC", True)
    monkeypatch.setattr(bias_module, "ROWS", 32)
    dy = _dy(100, 300, torch.float32)
    assert torch.equal(_check(dy), bias_grad(dy))


def test_no_rows():
    assert torch.equal(bias_grad(torch.empty(0, 48, device=DEVICE)), torch.zeros(48, device=DEVICE))


def test_opcheck():
    torch.library.opcheck(_op, (_dy(37, 100, torch.float32),))


def test_bad_inputs_are_named():
    dy = _dy(8, 32, torch.float32)
    for msg, arg in [("dy must have dtype", dy.double()), ("dy must be 2-D", dy[None]),
                     ("dy must be a torch.Tensor", dy.tolist())]:
        with pytest.raises(ValueError, match=msg):
            bias_grad(arg)
