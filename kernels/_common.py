"""Shared launcher helpers: input validation with clear errors, block and grid sizes, the per-sample and
per-column sum buffers (deterministic or atomic), the custom-op wrapper (``autograd_op``) with its refusals of
double backward and of nondeterminism where it is asked for, and the token->sample map.

Convention of the kernels: atomic adds pass ``sem="relaxed"``.  Triton's default, acq_rel, compiles each
one to a scalar ``atom.acq_rel`` (ordered against the program's other memory accesses, masked-off lanes
included) where relaxed gives vector ``atom.relaxed.add.v4.f32``; the sums are read only by later launches,
which need no ordering inside the kernel.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to fill every output with NaN (floats) or -1 (integers) before the kernel runs, so an
# element a kernel forgets to write fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = False
# Tests set this to take the deterministic backward paths on the CPU too (see ``deterministic``).
FORCE_DETERMINISTIC = False


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, or a poisoned tensor when ``POISON_OUTPUTS`` is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(name: str, t, *, ndim: int | None = None, shape: tuple | None = None, dtypes=None,
                 device: torch.device | None = None, last_stride_one: bool = False, contiguous: bool = False):
    """Raise ValueError naming ``name`` unless ``t`` is a tensor with the given properties.

    ``shape`` entries of None match any size.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and (t.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {t.device}")
    if t.device.type == "cpu" and not interpreting() and not t.is_meta:
        raise ValueError(f"{name} is on the CPU: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    if last_stride_one and t.ndim and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t


def readable_on_host(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t``: a CPU tensor outside tracing (a device tensor would cost a sync)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_out_dtype(out_dtype) -> None:
    """ValueError unless ``out_dtype`` is None or a floating dtype the kernels write."""
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(dt) for dt in FLOAT_DTYPES]} or None, got {out_dtype}")


def check_samples(seg: torch.Tensor, num_samples: int) -> None:
    """ValueError unless the token->sample map ``seg`` lies in [0, num_samples) (read on the host only)."""
    if seg.numel() and readable_on_host(seg):
        lo, hi = int(seg.min()), int(seg.max())
        if lo < 0 or hi >= num_samples:
            raise ValueError(f"seg must be in [0, {num_samples}) (the per-sample tensors' rows), got values in "
                             f"[{lo}, {hi}]")


def check_ordered_samples(seg: torch.Tensor) -> None:
    """ValueError unless ``seg`` never decreases (the samples in order, each one's tokens together, as the packed
    layout has them): what a deterministic backward over ``per_sample_sums_buffer`` needs.  Reads ``seg`` on the
    host, a synchronisation on CUDA; called in deterministic mode only."""
    if seg.numel() > 1 and bool((seg[1:] < seg[:-1]).any()):
        raise ValueError("seg must not decrease in deterministic mode (the samples in order, each one's tokens "
                         "together, as maskdit.masking packs them): the deterministic backward's per-sample sums "
                         "need it; the atomic backward does not")


def same_samples(**tensors) -> int:
    """The number of samples (rows) the per-sample tensors share; ValueError naming each count if they differ."""
    counts = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"{', '.join(counts)} must have one row per sample, the same number each, got "
                         + ", ".join(f"{name} {n}" for name, n in counts.items()))
    return next(iter(counts.values()))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints.  ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions that
    cost 1.6 us a call on the host against 0.07 for these (2-core CPU; several calls a launch)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1), a host int."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def block_size(n: int) -> int:
    """The power-of-two block covering ``n`` columns (at least 16)."""
    return max(16, next_power_of_2(n))


def column_blocks(n: int, split: bool) -> dict:
    """The power-of-two column blocks (BLOCK_A, BLOCK_B) a row kernel covers ``n`` columns with: one,
    ``block_size(n)`` (BLOCK_B = 0), or with ``split`` two, the largest power of two <= n and a block for the
    rest, when they cover fewer columns: 1024 + 128 at D 1152 instead of 2048, whose 896 idle lanes cost
    registers and instructions (two blocks: two reductions a row instead of one).  n a power of two, or no
    smaller cover: one block."""
    one = block_size(n)
    if split and n > 16:
        first = 1 << (n.bit_length() - 1)
        rest = n - first
        if rest and first + block_size(rest) < one:
            return dict(BLOCK_A=first, BLOCK_B=block_size(rest))
    return dict(BLOCK_A=one, BLOCK_B=0)


def num_warps(elements: int) -> int:
    """Warps for a program holding ``elements`` values per row/tile tensor: one per 256 values, 4 to 8.

    With 4 warps the fused backward kernels on 2048-wide rows (D 1152) took 162-187 registers a thread
    (``bench/kernel_resources.py``, sm_90: two 4-warp programs per SM); with 8 warps 99-124 (two 8-warp
    programs).
    """
    return min(8, max(4, elements // 256))


def forward_warps(elements: int) -> int:
    """Warps for a LayerNorm forward program holding ``elements`` values per tile tensor: one per 512
    values, 4 to 8.  The forwards keep fewer values live than the backwards; on an H200 at D 1152 (2048-wide
    blocks) 4 warps ran ln_modulate in 0.073 ms against 0.084 with 8, gated_residual_ln_modulate in 0.127
    against 0.131 (``bench/kernels.py`` launch-parameter rows)."""
    return min(8, max(4, elements // 512))


def backward_options(warps: int, stages: int, programs: int = 2) -> dict:
    """Launch options of a backward program of ``warps`` warps whose loop over rows (or tiles of rows) is
    software-pipelined over ``stages`` (``tl.range(num_stages=...)``): when pipelined (the next rows' loads
    issued, through shared memory, before this row's reductions), registers capped so that ``programs``
    programs still share a multiprocessor's 64K registers (two: 128 a thread at 8 warps, no cap at 4) (offline
    sm_90 build of gated_residual_ln_modulate's bf16 backward at D 1152 with 2 stages: 159 registers uncapped,
    128 capped without spills)."""
    cap = 65536 // (programs * 32 * warps)  # registers a thread with that many programs on a multiprocessor
    return dict(num_warps=warps, **({"maxnreg": cap} if stages > 1 and cap < 255 else {}))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of CUDA ``device`` (the current device when it has no index)."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def rows_per_program(num_rows: int, device: torch.device, most: int) -> int:
    """Rows a program walks in a kernel that sums over rows in registers: ``most``, halved (not below 8)
    while that leaves fewer than four programs per multiprocessor (small batches on a large GPU; at D 1152
    two backward programs fit an SM at once).  The CPU interpreter always takes ``most``."""
    if device.type != "cuda":
        return most
    sms = multiprocessors(device)
    rows = most
    while rows > 8 and cdiv(num_rows, rows) < 4 * sms:
        rows //= 2
    return rows


def deterministic(device: torch.device) -> bool:
    """Whether backward kernels must avoid atomic adds: under ``torch.use_deterministic_algorithms(True)`` on
    CUDA.  They then store each program's partial sum of a sample in its own row and reduce the rows per
    sample with ``index_add_`` (deterministic in that mode), see ``per_sample_sums_buffer``."""
    return FORCE_DETERMINISTIC or (device.type == "cuda" and torch.are_deterministic_algorithms_enabled())


def per_sample_sums_buffer(programs: int, num_samples: int, width: int, device, det: bool,
                           count: int = 1) -> torch.Tensor:
    """The zeroed fp32 buffer, (count, rows, D), that a backward kernel over consecutive token rows flushes
    ``count`` per-sample partial sums into (one allocation and one zeroing for all of them): rows = N for
    atomic adds; deterministic, programs + N, program p storing its sum for sample s in row p + s (distinct
    for every pair, as both grow along the tokens: ``seg`` must not decrease, ``check_ordered_samples``),
    unwritten rows zero."""
    rows = programs + num_samples if det else num_samples
    return torch.zeros((count, rows, width), device=device, dtype=torch.float32)


def row_samples_buffer(programs: int, num_samples: int, device, det: bool) -> torch.Tensor:
    """The zeroed int32 map from a deterministic buffer's rows to samples (row p + s -> s, written by the
    kernel with the sums); one unused element when not deterministic (no zeroing launched)."""
    if not det:
        return torch.empty(1, device=device, dtype=torch.int32)
    return torch.zeros(programs + num_samples, device=device, dtype=torch.int32)


def per_sample_sums(buffer: torch.Tensor, row_samples: torch.Tensor, num_samples: int, det: bool) -> torch.Tensor:
    """(count, N, D) sums from ``per_sample_sums_buffer`` after the kernel: deterministic, the rows of each
    sample added in a fixed order."""
    if not det:
        return buffer
    out = torch.zeros((buffer.shape[0], num_samples, buffer.shape[2]), device=buffer.device, dtype=buffer.dtype)
    return out.index_add_(1, row_samples.long(), buffer)


def row_tiles(num_rows: int, tile_rows: int, most_rows: int) -> tuple[int, int, int]:
    """(rows of a tile, tiles of a program, row blocks) for a kernel whose programs walk up to ``most_rows``
    rows of a column block in tiles of ``tile_rows`` (a power of two) and sum them over the rows."""
    block_t = min(tile_rows, next_power_of_2(max(num_rows, 1)))
    tiles = max(1, min(most_rows, num_rows) // block_t)
    return block_t, tiles, cdiv(num_rows, block_t * tiles)


def column_sums_buffer(row_blocks: int, width: int, device, det: bool) -> torch.Tensor:
    """The fp32 buffer such a kernel leaves its column sums in: one zeroed row its programs add into with
    atomics; deterministic, one row per row block, every one written (``new_output``: poisoned in the tests)."""
    if det:
        return new_output((row_blocks, width), torch.float32, device)
    return torch.zeros((1, width), dtype=torch.float32, device=device)


def column_sums(buffer: torch.Tensor, det: bool) -> torch.Tensor:
    """The (width,) sums from ``column_sums_buffer`` after the kernel: deterministic, the rows added in order."""
    return buffer.sum(0) if det else buffer.view(-1)


def cast_sums(sums: torch.Tensor, dtypes) -> tuple[torch.Tensor, ...]:
    """The (count, N, D) fp32 sums as ``count`` gradients in ``dtypes``: one cast when the dtypes agree (the
    modulation tensors are slices of one adaLN output)."""
    if all(dt == dtypes[0] for dt in dtypes):
        return sums.to(dtypes[0]).unbind(0)
    return tuple(g.to(dt) for g, dt in zip(sums.unbind(0), dtypes))


def alert_nondeterministic(op: str, device: torch.device) -> None:
    """Honour ``torch.use_deterministic_algorithms``: ``op``'s CUDA backward adds fp32 partial sums with
    atomics, whose order (and so the last bits of the result) can change from run to run.  Raises
    RuntimeError in deterministic mode, warns with ``warn_only=True``; the CPU interpreter is deterministic."""
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{op} has no deterministic CUDA implementation (fp32 atomic adds); use the model's "
           "backend='torch', or torch.use_deterministic_algorithms(True, warn_only=True) to allow it")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg)
    else:
        raise RuntimeError(msg)


def refuse_double_backward(name: str) -> None:
    """RuntimeError inside the backward of autograd Function ``name`` when it runs with grad mode on, i.e. under
    ``backward(create_graph=True)``: its kernels' gradients are not differentiable, and a higher-order gradient
    through them (a gradient penalty) would silently lose its terms.  Nothing while ``torch.compile`` traces the
    backward (it refuses double backward itself)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{name}: the fused kernels have no double backward (create_graph=True through them); "
                           "use the torch backend, with SDPA's math attention, for higher-order gradients")


def autograd_op(name: str, fwd_op, fwd_impl, bwd_op, bwd_impl, setup_context, backward):
    """Give the custom op pair (``fwd_op``, ``bwd_op``) with Python implementations (``fwd_impl``,
    ``bwd_impl``) its autograd: ``setup_context(ctx, inputs, output)`` and ``backward(ctx, bwd, *grads)``.
    Returns ``call(*inputs)``: the custom op inside ``torch.compile``, which needs it, and otherwise an
    autograd.Function ``name`` with the same autograd around the implementations, called directly.  The custom
    op's dispatch layers (autograd wrapper, redispatch, Dynamo-disable wrapper) cost host time at every call,
    which bounds small-batch steps (``bench/host_overhead.py``)."""
    fwd_op.register_autograd(lambda ctx, *grads: backward(ctx, bwd_op, *grads), setup_context=setup_context)

    def forward(ctx, *inputs):
        output = fwd_impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def eager_backward(ctx, *grads):
        refuse_double_backward(name)
        return backward(ctx, bwd_impl, *grads)

    eager = type(name, (torch.autograd.Function,), dict(forward=staticmethod(forward),
                                                        backward=staticmethod(eager_backward)))

    def call(*inputs):
        return fwd_op(*inputs) if torch.compiler.is_compiling() else eager.apply(*inputs)

    return call


def token_samples(batch: int, tokens_per_sample: int, device) -> torch.Tensor:
    """The token->sample map (int32, batch * tokens_per_sample) of a dense (N, K, D) layout."""
    samples = torch.arange(batch, device=device, dtype=torch.int32)[:, None]
    return samples.expand(batch, tokens_per_sample).contiguous().view(-1)  # (no repeat_interleave: no sync)
