"""The deterministic backward paths (``torch.use_deterministic_algorithms(True)`` on CUDA): per-sample sums
without atomic adds, against the references and bitwise equal from run to run.  ``FORCE_DETERMINISTIC``
takes these paths on any device (on CUDA the run-to-run check is the real one)."""

import importlib

import pytest
import torch

import kernels
from kernels import _common
from tests.kernels.conftest import DEVICE, DTYPES, TOL, segments

LENGTHS = [5, 40, 1, 33]  # runs that cross the backward's 32-row programs, a 1-token sample
D = 72


def _rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()


def _ops(dtype):
    g = torch.Generator().manual_seed(0)
    n, t = len(LENGTHS), sum(LENGTHS)
    seg = segments(LENGTHS)
    x, h = _rand(g, t, D, dtype=dtype), _rand(g, t, D, dtype=dtype)
    gate, shift, scale = (_rand(g, n, D, dtype=dtype) for _ in range(3))
    bias = _rand(g, D, dtype=dtype)  # (the triton backend's Linear layers leave theirs to the op)
    ids = torch.cat([torch.randperm(48, generator=g)[:k] for k in LENGTHS]).to(DEVICE)  # L = 48 tokens a sample
    mask_token, pos = _rand(g, D, dtype=dtype), torch.randn(48, D, generator=g).to(DEVICE, dtype)
    return {
        "ln_modulate": ((x, shift, scale), lambda f: f(x, shift, scale, seg)),
        "gated_residual_ln_modulate": ((x, h, gate, shift, scale, bias),
                                       lambda f: f(x, h, gate, shift, scale, seg, bias=bias)),
        "insert_mask_tokens": ((x, mask_token), lambda f: f(x, ids, seg, mask_token, pos, n)),
    }


def _grads(fn, leaves):
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(1)
    douts = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    return torch.autograd.grad(outs, leaves, douts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["ln_modulate", "gated_residual_ln_modulate", "insert_mask_tokens"])
def test_deterministic_backward_matches_reference_and_repeats_exactly(op, dtype, monkeypatch, deterministic_mode):
    leaves, call = _ops(dtype)[op]
    fused, reference = getattr(kernels, op), getattr(kernels, op + "_reference")
    expected = _grads(lambda: call(reference), leaves)
    atomic = _grads(lambda: call(fused), leaves)
    monkeypatch.setattr(_common, "FORCE_DETERMINISTIC", True)  # the path itself, on the CPU too
    torch.use_deterministic_algorithms(True)  # what selects it on CUDA, and makes index_add_ deterministic there
    first, second = _grads(lambda: call(fused), leaves), _grads(lambda: call(fused), leaves)
    for got, want, fast, again in zip(first, expected, atomic, second):
        torch.testing.assert_close(got, want, **TOL[dtype]["grad"])
        torch.testing.assert_close(got, fast, **TOL[dtype]["grad"])
        assert torch.equal(got, again)


@pytest.mark.parametrize("op,module", [("ln_modulate", "ln_modulate"),
                                       ("gated_residual_ln_modulate", "gated_residual")])
def test_deterministic_backward_in_two_column_blocks(op, module, monkeypatch, deterministic_mode):
    """The deterministic path with the backward's row in two column blocks (64 + 16 at D 72)."""
    monkeypatch.setattr(importlib.import_module(f"kernels.{module}"), "BWD_SPLIT_COLUMNS", True)
    leaves, call = _ops(torch.float32)[op]
    fused, reference = getattr(kernels, op), getattr(kernels, op + "_reference")
    expected = _grads(lambda: call(reference), leaves)
    monkeypatch.setattr(_common, "FORCE_DETERMINISTIC", True)
    torch.use_deterministic_algorithms(True)
    first, second = _grads(lambda: call(fused), leaves), _grads(lambda: call(fused), leaves)
    for got, want, again in zip(first, expected, second):
        torch.testing.assert_close(got, want, **TOL[torch.float32]["grad"])
        assert torch.equal(got, again)


@pytest.mark.parametrize("op", ["ln_modulate", "gated_residual_ln_modulate"])
def test_interleaved_samples_atomic_only(op, monkeypatch, deterministic_mode):
    """Tokens of different samples interleaved (``seg`` decreasing here and there): the atomic backward sums
    each sample's runs right; the deterministic one, whose partial-sum rows need the samples in order (as the
    packed layout has them), refuses them with a ValueError instead of mixing samples' sums."""
    g = torch.Generator().manual_seed(2)
    n, t = len(LENGTHS), sum(LENGTHS)
    seg = segments(LENGTHS)[torch.randperm(t, generator=g).to(DEVICE)]
    x, h = _rand(g, t, D), _rand(g, t, D)
    gate, shift, scale = (_rand(g, n, D) for _ in range(3))
    leaves, call = {"ln_modulate": ((x, shift, scale), lambda f: f(x, shift, scale, seg)),
                    "gated_residual_ln_modulate": ((x, h, gate, shift, scale),
                                                   lambda f: f(x, h, gate, shift, scale, seg))}[op]
    fused, reference = getattr(kernels, op), getattr(kernels, op + "_reference")
    for got, want in zip(_grads(lambda: call(fused), leaves), _grads(lambda: call(reference), leaves)):
        torch.testing.assert_close(got, want, **TOL[torch.float32]["grad"])
    monkeypatch.setattr(_common, "FORCE_DETERMINISTIC", True)
    torch.use_deterministic_algorithms(True)
    with pytest.raises(ValueError, match="seg must not decrease in deterministic mode"):
        _grads(lambda: call(fused), leaves)
