import pytest
import torch

from kernels import gelu_gemm
from kernels.gelu_gemm import (
    _gelu_grad_gemm_op,
    _linear_gelu_op,
    _linear_gelu_output_op,
    gelu_grad_gemm,
    gelu_grad_gemm_reference,
    linear_gelu,
    linear_gelu_output,
    linear_gelu_reference,
    supported,
)
from tests.kernels.conftest import DEVICE, TOL

HALF = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (tokens T, width D, MLP width H): one row tile and one column tile, row and column counts that are not
# multiples of the tiles (D 72 and H 200: not powers of two), several tiles in both directions
CASES = [(5, 16, 32), (100, 72, 200), (300, 64, 136)]
SMALL_TILES = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=2)  # many tiles a program, grouped order


def _inputs(t, d, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
    # a = y @ w1^T + b1 spreads over about +-4: both tails of the GELU
    return dict(y=rnd(t, d), w1=rnd(h, d, scale=1.5 / d ** 0.5), b1=rnd(h), dout=rnd(t, d),
                w2=rnd(d, h, scale=h ** -0.5))


def _check_forward(y, w1, b1):
    a, g = linear_gelu(y, w1, b1)
    a_ref, _ = linear_gelu_reference(y.float(), w1.float(), b1.float())
    tol = TOL[y.dtype]["fwd"]
    assert a.dtype == g.dtype == y.dtype and a.shape == g.shape == (y.shape[0], w1.shape[0])
    torch.testing.assert_close(a.float(), a_ref, **tol)
    # g is the GELU of a as stored (as the unfused chain computes it)
    torch.testing.assert_close(g.float(), torch.nn.functional.gelu(a.float(), approximate="tanh"), **tol)
    assert torch.equal(linear_gelu_output(y, w1, b1), g)  # (inference: a not written)
    return a, g


def _check_backward(dout, w2, a):
    g, da, db = gelu_grad_gemm(dout, w2, a)
    g_ref, da_ref, _ = gelu_grad_gemm_reference(dout.float(), w2.float(), a.float())
    tol = TOL[a.dtype]["fwd"]
    assert g.dtype == da.dtype == a.dtype and db.dtype == torch.float32 and db.shape == (a.shape[1],)
    torch.testing.assert_close(g.float(), g_ref, **tol)
    torch.testing.assert_close(da.float(), da_ref, **tol)
    torch.testing.assert_close(db, da.float().sum(0), atol=1e-3, rtol=1e-5)  # the sums of da as returned
    return g, da, db


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("t,d,h", CASES)
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_against_reference(t, d, h, dtype, tiles, monkeypatch):
    if tiles == "small":
        for name, value in SMALL_TILES.items():
            monkeypatch.setattr(gelu_gemm, name, value)
    x = _inputs(t, d, h, dtype)
    a, _ = _check_forward(x["y"], x["w1"], x["b1"])
    _check_backward(x["dout"], x["w2"], a)


@pytest.mark.parametrize("parts", [2, 4])
def test_epilogue_column_parts(parts, monkeypatch):
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(gelu_gemm, name, value)
    monkeypatch.setattr(gelu_gemm, "EPILOGUE_PARTS", parts)
    x = _inputs(100, 72, 200, torch.float16)
    a, _ = _check_forward(x["y"], x["w1"], x["b1"])
    _check_backward(x["dout"], x["w2"], a)


def test_matches_the_unfused_chain_bit_for_bit_in_fp16_math(monkeypatch):
    """With products that are exact in fp32 (small integers), every rounding is the unfused chain's: a and dg
    rounded to fp16, then the GELU in fp32 (the same formulas as ``kernels.gelu_tanh_grad``).  (Compiled for a
    GPU the two kernels may contract the GELU's multiply-adds differently: there, within an fp16 ulp.)"""
    import kernels

    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(gelu_gemm, name, value)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(-3, 4, (70, 24), generator=g).half().to(DEVICE)
    w1 = (torch.randint(-2, 3, (96, 24), generator=g) / 8).half().to(DEVICE)
    b1 = (torch.randint(-8, 9, (96,), generator=g) / 4).half().to(DEVICE)
    a, gel = linear_gelu(y, w1, b1)
    assert torch.equal(a, (y.float() @ w1.float().t() + b1.float()).half())
    dout = torch.randint(-3, 4, (70, 24), generator=g).half().to(DEVICE)
    w2 = (torch.randint(-2, 3, (24, 96), generator=g) / 4).half().to(DEVICE)
    g2, da, db = gelu_grad_gemm(dout, w2, a)
    g_ref, da_ref, db_ref = kernels.gelu_tanh_grad(a, (dout.float() @ w2.float()).half())
    ulp = dict(atol=0, rtol=0) if DEVICE == "cpu" else dict(atol=6e-8, rtol=1e-3)
    for name, out, ref in (("g", gel, g_ref), ("g (backward)", g2, g_ref), ("da", da, da_ref)):
        torch.testing.assert_close(out, ref, **ulp, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(db, db_ref, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (10, 0)])
def test_fused_on_hopper_and_the_interpreter_with_fp16_only(capability, monkeypatch):
    """The GEMMs are built and tuned for sm_90: other GPUs, and bf16 in the CPU interpreter (which computes bf16
    products wrongly), get the unfused chain."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert gelu_gemm.fused_on(cpu, torch.float16) and not gelu_gemm.fused_on(cpu, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for dtype in gelu_gemm.HALF_DTYPES:
        assert gelu_gemm.fused_on(cuda, dtype) == (capability == (9, 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unfused_where_not_fused_on(dtype, monkeypatch):
    """Where ``fused_on`` is false the ops launch nothing and return the unfused chain's results (on the CPU,
    bf16 is such a case without patching)."""
    import kernels

    if DEVICE == "cuda" or dtype == torch.float16:
        monkeypatch.setattr(gelu_gemm, "fused_on", lambda device, dtype: False)
    monkeypatch.setattr(gelu_gemm, "_launch", lambda *args, **kwargs: pytest.fail("a fused GEMM was launched"))
    x = _inputs(100, 72, 200, dtype)
    a, g = linear_gelu(x["y"], x["w1"], x["b1"])
    a_ref, g_ref = linear_gelu_reference(x["y"], x["w1"], x["b1"])
    assert torch.equal(a, a_ref) and torch.equal(g, g_ref)
    assert torch.equal(linear_gelu_output(x["y"], x["w1"], x["b1"]), g_ref)
    for out, ref in zip(gelu_grad_gemm(x["dout"], x["w2"], a), kernels.gelu_tanh_grad(a, x["dout"] @ x["w2"])):
        assert torch.equal(out, ref)


def test_deterministic():
    x = _inputs(300, 64, 136, torch.float16)
    first = gelu_grad_gemm(x["dout"], x["w2"], x["y"] @ x["w1"].t())
    second = gelu_grad_gemm(x["dout"], x["w2"], x["y"] @ x["w1"].t())
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_row_strided_operands():
    """Operands as column slices of wider tensors (16-byte aligned row strides and offsets)."""
    x = _inputs(40, 32, 64, torch.float16)
    y_wide = torch.randn(40, 48, device=DEVICE).half()
    y_wide[:, 8:40] = x["y"]
    a, _ = _check_forward(y_wide[:, 8:40], x["w1"], x["b1"])
    a_wide = torch.randn(40, 80, device=DEVICE).half()
    a_wide[:, 16:] = a
    _check_backward(x["dout"], x["w2"], a_wide[:, 16:])


def test_no_rows():
    x = _inputs(0, 16, 32, torch.float16)
    a, g = linear_gelu(x["y"], x["w1"], x["b1"])
    g2, da, db = gelu_grad_gemm(x["dout"], x["w2"], a)
    assert a.shape == g.shape == g2.shape == da.shape == (0, 32) and torch.equal(db, torch.zeros(32, device=DEVICE))


def test_supported_layouts():
    x = _inputs(8, 16, 32, torch.float16)
    y, w1 = x["y"], x["w1"]
    assert supported(y, w1) and supported(x["dout"], x["w2"], y @ w1.t())
    assert not supported(y.float(), w1.float())  # fp32: the unfused path
    assert not supported(y, w1.float())  # mixed dtypes
    assert not supported(y[:, :12], w1[:, :12])  # 24-byte rows
    assert not supported(y, w1[:28])  # outputs with 56-byte rows
    assert not supported(y[:, 1:9], w1[:, :8])  # base address off the 16-byte grid
    assert not supported(y, w1, y.t())  # no unit last stride
    assert not supported(y, w1, y[:1].expand(8, 16))  # rows not apart


def test_opcheck():
    x = _inputs(37, 24, 40, torch.float16)
    torch.library.opcheck(_linear_gelu_op, (x["y"], x["w1"], x["b1"]))
    torch.library.opcheck(_linear_gelu_output_op, (x["y"], x["w1"], x["b1"]))
    a = linear_gelu(x["y"], x["w1"], x["b1"])[0]
    torch.library.opcheck(_gelu_grad_gemm_op, (x["dout"], x["w2"], a))


def test_compiles_without_graph_breaks():
    x = _inputs(37, 24, 40, torch.float16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def every_op(y, w1, b1, dout, w2):
        a, g = linear_gelu(y, w1, b1)
        return a, g, gelu_grad_gemm(dout, w2, a), linear_gelu_output(y, w1, b1)

    out = every_op(**x)
    a, g = linear_gelu(x["y"], x["w1"], x["b1"])
    assert torch.equal(out[0], a) and torch.equal(out[1], g) and torch.equal(out[3], g)
    assert all(torch.equal(p, q) for p, q in zip(out[2], gelu_grad_gemm(x["dout"], x["w2"], a)))


def test_bad_inputs_are_named():
    x = _inputs(8, 16, 32, torch.float16)
    y, w1, b1, dout, w2 = x["y"], x["w1"], x["b1"], x["dout"], x["w2"]
    a = linear_gelu(y, w1, b1)[0]
    forward_cases = [
        ("y must have dtype", (y.float(), w1.float(), b1.float())),
        ("weight must have shape", (y, w1[:, :8], b1)),
        ("weight must have dtype", (y, w1.float(), b1)),
        ("bias must have shape", (y, w1, b1[:16])),
        ("need 16-byte aligned rows", (torch.zeros(8, 12, dtype=torch.float16, device=DEVICE),
                                       torch.zeros(32, 12, dtype=torch.float16, device=DEVICE), b1)),
    ]
    for msg, args in forward_cases:
        with pytest.raises(ValueError, match=msg):
            linear_gelu(*args)
    backward_cases = [
        ("weight must have shape", (dout, w2[:8], a)),
        ("a must have shape", (dout, w2, a[:4])),
        ("a must have dtype", (dout, w2, a.float())),
    ]
    for msg, args in backward_cases:
        with pytest.raises(ValueError, match=msg):
            gelu_grad_gemm(*args)
