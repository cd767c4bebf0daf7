"""Activation memory of a training step per backend, counted exactly on any machine (no GPU needed).

    python bench/activation_memory.py [--models DiT-XL/2 MaskDiT-XL/2] [--batch 256] [--out bench/results]

The memory a training step holds between its forward and its backward is the tensors autograd saves.
This script runs the EDM loss forward of each model and backend under bf16 autocast on the CPU and adds
up, with ``torch.autograd.graph.saved_tensors_hooks``, the bytes of every distinct storage saved for the
backward (views share their storage and count once; parameters are left out: they are memory the model
holds anyway).  The triton backend's kernels are not run (their launches are intercepted as in
``bench/kernel_resources.py``; only the sizes of what they save matter).  Saved bytes are affine in the
batch, so two small batches give the figure at ``--batch`` exactly: per-image bytes x batch + a
batch-independent part (the bf16 copies of the weights that autocast makes and keeps for the backward).

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, write_results  # noqa: E402
from bench.kernel_resources import intercept_launches  # noqa: E402
from maskdit import EDMLoss, EDMPrecond, create_model, random_mask  # noqa: E402

BACKENDS = ("torch", "triton")
STATIC_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # fp32 weight, gradient, AdamW moments, EMA copy


def saved_bytes(model: torch.nn.Module, batch: int, mask_ratio: float) -> int:
    """Bytes of the distinct non-parameter storages the EDM loss forward saves for its backward."""
    net, loss_fn = EDMPrecond(model), EDMLoss()
    g = torch.Generator().manual_seed(0)
    res = model.input_size
    images = torch.randn(batch, model.in_channels, res, res, generator=g)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    ids = random_mask(batch, model.num_tokens, mask_ratio, generator=g).ids_keep if mask_ratio else None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t.detach()  # (returning a saved output itself would make a reference cycle through its grad_fn)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(net, images, labels, ids).mean()
    del loss
    return sum(storages.values())


def measure(name: str, backend: str, batch: int, small=(2, 4)) -> dict:
    """Saved-activation bytes at ``batch`` from two small batches (affine fit), and the static bytes."""
    torch.manual_seed(0)
    model = create_model(name, backend=backend)
    ratio = 0.5 if name.startswith("MaskDiT") else 0.0
    counts = [saved_bytes(model, b, ratio) for b in small]
    per_image = (counts[1] - counts[0]) / (small[1] - small[0])
    fixed = counts[0] - per_image * small[0]
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()  # an XL model and its autocast copies are gigabytes: one at a time
    return dict(model=name, backend=backend, batch=batch, mask_ratio=ratio,
                activation_gb=(fixed + per_image * batch) / 1e9, activation_mb_per_image=per_image / 1e6,
                batch_independent_gb=fixed / 1e9, static_gb=n_params * STATIC_BYTES_PER_PARAM / 1e9)


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"## Activation memory of a training step (saved for the backward), batch {rows[0]['batch']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; counted on {env['device']} with "
             "saved_tensors_hooks under bf16 autocast (exact sizes, no GPU); 256x256 images (32x32x4 latents). "
             "Static = fp32 weights + gradients + AdamW moments + EMA.", "",
             "| model | backend | mask ratio | activations GB | MB per image | batch-independent GB | static GB "
             "| activations vs torch backend |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    torch_rows = {r["model"]: r for r in rows if r["backend"] == "torch"}
    for r in rows:
        base = torch_rows.get(r["model"])
        ratio = f"{r['activation_gb'] / base['activation_gb']:.2f}x" if base else "-"
        lines.append(f"| {r['model']} | {r['backend']} | {r['mask_ratio']} | {r['activation_gb']:.1f} | "
                     f"{r['activation_mb_per_image']:.1f} | {r['batch_independent_gb']:.2f} | {r['static_gb']:.1f} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["DiT-XL/2", "MaskDiT-XL/2"])
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    help="folder for activation_memory.json / .md (default bench/results: the counts are exact "
                         "sizes, the same on every machine)")
    args = ap.parse_args(argv)
    rows = []
    with intercept_launches([]):  # the triton backend's kernels are not run
        for name in args.models:
            for backend in args.backends:
                rows.append(measure(name, backend, args.batch))
                print(rows[-1], flush=True)
    env = environment()
    md = markdown(env, rows)
    print(md)
    print("wrote", *write_results(args.out, "activation_memory", dict(env, rows=rows), md))
    return rows


if __name__ == "__main__":
    main()
