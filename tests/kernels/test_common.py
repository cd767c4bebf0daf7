"""The launchers' shared helpers: warps and rows per program, and the deterministic-mode alert."""

import pytest
import torch

from kernels import _common
from kernels._common import alert_nondeterministic, num_warps, rows_per_program


def test_num_warps_one_per_256_values_between_4_and_8():
    assert [num_warps(n) for n in (16, 128, 512, 1024, 2048, 4096, 8192)] == [4, 4, 4, 4, 8, 8, 8]


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
