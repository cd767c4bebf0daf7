"""Train DiT or MaskDiT with the EDM loss.

    python train.py                      # a tiny MaskDiT on the bundled digits, a few minutes on a CPU
    python train.py --model MaskDiT-B/2 --dataset path/to/images --image-size 64 --precision bf16
    python train.py --resume runs/NAME   # continue a run exactly where its last checkpoint left it
    torchrun --nproc_per_node=8 train.py --model MaskDiT-XL/2 ...   # DDP (add --fsdp to shard the model)

A run folder (printed at start) receives checkpoint-<step>.pt files, log.jsonl and samples.png.  SIGTERM or
SIGUSR1 (a scheduler's notice) writes a checkpoint at the next log step and exits with 128 + the signal.
With N processes the global batch is --batch-size x N x --grad-accum; it alone defines the data stream and
the random draws, so N processes train like one process with the same global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm

from maskdit import distributed
from maskdit.attention import DENSE_KERNELS, set_sdpa_backend
from maskdit.backends import BACKENDS
from maskdit.checkpoint import (
    atomic_save,
    checkpoint_path,
    drop_log_records_after,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    set_aside_later_checkpoints,
)
from maskdit.config import ModelConfig, model_config, parse_model_name
from maskdit.cuda_graphs import GraphedStep
from maskdit.data import ImageFolderDataset, absolute_dataset_spec, batch_iterator, make_dataset
from maskdit.edm import EDMLoss, EDMPrecond, checkpoint_parameterization, edm_sample
from maskdit.files import folder_lock, make_output_folder, remove_partial_files
from maskdit.images import save_grid, to_uint8
from maskdit.latents import LATENT_PREFIX, read_meta
from maskdit.masking import num_kept, random_mask, token_layout
from maskdit.models import CHECKPOINTING, DiT
from maskdit.schedules import SCHEDULES, highest_mask_ratio, mask_ratio_schedule, ratio_distribution
from maskdit.training import COMPILE_MODES, EMA, compile_network, ema_decay_at, make_optimizer, stop_signals

DEFAULTS = dict(
    model="MaskDiT-T/2", dataset="digits", image_size=16, batch_size=64, grad_accum=1, steps=1000,
    lr=None, betas=(0.9, 0.999), weight_decay=0.0, ema_decay=None, ema_warmup=True,
    mask_ratio=0.5, mask_schedule="constant", mask_cosine_power=4.0, mask_ratio_dist="none", mask_schedule_start=0,
    mae_coef=0.1, label_dropout=0.1, precision="fp32", seed=0,
    ckpt_every=500, keep_checkpoints=0, keep_every=0, log_every=25, max_nonfinite=5, num_workers=2, device="auto",
    grid_per_class=10, grid_max_classes=10, sample_steps=40, cfg_scale=1.5, backend="auto", compile="none",
    activation_checkpointing="none", keep_norm_outputs=False, cuda_graph=False, sdpa_backend="auto",
    fsdp=False, tensorboard=False, eval_every=0, eval_every_seconds=0.0, eval_per_class=10, time_budget=0.0,
    init_from=None,
)
# Settings that define the network and its data: fixed for the life of a run.
FIXED_ON_RESUME = ("model", "dataset", "image_size")
# Settings of one launch, not inherited by a resume: a sharded run may continue unsharded and vice versa.
PER_LAUNCH = ("fsdp", "time_budget", "cuda_graph", "sdpa_backend", "keep_norm_outputs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    p.add_argument("--model", help=f"network name, e.g. MaskDiT-XL/2, DiT-B/4 (default {DEFAULTS['model']})")
    p.add_argument("--dataset", help="'digits' (bundled) or an image folder root/<class>/<images>")
    p.add_argument("--image-size", type=int, help="training resolution (default 16)")
    p.add_argument("--batch-size", type=int, help="images per process and micro-batch (default 64)")
    p.add_argument("--grad-accum", type=int, help="micro-batches accumulated per optimizer step (default 1); the "
                                                  "global batch is batch size x processes x grad accum")
    p.add_argument("--steps", type=int, help="train until this many steps in total (default 1000)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-4, the official recipe; 1e-3 for the "
                                            "CPU-sized T models, which 1e-4 trains too slowly for a demo)")
    p.add_argument("--betas", type=float, nargs=2, help="AdamW betas (default 0.9 0.999)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--ema-decay", type=float, help="EMA decay per step (default 0.9999, the official recipe; 0.999 "
                                                   "for the CPU-sized T models, whose runs are a few thousand steps)")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction,
                   help="cap the EMA decay at (1+step)/(10+step) early on (default on; off with --init-from, whose "
                        "EMA goes on from the checkpoint's)")
    p.add_argument("--mask-ratio", type=float, help="fraction of tokens masked per sample, in [0, 1) (default 0.5); "
                                                    "the scale of --mask-schedule")
    p.add_argument("--mask-schedule", help=f"mask ratio over the run: {', '.join(SCHEDULES)} (default constant); "
                                           "progress counts from the step of the resume that changed it")
    p.add_argument("--mask-cosine-power", type=float, help="k of the cosine schedule r*cos(pi x/2)^k (default 4)")
    p.add_argument("--mask-ratio-dist", help="per-sample ratios: none (default), unmasked:F (a fraction F of each "
                                             "batch keeps all tokens), uniform:LO:HI")
    p.add_argument("--mae-coef", type=float, help="weight of the MAE term (default 0.1); 0 also builds a new MaskDiT "
                   "without a learnable mask token (zeros at the masked positions), as the official code does")
    p.add_argument("--label-dropout", type=float, help="probability of the null class (default 0.1)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (fp16 uses a grad scaler)")
    p.add_argument("--seed", type=int)
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (default 500)")
    p.add_argument("--keep-checkpoints", type=int, help="keep only the N most recent checkpoints, deleting older "
                                                        "ones once a new one is written (default 0: keep all)")
    p.add_argument("--keep-every", type=int, help="with --keep-checkpoints, also keep the checkpoints at multiples "
                                                  "of this many steps (default 0: none)")
    p.add_argument("--log-every", type=int, help="steps between log lines (default 25)")
    p.add_argument("--max-nonfinite", type=int, help="stop after this many non-finite losses in a row (default 5)")
    p.add_argument("--num-workers", type=int, help="data loader processes for image folders (default 2)")
    p.add_argument("--device", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--backend", choices=BACKENDS,
                   help="'triton' fused kernels (the EMA too), 'torch' plain PyTorch, 'auto' (default): triton on CUDA")
    p.add_argument("--compile", nargs="?", const="full", choices=COMPILE_MODES,
                   help="torch.compile the training forward: 'full' (the whole loss function; the default when "
                        "the flag has no value) or 'regional' (each transformer block, the blocks of a stack "
                        "sharing their compiled graphs: much shorter compile time, no fusion across blocks); "
                        "default none. On an H100 (MaskDiT-XL/2) the torch backend compiled whole ran 2.5%% faster "
                        "than regionally after a 2-minute first step; the triton backend compiled whole ran as fast "
                        "as eager (H200) after a 1-minute first step: use none or regional with it")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="none", help="eager training")
    p.add_argument("--activation-checkpointing", choices=CHECKPOINTING,
                   help="recompute these blocks' forward in the backward instead of keeping their activations: "
                        "none (default), decoder (MaskDiT-XL/2: -17%% activation memory, +4%% FLOPs), encoder, all "
                        "(about a sixth of the activations left, +33%% FLOPs)")
    p.add_argument("--keep-norm-outputs", action=argparse.BooleanOptionalAction,
                   help="triton backend: keep the modulated LayerNorm outputs the Linear layers read instead of "
                        "recomputing them in the backward: a LayerNorm pass less per Linear for 13%% more "
                        "activation memory at MaskDiT-XL/2 (DiT.set_keep_norm_outputs); one launch's setting")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="capture the training step (forward, backward, AdamW, EMA) into a CUDA graph after two "
                        "eager steps and replay it: no host work per step, for batches where the host is slower "
                        "than the GPU. One CUDA process, a constant mask ratio, no fp16, no --compile")
    p.add_argument("--sdpa-backend", choices=("auto", *DENSE_KERNELS),
                   help="the attention kernel of equal-length samples: auto (default, PyTorch's choice) or one of "
                        "cudnn, flash, efficient, flex (FlexAttention compiled; these three CUDA only) and math; or "
                        "triton: the project's Triton kernel (kernels/attention.py) for every layout; "
                        "bench/attention.py times them at a step's shapes")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction,
                   help="under torchrun: shard the model, gradients and optimizer state (FSDP2) instead of DDP")
    p.add_argument("--eval-every", type=int, help="digits runs: the digits metric (maskdit.digits_metric) every N "
                                                  "steps; it is always reported at the end of a digits run")
    p.add_argument("--eval-every-seconds", type=float, help="... or every S seconds of training time (checked at "
                                                            "log steps)")
    p.add_argument("--eval-per-class", type=int, help="samples per class of the digits metric (default 10, with "
                                                      "10 Heun steps: about 15 s on 2 CPU cores)")
    p.add_argument("--time-budget", type=float, help="stop after S seconds of training time (evaluation and "
                                                     "checkpoints excluded; checked at log steps; 0: no limit)")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   help="also log to TensorBoard in the run folder (needs the tensorboard package)")
    p.add_argument("--grid-per-class", type=int, help="samples per class row in samples.png (default 10; 0: none)")
    p.add_argument("--sample-steps", type=int, help="Heun steps for samples.png (default 40)")
    p.add_argument("--cfg-scale", type=float, help="guidance scale for samples.png (default 1.5)")
    p.add_argument("--resume", help="a run folder (its latest checkpoint) or a checkpoint file")
    p.add_argument("--init-from", help="start a new run from a checkpoint's network and weights (model and EMA): "
                                       "a run folder or checkpoint of train.py, or a file of maskdit.convert (e.g. "
                                       "the official MaskDiT weights); a fresh optimizer from step 0, the other "
                                       "settings from this command line (fine-tuning, unmasking tuning)")
    p.add_argument("--out", help="the run folder (default runs/<time>-<model>, or the resumed run's folder)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace, ckpt: dict | None, init: dict | None = None) -> dict:
    """Defaults, then the resumed run's settings (or the network of the ``--init-from`` checkpoint ``init``: its
    model name and input size), then the flags given on this command line."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "out")}
    if "dataset" in given:
        given["dataset"] = absolute_dataset_spec(given["dataset"])
    cfg = dict(DEFAULTS)
    if init is not None:
        net = init["config"]["model"]
        if "model" in given and given["model"] != net["name"]:
            raise ValueError(f"--model {given['model']!r} differs from the network of --init-from ({net['name']!r})")
        # the EMA goes on from the checkpoint's averaged weights at the full decay, as the official tuning does
        # (a warm-up would all but reset it: its first decays are 0.1, 0.18, 0.25, ...)
        cfg.update(model=net["name"], image_size=net["input_size"], ema_warmup=False)
    if ckpt is not None:
        saved = dict(ckpt["config"]["train"])
        saved["dataset"] = absolute_dataset_spec(saved["dataset"])  # (relative in checkpoints of earlier versions)
        for key in FIXED_ON_RESUME:
            if key in given and given[key] != saved[key]:
                raise ValueError(f"--{key.replace('_', '-')} {given[key]!r} differs from the resumed run's "
                                 f"{saved[key]!r}; it cannot change within a run")
        cfg.update({k: v for k, v in saved.items() if k not in PER_LAUNCH})
        if any(k in given and given[k] != saved.get(k, DEFAULTS[k]) for k in ("mask_schedule", "mask_ratio",
                                                                               "mask_cosine_power")):
            # a new schedule (e.g. unmasking tuning) starts now; the same flags again (a rerun of the command that
            # set it, after an interruption) continue it
            cfg["mask_schedule_start"] = ckpt["step"]
        if "batch_size" in given and given["batch_size"] != saved["batch_size"]:
            # a new batch size says the global batch (batch x processes) anew: the run's accumulation is not kept
            cfg["grad_accum"] = DEFAULTS["grad_accum"]
    cfg.update(given)
    if ckpt is None and init is None and "image_size" not in given and cfg["dataset"].startswith(LATENT_PREFIX):
        cfg["image_size"] = read_meta(cfg["dataset"][len(LATENT_PREFIX):])["latent_size"]  # the latents' grid
    cfg["betas"] = tuple(cfg["betas"])
    if isinstance(cfg["compile"], bool):  # checkpoints written before the compile modes
        cfg["compile"] = "full" if cfg["compile"] else "none"
    tiny = parse_model_name(cfg["model"])[1] == "T"  # the CPU-sized models: short demo runs
    if cfg["lr"] is None:
        cfg["lr"] = 1e-3 if tiny else 1e-4
    if cfg["ema_decay"] is None:
        cfg["ema_decay"] = 0.999 if tiny else 0.9999
    return cfg


def validate(cfg: dict) -> None:
    """Fail at start, naming the offending value."""
    parse_model_name(cfg["model"])
    checks = [
        (0 <= cfg["mask_ratio"] < 1, f"--mask-ratio must be in [0, 1), got {cfg['mask_ratio']}"),
        (cfg["batch_size"] >= 1, f"--batch-size must be >= 1, got {cfg['batch_size']}"),
        (cfg["grad_accum"] >= 1, f"--grad-accum must be >= 1, got {cfg['grad_accum']}"),
        (not (cfg["fsdp"] and cfg["precision"] == "fp16"),
         "--fsdp supports --precision fp32 and bf16, not fp16 (its grad scaler would see only local shards)"),
        (cfg["steps"] >= 0, f"--steps must be >= 0, got {cfg['steps']}"),
        (cfg["lr"] > 0, f"--lr must be positive, got {cfg['lr']}"),
        (0 <= cfg["ema_decay"] < 1, f"--ema-decay must be in [0, 1), got {cfg['ema_decay']}"),
        (0 <= cfg["label_dropout"] < 1, f"--label-dropout must be in [0, 1), got {cfg['label_dropout']}"),
        (cfg["mae_coef"] >= 0, f"--mae-coef must be >= 0, got {cfg['mae_coef']}"),
        (cfg["image_size"] >= 1, f"--image-size must be positive, got {cfg['image_size']}"),
        (cfg["ckpt_every"] >= 1 and cfg["log_every"] >= 1, "--ckpt-every and --log-every must be >= 1"),
        (cfg["keep_checkpoints"] >= 0 and cfg["keep_every"] >= 0,
         f"--keep-checkpoints and --keep-every must be >= 0, got {cfg['keep_checkpoints']} and {cfg['keep_every']}"),
        (cfg["max_nonfinite"] >= 1, f"--max-nonfinite must be >= 1, got {cfg['max_nonfinite']}"),
        (all(0 <= b < 1 for b in cfg["betas"]), f"--betas must be in [0, 1), got {cfg['betas']}"),
        (cfg["weight_decay"] >= 0, f"--weight-decay must be >= 0, got {cfg['weight_decay']}"),
        (cfg["num_workers"] >= 0, f"--num-workers must be >= 0, got {cfg['num_workers']}"),
        (cfg["grid_per_class"] >= 0, f"--grid-per-class must be >= 0, got {cfg['grid_per_class']}"),
        (cfg["sample_steps"] >= 1, f"--sample-steps must be >= 1, got {cfg['sample_steps']}"),
        (cfg["cfg_scale"] >= 0, f"--cfg-scale must be >= 0, got {cfg['cfg_scale']}"),
        (cfg["eval_per_class"] >= 1, f"--eval-per-class must be >= 1, got {cfg['eval_per_class']}"),
        (cfg["eval_every"] >= 0 and cfg["eval_every_seconds"] >= 0,
         f"--eval-every and --eval-every-seconds must be >= 0, got {cfg['eval_every']} and "
         f"{cfg['eval_every_seconds']}"),
        (cfg["time_budget"] >= 0, f"--time-budget must be >= 0, got {cfg['time_budget']}"),
        (cfg["activation_checkpointing"] != "decoder" or cfg["model"].startswith("MaskDiT-"),
         f"--activation-checkpointing decoder needs a MaskDiT model ({cfg['model']} has no decoder)"),
    ]
    if cfg["cuda_graph"]:  # the captured step has fixed shapes and does its work without the host
        checks += [
            (cfg["precision"] != "fp16", "--cuda-graph supports --precision fp32 and bf16, not fp16 (the grad "
                                         "scaler's step decisions read the device)"),
            (cfg["compile"] == "none", f"--cuda-graph runs the eager step, not --compile {cfg['compile']}"),
            (cfg["mask_schedule"] == "constant" and cfg["mask_ratio_dist"] == "none",
             "--cuda-graph needs the same number of kept tokens every step: --mask-schedule constant and "
             "--mask-ratio-dist none"),
        ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    patch = parse_model_name(cfg["model"])[2]
    if cfg["image_size"] % patch:
        raise ValueError(f"--image-size {cfg['image_size']} is not divisible by the patch size {patch} "
                         f"of {cfg['model']}")
    highest = highest_mask_ratio(cfg["mask_ratio"], cfg["mask_ratio_dist"])  # (the schedules stay below the ratio)
    if highest > 0 and num_kept((cfg["image_size"] // patch) ** 2, highest) < 1:
        flag = "--mask-ratio" if highest == cfg["mask_ratio"] else "--mask-ratio-dist"
        raise ValueError(f"{flag}: a mask ratio of {highest} keeps no token of {cfg['model']} at image size "
                         f"{cfg['image_size']}")
    if (cfg["eval_every"] > 0 or cfg["eval_every_seconds"] > 0) and cfg["dataset"] != "digits":
        raise ValueError("--eval-every/--eval-every-seconds use the digits metric: they need --dataset digits")
    mask_ratio_schedule(cfg["mask_schedule"], cfg["mask_ratio"], cfg["mask_cosine_power"])
    ratio_distribution(cfg["mask_ratio_dist"])
    if cfg["tensorboard"]:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None


def save_sample_grid(ema_model: DiT, cfg: dict, path: str, device: torch.device, decode=None) -> None:
    """A PNG grid from the EMA weights with CFG: one row per class (up to grid_max_classes); ``decode`` maps
    latents to images (VAE) for latent datasets."""
    classes = min(ema_model.num_classes, cfg["grid_max_classes"])
    per = cfg["grid_per_class"]
    labels = torch.arange(classes, device=device).repeat_interleave(per)
    g = torch.Generator(device).manual_seed(cfg["seed"])
    shape = (len(labels), ema_model.in_channels, ema_model.input_size, ema_model.input_size)
    noise = torch.randn(shape, generator=g, device=device)
    images = edm_sample(EDMPrecond(ema_model), noise, labels, num_steps=cfg["sample_steps"], cfg_scale=cfg["cfg_scale"])
    if decode is not None:
        images = decode(images)
    save_grid(to_uint8(images), rows=classes, path=path, scale=max(1, 64 // images.shape[-1]))


def evaluate_digits(ema_model: DiT, cfg: dict, device: torch.device) -> dict:
    """The digits metric of the EMA weights: Frechet distance of a digits classifier's features and the
    class accuracy of guided samples."""
    from maskdit.digits_metric import digits_quality

    return digits_quality(ema_model, device=device, num_per_class=cfg["eval_per_class"], cfg_scale=cfg["cfg_scale"],
                          steps=10, seed=cfg["seed"])


def main(argv=None) -> str:
    """Train as the command line says; returns the run folder.  SIGTERM or SIGUSR1 (a scheduler's notice before
    it kills the job) makes the run write a checkpoint at its next log step and exit with status 128 + the
    signal's number."""
    with stop_signals() as stop_requests:
        with contextlib.ExitStack() as held:
            return run(parse_args(argv), stop_requests, held)


def run(args: argparse.Namespace, stop_requests: list[int], held: contextlib.ExitStack) -> str:
    """The training run of ``main``; ``stop_requests``: the stop signals received so far (``stop_signals``);
    ``held``: where the run folder's lock is kept until ``main`` returns."""
    if args.resume and args.init_from:
        raise ValueError("--resume continues a run, --init-from starts a new one from a checkpoint's weights: give one")
    resume_file = resolve_checkpoint(args.resume) if args.resume else None
    ckpt = load_checkpoint(resume_file) if resume_file else None
    if ckpt is not None and ("train" not in ckpt["config"] or not {"optimizer", "rng", "data"} <= ckpt.keys()):
        raise ValueError(f"--resume: {resume_file!r} holds weights without a run's training state (a converted "
                         "official checkpoint?); start a run from its weights with --init-from")
    init_file = resolve_checkpoint(args.init_from, "--init-from") if args.init_from else None
    init = load_checkpoint(init_file, arg="--init-from") if init_file else None
    cfg = resolve_config(args, ckpt, init)
    if init is not None:
        cfg["init_from"] = os.path.abspath(init_file)
    validate(cfg)
    env = distributed.setup(distributed.pick_device(cfg["device"]))  # joins the process group under torchrun
    micro_batch = cfg["batch_size"]
    if ckpt is not None and args.batch_size is None and args.grad_accum is None:
        # resumed with another number of processes: keep the global batch by accumulating more or fewer steps
        saved_global = ckpt["data"]["batch_size"]
        if saved_global % (micro_batch * env.world_size) == 0:
            cfg["grad_accum"] = saved_global // (micro_batch * env.world_size)
    device, accum = env.device, cfg["grad_accum"]
    if cfg["cuda_graph"] and (device.type != "cuda" or env.distributed):
        raise ValueError(f"--cuda-graph needs one process on a CUDA device, got {env.world_size} process(es) on "
                         f"{device}")
    cuda_only = ("cudnn", "efficient", "flex") + (() if os.environ.get("TRITON_INTERPRET") == "1" else ("triton",))
    if device.type != "cuda" and cfg["sdpa_backend"] in cuda_only:
        raise ValueError(f"--sdpa-backend {cfg['sdpa_backend']} needs a CUDA device (to train), got {device}"
                         + (" (triton: or TRITON_INTERPRET=1 to run its kernel on the CPU, slowly)"
                            if cfg["sdpa_backend"] == "triton" else ""))
    if device.type != "cuda" and cfg["backend"] == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--backend triton needs a CUDA device (its kernels take CUDA tensors), got {device} (or "
                         "TRITON_INTERPRET=1 to run them on the CPU, slowly)")
    set_sdpa_backend(cfg["sdpa_backend"])
    global_batch = env.global_batch(micro_batch, accum)
    fsdp = cfg["fsdp"] and env.distributed

    def say(*msg):  # rank 0 alone prints, logs and writes files
        if env.is_main:
            print(*msg, flush=True)

    torch.manual_seed(cfg["seed"])
    dataset = make_dataset(cfg["dataset"], cfg["image_size"])
    latent = getattr(dataset, "is_latent", False)  # VAE moments, resampled into latents every step
    if latent:  # what decodes the model's samples, should the latent folder be gone when they are drawn
        cfg["latents"] = {"vae": dataset.vae, "scale": dataset.scale}
    periodic_eval = cfg["eval_every"] > 0 or cfg["eval_every_seconds"] > 0
    # digits runs report the metric at the end, with the sample grid, and periodically when asked
    evaluate = cfg["dataset"] == "digits" and (periodic_eval or cfg["grid_per_class"] > 0)
    evaluate = evaluate and not fsdp  # the metric needs the unsharded EMA network
    if global_batch > len(dataset):
        raise ValueError(f"the global batch {global_batch} (--batch-size {micro_batch} x {env.world_size} processes "
                         f"x --grad-accum {accum}) is larger than the dataset ({len(dataset)} images)")
    size = dataset.image_size if latent else cfg["image_size"]  # latents: the model sees the latent grid
    if ckpt is not None or init is not None:  # the checkpoint's network, which the data must fit
        source, flag, path = ((ckpt, "--resume", args.resume) if ckpt is not None else
                              (init, "--init-from", args.init_from))
        model_cfg = ModelConfig.from_dict(source["config"]["model"])
        misfits = [f"{what} {ours} (the network's: {theirs})" for what, ours, theirs in (
            ("image size", size, model_cfg.input_size), ("channels", dataset.channels, model_cfg.in_channels),
            ("classes", dataset.num_classes, model_cfg.num_classes)) if ours != theirs]
        if ckpt is not None and ckpt.get("class_names") not in (None, dataset.class_names) and not misfits:
            # the same number of classes under other names or in another order: every label would change meaning
            i = next(i for i, (a, b) in enumerate(zip(dataset.class_names, ckpt["class_names"])) if a != b)
            misfits = [f"class {i} named {dataset.class_names[i]!r} (the run's: {ckpt['class_names'][i]!r})"]
        if misfits:
            folder = isinstance(dataset, ImageFolderDataset)
            raise ValueError(f"{flag} {path!r}: the dataset {cfg['dataset']!r} "
                             f"does not fit its {model_cfg.name}: {', '.join(misfits)}"
                             + (" (an image folder's classes are its sub-folders holding images, hidden ones not "
                                "counted)" if folder else ""))
    else:
        model_cfg = model_config(cfg["model"], input_size=size, in_channels=dataset.channels,
                                 num_classes=dataset.num_classes, learn_mask_token=cfg["mae_coef"] > 0)
    model = DiT(model_cfg, backend=cfg["backend"]).to(device)
    model.set_activation_checkpointing(cfg["activation_checkpointing"]).set_keep_norm_outputs(cfg["keep_norm_outputs"])
    n_params = sum(p.numel() for p in model.parameters())
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    net = EDMPrecond(model)
    loss_fn = EDMLoss(mae_coef=cfg["mae_coef"])
    # The module whose forward gives the per-sample loss: itself, DDP around it, or FSDP2 (blocks + root).
    train_module = distributed.wrap(distributed.LossModule(net, loss_fn), env, fsdp=fsdp)
    fused_ema = EMA.fused_for(model.backend)
    if fsdp:  # the EMA is sharded like the model and averaged shard by shard
        distributed.shard(ema_model, ema_model)
        ema = EMA(distributed.LocalShards(model), distributed.LocalShards(ema_model), fused=fused_ema)
    else:  # every process holds the same all-reduced weights and updates the same EMA
        ema = EMA(model, ema_model, fused=fused_ema)
    train_module = compile_network(train_module, cfg["compile"])
    optimizer = make_optimizer(model, cfg["lr"], cfg["betas"], cfg["weight_decay"], capturable=cfg["cuda_graph"])
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["precision"]]
    scaler = torch.amp.GradScaler(device.type) if cfg["precision"] == "fp16" else None
    # One stream of noise/mask/label-dropout draws, the same on every process (each keeps its rows).
    gen = torch.Generator(device).manual_seed(cfg["seed"])
    host_gen = torch.Generator().manual_seed(cfg["seed"] + 1)  # per-sample ratio draws: host-side, no sync
    schedule = mask_ratio_schedule(cfg["mask_schedule"], cfg["mask_ratio"], cfg["mask_cosine_power"])
    ratio_dist = ratio_distribution(cfg["mask_ratio_dist"])

    step, nonfinite_total = 0, 0
    if ckpt is not None:  # every process loads the complete state (and shards it under FSDP)
        distributed.load_full_state_dict(model, ckpt["model"])
        distributed.load_full_state_dict(ema_model, ckpt["ema"])
        distributed.load_full_optimizer_state_dict(model, optimizer, ckpt["optimizer"])
        for group in optimizer.param_groups:  # flags may change lr / betas / weight decay / capture on resume
            group.update(lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"],
                         capturable=cfg["cuda_graph"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        gen.set_state(ckpt["rng"]["generator"])
        host_gen.set_state(ckpt["rng"]["host"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step, nonfinite_total = ckpt["step"], ckpt.get("nonfinite_total", 0)
    elif init is not None:  # weights only: the optimizer, the draws and the data stream start afresh
        distributed.load_full_state_dict(model, init["model"])
        distributed.load_full_state_dict(ema_model, init.get("ema", init["model"]))

    resume_dir = os.path.dirname(os.path.abspath(resume_file)) if resume_file else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.out or resume_dir or os.path.join("runs", f"{stamp}-" + cfg["model"].replace("/", "_"))
    run_dir, stamp = distributed.broadcast_object((run_dir, stamp))  # rank 0's clock names the folder
    if latest_checkpoint(run_dir) and (resume_dir is None or not os.path.samefile(run_dir, resume_dir)):
        raise ValueError(f"--out {run_dir!r} already holds checkpoints of a run; continue that one with --resume "
                         f"{run_dir}, or choose another --out")
    if env.is_main:
        folder_arg = "--out" if args.out else "--resume" if args.resume else "the run folder"
        make_output_folder(run_dir, folder_arg)
        held.enter_context(folder_lock(run_dir, folder_arg))  # one run a folder (e.g. not a job and its requeue)
        for path in remove_partial_files(run_dir):
            print(f"removed {path}, the partial file of a checkpoint write a kill interrupted", flush=True)
        log_path = os.path.join(run_dir, "log.jsonl")
        if ckpt is not None:  # the steps after the checkpoint are trained again: their records go
            # (a resume from an earlier checkpoint than the folder's latest: the later ones and their records are a
            # branch this run abandons, set aside so that the folder's latest checkpoint is this branch's)
            aside = set_aside_later_checkpoints(run_dir, ckpt["step"], stamp)
            dropped = drop_log_records_after(log_path, ckpt["step"], keep_in=aside and os.path.join(aside, "log.jsonl"))
            if aside:
                print(f"moved the checkpoints of steps after {ckpt['step']} (a branch this resume abandons) and their "
                      f"log records to {aside}", flush=True)
            elif dropped:
                print(f"log.jsonl: dropped {dropped} record(s) of the steps after {ckpt['step']}, trained again now",
                      flush=True)
        elif drop_log_records_after(log_path, -1):  # an earlier attempt that saved no checkpoint: trained again now
            print(f"log.jsonl: dropped the records of an earlier attempt in {run_dir} that saved no checkpoint",
                  flush=True)
    say(f"run folder: {run_dir}")
    if init is not None:
        say(f"initialised from {cfg['init_from']} (its step {init.get('step')}): model and EMA weights")
        trained_as = checkpoint_parameterization(init)
        if trained_as != "edm":
            say(f"note: those weights were trained as {trained_as!r} (facebookresearch/DiT's DDPM noise predictor); "
                "this run trains them with the EDM loss, which changes what the network predicts")
    say(f"{model_cfg.name}: {n_params:,} parameters, {model.num_tokens} tokens, dataset {cfg['dataset']} "
        f"({len(dataset)} images, {dataset.num_classes} classes), device {device}, precision {cfg['precision']}")
    if env.distributed or accum > 1:
        say(f"global batch {global_batch} = batch {micro_batch} x {env.world_size} processes x {accum} accumulated"
            + (" (FSDP)" if fsdp else " (DDP)" if env.distributed else ""))
    if cfg["fsdp"] and not env.distributed:
        say("--fsdp: a single process has nothing to shard; it trains unsharded")
    if fsdp and cfg["dataset"] == "digits" and (periodic_eval or cfg["grid_per_class"] > 0):
        say("--fsdp: the digits metric needs the whole EMA network in one process; this run skips it")
    if step >= cfg["steps"]:
        say(f"the run is at step {step} and --steps is {cfg['steps']} (the total): nothing to train")

    # Data stream position: global batch b of the epoch-seeded stream (each process reads its parts of it).
    # The same global batch continues exactly, whatever the number of processes or accumulation steps; a
    # changed global batch restarts at the next epoch boundary of the images seen so far.
    data_state = ckpt["data"] if ckpt is not None else {"batch_size": global_batch, "batches_done": 0,
                                                        "images_done": 0}
    if data_state["batch_size"] == global_batch:
        start_batch = data_state["batches_done"]
    else:
        say(f"the global batch changes from {data_state['batch_size']} to {global_batch}: the data stream "
            "continues at the next epoch boundary")
        # (the epochs the stream has begun, from its position: images_done leaves out the images an earlier
        # change of the global batch skipped to reach its epoch boundary)
        epochs_begun = math.ceil(data_state["batches_done"] / (len(dataset) // data_state["batch_size"]))
        start_batch = epochs_begun * (len(dataset) // global_batch)
    data = batch_iterator(dataset, global_batch, cfg["seed"], start_batch, num_workers=cfg["num_workers"],
                          num_parts=env.world_size * accum, parts=env.parts(accum))
    batches_done, images_done = start_batch, data_state["images_done"]

    def save_checkpoint():
        # Gathering sharded state is collective: every process takes part, rank 0 writes.
        state = {
            "model": distributed.full_state_dict(model), "ema": distributed.full_state_dict(ema_model),
            "optimizer": distributed.full_optimizer_state_dict(model, optimizer),
            "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
            "rng": {"generator": gen.get_state(), "host": host_gen.get_state(), "torch": torch.get_rng_state()},
            "data": {"batch_size": global_batch, "batches_done": batches_done, "images_done": images_done,
                     "micro_batch": micro_batch, "world_size": env.world_size, "grad_accum": accum},
            "config": {"model": model_cfg.to_dict(), "train": cfg},
            "nonfinite_total": nonfinite_total + int(bad_total.item()),
            "class_names": dataset.class_names,
        }
        path = checkpoint_path(run_dir, step)
        if env.is_main:
            atomic_save(state, path)
            prune_checkpoints(run_dir, step, cfg["keep_checkpoints"], cfg["keep_every"])  # once the new one is safe
        distributed.barrier()  # no process runs ahead of (or exits before) a checkpoint it may need
        return path

    log = open(os.path.join(run_dir, "log.jsonl"), "a") if env.is_main else None
    tb = None
    if cfg["tensorboard"] and env.is_main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(run_dir, purge_step=step + 1 if ckpt is not None else 0)  # (as log.jsonl's records)
    # (a captured step must not keep autocast's cast cache, which would outlive the capture)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None,
                              cache_enabled=not cfg["cuda_graph"])
    num_classes, num_tokens = model.num_classes, model.num_tokens
    image_shape = (model.in_channels, model.input_size, model.input_size)
    # Running sums kept on the device: the loop never waits for the GPU except at log steps.
    loss_sum = torch.zeros((), device=device)
    good_steps = torch.zeros((), device=device)
    bad_total = torch.zeros((), device=device)
    streak = torch.zeros((), device=device)
    worst_streak = torch.zeros((), device=device)
    train_module.train()
    bar = tqdm(total=cfg["steps"], initial=step, desc="train", dynamic_ncols=True,
               disable=None if env.is_main else True)
    t_log, images_since_log = time.perf_counter(), 0
    # Training time: wall clock minus evaluations and checkpoints, for --time-budget and the eval records.
    t_start, t_excluded, next_eval_seconds = time.perf_counter(), 0.0, cfg["eval_every_seconds"]

    def train_seconds():
        return time.perf_counter() - t_start - t_excluded

    def run_eval():
        """Digits metric on rank 0 (the others wait), written to log.jsonl; its time is not training time."""
        nonlocal t_excluded
        t0 = time.perf_counter()
        if env.is_main:
            record = {"step": step, "train_seconds": train_seconds(), **evaluate_digits(ema_model, cfg, device)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            say(f"step {step}: digits FD {record['digits_fd']:.3f}, class accuracy {record['class_accuracy']:.3f}")
        distributed.barrier()
        t_excluded += time.perf_counter() - t0

    def load_micro_batch(micro, drop, latent_eps):
        """Micro-batch ``micro`` of this process: its rows of the global draws, images (latents drawn from
        their moments) and labels (dropped to the null class where ``drop``) on the device."""
        rows = env.rows(micro, micro_batch, accum)
        images, labels = next(data)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if latent:  # z = (mean + exp(logvar / 2) * eps) * the VAE's scale (SD's 0.18215), a fresh draw every step
            images = dataset.prepare_batch(images, eps=latent_eps[rows])
        return rows, images, torch.where(drop[rows], torch.full_like(labels, num_classes), labels)

    def update(step_loss, ema_weight):
        """The optimizer and EMA updates after the backward passes, both skipped when ``step_loss`` is not
        finite (no host sync); returns that non-finite flag."""
        bad = ~torch.isfinite(step_loss)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.found_inf = bad.float()  # the fused AdamW skips the whole update when set (no sync)
            optimizer.step()
            del optimizer.found_inf
        ema.update(ema_weight * (~bad).float())
        return bad

    def eager_step(drop, ids_keep, sigma, noise, latent_eps, decay, measure_grad_norm):
        """One optimizer step over this process's micro-batches (accumulated, DDP/FSDP-synchronised on the
        last), the fused AdamW and the EMA update; returns the global batch's mean loss, whether it is
        non-finite (its update skipped) and, if ``measure_grad_norm``, the norm of its gradient (else None)."""
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            rows, images, labels = load_micro_batch(micro, drop, latent_eps)
            # packed here, outside the compiled forward: only tensors and a few ints enter the graph
            layout = None if ids_keep is None else token_layout(ids_keep[rows], micro_batch, num_tokens, device)
            with distributed.grad_sync(train_module, sync=micro == accum - 1):  # reduce on the last one only
                with autocast:
                    loss = train_module(images, labels, layout, sigma[rows], noise[rows]).mean() / accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach().float()
        # The global batch's mean loss on every process (an all-reduce, no host sync), so that all
        # processes make the same skip decision.
        step_loss = distributed.mean_over_ranks(step_loss)
        norm = None
        if measure_grad_norm:  # before the update; fp16: the loss scale taken out (a sync: log steps only)
            norm = distributed.grad_norm(model) / (scaler.get_scale() if scaler is not None else 1.0)
        return step_loss, update(step_loss, 1 - decay), norm

    def graph_step(images, labels, sigma, noise, ema_weight, *ids_keep):
        """One optimizer step over the global batch's micro-batches (one process), as ``eager_step`` does it,
        for --cuda-graph."""
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            rows = env.rows(micro, micro_batch, accum)
            layout = token_layout(ids_keep[0][rows], micro_batch, num_tokens, device) if ids_keep else None
            with autocast:
                loss = train_module(images[rows], labels[rows], layout, sigma[rows], noise[rows]).mean() / accum
            loss.backward()
            step_loss += loss.detach().float()
        return step_loss, update(step_loss, ema_weight)

    graphed = GraphedStep(graph_step, warmup_steps=2) if cfg["cuda_graph"] else None

    out_of_time, stop_signal = False, 0
    while step < cfg["steps"] and not out_of_time and not stop_signal:
        # Per-sample draws for the whole GLOBAL batch, identical on every process; each process keeps the
        # rows of its micro-batches (env.rows), the rows the data sampler gives it.
        drop = torch.rand(global_batch, generator=gen, device=device) < cfg["label_dropout"]
        start = cfg["mask_schedule_start"]
        ratio = schedule(min(max((step - start) / max(cfg["steps"] - start, 1), 0.0), 1.0))
        ratios = ratio_dist(global_batch, ratio, host_gen)
        ids_keep = None
        if max(ratios if isinstance(ratios, list) else [ratios]) > 0:  # a ratio of 0 takes the unmasked path
            ids_keep = random_mask(global_batch, num_tokens, ratios, generator=gen, device=device).ids_keep
        sigma = loss_fn.sample_sigma(global_batch, device, gen)
        noise = torch.randn((global_batch, *image_shape), generator=gen, device=device)
        latent_eps = torch.randn((global_batch, *image_shape), generator=gen, device=device) if latent else None

        decay = ema_decay_at(step, cfg["ema_decay"], cfg["ema_warmup"])
        log_step = (step + 1) % cfg["log_every"] == 0 or step + 1 == cfg["steps"]
        if graphed is not None:  # one process: the step is one graph replay over the global batch
            parts = [load_micro_batch(micro, drop, latent_eps)[1:] for micro in range(accum)]
            images, labels = (torch.cat(t) if accum > 1 else t[0] for t in zip(*parts))
            step_loss, bad = graphed(images, labels, sigma, noise, torch.full((), 1 - decay, device=device),
                                     *([] if ids_keep is None else [ids_keep]))
            # the replayed step's gradients stay in place (an update does not change them; no fp16 here)
            grad_norm = distributed.grad_norm(model) if log_step else None
        else:
            step_loss, bad, grad_norm = eager_step(drop, ids_keep, sigma, noise, latent_eps, decay, log_step)

        loss_sum += torch.where(bad, 0.0, step_loss)
        good_steps += (~bad).float()
        bad_total += bad.float()
        streak = (streak + 1) * bad.float()
        worst_streak = torch.maximum(worst_streak, streak)
        step += 1
        batches_done += 1
        images_done += global_batch
        images_since_log += global_batch
        bar.update(1)

        last = step == cfg["steps"]
        if log_step:  # (step % log_every == 0 or last, now that step counts this one)
            now = time.perf_counter()
            n_good, n_bad, worst = good_steps.item(), int(bad_total.item()), worst_streak.item()
            mean_loss = loss_sum.item() / n_good if n_good else float("nan")
            norm = grad_norm.item()
            rate = images_since_log / (now - t_log)
            nonfinite_total += n_bad
            record = {"step": step, "loss": mean_loss, "grad_norm": norm if math.isfinite(norm) else None,
                      "imgs_per_s": rate, "nonfinite": n_bad, "nonfinite_total": nonfinite_total, "lr": cfg["lr"],
                      "mask_ratio": ratio, "time": time.time()}
            if env.is_main:
                log.write(json.dumps(record) + "\n")
                log.flush()
                if tb is not None:
                    for key in ("loss", "grad_norm", "imgs_per_s", "mask_ratio", "lr"):
                        if record[key] is not None:
                            tb.add_scalar(key, record[key], step)
                    tb.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}", grad=f"{norm:.3g}", img_s=f"{rate:.0f}")
                if bar.disable:  # not a terminal: plain log lines instead of the bar
                    print(f"step {step}/{cfg['steps']}  loss {mean_loss:.4f}  grad norm {norm:.3g}  {rate:.0f} img/s",
                          flush=True)
            for t in (loss_sum, good_steps, bad_total, worst_streak):
                t.zero_()
            t_log, images_since_log = now, 0
            # time-based decisions are rank 0's, shared with the others (log steps only: no per-step sync)
            out_of_time, eval_due = distributed.broadcast_object(
                (0 < cfg["time_budget"] <= train_seconds(),
                 0 < next_eval_seconds <= train_seconds()))
            if evaluate and eval_due:
                run_eval()
                next_eval_seconds = train_seconds() + cfg["eval_every_seconds"]
            if out_of_time:
                say(f"time budget of {cfg['time_budget']:.0f} s of training reached at step {step}")
                last = True
            stop_signal = distributed.max_over_ranks(max(stop_requests, default=0), device)  # any process's
            if stop_signal:
                say(f"{signal.Signals(stop_signal).name} received: checkpoint at step {step}, then stop")
                last = True
            if worst >= cfg["max_nonfinite"]:  # the same on every process: the losses were all-reduced
                path = save_checkpoint()
                bar.close()
                distributed.cleanup()
                raise SystemExit(f"stopping at step {step}: {int(worst)} non-finite losses in a row "
                                 f"({nonfinite_total} in all); their updates were skipped. Checkpoint: {path}. "
                                 "Try a lower --lr or --precision fp32/bf16." if env.is_main else 1)  # (said once)
        if evaluate and cfg["eval_every"] > 0 and step % cfg["eval_every"] == 0 and not last:
            run_eval()
        if step % cfg["ckpt_every"] == 0 or last:
            t0 = time.perf_counter()
            save_checkpoint()
            t_excluded += time.perf_counter() - t0
    if evaluate and step > 0 and not stop_signal:  # the final quality of a digits run
        run_eval()
    bar.close()
    if env.is_main:
        log.close()
        if tb is not None:
            tb.close()
    if distributed.broadcast_object(step == 0 or not os.path.exists(checkpoint_path(run_dir, step))):
        save_checkpoint()
    say(f"checkpoint: {checkpoint_path(run_dir, step)}")
    if stop_signal:  # a scheduler's notice: no sample grid, the time is short
        distributed.cleanup()
        say(f"stopped by {signal.Signals(stop_signal).name} at step {step}; continue with --resume {run_dir}")
        raise SystemExit(128 + stop_signal)
    if cfg["grid_per_class"] > 0:
        sample_model = ema_model
        if fsdp:  # gather the EMA (collective) into an unsharded network on rank 0
            ema_state = distributed.full_state_dict(ema_model)
            if env.is_main:
                sample_model = DiT(model_cfg, backend=cfg["backend"]).to(device).eval()
                sample_model.load_state_dict(ema_state)
        if env.is_main:
            grid = os.path.join(run_dir, "samples.png")
            decode = None
            if latent:  # decode the sampled latents with the dataset's VAE
                from maskdit.latents import decode_latents, load_vae

                vae = load_vae(dataset.vae, device)
                decode = lambda z: decode_latents(vae, z, dataset.scale)  # noqa: E731
            save_sample_grid(sample_model, cfg, grid, device, decode)
            print(f"samples (EMA, cfg {cfg['cfg_scale']}, a row per class): {grid}")
    distributed.cleanup()
    return run_dir


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # configuration errors: a message, not a stack trace
        sys.exit(f"error: {e}")
