import pytest
import torch

from kernels.patch_embed import _bwd, _fwd, embed_kept_patches, embed_kept_patches_reference
from tests.kernels.conftest import DEVICE, DTYPES, TOL, segments

# (channels, patch, hidden size, image side, per-sample kept-token counts): a 1-token sample, all tokens
# of an image (16 for 8x8/p2, 9 for 12x12/p4, 36 for 12x12/p2, 16 for 16x16/p4, 64 for 16x16/p2),
# counts crossing the 32-token programs, non-power-of-two widths and one XL-width row.
CASES = [
    (4, 2, 72, 8, [5, 1, 16]),
    (3, 4, 100, 12, [9, 2, 4]),
    (1, 2, 100, 12, [36, 1, 7]),
    (4, 4, 384, 16, [16, 3]),
    (1, 4, 72, 16, [1, 16, 6]),
    (3, 2, 384, 8, [11, 16]),
    (4, 2, 1152, 16, [64, 3]),
]


def _inputs(c, p, d, side, lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, num_tokens = len(lengths), (side // p) ** 2
    x = (torch.randn(n, c, side, side, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    ids = torch.cat([torch.randperm(num_tokens, generator=g)[:k] for k in lengths]).to(DEVICE)  # shuffled
    weight = (torch.randn(d, p * p * c, generator=g) * 0.3).to(DEVICE, dtype)
    bias = torch.randn(d, generator=g).to(DEVICE, dtype)
    pos_embed = torch.randn(num_tokens, d, generator=g).to(DEVICE, dtype)
    return x, ids, segments(lengths), weight, bias, pos_embed, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c,p,d,side,lengths", CASES)
def test_forward_backward_against_reference(c, p, d, side, lengths, dtype):
    x, ids, seg, weight, bias, pos_embed, p = _inputs(c, p, d, side, lengths, dtype)
    tol = TOL[dtype]
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    y = embed_kept_patches(leaves[0], ids, seg, leaves[1], leaves[2], pos_embed, p)
    y_ref = embed_kept_patches_reference(ref_leaves[0], ids, seg, ref_leaves[1], ref_leaves[2], pos_embed, p)
    assert y.dtype == dtype and y.shape == (sum(lengths), d)
    torch.testing.assert_close(y, y_ref, **tol["fwd"])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy)
    for name, gk, gr, leaf in zip(("dx", "dweight", "dbias"), grads, ref_grads, leaves):
        assert gk.dtype == leaf.dtype and gk.shape == leaf.shape, name
        assert torch.isfinite(gk).all(), name
        torch.testing.assert_close(gk.float(), gr.float(), **tol["grad"], msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter ignores a product's precision")
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
@pytest.mark.parametrize("tokens", [16, 32, 64])
@pytest.mark.parametrize("c,p,d,side,lengths", CASES[:4])
def test_forward_with_either_product_precision(c, p, d, side, lengths, tokens, precision, monkeypatch):
    """The forward with tf32x3 products (``FWD_PRECISION``'s default) or fp32 FMAs ("ieee", the other choice
    bench/kernels.py times) at the fp32 tolerance."""
    import kernels.patch_embed as module

    monkeypatch.setattr(module, "FWD_PRECISION", precision)
    monkeypatch.setattr(module, "FWD_TOKENS", tokens)
    x, ids, seg, weight, bias, pos_embed, p = _inputs(c, p, d, side, lengths, torch.float32)
    y = embed_kept_patches(x, ids, seg, weight, bias, pos_embed, p)
    torch.testing.assert_close(y, embed_kept_patches_reference(x, ids, seg, weight, bias, pos_embed, p),
                               **TOL[torch.float32]["fwd"])


def test_dx_zero_at_masked_patches_and_only_when_needed():
    x, ids, seg, weight, bias, pos_embed, p = _inputs(4, 2, 72, 8, [3, 5], torch.float32)
    xg, wg, bg = x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    y = embed_kept_patches(xg, ids, seg, wg, bg, pos_embed, p)
    (dx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    kept = torch.zeros(2, 16, dtype=torch.bool, device=DEVICE)
    kept[seg.long(), ids] = True
    # per-pixel kept map, (N, 1, H, W)
    kept_px = kept.view(2, 1, 4, 1, 4, 1).expand(2, 1, 4, 2, 4, 2).reshape(2, 1, 8, 8)
    assert (dx[~kept_px.expand_as(dx)] == 0).all()
    assert (dx[kept_px.expand_as(dx)] != 0).all()
    # x without grad: weight and bias gradients only (the backward's dx branch is skipped)
    y = embed_kept_patches(x, ids, seg, wg, bg, pos_embed, p)
    dw, db = torch.autograd.grad(y, (wg, bg), torch.ones_like(y))
    y_ref = embed_kept_patches_reference(x, ids, seg, wg, bg, pos_embed, p)
    dw_ref, db_ref = torch.autograd.grad(y_ref, (wg, bg), torch.ones_like(y_ref))
    torch.testing.assert_close(dw, dw_ref, **TOL[torch.float32]["grad"])
    torch.testing.assert_close(db, db_ref, **TOL[torch.float32]["grad"])


def test_out_dtype_and_mixed_dtypes():
    x, ids, seg, weight, bias, pos_embed, p = _inputs(3, 2, 72, 8, [4, 16], torch.float32)
    args = (x, ids.int(), seg, weight.half(), bias, pos_embed.half(), p)
    y = embed_kept_patches(*args, out_dtype=torch.float16)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, embed_kept_patches_reference(*args, out_dtype=torch.float16),
                               **TOL[torch.float16]["fwd"])


def test_empty():
    x, ids, seg, weight, bias, pos_embed, p = _inputs(4, 2, 72, 8, [2], torch.float32)
    w = weight.clone().requires_grad_()
    y = embed_kept_patches(x, ids[:0], seg[:0], w, bias, pos_embed, p)
    assert y.shape == (0, 72)
    (dw,) = torch.autograd.grad(y.sum(), w)
    assert (dw == 0).all()


def test_opcheck():
    x, ids, seg, weight, bias, pos_embed, p = _inputs(3, 2, 40, 8, [3, 16], torch.float32)
    torch.library.opcheck(_fwd, (x.requires_grad_(), ids, seg, weight.requires_grad_(), bias.requires_grad_(),
                                 pos_embed, p, None))
    y = _fwd(x, ids, seg, weight, bias, pos_embed, p, None)
    for needs_dx in (True, False):
        torch.library.opcheck(_bwd, (torch.randn_like(y), x.detach(), ids, seg, weight.detach(), p, needs_dx))


def test_bad_inputs_are_named():
    x, ids, seg, weight, bias, pos_embed, p = _inputs(4, 2, 40, 8, [3, 5], torch.float32)

    def call(**kw):
        args = dict(x=x, ids=ids, seg=seg, weight=weight, bias=bias, pos_embed=pos_embed, patch_size=p)
        args.update(kw)
        return embed_kept_patches(**args)

    cases = [
        (dict(x=x.double()), "x must have dtype"),
        (dict(x=x[0]), "x must be 4-D"),
        (dict(x=x.transpose(2, 3)), "x must be contiguous"),
        (dict(x=x[:, :, :7, :7].contiguous()), "divisible by patch_size"),
        (dict(patch_size=3), "divisible by patch_size"),
        (dict(ids=ids.float()), "ids must have dtype"),
        (dict(ids=ids[:, None]), "ids must be 1-D"),
        (dict(seg=seg.long()), "seg must have dtype"),
        (dict(seg=seg[:-1]), "seg must have shape"),
        (dict(weight=weight[:, :12]), "weight must have shape"),
        (dict(weight=weight.double()), "weight must have dtype"),
        (dict(weight=weight.to("meta")), "weight must be on"),
        (dict(bias=bias[:7]), "bias must have shape"),
        (dict(pos_embed=pos_embed[:9]), "pos_embed must have shape"),
        (dict(pos_embed=pos_embed[:, :7]), "pos_embed must have shape"),
        (dict(pos_embed=pos_embed.clone().requires_grad_()), "pos_embed must not require grad"),
    ]
    if DEVICE == "cpu":  # index ranges are checked only where that costs no device sync
        cases += [
            (dict(ids=torch.where(ids == ids[0], 16, ids)), "ids must lie in"),
            (dict(ids=torch.where(ids == ids[0], -1, ids)), "ids must lie in"),
            (dict(seg=torch.where(seg == 1, 2, seg).int()), "seg must lie in"),
        ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    with pytest.raises(ValueError, match="out_dtype must be"):
        call(out_dtype=torch.int32)
    with pytest.raises(ValueError, match="patch_size must be"):
        call(patch_size=0)
