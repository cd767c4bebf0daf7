"""The "triton" backend (fused kernels) against the "torch" backend (plain PyTorch), same weights.

On a CPU machine the kernels run under the Triton interpreter (TRITON_INTERPRET=1), so the networks
here are small; on CUDA the same tests run the compiled kernels.
"""

import os
import subprocess
import sys

import pytest
import torch

from maskdit import EDMLoss, EDMPrecond, create_model, random_mask
from tests.conftest import randomize, saved_storages

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=72, num_heads=3)


def pair(name, **kw):
    """The same randomly initialised network under both backends."""
    cfg = {**SMALL, **kw}
    if name.startswith("MaskDiT"):
        cfg.update(decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=4)
    ref = randomize(create_model(name, backend="torch", **cfg), std=0.1).to(DEVICE)
    fused = create_model(name, backend="triton", **cfg).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g).to(DEVICE)
    t = torch.randn(n, generator=g).to(DEVICE)
    y = torch.tensor([0, 4, 5][:n]).to(DEVICE)  # 5: the null class
    return x, t, y


def branch_value(out):
    """A branch output of the ops (``Mlp``, ``output_projection``) as the tensor it stands for: the triton
    backend's ``BranchOutput`` with its bias added (in the product's dtype, as the Linear's epilogue would)."""
    from maskdit.backends import BranchOutput

    return out.h + out.bias.to(out.h.dtype) if isinstance(out, BranchOutput) else out


def grads(model):
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name,kw", [("MaskDiT-T/2", {}), ("DiT-T/2", {}),
                                     ("MaskDiT-T/2", dict(learn_mask_token=False))],
                         ids=["MaskDiT", "DiT", "MaskDiT-zero-mask-token"])
@pytest.mark.parametrize("masked", [True, False])
def test_forward_and_parameter_gradients_match(name, kw, masked):
    """Outputs, without autograd too (sampling: the triton backend's branches take other code there), and every
    parameter gradient; also MaskDiT without a learnable mask token (zeros at the masked positions: the fused
    insertion gets a zero buffer that needs no gradient)."""
    ref, fused = pair(name, **kw)
    x, t, y = inputs()
    ids = random_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(1)).ids_keep.to(DEVICE) if masked else None
    out_ref, out_fused = ref(x, t, y, ids), fused(x, t, y, ids)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, y, ids), out_ref.detach(), atol=1e-4, rtol=1e-4)
    dout = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out_ref.backward(dout)
    out_fused.backward(dout)
    g_ref, g_fused = grads(ref), grads(fused)
    has_token = name.startswith("MaskDiT") and kw.get("learn_mask_token", True)
    assert g_ref.keys() == g_fused.keys() and ("mask_token" in g_ref) == has_token
    for k in g_ref:
        torch.testing.assert_close(g_fused[k], g_ref[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("masked", [True, False])
def test_fused_loss_and_gradients_match(masked):
    ref, fused = pair("MaskDiT-T/2")
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 8, 8, generator=g).to(DEVICE)
    sigma = torch.tensor([0.05, 0.8, 12.0]).to(DEVICE)
    noise = torch.randn(3, 3, 8, 8, generator=g).to(DEVICE)
    labels = torch.tensor([1, 2, 5]).to(DEVICE)
    ids = random_mask(3, 16, 0.5, generator=g).ids_keep.to(DEVICE) if masked else None
    loss_fn = EDMLoss()
    l_ref = loss_fn(EDMPrecond(ref), images, labels, ids, sigma=sigma, noise=noise)
    l_fused = loss_fn(EDMPrecond(fused), images, labels, ids, sigma=sigma, noise=noise)
    torch.testing.assert_close(l_fused, l_ref, atol=1e-5, rtol=1e-5)
    l_ref.sum().backward()
    l_fused.sum().backward()
    g_ref, g_fused = grads(ref), grads(fused)
    for k in g_ref:
        torch.testing.assert_close(g_fused[k], g_ref[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")


def test_backends_take_the_same_strided_inputs():
    """A sliced or channels_last input (the mean of stored VAE moments, a channels_last pipeline) and an
    (N, K) ``ids_keep`` on another device than x (random_mask's CPU default) run under both backends: the triton
    kernels' contiguous inputs are made there, not asked of the caller."""
    ref, fused = pair("MaskDiT-T/2")
    g = torch.Generator().manual_seed(4)
    moments = torch.randn(3, 6, 8, 8, generator=g).to(DEVICE)
    x, t, y = moments[:, :3], torch.randn(3, generator=g).to(DEVICE), torch.tensor([0, 4, 5]).to(DEVICE)
    ids = random_mask(3, 16, 0.5, generator=g).ids_keep  # on the CPU
    for xs in (x, x.contiguous(memory_format=torch.channels_last)):
        assert not xs.is_contiguous()
        torch.testing.assert_close(fused(xs, t, y, ids), ref(x.contiguous(), t, y, ids.to(DEVICE)),
                                   atol=1e-4, rtol=1e-4)
        sigma, noise = torch.tensor([0.1, 1.0, 9.0]).to(DEVICE), torch.randn(3, 3, 8, 8, generator=g).to(DEVICE)
        torch.testing.assert_close(EDMLoss()(EDMPrecond(fused), xs, y, ids, sigma=sigma, noise=noise),
                                   EDMLoss()(EDMPrecond(ref), x.contiguous(), y, ids, sigma=sigma, noise=noise),
                                   atol=1e-5, rtol=1e-5)


def test_double_backward_is_refused_by_the_triton_backend_only():
    """A gradient penalty (backward with create_graph=True) through the torch backend works (with SDPA's math
    attention); through the fused
    kernels, whose gradients are not differentiable, it is refused instead of silently losing terms."""
    ref, fused = pair("MaskDiT-T/2")
    x, t, y = inputs()
    x.requires_grad_()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # (the others' have no double backward)
        (gx,) = torch.autograd.grad(ref(x, t, y).square().sum(), x, create_graph=True)
        gx.square().sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(fused(x, t, y).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("function", ["_Linear", "_SplitQkv", "_MlpOnRecomputedLN"])
def test_triton_backend_functions_refuse_double_backward(function):
    from maskdit import backends

    g = torch.Generator().manual_seed(4)
    x, w, b, w2 = (torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in ((6, 8), (12, 8), (12,), (8, 12)))
    call = {"_Linear": lambda: backends._Linear.apply(x, w, b),
            "_SplitQkv": lambda: torch.stack(backends._SplitQkv.apply(x @ w.t(), b, 2)),
            "_MlpOnRecomputedLN": lambda: backends._MlpOnRecomputedLN.apply(x, w, b, w2)}[function]
    out = call()
    torch.autograd.grad(out.square().sum(), x)  # first order: fine
    with pytest.raises(RuntimeError, match=f"{function}: the fused kernels have no double backward"):
        torch.autograd.grad(call().square().sum(), x, create_graph=True)


def test_backends_share_state_dicts_and_auto_picks_by_device():
    ref, fused = pair("MaskDiT-T/2")
    assert ref.state_dict().keys() == fused.state_dict().keys()
    auto = create_model("MaskDiT-T/2", **SMALL)
    assert auto.backend == "auto"
    from maskdit.backends import get_ops
    assert get_ops("auto", torch.device("cpu")).name == "torch"
    assert get_ops("triton", torch.device("cpu")).name == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        create_model("MaskDiT-T/2", backend="cuda", **SMALL)


def test_triton_backend_without_triton_says_so(monkeypatch):
    """Where the kernels cannot be imported (no triton), asking for the triton ops names the missing package;
    the torch backend still works."""
    from maskdit.backends import get_ops

    monkeypatch.setitem(sys.modules, "kernels", None)  # makes `import kernels` raise ImportError
    with pytest.raises(RuntimeError, match="backend 'triton' needs the triton package"):
        get_ops("triton", torch.device("cpu"))
    assert get_ops("auto", torch.device("cpu")).name == "torch"


@pytest.mark.parametrize("keep_norm_outputs", [False, True])
def test_compile_fullgraph_triton_backend(keep_norm_outputs):
    """The custom ops trace without graph breaks (fullgraph=True); on CPU with a graph-only backend."""
    torch._dynamo.reset()
    _, fused = pair("MaskDiT-T/2")
    fused.set_keep_norm_outputs(keep_norm_outputs)
    x, t, y = inputs()
    ids = random_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(1)).ids_keep.to(DEVICE)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    out = compiled(x, t, y, ids)
    torch.testing.assert_close(out, fused(x, t, y, ids), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in fused.parameters())


_COMPILE_TWICE = """
import sys, torch
from maskdit import EDMLoss, EDMPrecond, create_model, random_mask
from maskdit.masking import token_layout
torch._dynamo.config.error_on_recompile = True  # a second compilation raises
model = create_model("MaskDiT-T/2", input_size=8, num_classes=4, hidden_size=24, num_heads=2, decoder_hidden_size=16,
                     decoder_num_heads=2, backend=sys.argv[1])
device = torch.device(sys.argv[2])
net, loss_fn = EDMPrecond(model.to(device)), EDMLoss()
step = torch.compile(lambda x, y, layout: loss_fn(net, x, y, layout).mean(), backend="eager")
for seed in range(3):  # new masks, noise and sigmas each step, as in training
    ids = random_mask(2, model.num_tokens, 0.5, generator=torch.Generator().manual_seed(seed)).ids_keep.to(device)
    layout = token_layout(ids, 2, model.num_tokens, device)
    step(torch.randn(2, 4, 8, 8, device=device), torch.tensor([1, 2], device=device), layout).backward()
"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_whole_network_compiles_once_in_a_fresh_process(backend):
    """A fresh process (nothing cached by earlier eager calls) compiles the training loss once over three steps:
    a cache that the first traced forward filled (the triton ops, built on first use) used to become a guard
    that the second step failed, compiling the whole network twice."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _COMPILE_TWICE, backend, DEVICE], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_linear_on_modulated_output_recomputes_instead_of_saving_it(residual, compiled):
    """Eager and under torch.compile (there the partitioner, not the Function, picks what is saved)."""
    from maskdit.backends import get_ops
    from maskdit.masking import token_layout

    ops = get_ops("triton", torch.device(DEVICE))
    layout = token_layout([torch.tensor([0, 2, 3]), torch.tensor([1, 3])], 2, 4, DEVICE)
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(shape, generator=g).to(DEVICE).requires_grad_() for shape in ((5, 72), (5, 72), (2, 72),
                                                                                       (2, 72), (2, 72))]
    layer = torch.nn.Linear(72, 40).to(DEVICE)
    dout = torch.randn(5, 40, generator=g).to(DEVICE)

    def run(through_ops):
        def forward(x, h, gate, shift, scale):
            if residual:
                _, y = ops.residual_ln_modulate(x, h, gate, shift, scale, layout)
            else:
                y = ops.ln_modulate(x, shift, scale, layout)
            return y.y, ops.linear(y, layer) if through_ops else layer(y.y)

        if compiled:
            torch._dynamo.reset()
            forward = torch.compile(forward, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
        (y, out), saved = saved_storages(lambda: forward(*leaves))
        params = [*leaves, layer.weight, layer.bias]
        return torch.autograd.grad(out, params, dout, allow_unused=True), y.untyped_storage().data_ptr() in saved

    (grads_saved, y_saved), (grads_recomputed, y_kept) = run(False), run(True)
    torch._dynamo.reset()
    assert y_saved and not y_kept
    for a, b in zip(grads_saved, grads_recomputed):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_regional_compilation_of_the_triton_backend_matches_eager_without_graph_breaks():
    import copy

    from torch._dynamo.utils import counters

    from maskdit.training import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    _, eager = pair("MaskDiT-T/2", depth=3)  # the triton one
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="aot_eager")
    x, t, y = inputs()
    ids = random_mask(3, 16, 0.5).ids_keep.to(DEVICE)
    out_e, out_c = eager(x, t, y, ids), compiled(x, t, y, ids)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, p_e), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


def test_checkpointing_compiled_whole_keeps_every_block_boundary():
    """Compiled whole with every block checkpointed, the forward saves each block's residual-stream input
    (the fused op's two outputs are copied at the boundary; without that the partitioner kept only the first
    block's input and the backward recomputed the whole chain at once)."""
    from maskdit.distributed import LossModule

    torch._dynamo.reset()
    _, model = pair("DiT-T/2", depth=3)
    model.set_activation_checkpointing("all")
    loss = torch.compile(LossModule(EDMPrecond(model), EDMLoss()), backend="aot_eager_decomp_partition")
    x, _, y = inputs()
    sigma, noise = torch.tensor([0.3, 1.0, 4.0]).to(DEVICE), torch.randn_like(x)
    residual_shape = (3 * model.num_tokens, model.config.hidden_size)
    out, saved = saved_storages(lambda: loss(x, y, None, sigma, noise), describe=lambda t: (tuple(t.shape), t.dtype))
    torch._dynamo.reset()
    assert list(saved.values()).count((residual_shape, torch.float32)) >= model.config.depth
    out.sum().backward()  # the same gradients as eager without checkpointing
    compiled_grads = grads(model)
    model.zero_grad()
    model.set_activation_checkpointing("none")
    LossModule(EDMPrecond(model), EDMLoss())(x, y, None, sigma, noise).sum().backward()
    for k, g in grads(model).items():
        torch.testing.assert_close(compiled_grads[k], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("compiled", [False, True])
def test_triton_mlp_keeps_neither_its_input_nor_the_gelu_output(compiled):
    """The triton backend's MLP on a modulated LayerNorm output (one Function, fused GELU backward) against
    Linear - GELU - Linear on that output: the same gradients, and it keeps neither the modulated output nor
    the GELU output (eager; compiled, the partitioner decides, given the Function's backward)."""
    from maskdit.backends import get_ops
    from maskdit.masking import token_layout
    from maskdit.models import Mlp

    ops = get_ops("triton", torch.device(DEVICE))
    layout = token_layout([torch.tensor([0, 2, 3]), torch.tensor([1, 3])], 2, 4, DEVICE)
    g = torch.Generator().manual_seed(0)
    # x, and shift / scale as chunks of one modulation tensor (as the adaLN GEMM gives them)
    leaves = [torch.randn(shape, generator=g).to(DEVICE).requires_grad_() for shape in ((5, 72), (2, 144))]
    mlp = randomize(Mlp(72, 100)).to(DEVICE)  # a hidden width that is not a power of two
    dout = torch.randn(5, 72, generator=g).to(DEVICE)

    def run(through_ops):
        def forward(x, mod):
            y = ops.ln_modulate(x, mod[:, :72], mod[:, 72:], layout)
            if through_ops:
                return y.y, branch_value(mlp(y, ops))
            return y.y, mlp.fc2(torch.nn.functional.gelu(mlp.fc1(y.y), approximate="tanh"))

        if compiled:
            torch._dynamo.reset()
            forward = torch.compile(forward, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
        (y, out), saved = saved_storages(lambda: forward(*leaves))
        grads = torch.autograd.grad(out, [*leaves, *mlp.parameters()], dout)
        return out, grads, y.untyped_storage().data_ptr() in saved, sum(saved.values())

    (out_p, grads_p, y_kept_p, bytes_p), (out_f, grads_f, y_kept_f, bytes_f) = run(False), run(True)
    torch._dynamo.reset()
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "mod", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], grads_p, grads_f):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert y_kept_p and not y_kept_f
    if not compiled:  # exactly the modulated output (5 x 72) and the GELU output (5 x 100), fp32
        assert bytes_p - bytes_f == (5 * 72 + 5 * 100) * 4


@pytest.mark.parametrize("compiled", [False, True])
def test_triton_mlp_with_the_gelu_in_the_gemm_epilogues(compiled, monkeypatch):
    """``kernels.gelu_gemm.FORWARD``, ``BACKWARD`` and ``INFERENCE``: the triton MLP under 16-bit autocast puts
    the GELU into its products' epilogues (both kernels run, eager and compiled, each under its own switch;
    without autograd the forward's alone, not writing the GELU input, under ``INFERENCE``) and gives what the
    unfused MLP gives, to the rounding of the products' summation order; operands the kernels cannot take
    (fp32, widths off the 16-byte grid) still take the unfused path."""
    import kernels
    from maskdit.backends import get_ops
    from maskdit.masking import token_layout
    from maskdit.models import Mlp

    if DEVICE == "cuda" and not kernels.gelu_gemm.fused_on(torch.device(DEVICE), torch.bfloat16):
        pytest.skip("kernels.gelu_gemm runs on Hopper GPUs only")
    ops = get_ops("triton", torch.device(DEVICE))
    layout = token_layout([torch.tensor([0, 2, 3]), torch.tensor([1, 3])], 2, 4, DEVICE)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    g = torch.Generator().manual_seed(0)
    x, mod = (torch.randn(shape, generator=g).to(DEVICE).requires_grad_() for shape in ((5, 72), (2, 144)))
    dout = torch.randn(5, 72, generator=g).to(DEVICE)
    calls, launch = [], kernels.gelu_gemm._launch  # (the launcher: runs outside the traced code when compiled)
    monkeypatch.setattr(kernels.gelu_gemm, "_launch",
                        lambda *args, **kw: calls.append((kw["backward"], kw.get("store_a", True)))
                        or launch(*args, **kw))

    def run(mlp, forward_fused, backward_fused=None, autocast=True, grad=True, inference_fused=None):
        monkeypatch.setattr(kernels.gelu_gemm, "FORWARD", forward_fused)
        monkeypatch.setattr(kernels.gelu_gemm, "BACKWARD", forward_fused if backward_fused is None else backward_fused)
        monkeypatch.setattr(kernels.gelu_gemm, "INFERENCE",
                            forward_fused if inference_fused is None else inference_fused)

        def forward(x, mod):
            with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
                return branch_value(mlp(ops.ln_modulate(x, mod[:, :72], mod[:, 72:], layout), ops))

        if compiled:
            torch._dynamo.reset()
            forward = torch.compile(forward, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
        out = forward(x, mod)
        if not grad:
            return out
        return out, torch.autograd.grad(out, [x, mod, *mlp.parameters()], dout.to(out.dtype))

    mlp = randomize(Mlp(72, 200), std=0.1).to(DEVICE)  # a hidden width that is not a power of two
    (out_u, grads_u), (out_f, grads_f) = run(mlp, False), run(mlp, True)
    assert calls == [(False, True), (True, True)]  # the forward's kernel, then the backward's
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out_f, out_u, **tol)
    for name, a, b in zip(["x", "mod", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], grads_u, grads_f):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # INFERENCE alone, then FORWARD and BACKWARD alone
        torch.testing.assert_close(run(mlp, False, grad=False, inference_fused=True), out_u, **tol)
        torch.testing.assert_close(run(mlp, True, grad=False, inference_fused=False), out_u, **tol)
    assert calls[2:] == [(False, False)]
    for forward_fused in (True, False):  # one direction fused, the other not
        out, grads = run(mlp, forward_fused, not forward_fused, inference_fused=True)
        torch.testing.assert_close(out, out_u, **tol)
        for a, b in zip(grads_u, grads):
            torch.testing.assert_close(b, a, **tol)
    assert calls[3:] == [(False, True), (True, True)]
    run(mlp, True, autocast=False)  # fp32
    run(randomize(Mlp(72, 100)).to(DEVICE), True)  # 100 fp16/bf16 values a row: 200 bytes
    monkeypatch.setattr(kernels.gelu_gemm, "fused_on", lambda device, dtype: False)  # as on a GPU other than Hopper
    with torch.no_grad():  # the op's unfused stand-in: eager, the MLP's own chain bit for bit
        out_i, out_n = run(mlp, False, grad=False, inference_fused=True), run(mlp, False, grad=False)
    if compiled:
        torch.testing.assert_close(out_i, out_n, **tol)
    else:
        assert torch.equal(out_i, out_n)
    torch._dynamo.reset()
    assert len(calls) == 5


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("projection", [False, True])
def test_triton_dense_matches_linear_and_saves_the_same(autocast, projection):
    """``ops.dense`` (the adaLN GEMM: a Linear whose bias gradient ``kernels.bias_grad`` sums) and
    ``ops.output_projection`` (the attention's, its bias left to the residual kernel: added here) against the
    Linear itself: the same output and gradients, also for an expanded output gradient (``out.sum()``), and the
    same saved bytes; under bf16 autocast the bias gradient is an fp32 sum, close to the Linear's."""
    from maskdit.backends import BranchOutput, get_ops

    ops = get_ops("triton", torch.device(DEVICE))
    layer = randomize(torch.nn.Linear(72, 100)).to(DEVICE)
    x = torch.randn(37, 72, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    tol = dict(atol=5e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)

    def run(fn):
        with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
            out, saved = saved_storages(lambda: fn(x))
        grads = torch.autograd.grad(out.float().sum(), [x, layer.weight, layer.bias])
        return out, grads, sum(saved.values())

    def through_ops(v):
        out = ops.output_projection(v, layer) if projection else ops.dense(v, layer)
        assert isinstance(out, BranchOutput) == projection and (not projection or out.bias is layer.bias)
        return branch_value(out)

    (out_r, grads_r, bytes_r), (out_f, grads_f, bytes_f) = run(layer), run(through_ops)
    torch.testing.assert_close(out_f, out_r, **tol)
    for name, a, b in zip(["x", "weight", "bias"], grads_r, grads_f):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{name}: {m}")
    assert bytes_f == bytes_r


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_gradient_in_the_weights_dtype(dtype):
    """``_weight_grad`` (the triton backend's Linear weight gradients): for 16-bit operands and an fp32 weight,
    on CUDA the fp32 product unrounded (within fp32 summation-order error, far inside the 16-bit rounding that a
    16-bit product and a cast would leave: checked against it); elsewhere the 16-bit product cast, bitwise
    what autocast's Linear and autograd's cast give.  Other weight dtypes get the product in their own."""
    from maskdit.backends import _weight_grad

    g = torch.Generator().manual_seed(0)
    dout, x = (torch.randn(300, n, generator=g).to(DEVICE, dtype) for n in (72, 100))
    got = _weight_grad(dout, x, torch.float32)
    exact = dout.float().t() @ x.float()
    rounded = (dout.t() @ x).float()
    assert got.dtype == torch.float32 and got.shape == (72, 100)
    if DEVICE == "cuda":
        torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-5)
        assert not torch.allclose(rounded, exact, atol=1e-4, rtol=1e-5)  # the check above can tell them apart
    else:
        assert torch.equal(got, rounded)
    same = _weight_grad(dout, x, dtype)
    assert same.dtype == dtype and torch.equal(same, dout.t() @ x)


@pytest.mark.parametrize("masked", [True, False])
def test_autocast_weight_gradients_are_fp32_and_match_the_torch_backend(masked):
    """MaskDiT under 16-bit autocast: every parameter gradient of the triton backend is fp32, close to the torch
    backend's (whose weight gradients are 16-bit products cast back), with no parameter left without one."""
    ref, fused = pair("MaskDiT-T/2")
    x, t, y = inputs()
    ids = random_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(1)).ids_keep.to(DEVICE) if masked else None
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    dout = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for model in (ref, fused):
        with torch.autocast(DEVICE, dtype=dtype):
            out = model(x, t, y, ids)
        out.float().backward(dout)
    g_ref, g_fused = grads(ref), grads(fused)
    for k, p in fused.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, k
        # 16-bit rounding in another order: up to about 0.2% of the largest gradient of a parameter (CPU, fp16;
        # an elementwise atol failed on AVX512 for a gradient of magnitude ~20), a wrong gradient is off by O(1)
        scale = g_ref[k].abs().max().item()
        torch.testing.assert_close(g_fused[k], g_ref[k], atol=1e-2 * scale, rtol=2e-2, msg=lambda m: f"{k}: {m}")


def test_keeping_the_norm_outputs_gives_the_same_gradients_for_exactly_their_bytes():
    """DiT.set_keep_norm_outputs: the triton backend's Linear Functions keep each block's two modulated
    LayerNorm outputs (qkv and fc1 inputs) instead of recomputing them: the same loss and gradients (the
    recomputation is the forward's kernel on the same input: bitwise), and exactly those outputs' bytes more
    saved (T tokens x D, 2 a block).  (The decoder bridge and the final layer keep their input y instead of the
    stack's last residual stream, which nothing else keeps: the same bytes in fp32, half under bf16.)"""
    _, fused = pair("MaskDiT-T/2")
    g = torch.Generator().manual_seed(3)
    images, noise = (torch.randn(3, 3, 8, 8, generator=g).to(DEVICE) for _ in range(2))
    sigma, labels = torch.tensor([0.05, 0.8, 12.0]).to(DEVICE), torch.tensor([1, 2, 5]).to(DEVICE)
    ids = random_mask(3, 16, 0.5, generator=g).ids_keep.to(DEVICE)

    def run(keep):
        fused.set_keep_norm_outputs(keep)
        fused.zero_grad(set_to_none=True)
        loss, saved = saved_storages(lambda: EDMLoss()(EDMPrecond(fused), images, labels, ids, sigma=sigma,
                                                       noise=noise))
        loss.sum().backward()
        return loss, grads(fused), sum(saved.values())

    (l_r, g_r, bytes_r), (l_k, g_k, bytes_k) = run(False), run(True)
    assert torch.equal(l_k, l_r)
    for k in g_r:
        torch.testing.assert_close(g_k[k], g_r[k], atol=0, rtol=0, msg=lambda m: f"{k}: {m}")
    cfg = fused.config
    enc_tokens, dec_tokens = 3 * 8, 3 * 16  # 8 of 16 tokens kept a sample; the decoder sees all
    expected = 2 * (cfg.depth * enc_tokens * cfg.hidden_size + cfg.decoder_depth * dec_tokens * cfg.decoder_hidden_size)
    assert bytes_k - bytes_r == expected * 4  # fp32
    with pytest.raises(ValueError, match="keep must be a bool"):
        fused.set_keep_norm_outputs("yes")


@pytest.mark.parametrize("compiled", [False, True])
def test_triton_qkv_sums_its_bias_gradient_with_the_stack(compiled, monkeypatch):
    """``ops.qkv``: q, k, v views of the packed projection whose backward stacks dq, dk, dv and sums the bias
    gradient in one pass (``kernels.stack_qkv_grad``, one call a projection; ``bias_grad`` never sees the
    stacked gradient): the same q, k, v and gradients as the torch backend's, eager and compiled (fullgraph)."""
    import kernels
    from maskdit.backends import get_ops
    from maskdit.masking import token_layout

    calls, widths = [], []
    if not compiled:  # (counting is a side effect compiled code may not have)
        stack, bias_grad = kernels.stack_qkv_grad, kernels.bias_grad
        monkeypatch.setattr(kernels, "stack_qkv_grad", lambda *g: calls.append(tuple(g[0].shape)) or stack(*g))
        monkeypatch.setattr(kernels, "bias_grad", lambda dy: widths.append(dy.shape[1]) or bias_grad(dy))
    g = torch.Generator().manual_seed(0)
    layer = randomize(torch.nn.Linear(72, 216)).to(DEVICE)
    x = torch.randn(10, 72, generator=g).to(DEVICE).requires_grad_()
    shift, scale = (torch.randn(2, 72, generator=g).to(DEVICE) * 0.3 for _ in range(2))
    layout = token_layout(torch.stack([torch.randperm(8, generator=g)[:5] for _ in range(2)]).to(DEVICE), 2, 8,
                          torch.device(DEVICE))

    def run(backend):
        ops = get_ops(backend, torch.device(DEVICE))

        def qkv(x):
            q, k, v = ops.qkv(ops.ln_modulate(x, shift, scale, layout), layer, 3)
            return torch.stack([q, k, v])

        out = (torch.compile(qkv, backend="aot_eager", fullgraph=True) if compiled else qkv)(x)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        return out, torch.autograd.grad((out * weights).sum(), [x, layer.weight, layer.bias])

    out_r, grads_r = run("torch")
    calls.clear()
    widths.clear()
    out_f, grads_f = run("triton")
    assert compiled or (calls == [(10, 72)] and 216 not in widths)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "weight", "bias"], grads_r, grads_f):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("ids_kind,compiled", [("uniform", False), ("all", False), ("mixed", False), ("mixed", True)])
def test_triton_attention_kernel_in_the_network(ids_kind, compiled, monkeypatch, small_attention_tiles):
    """With ``sdpa_backend("triton")`` the triton backend runs the Triton attention kernel through
    ``qkv_attention`` (the packed gradient and the qkv bias's sums from the kernel's backward: no
    ``stack_qkv_grad``, no ``bias_grad`` pass at a qkv width), on equal, mixed and all-token layouts, eager and
    compiled (fullgraph): the same output and parameter gradients as the torch backend on its default attention."""
    import kernels
    from maskdit.attention import sdpa_backend

    ref, fused = pair("MaskDiT-T/2")
    x, t, y = inputs()
    g = torch.Generator().manual_seed(1)
    ids = {"uniform": lambda: random_mask(3, 16, 0.5, generator=g).ids_keep.to(DEVICE),
           "mixed": lambda: [torch.randperm(16, generator=g)[:k].to(DEVICE) for k in (8, 3, 16)],
           "all": lambda: None}[ids_kind]()
    out_ref = ref(x, t, y, ids)
    dout = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out_ref.backward(dout)
    calls, widths = [], []
    if not compiled:  # (counting is a side effect compiled code may not have)
        qkv_attention, bias_grad = kernels.qkv_attention, kernels.bias_grad
        monkeypatch.setattr(kernels, "qkv_attention", lambda *a: calls.append(a[0].shape) or qkv_attention(*a))
        monkeypatch.setattr(kernels, "bias_grad", lambda dy: widths.append(dy.shape[1]) or bias_grad(dy))
        monkeypatch.setattr(kernels, "stack_qkv_grad", None)  # (not called)
    with sdpa_backend("triton"):
        out = (torch.compile(fused, fullgraph=True, backend="aot_eager") if compiled else fused)(x, t, y, ids)
        out.backward(dout)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    g_ref, g_fused = grads(ref), grads(fused)
    for k in g_ref:
        torch.testing.assert_close(g_fused[k], g_ref[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")
    assert compiled or (len(calls) == 3 and not {3 * 72, 3 * 32} & set(widths))


@pytest.mark.parametrize("parameterization,sampler", [("edm", "edm"), ("ddpm-eps", "edm"), ("ddpm-eps", "ddpm")])
def test_sampling_runs_on_the_networks_device(parameterization, sampler):
    """Both denoisers sample where their network is (DDPMPrecond's noise levels and step numbers too, DiT's sampler's
    coefficients), with guidance, and give the CPU's samples (fp32; TF32 off)."""
    from maskdit.ddpm import ddpm_sample
    from maskdit.edm import edm_sample, make_denoiser
    from maskdit.sampling import ImageNoise

    torch.manual_seed(0)
    model = randomize(create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=3, learn_sigma=True,
                                   backend="torch"), std=0.05)
    noise, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])

    def sample(net, noise, labels):
        if sampler == "ddpm":
            return ddpm_sample(net, noise, labels, num_steps=5, guided_channels=None,  # (1 channel: all)
                               randn_like=ImageNoise(0, torch.arange(2)).randn_like)
        return edm_sample(net, noise, labels, num_steps=3)

    on_cpu = sample(make_denoiser(model.eval(), parameterization), noise, labels)
    net = make_denoiser(model.to(DEVICE), parameterization)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_device = sample(net, noise.to(DEVICE), labels.to(DEVICE))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert on_device.device.type == DEVICE
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=1e-3, atol=1e-3)
