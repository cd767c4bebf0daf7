"""Activation memory of a training step per backend, counted exactly on any machine (no GPU needed).

    python bench/activation_memory.py [--models DiT-XL/2 MaskDiT-XL/2] [--batch 256]
                                      [--checkpointing none decoder all] [--compile none full]
                                      [--out bench/results]

The memory a training step holds between its forward and its backward is what the forward created and
the autograd graph keeps alive.  This script runs the EDM loss forward of each model and backend under
bf16 autocast on the CPU, records (a ``TorchDispatchMode``) a weak reference to every storage an op
creates, and after the forward, with the loss still alive, adds up the bytes of those still alive: the
tensors saved for the backward, the inputs kept by activation checkpointing, and nothing transient
(parameters and the batch itself are not counted: they are held anyway).  The triton backend's kernels
are not run (their launches are intercepted as in ``bench/kernel_resources.py``; only the sizes of what
they return matter).  The held bytes are affine in the batch, so two small batches give the figure at
``--batch`` exactly: per-image bytes x batch + a batch-independent part (mostly the bf16 copies of the
weights that autocast makes and the backward keeps).

Compiled training (``--compile regional|full``, as ``train.py --compile``) keeps what AOTAutograd's
min-cut partitioner decides, not what the eager autograd graph would: those rows compile with the
``aot_eager_decomp_partition`` backend (Inductor's decompositions and partitioner, the graphs then run
eagerly, so no code generation) and add up the storages the compiled graphs save for the backward
(``saved_tensors_hooks``; Inductor's kernels allocate outside PyTorch's dispatcher, so the storage count
above cannot see inside them).  For uncompiled rows the two counts agree.  Compiled rows are counted
without activation checkpointing only: what checkpointing keeps is invisible to the saved-tensor count
(regionally, the checkpoint holds a block's non-tensor arguments itself; compiled whole, the backward's
recomputation, which can hold several blocks' activations at once, happens after the count), so those
combinations need a GPU's peak (``bench/train_step.py --activation-checkpointing``).

The static memory of training (fp32 weights, gradients, AdamW's two moments and the EMA copy, 20 bytes a
parameter) is printed beside it; a GPU's peak adds transient buffers (attention workspaces, the
backward's temporaries) to the sum, so compare the measured peaks of ``bench/train_step.py``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_arguments, environment, write_results  # noqa: E402
from bench.kernel_resources import intercept_launches  # noqa: E402
from maskdit import EDMLoss, EDMPrecond, create_model, random_mask  # noqa: E402
from maskdit.distributed import LossModule  # noqa: E402
from maskdit.masking import token_layout  # noqa: E402
from maskdit.models import CHECKPOINTING  # noqa: E402
from maskdit.training import COMPILE_MODES, compile_blocks  # noqa: E402

BACKENDS = ("torch", "triton")
STATIC_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # fp32 weight, gradient, AdamW moments, EMA copy
PARTITION_BACKEND = "aot_eager_decomp_partition"  # Inductor's partitioner without its code generation


class _CreatedStorages(TorchDispatchMode):
    """Weak references to (and sizes of) the storages of every op output while active."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                self.created.append((StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        return out


def held_bytes(model: torch.nn.Module, batch: int, mask_ratio: float, loss_fn=None, compiled: bool = False) -> int:
    """Bytes of the storages the EDM loss forward created that are still alive after it (parameters and
    the batch excluded): what the step holds for its backward.  ``loss_fn``: ``training_loss(model)`` or
    a compiled one, then ``compiled=True`` counts the bytes of the storages saved for the backward."""
    g = torch.Generator().manual_seed(0)
    res = model.input_size
    images = torch.randn(batch, model.in_channels, res, res, generator=g)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    # drawn and packed outside the (compiled) forward, as train.py does
    sigma, noise = EDMLoss().sample_sigma(batch, "cpu", g), torch.randn(images.shape, generator=g)
    ids = random_mask(batch, model.num_tokens, mask_ratio, generator=g).ids_keep if mask_ratio else None
    layout = None if ids is None else token_layout(ids, batch, model.num_tokens, images.device)
    args = (images, labels, layout, sigma, noise)
    held_anyway = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), images]}
    loss_fn = loss_fn or training_loss(model)
    if not compiled:
        mode = _CreatedStorages()
        with mode, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(*args)
        gc.collect()
        alive = {ref.cdata: n for ref, n in mode.created if not ref.expired()}
    else:
        alive = {}

        def pack(t):
            alive[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(*args)
    del loss
    return sum(n for cdata, n in alive.items() if cdata not in held_anyway)


def training_loss(model: torch.nn.Module, compile_mode: str = "none"):
    """(images, labels, layout, sigma, noise) -> mean EDM loss of ``model`` (``maskdit.distributed.LossModule``),
    compiled as ``train.py --compile`` does (``regional``: the model's blocks, in place; ``full``: the whole
    module) with ``PARTITION_BACKEND``."""
    module = LossModule(EDMPrecond(model), EDMLoss())
    if compile_mode == "regional":
        compile_blocks(model, backend=PARTITION_BACKEND)
    elif compile_mode == "full":
        module = torch.compile(module, backend=PARTITION_BACKEND)
    return lambda *args: module(*args).mean()


def measure(name: str, backend: str, batch: int, checkpointing: str = "none", compile_mode: str = "none",
            small=(2, 4), keep_norm_outputs: bool = False) -> dict:
    """Held activation bytes at ``batch`` from two small batches (affine fit), and the static bytes."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = create_model(name, backend=backend).set_activation_checkpointing(checkpointing)
    model.set_keep_norm_outputs(keep_norm_outputs)
    ratio = 0.5 if name.startswith("MaskDiT") else 0.0
    loss_fn = training_loss(model, compile_mode)
    # compiled: each batch size compiles its own static graph (the second compile, with dynamic shapes, took
    # a third longer here for the same count)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        counts = [held_bytes(model, b, ratio, loss_fn, compiled=compile_mode != "none") for b in small]
    per_image = (counts[1] - counts[0]) / (small[1] - small[0])
    fixed = counts[0] - per_image * small[0]
    n_params = sum(p.numel() for p in model.parameters())
    del model, loss_fn
    torch._dynamo.reset()
    gc.collect()  # an XL model and its autocast copies are gigabytes: one at a time
    return dict(model=name, backend=backend, checkpointing=checkpointing, compile=compile_mode, batch=batch,
                mask_ratio=ratio, keep_norm_outputs=keep_norm_outputs,
                activation_gb=(fixed + per_image * batch) / 1e9, activation_mb_per_image=per_image / 1e6,
                batch_independent_gb=fixed / 1e9, static_gb=n_params * STATIC_BYTES_PER_PARAM / 1e9)


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"## Activation memory of a training step (held for the backward), batch {rows[0]['batch']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; counted on {env['device']}: storages "
             "the EDM loss forward created that are still alive after it, under bf16 autocast (exact sizes, no "
             "GPU); 256x256 images (32x32x4 latents). Static = fp32 weights + gradients + AdamW moments + EMA.", "",
             "Compiled rows: what the compiled graphs save (Inductor's partitioner, see the script).", "",
             "vs DiT: against the DiT row of the same size, backend, compile mode and checkpointing (DiT without "
             "checkpointing for MaskDiT's 'decoder'); activations + static is what the step holds at its peak, "
             "before the backward's transient buffers. 'triton, norms kept': DiT.set_keep_norm_outputs (the "
             "modulated LayerNorm outputs kept for the backward, not recomputed).", "",
             "| model | backend | compile | checkpointing | mask ratio | activations GB | MB per image | "
             "batch-independent GB | static GB | activations vs eager torch backend | activations vs DiT | "
             "activations + static vs DiT |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    torch_rows = {r["model"]: r for r in rows
                  if r["backend"] == "torch" and r["checkpointing"] == "none" and r["compile"] == "none"}

    def backend(r):
        return r["backend"] + (", norms kept" if r.get("keep_norm_outputs") else "")

    dit_rows = {(r["model"].split("-", 1)[1], backend(r), r["compile"], r["checkpointing"]): r for r in rows
                if r["model"].startswith("DiT-")}
    for r in rows:
        base = torch_rows.get(r["model"])
        ratio = f"{r['activation_gb'] / base['activation_gb']:.2f}x" if base else "-"
        dit = None
        if r["model"].startswith("MaskDiT-"):
            ckpt = "none" if r["checkpointing"] == "decoder" else r["checkpointing"]
            dit = dit_rows.get((r["model"].split("-", 1)[1], backend(r), r["compile"], ckpt))
        vs_dit = (f"{r['activation_gb'] / dit['activation_gb']:.2f}x | "
                  f"{(r['activation_gb'] + r['static_gb']) / (dit['activation_gb'] + dit['static_gb']):.2f}x"
                  if dit else "- | -")
        lines.append(f"| {r['model']} | {backend(r)} | {r['compile']} | {r['checkpointing']} | {r['mask_ratio']} | "
                     f"{r['activation_gb']:.1f} | "
                     f"{r['activation_mb_per_image']:.1f} | {r['batch_independent_gb']:.2f} | {r['static_gb']:.1f} "
                     f"| {ratio} | {vs_dit} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["DiT-XL/2", "MaskDiT-XL/2"])
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--checkpointing", nargs="+", default=["none", "decoder", "all"], choices=CHECKPOINTING,
                    help="activation checkpointing settings to count (DiT.set_activation_checkpointing; "
                         "'decoder' applies to MaskDiT only)")
    ap.add_argument("--compile", nargs="+", default=["none", "full"], choices=COMPILE_MODES,
                    help="count eager training and/or training compiled as train.py --compile full|regional "
                         "(compiled rows without checkpointing only; each compiles for about a minute here)")
    ap.add_argument("--no-kept-norms", dest="kept_norms", action="store_false",
                    help="skip the triton rows with the modulated LayerNorm outputs kept (DiT.set_keep_norm_outputs; "
                         "eager, without checkpointing)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="folder for activation_memory.json / .md (default bench/results: the counts are exact "
                         "sizes, the same on every machine)")
    args = ap.parse_args(argv)
    check_arguments(ap, args, models="models", at_least_one=("batch",))
    rows = []
    with intercept_launches():  # the triton backend's kernels are not run
        for name in args.models:
            for backend in args.backends:
                for mode in args.compile:
                    for which in args.checkpointing:
                        if (which == "decoder" and not name.startswith("MaskDiT")) or (mode != "none" != which):
                            continue  # compiled + checkpointing: not countable here (see the docstring)
                        rows.append(measure(name, backend, args.batch, which, mode))
                        print(rows[-1], flush=True)
                        if args.kept_norms and backend == "triton" and mode == "none" == which:
                            rows.append(measure(name, backend, args.batch, which, mode, keep_norm_outputs=True))
                            print(rows[-1], flush=True)
    env = environment()
    md = markdown(env, rows)
    print(md)
    print("wrote", *write_results(args.out, "activation_memory", dict(env, rows=rows), md))
    return rows


if __name__ == "__main__":
    main()
