import importlib

import pytest
import torch

from kernels.edm_loss import _bwd, _fwd, edm_loss, edm_loss_reference
from maskdit import ops
from maskdit.edm import EDMLoss, EDMPrecond
from tests.kernels.conftest import DEVICE, DTYPES, TOL

edm_loss_module = importlib.import_module("kernels.edm_loss")  # the package exports a function of this name

SIGMAS = [0.01, 0.3, 2.0, 50.0]

# (channels C, patch p, image H, W, learn_sigma, mask kind): 8x8 and 16x16 images, a non-square one
# (catches swapped rows/columns), C_out = 2C networks, per-sample masked counts or no masking.
CASES = [
    (4, 2, 8, 8, False, "mixed"),
    (1, 4, 16, 16, False, "mixed"),
    (4, 4, 16, 16, True, "mixed"),
    (1, 2, 16, 16, True, "none"),
    (4, 2, 16, 16, False, "none"),
    (1, 2, 8, 12, False, "mixed"),
]


def _mask(n, num_tokens, kind, g):
    mask = torch.zeros(n, num_tokens, dtype=torch.bool)
    if kind == "mixed":  # different masked counts per sample, sample 1 with no masked token
        counts = [num_tokens // 2, 0, 3, num_tokens - 1][:n]
        for i, k in enumerate(counts):
            mask[i, torch.randperm(num_tokens, generator=g)[:k]] = True
    return mask.to(DEVICE)


def _inputs(c, p, h, w, learn_sigma, kind, dtype, sigmas=SIGMAS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(sigmas)
    num_tokens = (h // p) * (w // p)
    p_out = p * p * c * (2 if learn_sigma else 1)
    f_tok = torch.randn(n, num_tokens, p_out, generator=g).to(DEVICE, dtype)
    y = (torch.randn(n, c, h, w, generator=g) * 0.7 + 0.2).to(DEVICE)
    sigma = torch.tensor(sigmas, dtype=torch.float32, device=DEVICE)
    noisy = y + torch.randn(n, c, h, w, generator=g).to(DEVICE) * sigma[:, None, None, None]
    return f_tok, y, noisy, sigma, _mask(n, num_tokens, kind, g)


def _maskdit_loss(f_tok, y, noisy, sigma, mask, p, sigma_data=0.5, mae_coef=0.1):
    """maskdit.edm: unpatchify F, precondition as EDMPrecond, then EDMLoss.from_denoised one sample at a time
    (ids_keep must have the same length for every sample of a batch)."""
    n, c, h, w = y.shape
    f = ops.unpatchify(f_tok.float(), p, f_tok.shape[-1] // (p * p), h, w)
    c_skip, c_out, _, _ = EDMPrecond(torch.nn.Identity(), sigma_data).coefficients(sigma.reshape(-1, 1, 1, 1))
    denoised = c_skip * noisy + c_out * f[:, :c]
    loss_fn = EDMLoss(sigma_data=sigma_data, mae_coef=mae_coef)
    out = []
    for i in range(n):
        ids_keep = (~mask[i]).nonzero().flatten()[None]
        out.append(loss_fn.from_denoised(denoised[i:i + 1], y[i:i + 1], noisy[i:i + 1], sigma[i:i + 1], ids_keep, p))
    return torch.cat(out)


def _check(f_tok, y, noisy, sigma, mask, p, dtype, against_maskdit=True, **kw):
    tol = TOL[dtype]
    gout = torch.randn(f_tok.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    leaf = f_tok.detach().clone().requires_grad_()
    loss = edm_loss(leaf, y, noisy, sigma, mask, p, **kw)
    assert loss.dtype == torch.float32 and loss.shape == (f_tok.shape[0],)
    (grad,) = torch.autograd.grad(loss, leaf, gout)
    assert grad.dtype == dtype and grad.shape == f_tok.shape and torch.isfinite(grad).all()
    refs = [("reference", edm_loss_reference)] + ([("maskdit.edm", _maskdit_loss)] if against_maskdit else [])
    for name, fn in refs:
        ref_leaf = f_tok.detach().clone().requires_grad_()
        ref = fn(ref_leaf, y, noisy, sigma, mask, p, **kw)
        torch.testing.assert_close(loss, ref, **tol["fwd"], msg=lambda m: f"loss vs {name}: {m}")
        (ref_grad,) = torch.autograd.grad(ref, ref_leaf, gout)
        torch.testing.assert_close(grad.float(), ref_grad.float(), **tol["grad"], msg=lambda m: f"grad vs {name}: {m}")
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,p,h,w,learn_sigma,kind", CASES)
def test_forward_backward(c, p, h, w, learn_sigma, kind, dtype):
    f_tok, y, noisy, sigma, mask = _inputs(c, p, h, w, learn_sigma, kind, dtype)
    _, grad = _check(f_tok, y, noisy, sigma, mask, p, dtype)
    if learn_sigma:  # the variance channels get exactly zero gradient
        grad = grad.reshape(*grad.shape[:2], p * p, 2 * c)
        assert (grad[..., c:] == 0).all() and (grad[..., :c] != 0).any()


def test_no_masking_matches_ids_keep_none():
    f_tok, y, noisy, sigma, mask = _inputs(4, 2, 8, 8, False, "none", torch.float32)
    n, c, h, w = y.shape
    c_skip, c_out, _, _ = EDMPrecond(torch.nn.Identity()).coefficients(sigma.reshape(-1, 1, 1, 1))
    denoised = c_skip * noisy + c_out * ops.unpatchify(f_tok, 2, c, h, w)
    ref = EDMLoss().from_denoised(denoised, y, noisy, sigma, None, 2)
    torch.testing.assert_close(edm_loss(f_tok, y, noisy, sigma, mask, 2), ref, **TOL[torch.float32]["fwd"])


def test_many_tiles_and_options(monkeypatch):
    """Several token tiles per sample with a partial last tile (L = 24, 16-token tiles), other sigma_data and
    mae_coef, non-contiguous y / noisy / f_tok."""
    monkeypatch.setattr(edm_loss_module, "TILE_ELEMS", 16 * 16)
    monkeypatch.setattr(edm_loss_module, "BWD_TILE_ELEMS", 16 * 16)
    f_tok, y, noisy, sigma, mask = _inputs(4, 2, 8, 12, False, "mixed", torch.float32)
    assert edm_loss_module._geometry(f_tok, y, 2, 16 * 16)[1] == 2  # tiles a sample
    wide = torch.randn(*f_tok.shape[:2], 40, device=DEVICE)
    wide[..., 3:19] = f_tok
    f_strided = wide[..., 3:19]
    y_cl, noisy_cl = y.to(memory_format=torch.channels_last), noisy.to(memory_format=torch.channels_last)
    mask_strided = torch.stack([mask, ~mask], dim=2)[..., 0]
    _check(f_strided, y_cl, noisy_cl, sigma, mask_strided, 2, torch.float32, sigma_data=1.3, mae_coef=0.25)


def test_patches_of_variance_near_the_mae_eps():
    """The noisy input's masked patches vary by about 1e-3 (variance about the MAE target's eps, 1e-6), one is
    constant: the fused target normalisation must match maskdit.edm's (checked against a hand formula in
    tests/test_edm.py) where the eps decides the value."""
    from kernels.edm_loss import MAE_EPS
    from maskdit import edm

    assert MAE_EPS == edm.MAE_EPS
    f_tok, y, _, sigma, mask = _inputs(2, 2, 8, 8, False, "mixed", torch.float32)
    noisy = 0.3 + 1e-3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    noisy[0, :, :2, :2] = 0.3
    mask[0, 0] = True
    _check(f_tok, y, noisy, sigma, mask, 2, torch.float32, mae_coef=1.0)


def test_no_visible_token_gives_zero_dsm():
    f_tok, y, noisy, sigma, mask = _inputs(1, 2, 8, 8, False, "mixed", torch.float32)
    mask[2] = True  # sample 2: every token masked
    loss, _ = _check(f_tok, y, noisy, sigma, mask, 2, torch.float32, against_maskdit=False)
    only_mae = edm_loss(f_tok, y, noisy, sigma, mask, 2, mae_coef=0.0)
    assert only_mae[2] == 0 and torch.isfinite(loss).all()
    ref = _maskdit_loss(f_tok, y, noisy, sigma, mask, 2)  # from_denoised: 0/0 there, equal elsewhere
    assert torch.isnan(ref[2])
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(loss[keep], ref[keep], **TOL[torch.float32]["fwd"])


def test_saves_only_per_sample_values():
    f_tok, y, noisy, sigma, mask = _inputs(4, 2, 8, 8, True, "mixed", torch.float32)
    leaf = f_tok.clone().requires_grad_()
    inputs = {t.data_ptr() for t in (leaf, y, noisy, mask)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = edm_loss(leaf, y, noisy, sigma, mask, 2)
    new = [t for t in saved if t.data_ptr() not in inputs]
    assert saved and all(t.numel() <= 4 * f_tok.shape[0] for t in new), [tuple(t.shape) for t in new]
    loss.sum().backward()  # g with stride 0
    ref_leaf = f_tok.clone().requires_grad_()
    edm_loss_reference(ref_leaf, y, noisy, sigma, mask, 2).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, **TOL[torch.float32]["grad"])


def test_opcheck():
    f_tok, y, noisy, sigma, mask = _inputs(4, 2, 8, 8, True, "mixed", torch.float32)
    torch.library.opcheck(_fwd, (f_tok.clone().requires_grad_(), y, noisy, sigma, mask, 2, 0.5, 0.1))
    g = torch.randn(f_tok.shape[0], device=DEVICE)
    torch.library.opcheck(_bwd, (g, f_tok, y, noisy, sigma, mask, 2, 0.5, 0.1))


def test_bad_inputs_are_named():
    f_tok, y, noisy, sigma, mask = _inputs(4, 2, 8, 8, False, "mixed", torch.float32)
    args = dict(f_tok=f_tok, y=y, noisy=noisy, sigma=sigma, mask=mask, patch_size=2)

    def call(**changes):
        return edm_loss(**{**args, **changes})

    bad = [
        ("f_tok must have dtype", dict(f_tok=f_tok.double())),
        ("f_tok must be 3-D", dict(f_tok=f_tok[0])),
        ("f_tok must have shape", dict(f_tok=f_tok[:, :-1])),
        ("f_tok must have shape", dict(f_tok=torch.cat([f_tok, f_tok[..., :4]], dim=-1))),
        ("f_tok must have unit stride", dict(f_tok=f_tok.transpose(1, 2).contiguous().transpose(1, 2))),
        ("y must have shape", dict(y=y[:3])),
        ("y must be 4-D", dict(y=y[0])),
        ("y must be on", dict(y=y.to("meta"))),
        ("noisy must have shape", dict(noisy=noisy[..., :4])),
        ("noisy must have dtype", dict(noisy=noisy.double())),
        ("sigma must have shape", dict(sigma=sigma[:2])),
        ("sigma must be a torch.Tensor", dict(sigma=0.5)),
        ("mask must have dtype", dict(mask=mask.int())),
        ("mask must have shape", dict(mask=mask[:, :-1])),
        ("patch_size must be a positive int", dict(patch_size=0)),
        ("patch_size 3 must divide", dict(patch_size=3)),
        ("sigma_data must be a positive", dict(sigma_data=0.0)),
        ("mae_coef must be a number >= 0", dict(mae_coef=-0.1)),
    ]
    for match, change in bad:
        with pytest.raises(ValueError, match=match):
            call(**change)
    with pytest.raises(ValueError, match="patch_size 1 with 1 channels"):
        edm_loss(torch.randn(1, 4, 1, device=DEVICE), y[:1, :1, :2, :2], noisy[:1, :1, :2, :2], sigma[:1],
                 mask[:1, :4], 1)
