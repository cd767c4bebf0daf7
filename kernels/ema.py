"""The weight average of a training step in one launch: ema[i] += weight * (src[i] - ema[i]) for every pair of
tensors (the model's parameters and their exponential moving average).

``torch._foreach_sub`` / ``_foreach_mul_`` / ``_foreach_add_`` (the plain-PyTorch way with a weight that is a
device tensor, so that a skipped step costs no host sync) make three passes and a temporary copy of every
parameter: 8 reads and writes of 4 bytes a parameter; a lerp is 3.  ``torch._foreach_lerp_`` takes its weight
as a host scalar only.  Here a Triton kernel walks a table of (tensor, chunk) pairs built once: each program
reads its tensors' addresses from the table and updates one chunk, reading ema and src once and writing ema
once (the addresses are stored as element offsets from the first tensor's, so that the compiler knows their
alignment and moves 16 bytes a thread at a time in whole chunks).  Math in fp32, ``e + w * (s - e)`` as the
foreach ops compute it (the GPU may fuse the multiply-add: within an ulp); a weight of 0 leaves ema bitwise
unchanged.  The weight is a float or a 0-dim float tensor on the tensors' device, read by the kernel: no
sync, and a CUDA-graph replay sees its current value.

The table holds addresses: ``MultiTensorLerp`` keeps references to the tensors (their memory stays valid) and
checks before each launch that they still are the same storages (a tensor whose ``.data`` was replaced is
refused with a ValueError, not written through a stale address).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_tensor

CHUNK = 16384  # elements of one program (its table row)
BLOCK = 2048  # elements of one step of a program


@triton.jit
def _lerp_kernel(BASE, DST_OFFS, SRC_OFFS, SIZES, CHUNKS, W, w_value, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 W_IS_TENSOR: tl.constexpr, ALIGNED: tl.constexpr, VECTOR: tl.constexpr):
    pid = tl.program_id(0)
    ti = tl.load(CHUNKS + 2 * pid)  # (tensor, first element) of this program's chunk
    start = tl.multiple_of(tl.load(CHUNKS + 2 * pid + 1), CHUNK)
    # the tensors' addresses as element offsets from BASE, so that the compiler knows their alignment
    dst_off = tl.load(DST_OFFS + ti)
    src_off = tl.load(SRC_OFFS + ti)
    if ALIGNED:  # every address a multiple of 16 bytes (checked by the launcher): vector loads and stores
        dst_off = tl.multiple_of(dst_off, VECTOR)
        src_off = tl.multiple_of(src_off, VECTOR)
    end = tl.minimum(start + CHUNK, tl.load(SIZES + ti))
    if W_IS_TENSOR:
        w = tl.load(W).to(tl.float32)
    else:
        w = w_value
    if end - start == CHUNK:  # a whole chunk: no mask (a mask of unknown alignment would forbid vector accesses)
        for j in range(0, CHUNK, BLOCK):
            offs = tl.max_contiguous(tl.multiple_of(start + j + tl.arange(0, BLOCK), BLOCK), BLOCK)
            e = tl.load(BASE + dst_off + offs).to(tl.float32)
            s = tl.load(BASE + src_off + offs).to(tl.float32)
            tl.store(BASE + dst_off + offs, (e + w * (s - e)).to(BASE.dtype.element_ty))
    else:  # a tensor's last, partial chunk
        for j in range(0, CHUNK, BLOCK):
            offs = start + j + tl.arange(0, BLOCK)
            m = offs < end
            e = tl.load(BASE + dst_off + offs, mask=m).to(tl.float32)
            s = tl.load(BASE + src_off + offs, mask=m).to(tl.float32)
            tl.store(BASE + dst_off + offs, (e + w * (s - e)).to(BASE.dtype.element_ty), mask=m)


def _check_no_overlap(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """ValueError if a tensor of ``dst`` shares memory with another of ``dst`` or with a tensor of ``src`` other
    than its own pair's (which may be the same tensor): the kernel's programs would update it twice or read
    values another program is writing."""
    spans = []  # (first byte, end, is dst, name)
    for i, (d, s) in enumerate(zip(dst, src)):
        size = d.numel() * d.element_size()
        if size:
            spans.append((d.data_ptr(), d.data_ptr() + size, True, f"dst[{i}]"))
            if s.data_ptr() != d.data_ptr():
                spans.append((s.data_ptr(), s.data_ptr() + size, False, f"src[{i}]"))
    spans.sort()
    last_any = last_dst = (0, "")  # (end, name) of the earlier span reaching furthest, of any kind / of dst
    for start, end, is_dst, name in spans:
        other = last_any if is_dst else last_dst
        if start < other[0]:
            raise ValueError(f"{name} overlaps {other[1]} in memory: dst tensors must not share memory with each "
                             "other or with another pair's src")
        last_any = max(last_any, (end, name))
        if is_dst:
            last_dst = max(last_dst, (end, name))


class MultiTensorLerp:
    """``dst[i] += weight * (src[i] - dst[i])`` for all i in one kernel launch (see the module doc).

    ``dst`` and ``src``: equally long sequences of contiguous tensors, pairwise of the same shape, all of one
    float dtype and on one device; no two dst tensors share memory, nor a dst tensor with another pair's src.
    Call with ``weight`` a float or a 0-dim float tensor on that device.
    """

    def __init__(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]):
        dst, src = list(dst), list(src)
        if len(dst) != len(src) or not dst:
            raise ValueError(f"dst and src must be equally long, non-empty lists, got {len(dst)} and {len(src)}")
        dtype, device = dst[0].dtype, dst[0].device
        for i, (d, s) in enumerate(zip(dst, src)):
            check_tensor(f"dst[{i}]", d, dtypes=(dtype,) if dtype in FLOAT_DTYPES else FLOAT_DTYPES, device=device,
                         contiguous=True)
            check_tensor(f"src[{i}]", s, shape=tuple(d.shape), dtypes=(dtype,), device=device, contiguous=True)
        _check_no_overlap(dst, src)
        self.dst, self.src, self.device = dst, src, device
        self._storages = self._addresses()
        self.aligned = all(a % 16 == 0 and b % 16 == 0 for a, b in self._storages)
        chunks = [(i, start) for i, d in enumerate(dst) for start in range(0, d.numel(), CHUNK)]
        self.num_chunks = len(chunks)
        base, size = dst[0].data_ptr(), dst[0].element_size()
        self._dst_offs = torch.tensor([(d.data_ptr() - base) // size for d in dst], dtype=torch.int64, device=device)
        self._src_offs = torch.tensor([(s.data_ptr() - base) // size for s in src], dtype=torch.int64, device=device)
        self._sizes = torch.tensor([d.numel() for d in dst], dtype=torch.int64, device=device)
        self._chunks = torch.tensor(chunks or [(0, 0)], dtype=torch.int64, device=device).view(-1)

    def _addresses(self) -> list[tuple[int, int]]:
        return [(d.data_ptr(), s.data_ptr()) for d, s in zip(self.dst, self.src)]

    def __call__(self, weight: float | torch.Tensor) -> None:
        if self._addresses() != self._storages:
            raise ValueError("a tensor of dst or src now lives in other memory (its .data was replaced) since this "
                             "MultiTensorLerp was built: build a new one")
        is_tensor = isinstance(weight, torch.Tensor)
        if is_tensor:
            check_tensor("weight", weight, shape=(), dtypes=FLOAT_DTYPES, device=self.device)
        elif not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ValueError(f"weight must be a float or a 0-dim tensor, got {type(weight).__name__}")
        if self.num_chunks:
            _lerp_kernel[(self.num_chunks,)](
                self.dst[0], self._dst_offs, self._src_offs, self._sizes, self._chunks,
                weight if is_tensor else self._sizes, 0.0 if is_tensor else float(weight), CHUNK=CHUNK, BLOCK=BLOCK,
                W_IS_TENSOR=is_tensor, ALIGNED=self.aligned, VECTOR=16 // self.dst[0].element_size(), num_warps=4)


def lerp_reference(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], weight: float | torch.Tensor) -> None:
    """Plain-PyTorch reference of ``MultiTensorLerp(dst, src)(weight)``: three foreach ops (in place on dst)."""
    diff = torch._foreach_sub(list(src), list(dst))
    torch._foreach_mul_(diff, weight)
    torch._foreach_add_(list(dst), diff)
