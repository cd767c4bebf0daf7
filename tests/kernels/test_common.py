"""The launchers' shared helpers: warps and rows per program, and the deterministic-mode alert."""

import pytest
import torch

from kernels import _common
from kernels._common import alert_nondeterministic, backward_options, column_blocks, num_warps, rows_per_program


def test_num_warps_one_per_256_values_between_4_and_8():
    assert [num_warps(n) for n in (16, 128, 512, 1024, 2048, 4096, 8192)] == [4, 4, 4, 4, 8, 8, 8]


@pytest.mark.parametrize("n,split", [(1152, (1024, 128)), (384, (256, 128)), (72, (64, 16)), (4608, (4096, 512)),
                                     (512, (512, 0)), (100, (128, 0)), (1000, (1024, 0)), (16, (16, 0)), (1, (16, 0))])
def test_column_blocks_split_only_where_they_cover_fewer_columns(n, split):
    """Two blocks where the largest power of two plus a block for the rest is smaller than one block (not at
    D 100: 64 + 64 = 128); one block without ``split``; the blocks always cover the row."""
    assert column_blocks(n, True) == dict(BLOCK_A=split[0], BLOCK_B=split[1])
    assert column_blocks(n, False) == dict(BLOCK_A=max(16, 1 << (n - 1).bit_length()), BLOCK_B=0)
    assert sum(split) >= n


def test_backward_options_cap_registers_for_the_programs_an_sm_only_when_pipelined():
    assert backward_options(4, 1) == dict(num_warps=4) and backward_options(8, 1) == dict(num_warps=8)
    assert backward_options(4, 3) == dict(num_warps=4)  # two programs of 4 warps: 256 registers, no cap
    assert backward_options(8, 3) == dict(num_warps=8, maxnreg=128)
    assert backward_options(4, 3, programs=4) == dict(num_warps=4, maxnreg=128)


def test_rows_per_program_halves_until_four_programs_per_multiprocessor(monkeypatch):
    monkeypatch.setattr(_common, "_multiprocessors", lambda index: 132)  # an H100/H200
    gpu = torch.device("cuda", 0)
    # MaskDiT-XL/2 encoder tokens at batch 256 and 32, decoder tokens at batch 32, a tiny batch
    assert [rows_per_program(t, gpu, 32) for t in (32768, 4096, 8192, 100)] == [32, 8, 8, 8]
    assert rows_per_program(20000, gpu, 32) == 32 and rows_per_program(16000, gpu, 32) == 16
    assert rows_per_program(65536, gpu, 64) == 64 and rows_per_program(8192, gpu, 64) == 8
    assert rows_per_program(100, torch.device("cpu"), 32) == 32  # the interpreter: no change


def test_atomic_backward_alerts_only_in_deterministic_mode_on_cuda(deterministic_mode):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    alert_nondeterministic("maskdit::op backward", cuda)  # mode off: nothing
    torch.use_deterministic_algorithms(True)
    alert_nondeterministic("maskdit::op backward", cpu)  # the interpreter adds in program order
    with pytest.raises(RuntimeError, match="maskdit::op backward has no deterministic CUDA implementation.*"
                                           "backend='torch'"):
        alert_nondeterministic("maskdit::op backward", cuda)
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="maskdit::op backward"):
        alert_nondeterministic("maskdit::op backward", cuda)


def test_double_backward_through_a_kernel_is_refused():
    """create_graph=True through a fused op: its gradients are not differentiable, so a higher-order gradient
    would silently miss terms; refused.  First-order gradients, with create_graph or not, are unaffected."""
    from kernels import ln_modulate
    from tests.kernels.conftest import DEVICE, segments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 17, generator=g).to(DEVICE).requires_grad_()
    shift, scale = (torch.randn(2, 17, generator=g).to(DEVICE) for _ in range(2))
    seg = segments([2, 3])
    with pytest.raises(RuntimeError, match="LnModulate: the fused kernels have no double backward"):
        torch.autograd.grad(ln_modulate(x, shift, scale, seg).square().sum(), x, create_graph=True)
    (dx,) = torch.autograd.grad(ln_modulate(x, shift, scale, seg).square().sum(), x)
    assert torch.isfinite(dx).all() and bool(dx.abs().sum() > 0)
