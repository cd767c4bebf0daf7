import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels on the CPU; must be set before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the cores shared among pytest-xdist's workers (`make test` runs two), so that they do not oversubscribe them
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (the official init zeroes the adaLN and output layers,
    which would hide bugs behind exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def saved_storages(fn, describe=lambda t: t.untyped_storage().nbytes()):
    """``fn()``'s result and the storages autograd saves for the backward while it runs:
    {data_ptr: describe(a tensor saved in it)}, by default {data_ptr: bytes}."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = describe(t)
        return t.detach()  # (returning a saved output itself would make a reference cycle through its grad_fn)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.fixture
def small_attention_tiles(monkeypatch):
    """The Triton attention kernel on blocks of 16 (fp16/bf16 and fp32 inputs alike) for the interpreter, whose
    time grows with the tiles (the networks here have 8 or 16 tokens a sample); left as they are on CUDA."""
    if torch.cuda.is_available():
        return
    import kernels.attention as attention_kernels

    for name in ("FWD_BLOCK_M", "FWD_BLOCK_N", "BWD_BLOCK_N", "BWD_BLOCK_M", "BWD_BLOCK_M_MULTI"):
        monkeypatch.setattr(attention_kernels, name, 16)
    monkeypatch.setattr(attention_kernels, "FP32_FWD", (16, 16, 4))
    monkeypatch.setattr(attention_kernels, "FP32_BWD", (16, 16, 4))
