"""Generate images from a checkpoint with classifier-free guidance: the EDM Heun sampler (MaskDiT's), or for a
DDPM noise predictor (converted facebookresearch/DiT weights) DiT's own ancestral sampler (--sampler ddpm).

    python sample.py --ckpt runs/NAME --num-per-class 8 --out samples/digits
    python sample.py --ckpt model.pt --labels 3 3 7 --cfg-scale 2 --out samples/three

Writes PREFIX.png (a grid: one row per class with --num-per-class) and PREFIX.npz holding
``images`` (N, H, W, C) uint8 and ``labels`` (N,).  Image i's noise depends only on --seed and i, so
results do not depend on --batch-size.

A model trained on VAE latents (--dataset latents:DIR) samples latents; they are decoded to images with the
VAE recorded in DIR/meta.json, or the one given by --vae (a local folder or a hub name; needs diffusers).
--vae also decodes the samples of a checkpoint without a training config (e.g. converted official weights).
The converted weights of facebookresearch/DiT (a DDPM noise predictor; their checkpoint says so:
``parameterization``) sample with DiT's protocol by default: ``maskdit.ddpm.ddpm_sample``, 250 respaced steps with
the learned variance, guidance on the first 3 channels (--cfg-channels).  --sampler edm samples them with the Heun
sampler instead, through ``maskdit.edm.DDPMPrecond``, on steps rounded to DiT's 1000 noise levels.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from maskdit.checkpoint import load_checkpoint
from maskdit.distributed import pick_device
from maskdit.files import atomic_write, make_output_folder
from maskdit.images import save_grid
from maskdit.sampling import (
    add_sampling_arguments,
    check_sampling_precision,
    draw_images,
    resolve_sampling,
    sampling_fill,
    sampling_network,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint file or a run folder (its latest checkpoint)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--num-per-class", type=int, default=None, help="images per class, every class (default 8)")
    who.add_argument("--labels", type=int, nargs="+", help="explicit class labels, one image each")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale; 1 disables guidance (default 1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to use (default ema)")
    p.add_argument("--max-classes", type=int, default=None, help="with --num-per-class, only the first classes")
    p.add_argument("--device", default="auto")
    p.add_argument("--vae", default=None, help="decode latents with this VAE (local folder or hub name); default: "
                   "the VAE in the latent folder's meta.json when the model was trained on latents")
    p.add_argument("--out", default="samples", help="output prefix: writes PREFIX.png and PREFIX.npz")
    add_sampling_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> tuple[str, str]:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_classes is not None and args.max_classes < 1:
        raise ValueError(f"--max-classes must be >= 1, got {args.max_classes}")
    png, npz = args.out + ".png", args.out + ".npz"
    folder = os.path.dirname(os.path.abspath(png))
    if not os.path.basename(args.out).strip(".") or os.path.isdir(png) or os.path.isdir(npz):
        raise ValueError(f"--out {args.out!r} must be a file prefix (it writes PREFIX.png and PREFIX.npz), "
                         "not a folder")
    make_output_folder(folder, "--out")  # before the sampling, whose work a bad --out would lose
    device = pick_device(args.device)
    check_sampling_precision(args.precision, device)
    ckpt = load_checkpoint(args.ckpt, arg="--ckpt")
    resolve_sampling(args, ckpt)
    net, decode = sampling_network(ckpt, args, device)
    model = net.model

    if args.labels is not None:
        bad = [y for y in args.labels if not 0 <= y < max(model.num_classes, 1)]
        if bad:
            raise ValueError(f"--labels {bad} outside [0, {model.num_classes})")
        labels = torch.tensor(args.labels, dtype=torch.int64)
    else:
        per = 8 if args.num_per_class is None else args.num_per_class
        if per < 1:
            raise ValueError(f"--num-per-class must be >= 1, got {per}")
        classes = max(model.num_classes, 1)  # an unconditional model: one row
        if args.max_classes is not None:
            classes = min(args.max_classes, classes)
        labels = torch.arange(classes).repeat_interleave(per)
    images, fill_to = [], sampling_fill(args, len(labels))
    for start in range(0, len(labels), args.batch_size):
        idx = torch.arange(start, min(start + args.batch_size, len(labels)))
        images.append(draw_images(net, idx, labels[idx] if model.num_classes else None, args, device, decode,
                                  fill_to=fill_to))
        print(f"sampled {int(idx[-1]) + 1}/{len(labels)}")
    images = np.concatenate(images)

    atomic_write(npz, lambda f: np.savez(f, images=images, labels=labels.numpy()))  # the samples, then their picture
    rows = len(labels) // per if args.labels is None else 1
    save_grid(images, rows=rows, path=png, scale=max(1, 64 // images.shape[1]))
    print(f"wrote {png} and {npz}")
    return png, npz


if __name__ == "__main__":
    try:
        main()
    except (ValueError, ImportError) as e:  # ImportError: the VAE needs diffusers, which is not installed
        sys.exit(f"error: {e}")
