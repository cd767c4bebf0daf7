"""Multi-process training: process group, rank helpers, the DDP / FSDP2 wrappers and full-state checkpoints.

``torchrun --nproc_per_node=N train.py ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; ``setup`` then joins the
process group (NCCL on CUDA, gloo on the CPU) and gives each process cuda:LOCAL_RANK.  Without WORLD_SIZE > 1
nothing here creates a process group and every helper is a no-op, so a single process runs unchanged.

The data stream and all per-sample random draws are defined by the GLOBAL batch (per-process micro-batch x
processes x gradient-accumulation steps): every process computes the same permutation and the same draws for
the whole global batch and keeps its own rows (``DistEnv.rows``), so N processes train exactly like one process
with the same global batch, up to the order of floating-point sums.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


def pick_device(name: str) -> torch.device:
    """The device a ``--device`` value names: "auto" (CUDA if present, else the CPU), "cpu", "cuda", "cuda:N", ...;
    ValueError naming ``--device`` for a name torch does not know or CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a valid device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def global_batch(self, micro_batch: int, grad_accum: int) -> int:
        return micro_batch * self.world_size * grad_accum

    def parts(self, grad_accum: int) -> list[int]:
        """The parts of each global batch (cut into world_size x grad_accum micro-batches) this process
        trains on, in order: rank r takes the contiguous parts r*A .. r*A + A - 1."""
        return list(range(self.rank * grad_accum, (self.rank + 1) * grad_accum))

    def rows(self, micro: int, micro_batch: int, grad_accum: int) -> slice:
        """The rows of the global batch (and of its per-sample random draws) in this process's micro-batch
        ``micro`` (0 .. grad_accum - 1): the same rows ``parts`` gives the data sampler."""
        start = (self.rank * grad_accum + micro) * micro_batch
        return slice(start, start + micro_batch)


def setup(device: torch.device) -> DistEnv:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun); else a single-process ``DistEnv``.

    On CUDA each process uses cuda:LOCAL_RANK and NCCL; on the CPU gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world_size, device)


def cleanup() -> None:
    """Leave the process group, all processes together (a barrier first: one rank tearing down while another
    still talks to it once aborted a 2-process gloo run at exit, "terminate called without an active
    exception", in CI)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (e.g. a run folder named after the time)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of the processes' ``value`` (a host int; a sync: for log steps), e.g. a stop request that
    only some processes received."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all processes (an asynchronous all-reduce on CUDA: no host sync)."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The L2 norm of ``model``'s gradients over all processes, an fp32 device scalar (no host sync): FSDP2's
    gradient shards add their squares across processes; DDP's gradients, all-reduced, are the same in every
    process and count once.  0 when no parameter has a gradient."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this process's shards
    if grads:
        squares = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()
    else:
        squares = torch.zeros((), device=next(model.parameters()).device)
    if is_sharded(model):
        dist.all_reduce(squares)
    return squares.sqrt()


class LossModule(nn.Module):
    """The training forward as one module: the per-sample EDM loss (N,) of ``net`` (an ``EDMPrecond``).

    This is the module DDP wraps (and the FSDP2 root), so whichever path the loss takes -- ``net(...)`` on
    the torch backend or ``net.model.forward_tokens`` on the triton backend -- runs inside the wrapper's
    forward and every gradient is synchronised.  ``0 * mask_token.sum()`` keeps the mask token in the graph
    when nothing is masked (mask ratio 0), as the official code does, so DDP needs no
    ``find_unused_parameters`` (both backends already give it a zero gradient then; this makes it certain).
    """

    def __init__(self, net: nn.Module, loss_fn):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn

    def forward(self, images, labels, ids_keep, sigma, noise) -> torch.Tensor:
        loss = self.loss_fn(self.net, images, labels, ids_keep, sigma=sigma, noise=noise)
        mask_token = getattr(self.net.model, "mask_token", None)
        if isinstance(mask_token, nn.Parameter):  # (a zero buffer without --mae-coef: nothing to train)
            loss = loss + 0 * mask_token.sum()
        return loss


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks) + list(getattr(model, "decoder_blocks", []))


def shard(module: nn.Module, model: nn.Module) -> nn.Module:
    """FSDP2: shard every encoder / decoder block of ``model`` and then ``module`` (the root, holding the
    remaining parameters: embedders, bridge, mask token, final layer, the adaLN GEMM).  ``module`` is the
    loss module around ``model`` for training, or ``model`` itself for its EMA copy (never run: sharded only
    so that its shards line up with the model's)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # DiT blocks return views; nothing modifies them in place, so FSDP2's warning about that does not apply
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def wrap(loss_module: LossModule, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """The module to call for the loss: ``loss_module`` itself (one process), DDP around it, or FSDP2."""
    if not env.distributed:
        return loss_module
    if fsdp:
        return shard(loss_module, loss_module.net.model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    # buffers (the fixed positional embeddings) never change: no per-step broadcast of them
    ddp = nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})  # the older name (torch < 2.13)
    return ddp(loss_module, device_ids=ids, **no_buffer_sync)


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 holds ``module``'s parameters as shards (DTensors)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def grad_sync(module: nn.Module, sync: bool):
    """A context for one micro-batch's forward and backward: gradients are reduced across processes only
    when ``sync`` (the last micro-batch of a step).  Single process: nothing to do."""
    module = getattr(module, "_orig_mod", module)  # under torch.compile
    if isinstance(module, nn.parallel.DistributedDataParallel) and not sync:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


class LocalShards(nn.Module):
    """The local shards of ``module``'s parameters (FSDP2 DTensors), as plain parameters sharing their storage,
    with its buffers: lets ``training.EMA`` average sharded weights shard by shard with its foreach ops."""

    def __init__(self, module: nn.Module):
        super().__init__()
        for i, p in enumerate(module.parameters()):
            local = p.to_local() if hasattr(p, "to_local") else p
            self.register_parameter(f"p{i}", nn.Parameter(local.detach(), requires_grad=False))
        for i, b in enumerate(module.buffers()):
            self.register_buffer(f"b{i}", b)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict:
    """The model's complete state dict (collective when sharded: call it on every rank; then only rank 0
    receives the tensors, on the CPU)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def load_full_state_dict(model: nn.Module, state: dict) -> None:
    """Load a complete state dict (a checkpoint's, every rank holding it) into a plain or sharded model."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state in ``optimizer.state_dict()``'s format (parameters numbered in ``model.parameters()``
    order), also when the model is sharded: then gathered (collective) and converted from names to numbers,
    so checkpoints of sharded and unsharded runs are interchangeable."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not osd:  # ranks other than 0
        return {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in osd["param_groups"]]
    return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``optimizer.state_dict()``-format state (a checkpoint's) into the optimizer of a plain or sharded model."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    osd = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
