"""Samples that keep different numbers of tokens: packed encoder, attention paths, per-sample loss."""

import pytest
import torch
import torch.nn.functional as F

from maskdit import EDMLoss, EDMPrecond, create_model, random_mask
from maskdit.attention import PATHS_USED, attention, choose_path, forced_path
from maskdit.masking import token_layout
from tests.conftest import randomize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(input_size=8, in_channels=3, num_classes=5, depth=2, hidden_size=72, num_heads=3,
             decoder_depth=1, decoder_hidden_size=32, decoder_num_heads=4)
L = 16


def mixed_ids(seed=0):
    """Per-sample kept tokens: 1 token, all 16, 7 and 12, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(L, generator=g)[:k].to(DEVICE) for k in (1, 16, 7, 12)]


def inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE),
            torch.tensor([0, 4, 5, 2][:n]).to(DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_batch_equals_each_sample_alone(backend):
    model = randomize(create_model("MaskDiT-T/2", backend=backend, **SMALL), std=0.1).to(DEVICE)
    x, t, y = inputs()
    ids = mixed_ids()
    out = model(x, t, y, ids)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (out * dout).sum().backward()
    batch_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    sum_grads = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        alone = model(x[i:i + 1], t[i:i + 1], y[i:i + 1], ids[i][None])
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-5, rtol=1e-4)
        (alone * dout[i:i + 1]).sum().backward()
        for k, p in model.named_parameters():
            if p.grad is not None:
                sum_grads[k] += p.grad
    for k in batch_grads:
        torch.testing.assert_close(batch_grads[k], sum_grads[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_loss_per_sample_counts(backend):
    """Each sample's loss uses its own visible and masked counts; a sample keeping every token has no MAE."""
    model = randomize(create_model("MaskDiT-T/2", backend=backend, **SMALL), std=0.1).to(DEVICE)
    net, loss_fn = EDMPrecond(model), EDMLoss()
    x, _, y = inputs()
    g = torch.Generator().manual_seed(5)
    sigma, noise = torch.tensor([0.1, 1.0, 3.0, 0.5]).to(DEVICE), torch.randn(x.shape, generator=g).to(DEVICE)
    ids = mixed_ids()
    batch = loss_fn(net, x, y, ids, sigma=sigma, noise=noise)
    for i in range(4):
        alone = loss_fn(net, x[i:i + 1], y[i:i + 1], ids[i][None], sigma=sigma[i:i + 1], noise=noise[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    full = loss_fn(net, x[1:2], y[1:2], None, sigma=sigma[1:2], noise=noise[1:2])  # sample 1 keeps all tokens
    torch.testing.assert_close(batch[1:2], full, atol=1e-5, rtol=1e-5)
    no_mae = EDMLoss(mae_coef=0.0)(net, x, y, ids, sigma=sigma, noise=noise)
    assert no_mae[1] == batch[1] and (no_mae[[0, 2, 3]] != batch[[0, 2, 3]]).all()


def reference_attention(q, k, v, lengths):
    out, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        out.append(F.scaled_dot_product_attention(*(t[s].transpose(0, 1) for t in (q, k, v))).transpose(0, 1))
        start += n
    return torch.cat(out)


PATHS_HERE = ["padded-sdpa", "triton"] + (["torch-varlen"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("path", PATHS_HERE)
def test_attention_paths_against_per_sample_sdpa(path):
    ids = mixed_ids()
    layout = token_layout(ids, 4, L, DEVICE)
    dtype = torch.bfloat16 if path != "padded-sdpa" and DEVICE == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(layout.lengths()), 3, 24, generator=g).to(DEVICE, dtype) for _ in range(3))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with forced_path(path):
        out = attention(q, k, v, layout)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout.lengths()), **tol)


def test_dense_path_for_equal_lengths_and_logging(caplog):
    ids = torch.stack([torch.randperm(L)[:6] for _ in range(3)]).to(DEVICE)
    layout = token_layout(ids, 3, L, DEVICE)
    assert choose_path(torch.empty(1, device=DEVICE), layout) == "dense-sdpa"
    q, k, v = (torch.randn(18, 2, 8).to(DEVICE) for _ in range(3))
    before = PATHS_USED["dense-sdpa"]
    with caplog.at_level("INFO", logger="maskdit.attention"):
        out = attention(q, k, v, layout)
        with forced_path("padded-sdpa"):
            padded = attention(q, k, v, layout)
    assert PATHS_USED["dense-sdpa"] == before + 1
    assert "attention path: padded-sdpa" in caplog.text
    torch.testing.assert_close(out, reference_attention(q, k, v, layout.lengths()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, out, atol=1e-5, rtol=1e-5)


def test_forced_sdpa_backend_on_the_dense_path():
    """``sdpa_backend``: one SDPA kernel for the dense path (math and flash anywhere; on CUDA also
    memory-efficient, in bf16), or FlexAttention compiled (forward anywhere; on CUDA also the backward), or the
    Triton kernel, the same result, eager and compiled; a kernel that cannot run fails with PyTorch's error, or
    (FlexAttention below its smallest head dim on CUDA) with one naming the head dim; a bad name is refused."""
    from maskdit.attention import sdpa_backend, set_sdpa_backend

    layout = token_layout(torch.stack([torch.randperm(L)[:6] for _ in range(3)]).to(DEVICE), 3, L, DEVICE)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q, k, v = (torch.randn(18, 2, 16).to(DEVICE, dtype) for _ in range(3))
    expected = attention(q, k, v, layout)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    for name in ["math", "flash", "flex", "triton"] + (["efficient"] if DEVICE == "cuda" else []):
        with sdpa_backend(name):
            torch.testing.assert_close(attention(q, k, v, layout), expected, **tol)
            compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(compiled(q, k, v, layout), expected, **tol)
    if DEVICE == "cuda":  # FlexAttention's backward (generated kernels) against the default's
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(attention(*leaves, layout).float().sum(), leaves)
        with sdpa_backend("flex"):
            flex_grads = torch.autograd.grad(attention(*leaves, layout).float().sum(), leaves)
        for got, want in zip(flex_grads, grads):
            torch.testing.assert_close(got, want, **tol)
    if DEVICE == "cuda":
        with sdpa_backend("flex"), pytest.raises(ValueError, match="head dim of at least 16 on CUDA.*got 8"):
            attention(q[..., :8], k[..., :8], v[..., :8], layout)
    if DEVICE == "cpu":
        with sdpa_backend("cudnn"), pytest.raises(RuntimeError, match="No viable backend"):
            attention(q, k, v, layout)
    with pytest.raises(ValueError, match="sdpa backend must be"):
        set_sdpa_backend("fast")


def test_random_mask_per_sample_ratios():
    ratios = torch.tensor([0.0, 0.5, 0.75, 0.3])
    mk = random_mask(4, L, ratios, generator=torch.Generator().manual_seed(0))
    assert isinstance(mk.ids_keep, list)
    assert [len(i) for i in mk.ids_keep] == [16, 8, 4, int(16 * 0.7)]
    for i, ids in enumerate(mk.ids_keep):
        assert len(set(ids.tolist())) == len(ids)
        assert torch.equal(mk.mask[i], torch.ones(L, dtype=torch.bool).index_fill(0, ids, False))
    same = random_mask(3, L, [0.5, 0.5, 0.5])
    assert isinstance(same.ids_keep, torch.Tensor) and same.ids_keep.shape == (3, 8)
    with pytest.raises(ValueError, match="per-sample ratios"):
        random_mask(3, L, [0.5, 0.5])
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, L, [0.5, 1.0])


def test_token_layout():
    ids = mixed_ids()
    layout = token_layout(ids, 4, L, DEVICE)
    assert layout.lengths() == [1, 16, 7, 12] and layout.max_len == 16 and layout.uniform_len is None
    assert layout.cu_seqlens.tolist() == [0, 1, 17, 24, 36] and layout.cu_seqlens.dtype == torch.int32
    assert layout.seg.tolist() == [0] + [1] * 16 + [2] * 7 + [3] * 12
    assert torch.equal(layout.ids, torch.cat(ids))
    masked = layout.masked()
    assert masked.sum(1).tolist() == [15, 0, 9, 4]
    with pytest.raises(ValueError, match="ids_keep as a list"):
        token_layout(ids[:3], 4, L, DEVICE)


def test_varlen_kernels_are_chosen_for_16_bit_cuda_inputs_only(monkeypatch):
    """flash-attn and varlen_attn take fp16/bf16 only: fp32 packed CUDA inputs go to the padded path."""
    from types import SimpleNamespace

    from maskdit import attention as att

    monkeypatch.setattr(att, "HAS_FLASH_ATTN", True)
    monkeypatch.setattr(att, "HAS_TORCH_VARLEN", True)
    monkeypatch.setattr(att, "HAS_XFORMERS", False)
    mixed = token_layout([torch.arange(5), torch.arange(3)], 2, 16, "cpu")
    assert mixed.uniform_len is None
    with att.forced_path(None):
        assert choose_path(SimpleNamespace(is_cuda=True, dtype=torch.float32), mixed) == "padded-sdpa"
        assert choose_path(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16), mixed) == "flash-attn-varlen"
        uniform = token_layout([torch.randperm(16)[:6] for _ in range(3)], 3, 16, "cpu")
        assert uniform.uniform_len == 6
        assert choose_path(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16), uniform) == "dense-sdpa"


def test_layout_masked_is_the_mask_of_the_kept_ids():
    mk = random_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(token_layout(mk.ids_keep, 3, 16, "cpu").masked(), mk.mask)
