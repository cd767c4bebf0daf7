"""bench/attention.py: attention per SDPA backend at the training step's shapes (CPU: a smoke run), and its
rows of the Triton kernel (CUDA only there; their adapters and launch settings checked here in the interpreter)."""

import pytest
import torch

import kernels.attention as kernel_module
from bench import attention
from bench.common import module_constants


def test_shapes_are_the_xl2_step_layers():
    enc, dec, dit = attention.shapes(256, 32)
    assert (enc["seq"], enc["heads"], enc["head_dim"], enc["layers"]) == (128, 16, 72, 28)
    assert (dec["seq"], dec["head_dim"]) == (256, dec["head_dim"]) and dec["heads"] * dec["head_dim"] == 512
    assert (dit["seq"], dit["head_dim"], dit["layers"]) == (256, 72, 28)


def test_backends_agree_and_rows_are_written(tmp_path):
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    fns = attention.backends(cuda=False)
    torch.testing.assert_close(fns["math"](q, k, v), fns["default"](q, k, v))
    rows = attention.main(["--batch", "1", "--input-size", "4", "--out", str(tmp_path)])
    # the encoder's and DiT's head dim 72 also zero-padded to 80, 96 and 128
    assert len(rows) == 3 * (len(fns) + 1) + 2 * 3 and not any("error" in r for r in rows)
    assert [r["layout"] for r in rows[:len(fns) + 1]] == ["packed"] * len(fns) + ["contiguous"]
    assert [r["padded_head_dim"] for r in rows if r["name"] == "DiT-XL/2"][-3:] == [80, 96, 128]
    assert all(r["fwd_bwd_ms"] > 0 and r["step_ms"] > 0 for r in rows)
    assert "| MaskDiT-XL/2 encoder | 1 x 16 x 2 x 72 | math |" in (tmp_path / "attention.md").read_text()


def test_zero_padded_heads_give_the_same_attention():
    """The padded rows' premise: heads zero-padded from 72 to 80 values, scaled by 72 ** -0.5, give the same
    output in their first 72 values and zeros after them."""
    q, k, v = (torch.randn(2, 3, 5, 72, dtype=torch.float64) for _ in range(3))
    pad = [torch.nn.functional.pad(t, (0, 8)) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*pad, scale=72 ** -0.5)
    torch.testing.assert_close(out[..., :72], torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert not out[..., 72:].any()


# the Triton rows' CPU checks need the interpreter (conftest sets it without CUDA; on CUDA the bench runs them)
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the Triton interpreter")


def _sdpa_reference(qkv, batch):
    """SDPA's output (B, heads, S, head_dim) in fp32 math for the bench's views of ``qkv``, and the fp32 leaf."""
    qkv = qkv.detach().float().requires_grad_()
    t, _, h, d = qkv.shape
    q, k, v = (x.view(batch, t // batch, h, d).transpose(1, 2) for x in qkv.unbind(1))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out, qkv


@interpreted
@pytest.mark.parametrize("name,seq,head_dim", [("MaskDiT-XL/2 encoder", 80, 72), ("MaskDiT-XL/2 decoder", 136, 32)])
def test_triton_rows_match_sdpa_at_every_sweep_setting(name, seq, head_dim):
    """The Triton rows' adapters give SDPA's output and gradients (``triton_flash`` on the bench's views;
    ``triton_qkv`` with the bias gradient the column sums of the packed one) at the kernel's launch parameters
    and at each of the shape's ``SWEEP`` settings: one-program samples (80 keys) and longer ones (136).  fp16
    inputs, as the bench's bf16 (the interpreter gets bf16 wrong; fp32 inputs take their own tiles, FP32_*)."""
    batch, heads = 2, 1
    qkv = torch.randn(batch * seq, 3, heads, head_dim).half()
    grad = torch.randn(batch, heads, seq, head_dim).half()
    ref, ref_leaf = _sdpa_reference(qkv, batch)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, grad.float())
    tol = dict(atol=2e-2, rtol=2e-2)
    leaf = qkv.clone().requires_grad_()
    out = attention.triton_flash(*(x.view(batch, seq, heads, head_dim).transpose(1, 2) for x in leaf.unbind(1)))
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(torch.autograd.grad(out, leaf, grad)[0].float(), ref_grad, **tol)
    for settings in [{}] + attention.SWEEP[name]:
        with module_constants([kernel_module], **settings):
            leaf = qkv.clone().requires_grad_()
            bias = torch.zeros(3 * heads * head_dim, requires_grad=True)
            out = attention.triton_qkv(leaf, bias, batch)
            torch.testing.assert_close(out.float(), ref, **tol, msg=lambda m: f"{settings}: {m}")
            dqkv, dbias = torch.autograd.grad(out, (leaf, bias), grad)
            torch.testing.assert_close(dqkv.float(), ref_grad, **tol, msg=lambda m: f"{settings}: {m}")
            torch.testing.assert_close(dbias, ref_grad.sum(0).flatten(), atol=0.1, rtol=2e-2,
                                       msg=lambda m: f"{settings}: {m}")


@interpreted
def test_sweep_rows_name_their_settings_and_a_failing_one_gets_its_error(monkeypatch):
    """The sweep of a shape: the row at the kernel's launch parameters, then each ``SWEEP`` setting a row named
    by it (the kernel's constants set only around it); one that fails to build (a query step that is not a
    power of two) is a row with its error, and the sweep goes on.  (``bench_ms`` runs each function once: the
    interpreter is slow.)"""
    monkeypatch.setattr(attention, "bench_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setitem(attention.SWEEP, "MaskDiT-XL/2 decoder", [dict(BWD_BLOCK_M_MULTI=24), dict(FWD_WARPS=4)])
    defaults = {k: getattr(kernel_module, k) for k in ("BWD_BLOCK_M_MULTI", "FWD_WARPS")}
    shape = dict(name="MaskDiT-XL/2 decoder", batch=1, seq=136, heads=1, head_dim=32, layers=12)
    base, bad, good = attention.sweep_rows(shape, torch.device("cpu"), torch.float16)
    assert base["backend"] == attention.TRITON_QKV and base["launch"] == {} and "error" not in base
    assert bad["backend"] == attention.TRITON_QKV + ", BWD_BLOCK_M_MULTI=24" and "error" in bad
    assert good["backend"] == attention.TRITON_QKV + ", FWD_WARPS=4" and good["launch"] == dict(FWD_WARPS=4)
    assert "error" not in good and good["fwd_bwd_ms"] == 1.0
    assert {k: getattr(kernel_module, k) for k in defaults} == defaults
    row = attention.run_row(shape, "triton (kernels.flash_attention)", attention.triton_flash, "cpu", torch.float16)
    assert "error" not in row and row["layout"] == "packed"
    assert not list(attention.sweep_rows(dict(shape, name="DiT-XL/2"), "cpu", torch.float16))


def test_sweep_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("on CUDA it runs")
    with pytest.raises(SystemExit, match="needs CUDA"):
        attention.main(["--sweep"])
