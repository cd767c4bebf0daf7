import pytest
import torch

from kernels import _common

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 only on CUDA: the Triton interpreter computes bf16 arithmetic wrongly.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (forward atol/rtol, gradient atol/rtol) per input dtype, kernel vs. its reference computed in fp32 math.
TOL = {
    torch.float32: dict(fwd=dict(atol=1e-5, rtol=1e-5), grad=dict(atol=1e-4, rtol=1e-4)),
    torch.float16: dict(fwd=dict(atol=2e-3, rtol=2e-3), grad=dict(atol=1e-2, rtol=1e-2)),
    torch.bfloat16: dict(fwd=dict(atol=2e-2, rtol=2e-2), grad=dict(atol=5e-2, rtol=5e-2)),
}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel forgets to write fails the test."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


@pytest.fixture
def deterministic_mode():
    """Restores torch's deterministic-algorithms setting after a test that changes it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def segments(lengths, device=DEVICE):
    """The token->sample map (int32) of samples with the given token counts, packed one after another."""
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                   torch.tensor(lengths)).to(device)
