"""The launchers' shared helpers: warps per program and the deterministic-mode alert."""

import pytest
import torch

from kernels._common import alert_nondeterministic, num_warps


def test_num_warps_one_per_256_values_between_4_and_8():
    assert [num_warps(n) for n in (16, 128, 512, 1024, 2048, 4096, 8192)] == [4, 4, 4, 4, 8, 8, 8]


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
