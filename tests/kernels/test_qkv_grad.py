import pytest
import torch

from kernels import _common
from kernels import qkv_grad as qkv_module
from kernels.qkv_grad import _op, stack_qkv_grad, stack_qkv_grad_reference
from tests.kernels.conftest import DEVICE, DTYPES

# (rows T, columns D of each of q, k, v): a single row, rows that are not a multiple of the 16-row tile, row
# counts crossing the 256-row programs, widths that are not powers of two or cross the 256-column blocks (so
# a block of k starts inside the columns of q's last block), an XL width
CASES = [(1, 64), (37, 100), (300, 288), (517, 72), (20, 1152)]


def _grads(t, d, dtype, seed=0):
    """dq, dk, dv as the attention's backward may give them: (T, D) views with row stride 3D of one tensor."""
    g = torch.Generator().manual_seed(seed)
    packed = (torch.randn(t, 3, d, generator=g) + 0.5).to(DEVICE, dtype)  # not zero-mean: sums grow with T
    return packed[:, 0], packed[:, 1], packed[:, 2]


def _check(dq, dk, dv):
    dqkv, dbias = stack_qkv_grad(dq, dk, dv)
    t, d = dq.shape
    assert dqkv.dtype == dq.dtype and dqkv.shape == (t, 3 * d) and dqkv.is_contiguous()
    assert dbias.dtype == torch.float32 and dbias.shape == (3 * d,)
    assert torch.equal(dqkv, torch.cat([dq, dk, dv], dim=1))  # a copy: exact
    # against float64 sums of the values as stored: only fp32 accumulation differs
    ref = dqkv.double().sum(0)
    torch.testing.assert_close(dbias.double(), ref, atol=1e-4 * max(1.0, t ** 0.5), rtol=1e-5)
    return dqkv, dbias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,d", CASES)
def test_against_reference(t, d, dtype):
    dqkv, dbias = _check(*_grads(t, d, dtype))
    ref_qkv, ref_bias = stack_qkv_grad_reference(*_grads(t, d, dtype))
    assert torch.equal(dqkv, ref_qkv)
    torch.testing.assert_close(dbias, ref_bias, atol=1e-3, rtol=1e-5)


def test_separate_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    _check(*(torch.randn(50, 72, generator=g).to(DEVICE) for _ in range(3)))


@pytest.mark.parametrize("block_d,rows,tile_rows,warps,stages", [(128, 32, 16, 4, 1), (512, 64, 8, 2, 2)])
def test_other_launch_parameters(monkeypatch, block_d, rows, tile_rows, warps, stages):
    """Its own launch parameters (read from kernels.qkv_grad at each call, as bench/kernels.py sets them)."""
    for name, value in dict(BLOCK_D=block_d, ROWS=rows, TILE_ROWS=tile_rows, NUM_WARPS=warps,
                            BWD_STAGES=stages).items():
        monkeypatch.setattr(qkv_module, name, value)
    _check(*_grads(100, 300, torch.float32))


def test_deterministic_mode_sums_in_order(monkeypatch):
    monkeypatch.setattr(_common, "FORCE_DETERMINISTIC", True)
    monkeypatch.setattr(qkv_module, "ROWS", 32)  # 4 row blocks of 100 rows, summed in order
    blocks, buffer = [], qkv_module.column_sums_buffer
    monkeypatch.setattr(qkv_module, "column_sums_buffer", lambda n, *a: blocks.append(n) or buffer(n, *a))
    grads = _grads(100, 300, torch.float32)
    assert torch.equal(_check(*grads)[1], stack_qkv_grad(*grads)[1])
    assert blocks == [4, 4]


def test_no_rows():
    empty = torch.empty(0, 48, device=DEVICE)
    dqkv, dbias = stack_qkv_grad(empty, empty, empty)
    assert dqkv.shape == (0, 144) and torch.equal(dbias, torch.zeros(144, device=DEVICE))


def test_opcheck():
    torch.library.opcheck(_op, _grads(37, 100, torch.float32))


def test_bad_inputs_are_named():
    dq, dk, dv = _grads(8, 32, torch.float32)
    for msg, args in [("dq must have dtype", (dq.double(), dk, dv)), ("dq must be 2-D", (dq[None], dk, dv)),
                      ("dk must have shape", (dq, dk[:4], dv)), ("dv must have dtype", (dq, dk, dv.half())),
                      ("dk must have unit stride", (dq, dk.t().contiguous().t(), dv))]:
        with pytest.raises(ValueError, match=msg):
            stack_qkv_grad(*args)
