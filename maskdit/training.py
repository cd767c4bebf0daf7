"""Training utilities: exponential moving average of the weights, the optimizer, regional compilation, stop
signals."""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.nn as nn

# the signals a scheduler sends before it kills a job (SLURM: SIGTERM, or SIGUSR1 with --signal)
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class EMA:
    """Exponential moving average of a model's parameters.

    ``update(weight)`` makes ema += weight * (param - ema), i.e. ema = decay * ema + (1 - decay) * param with
    weight = 1 - decay, a float or a 0-dim tensor (a tensor of 0 leaves the average bitwise unchanged, which
    lets a skipped step skip the EMA without a host sync).  With ``fused`` (default: when every parameter is
    a CUDA tensor of one float dtype and triton is installed) one Triton launch updates all parameters, reading
    each average and parameter once and writing the average once (``kernels.ema.MultiTensorLerp``); otherwise
    three ``torch._foreach_*`` ops, which also make a temporary copy of the parameters.  Buffers are copied.
    """

    def __init__(self, model: nn.Module, ema_model: nn.Module, fused: bool | None = None):
        names, ema_names = [n for n, _ in model.named_parameters()], [n for n, _ in ema_model.named_parameters()]
        if names != ema_names:
            raise ValueError("ema_model must have the same parameters as model (e.g. a deepcopy of it)")
        self.model = model
        self.ema_model = ema_model
        ema_model.requires_grad_(False)
        self.ema_params = list(ema_model.parameters())
        self.params = [p.detach() for p in model.parameters()]
        self.copy_from_model()
        if fused is None:
            fused = _fusable(self.params + self.ema_params)
        self._lerp = None
        if fused:
            from kernels.ema import MultiTensorLerp

            self._lerp = MultiTensorLerp(self.ema_params, self.params)

    @staticmethod
    def fused_for(backend: str) -> bool | None:
        """``fused`` for the EMA of a network of ``backend``: False for "torch" (plain PyTorch throughout), else
        None (the EMA's own choice: its Triton kernel for CUDA parameters)."""
        return False if backend == "torch" else None

    @property
    def fused(self) -> bool:
        return self._lerp is not None

    @torch.no_grad()
    def copy_from_model(self) -> None:
        torch._foreach_copy_(self.ema_params, self.params)
        for eb, b in zip(self.ema_model.buffers(), self.model.buffers()):
            eb.copy_(b)

    @torch.no_grad()
    def update(self, weight: float | torch.Tensor) -> None:
        """ema += weight * (param - ema), i.e. ema = decay * ema + (1 - decay) * param with weight = 1 - decay."""
        if self._lerp is not None:
            self._lerp(weight)
            return
        diff = torch._foreach_sub(self.params, self.ema_params)
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(self.ema_params, diff)


def _fusable(tensors: list[torch.Tensor]) -> bool:
    """Whether ``kernels.ema`` can average these: contiguous CUDA tensors of one float dtype, triton installed."""
    if not tensors or tensors[0].device.type != "cuda" or tensors[0].dtype not in (torch.float32, torch.bfloat16,
                                                                                     torch.float16):
        return False
    if any(t.device != tensors[0].device or t.dtype != tensors[0].dtype or not t.is_contiguous() for t in tensors):
        return False
    try:
        import kernels.ema  # noqa: F401  (needs triton)
    except ImportError:
        return False
    return True


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """``decay``, capped during warm-up at (1 + step) / (10 + step) so short runs average recent weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float],
                   weight_decay: float, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW (fused kernel: one launch for all parameters, and skips steps via ``found_inf`` with no sync);
    ``capturable`` for a step captured into a CUDA graph (``maskdit.cuda_graphs``)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, eps=1e-8,
                             fused=True, capturable=capturable)


COMPILE_MODES = ("none", "full", "regional")


def compile_blocks(model: nn.Module, **compile_options) -> int:
    """Regional compilation: ``torch.compile`` every transformer block (``DiTBlock``) in ``model`` (a network, or
    a module holding one: the EDM denoiser, a loss module) in place; returns how many.

    The blocks of a stack run the same code on same-shaped parameters, so Dynamo traces and Inductor
    compiles a graph for a stack's body (and one for its last block, whose arguments differ) that every
    block reuses: the compile time of a couple of blocks, however deep the network.  Fusion across block
    boundaries is lost; the patch embedding, the batched adaLN GEMM, the final layer and the loss stay
    eager.  ``full`` compilation (``torch.compile`` of the whole loss function) is the alternative.
    ``compile_options`` go to ``torch.compile`` (``backend``, ``mode``, ...).
    """
    from .models import DiTBlock

    blocks = [m for m in model.modules() if isinstance(m, DiTBlock)]
    for block in blocks:
        block.compile(**compile_options)
    return len(blocks)


def compile_network(net: nn.Module, mode: str, **compile_options) -> nn.Module:
    """``net`` compiled as ``mode`` (one of ``COMPILE_MODES``) says: "none" returns it as it is, "full" returns
    ``torch.compile(net)`` (a module sharing net's parameters), "regional" compiles net's transformer blocks in
    place (``compile_blocks``) and returns net.  ``compile_options`` go to ``torch.compile``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "full":
        return torch.compile(net, **compile_options)
    if mode == "regional":
        compile_blocks(net, **compile_options)
    return net


@contextlib.contextmanager
def stop_signals(signals=STOP_SIGNALS):
    """Within the block, ``signals`` do not end the process: each one received is appended to the yielded list,
    for the training loop to see at its next log step, write a checkpoint and stop.  The previous handlers
    come back after the block; outside the main thread (where Python cannot install handlers) nothing is
    installed.  Processes forked inside the block (data-loader workers) inherit the handlers:
    ``default_signal_handlers`` gives them back the default ones."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def default_signal_handlers(_worker_id: int = 0) -> None:
    """The default handlers of ``STOP_SIGNALS`` (a DataLoader ``worker_init_fn``: a worker ends when told to)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
