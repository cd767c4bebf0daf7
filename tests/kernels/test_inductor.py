"""kernels.inductor: the custom ops' Inductor fallbacks registered up front, so that Inductor never creates one
itself (on torch < 2.13 that path formats the inputs' whole IR: exponential in a deep graph)."""

import pytest
import torch

import kernels
from kernels import inductor
from kernels.unmask import insert_mask_tokens_reference
from tests.kernels.conftest import DEVICE, segments


def test_custom_ops_lists_every_op():
    ops = {str(op) for op in inductor.custom_ops()}
    assert len(ops) >= 19 and all(name.startswith("maskdit.") for name in ops)
    for name in ("insert_mask_tokens_fwd", "insert_mask_tokens_bwd", "edm_loss_fwd", "ln_modulate_fwd",
                 "gated_residual_ln_modulate_bwd", "bias_grad", "attention_fwd"):
        assert f"maskdit.{name}.default" in ops
    assert inductor.custom_ops("no_such_namespace") == []


@pytest.mark.parametrize("version,expected", [("2.11.0+cu130", (2, 11)), ("2.13.0+cpu", (2, 13)),
                                              ("2.12.1", (2, 12)), ("2.14.0a0+git1234", (2, 14))])
def test_torch_version(monkeypatch, version, expected):
    monkeypatch.setattr(torch, "__version__", version)
    assert inductor.torch_version() == expected


def test_registered_only_on_torch_before_2_13(monkeypatch):
    calls = []
    monkeypatch.setattr(inductor, "register_fallbacks", lambda: calls.append(1))
    for version, registered in (("2.11.0+cu130", 1), ("2.12.0", 2), ("2.13.0", 2), ("3.0.0", 2)):
        monkeypatch.setattr(torch, "__version__", version)
        inductor.register_fallbacks_if_needed()
        assert len(calls) == registered, version


def test_compiled_op_takes_the_registered_fallback(monkeypatch):
    """After ``register_fallbacks`` every op has a lowering, a second call registers nothing, and Inductor
    compiling a graph with a custom op first met after other extern kernels creates no fallback of its own;
    the compiled result is the eager one."""
    import torch._inductor.graph as graph
    from torch._inductor.lowering import lowerings

    inductor.register_fallbacks()
    assert all(op in lowerings for op in inductor.custom_ops())
    assert inductor.register_fallbacks() == 0
    created = []
    original = graph.make_fallback
    monkeypatch.setattr(graph, "make_fallback", lambda op, *a, **k: (created.append(op), original(op, *a, **k))[1])

    g = torch.Generator().manual_seed(0)
    kept, L, d = [3, 1, 4], 6, 20
    ids = torch.cat([torch.randperm(L, generator=g)[:k] for k in kept]).to(DEVICE)
    seg = segments(kept)
    x, w = torch.randn(len(ids), d, generator=g).to(DEVICE), torch.randn(d, d, generator=g).to(DEVICE)
    mask_token, pos_embed = torch.randn(d, generator=g).to(DEVICE), torch.randn(L, d, generator=g).to(DEVICE)

    def decoder_input(x, w):  # the op's input made by a product (an extern kernel), as in the network
        return kernels.insert_mask_tokens((x @ w) @ w, ids, seg, mask_token, pos_embed, len(kept))

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph would skip the lowering
        out = torch.compile(decoder_input, backend="inductor", fullgraph=True)(x, w)
    torch.testing.assert_close(out, insert_mask_tokens_reference((x @ w) @ w, ids, seg, mask_token, pos_embed,
                                                                 len(kept)), atol=1e-4, rtol=1e-4)
    assert not [op for op in created if str(op).startswith("maskdit.")], created
