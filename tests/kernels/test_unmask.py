import pytest
import torch

from kernels import unmask
from kernels.unmask import _bwd, _fwd, insert_mask_tokens, insert_mask_tokens_reference
from tests.kernels.conftest import DEVICE, DTYPES, TOL, segments

# (decoder width Dd, tokens per image L, kept tokens per sample): non-powers of two, a sample keeping 1
# token, one keeping all L, typical halves, and a 512-wide row (the official decoder width).
CASES = [(32, 16, [8, 1, 16]), (100, 36, [1, 18, 36, 17]), (128, 64, [32, 64, 1]), (512, 16, [16, 1, 8])]


def _inputs(d, L, kept, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # ids of each sample: the first k of a random permutation, so in shuffled (not sorted) order
    ids = torch.cat([torch.randperm(L, generator=g)[:k] for k in kept])
    x = torch.randn(len(ids), d, generator=g).to(DEVICE, dtype)
    mask_token = torch.randn(d, generator=g).to(DEVICE, dtype)
    pos_embed = torch.randn(L, d, generator=g).to(DEVICE, dtype)
    return x, ids.to(DEVICE), segments(kept), mask_token, pos_embed, len(kept)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,L,kept", CASES)
def test_forward_backward_against_reference(d, L, kept, dtype):
    x, ids, seg, mask_token, pos_embed, n = _inputs(d, L, kept, dtype)
    tol = TOL[dtype]
    leaves = [t.detach().clone().requires_grad_() for t in (x, mask_token)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, mask_token)]
    out = insert_mask_tokens(leaves[0], ids, seg, leaves[1], pos_embed, n)
    ref = insert_mask_tokens_reference(ref_leaves[0], ids, seg, ref_leaves[1], pos_embed, n)
    assert out.dtype == dtype and out.shape == (n, L, d)
    torch.testing.assert_close(out, ref, **tol["fwd"])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    for name, gk, gr, leaf in zip(("dx_kept", "dmask_token"), grads, ref_grads, leaves):
        assert gk.dtype == leaf.dtype and gk.shape == leaf.shape, name
        assert torch.isfinite(gk).all(), name
        torch.testing.assert_close(gk.float(), gr.float(), **tol["grad"], msg=lambda m: f"{name}: {m}")
    # dx_kept is a pure gather: exact
    torch.testing.assert_close(grads[0], dout[seg.long(), ids], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_mask_token_exactly_at_masked_positions(dtype, interleaved):
    d, L, kept = 40, 16, [5, 16, 1, 9]
    x, ids, seg, mask_token, _, n = _inputs(d, L, kept, dtype, seed=3)
    if interleaved:  # samples need not be contiguous in the packed layout
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(4)).to(DEVICE)
        x, ids, seg = x[perm], ids[perm], seg[perm]
    zero_pos = torch.zeros(L, d, device=DEVICE, dtype=dtype)  # adding 0 is exact: compare bit for bit
    out = insert_mask_tokens(x, ids, seg, mask_token, zero_pos, n)
    is_kept = torch.zeros(n, L, dtype=torch.bool, device=DEVICE)
    is_kept[seg.long(), ids] = True
    assert int(is_kept.sum()) == sum(kept)
    assert torch.equal(out[~is_kept], mask_token.expand(int((~is_kept).sum()), d))
    assert torch.equal(out[seg.long(), ids], x)


def test_mixed_dtypes_expanded_grad_and_pos_embed_grad():
    d, L, kept = 48, 16, [4, 16, 1]
    x, ids, seg, mask_token, pos_embed, n = _inputs(d, L, kept, torch.float16)
    leaves = [x.requires_grad_(), mask_token.float().requires_grad_(), pos_embed.float().requires_grad_()]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = insert_mask_tokens(leaves[0], ids, seg, leaves[1], leaves[2], n)
    ref = insert_mask_tokens_reference(ref_leaves[0], ids, seg, ref_leaves[1], ref_leaves[2], n)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, **TOL[torch.float16]["fwd"])
    (out.float() * 0.5).sum().backward()  # an expanded (stride-0) upstream gradient
    (ref.float() * 0.5).sum().backward()
    masked = n * L - sum(kept)
    torch.testing.assert_close(leaves[1].grad, torch.full((d,), 0.5 * masked, device=DEVICE))
    for name, a, b in zip(("dx_kept", "dmask_token", "dpos_embed"), leaves, ref_leaves):
        assert a.grad.dtype == a.dtype, name
        torch.testing.assert_close(a.grad.float(), b.grad.float(), **TOL[torch.float16]["grad"])


def test_row_strided_pos_embed():
    """pos_embed as a view of every other column block of a wider table (row stride 2d, not d)."""
    d, L, kept = 40, 16, [5, 16, 1]
    x, ids, seg, mask_token, _, n = _inputs(d, L, kept, torch.float32)
    wide = torch.randn(L, 2 * d, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    pos_embed = wide[:, d:]
    assert pos_embed.stride(0) == 2 * d
    torch.testing.assert_close(insert_mask_tokens(x, ids, seg, mask_token, pos_embed, n),
                               insert_mask_tokens_reference(x, ids, seg, mask_token, pos_embed, n),
                               **TOL[torch.float32]["fwd"])


def test_fewer_backward_rows_a_program(monkeypatch):
    """8 output rows a program, as ``rows_per_program`` picks for small batches on a GPU."""
    monkeypatch.setattr(unmask, "rows_per_program", lambda num_rows, device, most: 8)
    test_forward_backward_against_reference(32, 16, [8, 1, 16], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stages", [2, 3])
def test_pipelined_backward_tiles(stages, dtype, monkeypatch):
    """The backward's tile loop software-pipelined (a launch parameter timed by bench/kernels.py), several tiles
    a program, a partial last one."""
    monkeypatch.setattr(unmask, "BWD_STAGES", stages)
    test_forward_backward_against_reference(512, 72, [40, 1, 72], dtype)  # 8-row tiles, 8 a program


@pytest.mark.parametrize("det", [False, True])
def test_fixed_mask_token_gets_no_gradient(det, deterministic_mode):
    """A mask token that needs no gradient (learn_mask_token=False): the backward skips its sums, dx unchanged."""
    torch.use_deterministic_algorithms(det)
    x, ids, seg, mask_token, pos_embed, n = _inputs(100, 36, [1, 18, 36, 17], torch.float32)
    x.requires_grad_()
    dout = torch.randn(n, 36, 100, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (dx,) = torch.autograd.grad(insert_mask_tokens(x, ids, seg, mask_token, pos_embed, n), x, dout)
    torch.testing.assert_close(dx, dout[seg.long(), ids], atol=0, rtol=0)
    _, src = _fwd(x.detach(), ids, seg, mask_token, pos_embed, n)
    dx_op, dmask = _bwd(dout, src, x.shape[0], False)
    assert torch.equal(dx_op, dx) and dmask.shape == (0,)


def test_no_kept_tokens():
    d, L, n = 24, 16, 2
    mask_token = torch.randn(d, device=DEVICE, requires_grad=True)
    pos = torch.randn(L, d, device=DEVICE)
    x = torch.empty(0, d, device=DEVICE, requires_grad=True)
    ids, seg = torch.empty(0, dtype=torch.int64, device=DEVICE), torch.empty(0, dtype=torch.int32, device=DEVICE)
    out = insert_mask_tokens(x, ids, seg, mask_token, pos, n)
    torch.testing.assert_close(out, (mask_token + pos).expand(n, L, d))
    out.sum().backward()
    torch.testing.assert_close(mask_token.grad, torch.full((d,), float(n * L), device=DEVICE))


def test_opcheck():
    x, ids, seg, mask_token, pos_embed, n = _inputs(40, 16, [5, 16, 1], torch.float32)
    torch.library.opcheck(_fwd, (x.requires_grad_(), ids, seg, mask_token.requires_grad_(), pos_embed, n))
    out, src = _fwd(x.detach(), ids, seg, mask_token.detach(), pos_embed, n)
    for mask_grad in (True, False):
        torch.library.opcheck(_bwd, (torch.randn_like(out), src, x.shape[0], mask_grad))


def test_bad_inputs_are_named():
    x, ids, seg, mask_token, pos, n = _inputs(40, 16, [5, 16, 1], torch.float32)
    f = insert_mask_tokens
    cases = [
        ("x_kept must have dtype", (x.double(), ids, seg, mask_token, pos, n)),
        ("x_kept must be 2-D", (x[None], ids, seg, mask_token, pos, n)),
        ("x_kept must have unit stride", (x.t().contiguous().t(), ids, seg, mask_token, pos, n)),
        ("ids must have dtype", (x, ids.int(), seg, mask_token, pos, n)),
        ("ids must have shape", (x, ids[:-1], seg, mask_token, pos, n)),
        ("ids must be on", (x, ids.to("meta"), seg, mask_token, pos, n)),
        ("seg must have dtype", (x, ids, seg.long(), mask_token, pos, n)),
        ("seg must have shape", (x, ids, seg[:-1], mask_token, pos, n)),
        ("mask_token must have shape", (x, ids, seg, mask_token[:7], pos, n)),
        ("mask_token must have dtype", (x, ids, seg, mask_token.double(), pos, n)),
        ("mask_token must be on", (x, ids, seg, mask_token.to("meta"), pos, n)),
        ("pos_embed must have shape", (x, ids, seg, mask_token, pos[:, :7], n)),
        ("pos_embed must be 2-D", (x, ids, seg, mask_token, pos[None], n)),
        ("pos_embed must be on", (x, ids, seg, mask_token, pos.to("meta"), n)),
        ("num_samples must be", (x, ids, seg, mask_token, pos, -1)),
        ("num_samples must be", (x, ids, seg, mask_token, pos, 2.0)),
        ("ids must be in", (x, torch.where(ids == ids.max(), 16, ids), seg, mask_token, pos, n)),
        ("ids must be in", (x, torch.where(ids == ids.max(), -1, ids), seg, mask_token, pos, n)),
        ("seg must be in", (x, ids, seg, mask_token, pos, n - 1)),
        ("ids must be unique", (x, torch.where(ids == ids[1], ids[0], ids), seg, mask_token, pos, n)),
    ]
    for match, args in cases:
        if DEVICE != "cpu" and match.endswith(("be in", "unique")):
            continue  # value checks run on CPU tensors only (no device sync)
        with pytest.raises(ValueError, match=match):
            f(*args)
