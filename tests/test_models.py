import copy
import math

import pytest
import torch

from bench.compute_table import DIT_PAPER_GMACS
from maskdit import MODEL_NAMES, create_model, random_mask
from maskdit.flops import count_parameters, forward_gmacs, train_gflops
from maskdit.masking import token_layout
from maskdit.models import sincos_pos_embed_2d, timestep_embedding
from tests.conftest import randomize, saved_storages


def tiny(name="MaskDiT-T/2", **kw):
    kw.setdefault("input_size", 8)
    kw.setdefault("in_channels", 3)
    kw.setdefault("num_classes", 5)
    return randomize(create_model(name, **kw))


def test_sincos_pos_embed_closed_form():
    d, g = 24, 5
    pe = sincos_pos_embed_2d(d, g)
    assert pe.shape == (g * g, d)
    q = d // 4
    for t in (0, 3, 7, 24):
        row, col = divmod(t, g)
        for k in range(q):
            w = 10000 ** (-k / q)
            assert pe[t, k].item() == pytest.approx(math.sin(col * w), abs=1e-6)
            assert pe[t, q + k].item() == pytest.approx(math.cos(col * w), abs=1e-6)
            assert pe[t, 2 * q + k].item() == pytest.approx(math.sin(row * w), abs=1e-6)
            assert pe[t, 3 * q + k].item() == pytest.approx(math.cos(row * w), abs=1e-6)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 0.37, -1.5])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    for n in range(3):
        expect = [math.cos(t[n].item() * f) for f in freqs] + [math.sin(t[n].item() * f) for f in freqs]
        assert emb[n].tolist() == pytest.approx(expect, abs=1e-6)


@pytest.mark.parametrize("name,kwargs,expected", [
    ("DiT-XL/2", dict(learn_sigma=True), 674_834_720),
    ("MaskDiT-XL/2", {}, 730_115_216),
    ("MaskDiT-XL/2", dict(null_class="learned"), 730_115_216 + 1152),
])
def test_parameter_counts_on_meta(name, kwargs, expected):
    assert count_parameters(name, **kwargs) == expected
    with torch.device("meta"):
        m = create_model(name, **kwargs)
    assert all(p.is_meta for p in m.parameters())


def test_official_block_parameter_counts():
    with torch.device("meta"):
        m = create_model("MaskDiT-XL/2")
    # the blocks' own parameters plus their rows of the batched adaLN Linear
    adaln = 6 * 1152 * (1152 + 1)
    assert sum(p.numel() for p in m.blocks.parameters()) + 28 * adaln == 669_344_256
    assert sum(p.numel() for p in m.decoder_blocks.parameters()) + 8 * 6 * 512 * (1152 + 1) == 53_538_816


def test_every_name_builds_on_meta():
    assert len(MODEL_NAMES) == 2 * 5 * 3
    with torch.device("meta"):
        for name in MODEL_NAMES:
            m = create_model(name)
            assert m.config.use_decoder == name.startswith("MaskDiT")


@pytest.mark.parametrize("bad", ["DiT-XXL/2", "MaskDiT-XL/3", "dit-XL/2", "", "ViT-B/16"])
def test_unknown_model_name(bad):
    with pytest.raises(ValueError, match="unknown model name"):
        create_model(bad)


def test_bad_overrides():
    with pytest.raises(ValueError, match="unknown model option"):
        create_model("DiT-S/2", hidden=3)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_model("DiT-S/4", input_size=30)


@pytest.mark.parametrize("key", sorted(DIT_PAPER_GMACS))
def test_gmacs_reproduce_the_dit_paper_within_half_a_percent(key):
    """The paper's models (learned sigma: 2C outputs) within 0.5%, or within the rounding of the paper's two
    printed decimals (S/8: 0.358 printed 0.36)."""
    name, input_size = key
    gmacs = forward_gmacs(name, input_size=input_size, learn_sigma=True)
    assert gmacs == pytest.approx(DIT_PAPER_GMACS[key], rel=0.005, abs=0.005)


def test_maskdit_compute_matches_the_paper():
    assert forward_gmacs("MaskDiT-XL/2", mask_ratio=0.5) == pytest.approx(65.5, rel=0.01)
    assert forward_gmacs("MaskDiT-XL/2", input_size=64, mask_ratio=0.5) == pytest.approx(280, rel=0.01)
    assert train_gflops("DiT-XL/2") == pytest.approx(712, rel=0.01)
    assert train_gflops("MaskDiT-XL/2", mask_ratio=0.5) == pytest.approx(393, rel=0.01)


@pytest.mark.parametrize("kernel", ["triton", "flex"])
def test_compute_counts_do_not_depend_on_the_attention_kernel(kernel):
    """Counted with SDPA whatever attention kernel a run chose (neither runs on the meta device)."""
    from maskdit.attention import sdpa_backend

    expected = train_gflops("MaskDiT-S/2", mask_ratio=0.5)
    with sdpa_backend(kernel):
        assert train_gflops("MaskDiT-S/2", mask_ratio=0.5) == expected


def test_output_shapes_and_learn_sigma():
    x = torch.randn(2, 3, 8, 8)
    for name, kw, cout in [("DiT-T/2", {}, 3), ("DiT-T/2", dict(learn_sigma=True), 6), ("MaskDiT-T/4", {}, 3)]:
        m = tiny(name, **kw)
        out = m(x, torch.randn(2), torch.tensor([0, 5]))
        assert out.shape == (2, cout, 8, 8)
        assert torch.isfinite(out).all()


def test_encoder_sees_only_kept_tokens():
    """Changing the input at masked positions does not change the output at all."""
    m = tiny()
    n, p = 3, 2
    x = torch.randn(n, 3, 8, 8)
    t, y = torch.randn(n), torch.tensor([1, 2, 5])
    mk = random_mask(n, 16, 0.5, generator=torch.Generator().manual_seed(1))
    out = m(x, t, y, mk.ids_keep)
    pix_mask = mk.mask.reshape(n, 4, 4).repeat_interleave(p, 1).repeat_interleave(p, 2)  # (N, H, W)
    x2 = torch.where(pix_mask[:, None], torch.randn_like(x) * 10, x)
    assert not torch.equal(x, x2)
    assert torch.equal(m(x2, t, y, mk.ids_keep), out)
    # ...while changing a kept position does change it
    x3 = torch.where(~pix_mask[:, None], x + 1, x)
    assert not torch.allclose(m(x3, t, y, mk.ids_keep), out)


def test_mask_token_appears_exactly_at_masked_positions():
    m = tiny()
    captured = {}

    def grab(module, args):
        captured["x"] = args[0]

    m.decoder_blocks[0].register_forward_pre_hook(grab)
    n = 2
    mk = random_mask(n, 16, 0.75, generator=torch.Generator().manual_seed(3))
    m(torch.randn(n, 3, 8, 8), torch.randn(n), torch.tensor([0, 1]), mk.ids_keep)
    dec_in = captured["x"].view(n, 16, -1) - m.decoder_pos_embed  # (N, L, Dd)
    is_mask_token = (dec_in - m.mask_token).abs().amax(-1) < 1e-6
    assert torch.equal(is_mask_token, mk.mask)


def test_without_a_learnable_mask_token_the_decoder_gets_zeros():
    """learn_mask_token=False (the official MaskDiT trained without MAE): no mask-token parameter and nothing
    saved for it; the masked positions get zeros, i.e. the outputs and gradients of a model whose learnable
    token is zero, with the same other weights."""
    m = tiny(learn_mask_token=False)
    assert "mask_token" not in dict(m.named_parameters()) and "mask_token" not in m.state_dict()
    ref = create_model("MaskDiT-T/2", input_size=8, in_channels=3, num_classes=5)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters()) - ref.mask_token.numel()
    missing = ref.load_state_dict(m.state_dict(), strict=False).missing_keys
    assert missing == ["mask_token"]
    with torch.no_grad():
        ref.mask_token.zero_()
    x, t, y = torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([0, 4])
    ids = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(1)).ids_keep
    out, out_ref = m(x, t, y, ids), ref(x, t, y, ids)
    torch.testing.assert_close(out, out_ref, atol=0, rtol=0)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k].grad, atol=0, rtol=0, msg=lambda msg: f"{k}: {msg}")
    with pytest.raises(ValueError, match="learn_mask_token must be a bool"):
        create_model("MaskDiT-T/2", learn_mask_token="no")


def test_masked_forward_with_all_tokens_equals_unmasked():
    m = tiny()
    x, t, y = torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([0, 4])
    ids_all = torch.stack([torch.randperm(16), torch.randperm(16)])
    torch.testing.assert_close(m(x, t, y, ids_all), m(x, t, y), rtol=1e-5, atol=1e-5)


def test_dit_with_mask_outputs_zero_at_masked_tokens():
    m = tiny("DiT-T/2")
    mk = random_mask(2, 16, 0.5)
    out = m(torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([0, 4]), mk.ids_keep)
    pix_mask = mk.mask.reshape(2, 4, 4).repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert (out.permute(1, 0, 2, 3)[:, pix_mask] == 0).all()
    assert (out.permute(1, 0, 2, 3)[:, ~pix_mask] != 0).all()


def test_null_class_embeddings():
    zero = tiny("MaskDiT-T/2")
    assert zero.y_embedder.embedding_table.weight.shape[0] == 5
    assert torch.equal(zero.y_embedder(torch.tensor([5, 5])), torch.zeros(2, 192))
    learned = tiny("DiT-T/2")
    assert learned.y_embedder.embedding_table.weight.shape[0] == 6
    assert torch.equal(learned.y_embedder(torch.tensor([5])), learned.y_embedder.embedding_table.weight[5:6])


def test_bad_forward_inputs_are_named():
    m = tiny()
    x, t, y = torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 3, 8, 9), t, y)
    with pytest.raises(ValueError, match="noise_labels"):
        m(x, torch.randn(3), y)
    with pytest.raises(ValueError, match="class_labels"):
        m(x, t, y.float())
    with pytest.raises(ValueError, match="ids_keep"):
        m(x, t, y, torch.zeros(2, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be float32 as the parameters .* got torch.float16"):
        m(x.half(), t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x.bfloat16(), t, y).dtype == torch.bfloat16  # autocast takes any float input
    with pytest.raises(ValueError, match=r"ids_keep must hold distinct token indices per sample, token 3 of sample 1"):
        m(x, t, y, torch.tensor([[0, 1, 2], [3, 5, 3]]))
    with pytest.raises(ValueError, match="distinct token indices"):
        m(x, t, y, [torch.tensor([0, 1]), torch.tensor([4, 4, 2])])
    with pytest.raises(ValueError, match=r"TokenLayout of 3 samples of 16 tokens, expected 2 of 16"):
        m(x, t, y, token_layout(random_mask(3, 16, 0.5).ids_keep, 3, 16, "cpu"))
    with pytest.raises(ValueError, match=r"parameters must be float32 .* got torch.bfloat16"):
        copy.deepcopy(m).bfloat16()(x.bfloat16(), t, y)
    with pytest.raises(ValueError, match="class_labels must be None for an unconditional network"):
        tiny(num_classes=0)(x, t, y)
    tiny(num_classes=0)(x, t, None)


def test_gradients_reach_every_parameter():
    m = tiny()
    mk = random_mask(4, 16, 0.5)
    m(torch.randn(4, 3, 8, 8), torch.randn(4), torch.tensor([0, 1, 2, 3]), mk.ids_keep).square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_official_init_zeroes_output():
    m = create_model("MaskDiT-T/2", input_size=8, in_channels=3, num_classes=5)
    out = m(torch.randn(2, 3, 8, 8), torch.randn(2), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros_like(out))
    assert m.mask_token.std() > 0


def test_official_init_of_every_parameter():
    """As the official code: the adaLN, bridge and output Linears zero; the mask token, the class table and the
    timestep MLP N(0, 0.02); every other Linear xavier-uniform (std sqrt(2 / (fan_in + fan_out))) with zero bias."""
    torch.manual_seed(0)
    m = create_model("MaskDiT-S/2", input_size=8, in_channels=4, num_classes=1000)
    normal = {"mask_token": m.mask_token, "y_embedder": m.y_embedder.embedding_table.weight,
              "t_embedder.mlp.0": m.t_embedder.mlp[0].weight, "t_embedder.mlp.2": m.t_embedder.mlp[2].weight}
    for name, w in normal.items():
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002, name
    zero = {"adaLN_modulation": m.adaLN_modulation, "decoder_layer": m.decoder_layer, "final_layer": m.final_layer}
    for name, layer in zero.items():
        assert not layer.weight.any() and not layer.bias.any(), name
    special = {id(p) for p in normal.values()} | {id(layer.weight) for layer in zero.values()}
    linears = [(name, layer) for name, layer in m.named_modules() if isinstance(layer, torch.nn.Linear)]
    assert len(linears) == 2 + 1 + 12 * 4 + 1 + 1 + 8 * 4 + 1  # t MLP, patches, blocks, adaLN, bridge, decoder, out
    for name, layer in linears:
        assert not layer.bias.any(), name
        if id(layer.weight) not in special:
            bound = math.sqrt(6 / sum(layer.weight.shape))
            assert layer.weight.abs().max() <= bound, name
            assert abs(layer.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.1, name


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("amp", [False, True])
def test_mlp_recomputes_gelu_same_gradients_less_memory(amp, compiled):
    """Eager, and compiled with Inductor's partitioner (which would keep a plain recomputed GELU's output)."""
    from maskdit.backends import get_ops
    from maskdit.models import Mlp

    torch.manual_seed(0)
    torch._dynamo.reset()
    mlp, ops = Mlp(72, 288), get_ops("torch", torch.device("cpu"))
    x = torch.randn(50, 72, requires_grad=True)
    dout = torch.randn(50, 72)

    def plain():  # what autograd would do with Linear - GELU - Linear
        return mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))

    def recomputing():
        return mlp(x, ops)

    results = []
    for fn in (plain, recomputing):
        if compiled:
            fn = torch.compile(fn, backend="aot_eager_decomp_partition", fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out, saved = saved_storages(fn)
        nbytes = sum(saved.values())
        grads = torch.autograd.grad(out, [x, *mlp.parameters()], dout.to(out.dtype))
        results.append((out, grads, nbytes))
    (out_p, grads_p, bytes_p), (out_m, grads_m, bytes_m) = results
    assert out_m.dtype == out_p.dtype == (torch.bfloat16 if amp else torch.float32)
    torch.testing.assert_close(out_m, out_p, atol=0, rtol=0)
    tol = dict(atol=1e-2, rtol=1e-2) if amp else dict(atol=1e-5, rtol=1e-5)
    for name, g_m, g_p in zip(["x", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], grads_m, grads_p):
        assert g_m.dtype == g_p.dtype, name
        torch.testing.assert_close(g_m, g_p, **tol, msg=name)
    hidden_bytes = 50 * 288 * (2 if amp else 4)
    assert bytes_p - bytes_m == hidden_bytes  # exactly the GELU output is no longer kept
    torch._dynamo.reset()


def test_gelu_op_of_the_mlp_backward():
    from maskdit.backends import _gelu_tanh

    a = torch.randn(7, 33)
    torch.testing.assert_close(_gelu_tanh(a), torch.nn.functional.gelu(a, approximate="tanh"), atol=0, rtol=0)
    torch.library.opcheck(_gelu_tanh, (a,))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_activation_checkpointing_same_gradients_less_held_memory(backend):
    from bench.activation_memory import held_bytes

    base = randomize(create_model("MaskDiT-T/2", input_size=8, backend=backend))
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 5, 1000])
    ids = random_mask(3, 16, 0.5).ids_keep
    results = {}
    for which in ("none", "decoder", "all"):
        model = copy.deepcopy(base).set_activation_checkpointing(which)
        out = model(x, t, y, ids)
        out.square().sum().backward()
        results[which] = (out.detach(), [p.grad for p in model.parameters()])
        if backend == "torch":  # (counting the triton backend would run its kernels in the slow interpreter)
            results[which] += (held_bytes(model, 3, 0.5),)
    for which in ("decoder", "all"):
        torch.testing.assert_close(results[which][0], results["none"][0], atol=0, rtol=0)
        for g, g0 in zip(results[which][1], results["none"][1]):  # fp32, summed in another order (triton's
            # checkpointed blocks run without the recomputing Functions): a few ulps of the largest gradient
            torch.testing.assert_close(g, g0, atol=2e-6 * g0.abs().max().item(), rtol=1e-6)
    if backend == "torch":
        assert results["all"][2] < results["decoder"][2] < results["none"][2]
    with pytest.raises(ValueError, match="activation checkpointing must be one of"):
        create_model("DiT-T/2").set_activation_checkpointing("decoder")


def test_out_of_range_labels_and_token_ids_are_refused():
    """Host tensors are checked (device ones would cost a sync every call): a label above num_classes (the null
    class) or below 0, a token index outside [0, L)."""
    model = create_model("MaskDiT-T/2", input_size=8, in_channels=1, num_classes=10)
    x, t = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 10\] .* got values in \[0, 11\]"):
        model(x, t, torch.tensor([11, 0]))
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 10\] .* got values in \[-1, 3\]"):
        model(x, t, torch.tensor([-1, 3]))
    model(x, t, torch.tensor([10, 9]))  # the null class is a label
    with pytest.raises(ValueError, match=r"ids_keep must hold token indices in \[0, 16\), got values in \[0, 99\]"):
        model(x, t, torch.tensor([1, 2]), torch.tensor([[0, 99], [1, 2]]))
    with pytest.raises(ValueError, match=r"ids_keep must hold token indices in \[0, 16\)"):
        model(x, t, torch.tensor([1, 2]), [torch.tensor([0, 1]), torch.tensor([-3])])


def test_per_sample_token_counts_give_the_same_gradients_run_to_run():
    """With unequal token counts the per-sample (N, D) adaLN vectors are broadcast to rows: their backward sums
    each sample's rows in a fixed order (``v[seg]``'s backward on the CPU added them with atomics, differing by
    up to 1e-5 between identical calls with two threads) and matches the float64 sums."""
    from maskdit import ops

    g = torch.Generator().manual_seed(0)
    n, d, L = 64, 96, 256
    ids = [torch.randperm(L, generator=g)[:int(torch.randint(20, L, (1,), generator=g))] for _ in range(n)]
    layout = token_layout(ids, n, L, "cpu")
    x, h = torch.randn(2, layout.ids.numel(), d, generator=g)
    shift, scale, gate = torch.randn(3, n, d, generator=g).unbind(0)
    grad = torch.randn(x.shape, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(8):
            vs = [v.clone().requires_grad_() for v in (shift, scale, gate)]
            out = ops.ln_modulate(ops.gated_residual(x, vs[2], h, layout), vs[0], vs[1], layout)
            grads.append(torch.autograd.grad(out, vs, grad))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    seg = layout.seg.long()
    expected_dshift = torch.zeros(n, d, dtype=torch.float64).index_add_(0, seg, grad.double())
    torch.testing.assert_close(grads[0][0].double(), expected_dshift, rtol=0, atol=1e-4)
