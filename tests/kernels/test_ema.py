import pytest
import torch

from kernels import ema as ema_module
from kernels.ema import MultiTensorLerp, lerp_reference
from tests.kernels.conftest import DEVICE, DTYPES, TOL

# tensor sizes: a scalar-like one, sizes around the 16384-element chunk, a 2-D weight, an empty tensor
SHAPES = [(3,), (16384,), (16385,), (40000,), (72, 100), (0,), (1152,)]


def _tensors(dtype, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    dst = [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]
    src = [torch.randn(s, generator=g).to(DEVICE, dtype) for s in shapes]
    return dst, src


# fp32: on a GPU the kernel's fused multiply-adds round differently from torch.lerp's, by up to an ulp of the
# inputs' scale (randn values up to ~5: 5e-7; seen on an H200: 2.1e-7), so also near-zero results differ by that
FP32_TOL = {"atol": 1e-6, "rtol": 2e-7}


def _close(a, b, dtype):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **(FP32_TOL if dtype == torch.float32 else TOL[dtype]["fwd"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [0.25, "tensor"])
def test_against_reference(weight, dtype):
    dst, src = _tensors(dtype)
    ref = [d.clone() for d in dst]
    w = torch.tensor(0.3, device=DEVICE) if weight == "tensor" else weight
    lerp = MultiTensorLerp(dst, src)
    assert lerp.aligned and lerp.num_chunks == 1 + 1 + 2 + 3 + 1 + 0 + 1
    for _ in range(2):  # twice: the table is reused
        lerp(w)
        lerp_reference(ref, src, w)
    _close(dst, ref, dtype)
    assert all(torch.equal(s, s0) for s, s0 in zip(src, _tensors(dtype)[1]))  # src untouched


def test_zero_weight_leaves_the_average_bitwise_unchanged():
    dst, src = _tensors(torch.float32)
    before = [d.clone() for d in dst]
    MultiTensorLerp(dst, src)(torch.zeros((), device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip(dst, before))


def test_weight_tensor_read_at_each_call():
    dst, src = _tensors(torch.float32, shapes=[(100,)])
    w = torch.tensor(1.0, device=DEVICE)
    lerp = MultiTensorLerp(dst, src)
    lerp(w)  # weight 1: the average becomes src
    torch.testing.assert_close(dst[0], src[0], atol=1e-6, rtol=0)
    before = dst[0].clone()
    w.fill_(0.5)
    src[0].zero_()
    lerp(w)  # halfway to zero
    torch.testing.assert_close(dst[0], before / 2, atol=0, rtol=0)


def test_unaligned_views_of_one_buffer():
    """Tensors that start at odd element offsets of shared buffers (no 16-byte alignment: scalar accesses)."""
    g = torch.Generator().manual_seed(1)
    flat_d, flat_s = (torch.randn(50001, generator=g).to(DEVICE) for _ in range(2))
    dst = [flat_d[1:16386], flat_d[16387:16390], flat_d[16391:50001].view(-1)]
    src = [flat_s[3:16388], flat_s[5:8], flat_s[20:33630]]
    ref = [d.clone() for d in dst]
    lerp = MultiTensorLerp(dst, src)
    assert not lerp.aligned
    lerp(0.7)
    lerp_reference(ref, src, 0.7)
    _close(dst, ref, torch.float32)
    assert flat_d[0] == torch.randn(50001, generator=torch.Generator().manual_seed(1))[0].item()  # not written


def test_fewer_elements_a_program(monkeypatch):
    monkeypatch.setattr(ema_module, "CHUNK", 1024)
    monkeypatch.setattr(ema_module, "BLOCK", 256)
    dst, src = _tensors(torch.float32)
    ref = [d.clone() for d in dst]
    MultiTensorLerp(dst, src)(0.1)
    lerp_reference(ref, src, 0.1)
    _close(dst, ref, torch.float32)


def test_replaced_storage_is_refused():
    dst, src = _tensors(torch.float32, shapes=[(10,), (20,)])
    lerp = MultiTensorLerp(dst, src)
    dst[1].data = torch.zeros(20, device=DEVICE)
    with pytest.raises(ValueError, match="other memory"):
        lerp(0.5)


def test_bad_inputs_are_named():
    dst, src = _tensors(torch.float32, shapes=[(10,), (20,)])
    cases = [
        ("equally long", ([dst[0]], src)),
        ("src\\[1\\] must have shape", (dst, [src[0], src[1][:5]])),
        ("src\\[0\\] must have dtype", (dst, [src[0].double(), src[1]])),
        ("dst\\[1\\] must be contiguous", ([dst[0], torch.randn(20, 2, device=DEVICE)[:, 0]], src)),
    ]
    for msg, args in cases:
        with pytest.raises(ValueError, match=msg):
            MultiTensorLerp(*args)
    lerp = MultiTensorLerp(dst, src)
    with pytest.raises(ValueError, match="weight must have shape"):
        lerp(torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be a float"):
        lerp("0.5")


def test_shared_memory_is_refused():
    """A dst tensor sharing memory with another dst, or with another pair's src, would be updated twice or read
    while written (a race on a GPU); a pair that is one tensor, and src tensors sharing memory, are fine."""
    flat = torch.randn(190, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    a, b, c, d, e = flat[:40], flat[30:70], flat[70:110], flat[110:150], flat[150:]
    cases = [
        ("dst\\[1\\] overlaps dst\\[0\\]", ([a, a], [d, d])),
        ("dst\\[1\\] overlaps dst\\[0\\]", ([a, b], [d, d])),
        ("src\\[0\\] overlaps dst\\[1\\]|dst\\[1\\] overlaps src\\[0\\]", ([a, c], [c, d])),
    ]
    for msg, args in cases:
        with pytest.raises(ValueError, match=msg):
            MultiTensorLerp(*args)
    ref = [a.clone(), c.clone()]
    MultiTensorLerp([a, c], [d, d])(0.5)  # src tensors sharing memory
    lerp_reference(ref, [d, d], 0.5)
    _close([a, c], ref, torch.float32)
    before = e.clone()
    MultiTensorLerp([e], [e])(0.5)  # a pair that is one tensor: unchanged
    assert torch.equal(e, before)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_captured_in_a_cuda_graph_reads_the_current_weight():
    dst, src = _tensors(torch.float32)
    ref = [d.clone() for d in dst]
    w = torch.tensor(0.2, device=DEVICE)
    lerp = MultiTensorLerp(dst, src)
    lerp(w)  # warm-up (compiles) before the capture
    lerp_reference(ref, src, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lerp(w)
    for value in (0.5, 0.0, 0.1):
        w.fill_(value)
        graph.replay()
        lerp_reference(ref, src, value)
    torch.cuda.synchronize()
    _close(dst, ref, torch.float32)
