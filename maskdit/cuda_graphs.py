"""A whole training step as one CUDA graph: the host issues the step with a single launch.

At small batches (MaskDiT-XL/2 at 32-64 images on an H200) the host's Python, autograd and launch work for
a step takes longer than the GPU's kernels (``bench/profile_step.py``): the GPU waits.  Capturing the step
(forward, backward, optimizer step, EMA) into a CUDA graph and replaying it leaves only the kernels.

What a captured step must satisfy (PyTorch's CUDA-graph rules):
- fixed shapes: the same batch size and, for MaskDiT, the same number of kept tokens every step (a uniform
  mask ratio; per-sample ratios change the packed layout);
- no host synchronisation and no host-side decision on device values inside the step;
- random draws from torch's default CUDA generator (graph-safe: each replay advances its offset);
- an optimizer built with ``capturable=True`` (AdamW, fused or not), whose learning rate and hyper-parameters
  are frozen at capture unless they are tensors updated in place;
- ``torch.autocast(..., cache_enabled=False)`` inside the step (the cast cache would outlive the capture).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch


class GraphedStep:
    """Run ``step_fn(*inputs)`` eagerly for its first ``warmup_steps`` calls, then capture it into a CUDA
    graph and replay that graph on every later call's inputs.

    ``step_fn`` is the whole step; it may return a tensor, a tuple of tensors or None.  Every call is a real
    step on its inputs: the warm-up calls run on a side stream (as capture requires: Triton compiles its
    kernels, cuBLAS and the allocator settle), the next call copies its inputs into the graph's input
    tensors, captures and replays, later calls copy and replay.  Inputs are CUDA tensors of the same shapes
    and dtypes at every call.  From the capture on, a call returns the graph's output tensors, which the next
    call overwrites (clone what must be kept).
    """

    def __init__(self, step_fn: Callable, warmup_steps: int = 3):
        if not callable(step_fn):
            raise ValueError(f"step_fn must be callable, got {type(step_fn).__name__}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive int (capture needs a warmed-up step), "
                             f"got {warmup_steps!r}")
        self.step_fn, self.warmup_steps = step_fn, warmup_steps
        self.calls = 0
        self.inputs: tuple[torch.Tensor, ...] | None = None  # the graph's input tensors, once captured
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _check(self, inputs: Sequence[torch.Tensor]) -> None:
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
                where = x.device if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"inputs[{i}] must be a CUDA tensor (CUDA graphs need CUDA), got {where}")
        if self.inputs is None:
            return
        if len(inputs) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs (as captured), got {len(inputs)}")
        for i, (static, x) in enumerate(zip(self.inputs, inputs)):
            if x.shape != static.shape or x.dtype != static.dtype:
                raise ValueError(f"inputs[{i}] must have shape {tuple(static.shape)} and dtype {static.dtype} "
                                 f"(as captured), got {tuple(x.shape)} {x.dtype}")

    def __call__(self, *inputs: torch.Tensor):
        """One step on ``inputs``."""
        self._check(inputs)
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup_steps:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():
                # AdamW(capturable=True) warns when it steps outside a capture: here it must, to warm up
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                out = self.step_fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.inputs = tuple(x.detach().clone() for x in inputs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records the step; nothing runs until the replay below
                self.outputs = self.step_fn(*self.inputs)
            self.graph = graph
        else:
            for static, x in zip(self.inputs, inputs):
                static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs
