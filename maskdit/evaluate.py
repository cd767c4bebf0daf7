"""FID of a checkpoint against reference statistics (the paper's protocol: 50,000 samples, ADM reference batch).

    python -m maskdit.evaluate --ckpt runs/NAME --num-samples 50000 --ref VIRTUAL_imagenet256_labeled.npz
    torchrun --nproc-per-node 8 -m maskdit.evaluate --ckpt model.pt --ref REF.npz --cfg-scale 1.5 --outdir fid/
    python -m maskdit.evaluate --write-stats DIR_OF_IMAGES --out STATS.npz --resolution 256
    python -m maskdit.evaluate --export-adm fid/ --out samples.npz   # for ADM's evaluator (IS, sFID, precision)

Samples with classifier-free guidance and the EDM Heun sampler, or for a DDPM noise predictor (converted
facebookresearch/DiT weights) DiT's own sampler (``maskdit.ddpm``; --sampler as in sample.py). Sample i has the
noise of ``maskdit.sampling.ImageNoise`` (seed, i), as in sample.py, and a class drawn uniformly at random from the
seed, as the official sampling scripts draw them (``--class-labels balanced``: class i % num_classes, the same count
for every class), so the samples do not depend on --batch-size or on the number of processes: under torchrun, rank r
draws samples r, r+W, r+2W, ...
Inception-v3 pool3 features (torch-fidelity, an optional dependency) are reduced to their mean and covariance; the
per-process sums are added up with torch.distributed and rank 0 prints the FID and writes it as JSON. --outdir also
keeps the samples, one uint8 npz per process (``images``, ``labels``, ``indices``; ``load_samples`` merges them in
sample order), and their statistics (stats.npz). Without --ref only the samples are written. With --outdir an
interrupted run can be continued: each process writes its samples as they come, in part files of about
``PART_IMAGES``, and the same command run again keeps them and draws only the rest (sampling.json records the
settings the samples depend on; other settings are refused).

--export-adm OUTDIR --out SAMPLES.npz writes the samples of a finished --outdir run as one npz for ADM's evaluator
(``arr_0``, in sample order), which also reports the paper's Inception Score, sFID, precision and recall.

--write-stats computes reference statistics from a folder of images (searched recursively; center-cropped and
resized like training data, ``maskdit.data.center_crop_resize``) or from an npz of uint8 images (``arr_0`` or
``images``, used as they are: e.g. ADM's reference batch, to check its statistics against this extractor).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import hashlib
import json
import os
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from maskdit import distributed
from maskdit.checkpoint import load_checkpoint, resolve_checkpoint
from maskdit.data import IMAGE_EXTENSIONS, image_files, read_image
from maskdit.ddpm import DIT_GUIDED_CHANNELS
from maskdit.distributed import broadcast_object, pick_device
from maskdit.fid import (
    InceptionFeatures,
    InceptionUnavailableError,
    StatsAccumulator,
    frechet_distance,
    load_reference_stats,
    save_stats,
)
from maskdit.files import atomic_write, atomic_write_json, folder_lock, make_output_folder
from maskdit.sampling import (
    STOCHASTIC_DEFAULTS,
    add_sampling_arguments,
    check_sampling_precision,
    draw_images,
    resolve_sampling,
    sampling_fill,
    sampling_network,
    stochastic_options,
)

LABEL_MODES = ("random", "balanced")
LABEL_STREAM = 0x1ABE1  # the class draws' stream of a seed, apart from the images' noise streams


def sample_labels(num_samples: int, num_classes: int, seed: int, mode: str = "random") -> torch.Tensor:
    """The class of every sample (int64, ``num_samples``): "random", uniform draws from a stream of ``seed`` (apart
    from the images' noise streams), or "balanced", sample i of class i % num_classes."""
    if mode not in LABEL_MODES:
        raise ValueError(f"class-label mode must be one of {LABEL_MODES}, got {mode!r}")
    if mode == "balanced":
        return torch.arange(num_samples) % num_classes
    rng = np.random.default_rng(np.random.SeedSequence([seed % (1 << 64), LABEL_STREAM]))  # (a negative seed too)
    return torch.from_numpy(rng.integers(0, num_classes, num_samples))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a checkpoint file or a run folder (its latest checkpoint)")
    p.add_argument("--ref", help="reference statistics: an npz with 'mu' and 'sigma' (ADM's reference batch, or one "
                                 "written by --write-stats); without it only the samples are written (--outdir)")
    p.add_argument("--num-samples", type=int, default=50000, help="samples in all (default 50000)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale; 1 disables guidance (default 1.5)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch and process (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-labels", choices=LABEL_MODES, default="random",
                   help="the samples' classes: 'random' (default; uniform, drawn from --seed, as the official "
                        "MaskDiT and DiT sampling scripts) or 'balanced' (sample i: class i %% classes)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights to use (default ema)")
    p.add_argument("--vae", default=None, help="decode latents with this VAE (local folder or hub name); default: the "
                                               "VAE of the latent folder the model was trained on (see sample.py)")
    p.add_argument("--outdir", help="write the samples (samples-rank<r>-of-<W>.npz), their stats.npz and fid.json here")
    p.add_argument("--json", help="where to write the result (default: OUTDIR/fid.json, else next to the checkpoint: "
                                  "fid-<checkpoint>-n<N>-cfg<s>-steps<k>[-<other settings>]-<weights>-ref-<REF>.json)")
    p.add_argument("--write-stats", metavar="SRC", help="compute reference statistics of SRC (a folder of images or "
                                                        "an npz of uint8 images) into --out instead of evaluating")
    p.add_argument("--export-adm", metavar="OUTDIR", help="write the samples of a finished --outdir run as one npz "
                   "for ADM's evaluator (arr_0: the images in sample order) into --out, instead of evaluating")
    p.add_argument("--out", help="with --write-stats: the statistics file to write (npz with mu, sigma); with "
                                 "--export-adm: the npz to write")
    p.add_argument("--resolution", type=int, default=256, help="with --write-stats from a folder: crop size (256)")
    p.add_argument("--num-workers", type=int, default=4, help="image loading processes for --write-stats (default 4)")
    p.add_argument("--inception-weights", help="a local copy of torch-fidelity's Inception-v3 weights "
                                               "(default: the torch hub cache, downloading if needed)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', ...")
    add_sampling_arguments(p)
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.ckpt, args.write_stats, args.export_adm)) != 1:
        p.error("give --ckpt (evaluate a checkpoint), --write-stats SRC --out STATS.npz (reference statistics) or "
                "--export-adm OUTDIR --out SAMPLES.npz (samples for ADM's evaluator)")
    return args


# --- processes ---------------------------------------------------------------------------------------------------

def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of ``distributed.setup`` on ``--device``: under torchrun with more than one
    process it joins the process group, each process on its own GPU (cuda:LOCAL_RANK)."""
    env = distributed.setup(pick_device(device_arg))  # (a valid --device, CUDA only where there is CUDA)
    return env.rank, env.world_size, env.device


def all_reduce_stats(acc: StatsAccumulator, device: torch.device) -> None:
    """Sum the accumulators of all processes (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flat = acc.tensors().to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flat)
        acc.load_tensors(flat)


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


# --- samples -----------------------------------------------------------------------------------------------------

def samples_path(outdir: str, rank: int, world: int) -> str:
    return os.path.join(outdir, f"samples-rank{rank:03d}-of-{world:03d}.npz")


def finished_files(outdir: str) -> list[str]:
    """The processes' finished samples files (``samples_path``) in ``outdir``, sorted."""
    return sorted(glob.glob(os.path.join(outdir, "samples-rank*-of-*.npz")))


def sample_files(outdir: str) -> list[str]:
    """The ``samples-rank<r>-of-<W>.npz`` files of a finished run in ``outdir`` (all W of them); ValueError else."""
    files = finished_files(outdir)
    worlds = {f.rsplit("-of-", 1)[1] for f in files}
    if not files or len(worlds) != 1 or len(files) != int(worlds.pop()[:-4]):
        raise ValueError(f"{outdir!r} does not hold one complete set of samples-rank<r>-of-<W>.npz files: {files}")
    return files


def load_samples(outdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of every ``samples-rank*-of-W.npz`` in ``outdir``, merged in sample order."""
    parts = [np.load(f) for f in sample_files(outdir)]
    indices = np.concatenate([p["indices"] for p in parts])
    order = np.argsort(indices)
    images = np.concatenate([p["images"] for p in parts])[order]
    labels = np.concatenate([p["labels"] for p in parts])[order]
    return images, labels


PART_IMAGES = 1000  # samples a process gathers before writing them to --outdir as a part file (resumable)


def part_path(outdir: str, rank: int, world: int, first: int) -> str:
    """A part file of rank ``rank``'s samples, named by the index of its first sample."""
    return os.path.join(outdir, f"part-rank{rank:03d}-of-{world:03d}-{first:07d}.npz")


def part_files(outdir: str, rank: int | None = None, world: int | None = None) -> list[str]:
    """The part files (``part_path``) in ``outdir`` of rank ``rank`` of ``world`` processes (None: any), sorted."""
    r, w = ("*" if v is None else f"{v:03d}" for v in (rank, world))
    return sorted(glob.glob(os.path.join(outdir, f"part-rank{r}-of-{w}-*.npz")))


def save_samples(path: str, images: list, labels: list, indices: list) -> None:
    """images, labels and sample indices as one npz, written atomically."""
    atomic_write(path, lambda f: np.savez(f, images=np.concatenate(images), labels=np.concatenate(labels),
                                          indices=np.concatenate(indices)))


def stochastic_json(args) -> dict:
    """The stochastic sampler's options for strict JSON (an infinite s_max as null)."""
    return {k: (None if v == float("inf") else v) for k, v in stochastic_options(args).items()}


def weights_digest(state: dict) -> str:
    """SHA-256 of a state dict's tensors (names, dtypes, shapes and bytes, in name order): which weights sampled,
    whatever the file is called (converted checkpoints all have step 0)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def sampling_settings(args, ckpt_file: str, ckpt: dict, digest: str, world: int) -> dict:
    """What a process's samples depend on (``digest``: ``weights_digest`` of the weights sampled): a rerun with
    other settings must not continue them."""
    return {"ckpt": os.path.abspath(ckpt_file), "step": ckpt.get("step"), "weights": args.weights,
            "weights_sha256": digest,
            "num_samples": args.num_samples, "sampler": args.sampler, "cfg_scale": args.cfg_scale,
            "cfg_channels": args.cfg_channels, "steps": args.steps, "seed": args.seed,
            "class_labels": args.class_labels,
            "precision": args.precision, "vae": args.vae, "world_size": world,
            **stochastic_json(args)}


# names of the settings in messages; the others are --<key>
SETTING_NAMES = {"step": "the checkpoint's step", "weights_sha256": "the weights' SHA-256", "world_size": "processes"}


def holds_samples(outdir: str) -> bool:
    """Whether ``outdir`` holds samples of a run: finished (``samples_path``) or part files (``part_path``)."""
    return bool(finished_files(outdir) or part_files(outdir))


def samples_done(outdir: str, settings: dict, rank: int, world: int) -> tuple[list, list, list]:
    """(images, labels, indices) of the samples this process wrote to ``outdir`` in an earlier run with the same
    ``settings`` (its part files, or its finished samples file), as lists of arrays; ValueError if ``outdir``
    holds samples of other settings.  Writes the settings (rank 0) into a new ``outdir``, or one whose settings
    no samples were written with."""
    settings_file = os.path.join(outdir, "sampling.json")
    saved = None
    if os.path.exists(settings_file):
        with open(settings_file) as f:
            saved = json.load(f)
        saved.setdefault("class_labels", "balanced")  # (written before the mode existed: class i % classes)
        saved.setdefault("sampler", "edm")  # (before there was a choice: every checkpoint sampled with EDM's)
        saved.setdefault("cfg_channels", None)
        saved.setdefault("weights_sha256", settings.get("weights_sha256"))  # (written before it was recorded)
    if saved is not None and saved != settings:
        if not holds_samples(outdir):  # a run that failed or stopped before its first batch: nothing to continue
            saved = None
        else:
            diff = {SETTING_NAMES.get(k, "--" + k.replace("_", "-")): (saved.get(k), v) for k, v in settings.items()
                    if saved.get(k) != v}
            raise ValueError(f"--outdir {outdir!r} holds samples of other settings (earlier, now: {diff}); choose "
                             "another --outdir or remove that one")
    distributed.barrier()  # every process has read the settings before rank 0 may write them
    if saved is None:
        if rank == 0:
            os.makedirs(outdir, exist_ok=True)
            atomic_write_json(settings_file, settings)
        return [], [], []
    finished = samples_path(outdir, rank, world)
    files = [finished] if os.path.exists(finished) else part_files(outdir, rank, world)
    parts = [np.load(f) for f in files]
    return [p["images"] for p in parts], [p["labels"] for p in parts], [p["indices"] for p in parts]


def result_path(args, ckpt_file: str) -> str:
    """--json, else OUTDIR/fid.json, else a name that records every setting the result depends on (those not at
    their defaults; the reference statistics' file name last), next to the checkpoint."""
    if args.json:
        return args.json
    if args.outdir:
        return os.path.join(args.outdir, "fid.json")
    stem = os.path.splitext(os.path.basename(ckpt_file))[0]
    options = "" if args.sampler == "edm" else f"-{args.sampler}"
    options += "" if args.cfg_channels in (None, DIT_GUIDED_CHANNELS) else f"-cfgch{args.cfg_channels}"
    if args.s_churn > 0:
        options += f"-churn{args.s_churn:g}" + "".join(
            f"-{key.replace('_', '')}{getattr(args, key):g}" for key in ("s_min", "s_max", "s_noise")
            if getattr(args, key) != STOCHASTIC_DEFAULTS[key])
    options += "" if args.precision == "fp32" else f"-{args.precision}"
    options += "" if args.class_labels == "random" else f"-{args.class_labels}"
    options += "" if args.seed == 0 else f"-seed{args.seed}"
    options += "" if args.vae is None else f"-vae-{os.path.basename(os.path.normpath(args.vae))}"
    options += f"-{args.weights}"
    options += "" if args.ref is None else f"-ref-{os.path.splitext(os.path.basename(args.ref))[0]}"
    name = f"fid-{stem}-n{args.num_samples}-cfg{args.cfg_scale:g}-steps{args.steps}{options}.json"
    return os.path.join(os.path.dirname(os.path.abspath(ckpt_file)), name)


def make_extractor(args, device: torch.device, ref_dim: int | None):
    """The feature extractor (``InceptionFeatures``), built before any sampling so a missing package or
    weights file fails at once; its dimension must match the reference statistics."""
    extractor = InceptionFeatures(device=device, weights_path=args.inception_weights)
    if ref_dim is not None and extractor.dim != ref_dim:
        raise ValueError(f"--ref: the reference statistics have dimension {ref_dim}, the features {extractor.dim}")
    return extractor


def lock_outdir(outdir: str, rank: int, held: contextlib.ExitStack) -> None:
    """Rank 0 locks ``outdir`` (``folder_lock``, kept in ``held``) for this evaluation; every process raises the
    same ValueError if another evaluation holds it (two writing one folder would mix their samples)."""
    refused = None
    if rank == 0:
        try:
            held.enter_context(folder_lock(outdir, "--outdir"))
        except ValueError as e:
            refused = str(e)
    refused = broadcast_object(refused)
    if refused is not None:
        raise ValueError(refused)


def evaluate(args, held: contextlib.ExitStack) -> dict | None:
    """Sample ``args.num_samples`` images across the processes; FID against ``args.ref`` (the result dict,
    on rank 0; None elsewhere or without --ref).  ``held`` keeps the lock of ``args.outdir`` until the caller
    closes it."""
    for flag, value, low in (("--num-samples", args.num_samples, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.ref is None and args.outdir is None:
        raise ValueError("nothing to do: give --ref STATS.npz (FID) and/or --outdir DIR (keep the samples)")
    if args.ref is not None and args.num_samples < 2:
        raise ValueError(f"FID needs --num-samples >= 2, got {args.num_samples}")
    if args.outdir is not None:  # before the sampling, whose work a bad --outdir would lose
        make_output_folder(args.outdir, "--outdir")
    rank, world, device = setup_distributed(args.device)
    if args.outdir is not None:
        lock_outdir(args.outdir, rank, held)
    check_sampling_precision(args.precision, device)
    if args.num_samples < world:
        raise ValueError(f"--num-samples {args.num_samples} is smaller than the number of processes ({world})")
    ckpt_file = resolve_checkpoint(args.ckpt, "--ckpt")
    ref = load_reference_stats(args.ref) if args.ref is not None else None  # fail before sampling
    ckpt = load_checkpoint(ckpt_file, arg="--ckpt")
    resolve_sampling(args, ckpt)
    net, decode = sampling_network(ckpt, args, device)
    settings = sampling_settings(args, ckpt_file, ckpt, weights_digest(ckpt[args.weights]), world)
    model, model_cfg = net.model, net.model.config
    extractor = make_extractor(args, device, ref.mu.shape[0]) if ref is not None else None

    indices = torch.arange(rank, args.num_samples, world)
    acc = StatsAccumulator(extractor.dim) if extractor is not None else None
    kept_images, kept_labels, kept_indices, processed = [], [], [], 0
    if args.outdir is not None:  # continue an interrupted run: its samples are not drawn again
        kept_images, kept_labels, kept_indices = samples_done(args.outdir, settings, rank, world)
        drawn = torch.from_numpy(np.concatenate(kept_indices)) if kept_indices else torch.zeros(0, dtype=torch.int64)
        indices = indices[~torch.isin(indices, drawn)]
        processed = len(drawn)
        if acc is not None:
            for images in kept_images:
                for chunk in np.array_split(images, max(1, -(-len(images) // args.batch_size))):
                    acc.update(extractor(chunk))
        if processed:
            log(rank, f"continuing in {args.outdir}: {processed} samples of this process were drawn earlier")
    log(rank, f"{model_cfg.name} ({args.weights}) from {ckpt_file}: {args.num_samples} samples, {world} process(es), "
              f"{args.sampler} sampler, cfg {args.cfg_scale}, {args.steps} steps, seed {args.seed}, "
              f"{args.class_labels} classes, "
              f"{args.precision}, device {device}")
    t0, part_start, resumed = time.perf_counter(), len(kept_images), processed
    fill_to = sampling_fill(args, len(indices))
    classes = sample_labels(args.num_samples, model.num_classes, args.seed, args.class_labels) \
        if model.num_classes else torch.zeros(args.num_samples, dtype=torch.int64)
    for batch in indices.split(args.batch_size) if len(indices) else ():  # (an empty tensor splits into itself)
        labels = classes[batch]
        images = draw_images(net, batch, labels if model.num_classes else None, args, device, decode,
                             fill_to=fill_to)
        if acc is not None:
            acc.update(extractor(images))
        if args.outdir is not None:
            kept_images.append(images)
            kept_labels.append(labels.numpy())
            kept_indices.append(batch.numpy())
            if sum(map(len, kept_indices[part_start:])) >= PART_IMAGES:
                # the batches since the last part file, as a part file: a rerun continues after them
                save_samples(part_path(args.outdir, rank, world, int(kept_indices[part_start][0])),
                             kept_images[part_start:], kept_labels[part_start:], kept_indices[part_start:])
                part_start = len(kept_images)
        processed += len(batch)
        done = min(processed * world, args.num_samples)  # rank 0's progress, for all processes
        rate = (processed - resumed) * world / (time.perf_counter() - t0)
        log(rank, f"sampled {done}/{args.num_samples} ({rate:.1f} img/s)")

    if args.outdir is not None:
        save_samples(samples_path(args.outdir, rank, world), kept_images, kept_labels, kept_indices)
        for part in part_files(args.outdir, rank, world):
            os.unlink(part)  # (after the whole file is safely written)
        log(rank, f"wrote the samples to {args.outdir}")
    if acc is None:
        return None
    all_reduce_stats(acc, device)
    if rank != 0:
        return None
    mu, sigma = acc.statistics()
    if args.outdir is not None:
        save_stats(os.path.join(args.outdir, "stats.npz"), mu, sigma)
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    result = {
        "fid": fid, **settings, "num_samples": acc.count,
        "model": model_cfg.name, "ref": os.path.abspath(args.ref), "seconds": round(time.perf_counter() - t0, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = result_path(args, ckpt_file)
    atomic_write_json(path, result)  # (atomic_write makes the folder)
    print(json.dumps(result), flush=True)
    print(f"FID {fid:.4f} ({acc.count} samples) -> {path}", flush=True)
    return result


# --- reference statistics ----------------------------------------------------------------------------------------

class ImageFiles(torch.utils.data.Dataset):
    """Image files as (size, size, 3) uint8 arrays, center-cropped like the training data."""

    def __init__(self, files: list[str], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(read_image(self.files[i], self.size)))  # a writable copy


def write_stats(args) -> tuple[np.ndarray, np.ndarray] | None:
    """Reference statistics of the images in ``args.write_stats`` into ``args.out`` ((mu, sigma) on rank 0)."""
    if args.out is None:
        raise ValueError("--write-stats needs --out STATS.npz")
    if args.resolution < 1 or args.batch_size < 1:
        raise ValueError(f"--resolution and --batch-size must be >= 1, got {args.resolution} and {args.batch_size}")
    src = args.write_stats
    rank, world, device = setup_distributed(args.device)
    if os.path.isdir(src):
        files = image_files(src)
        if not files:
            raise ValueError(f"folder {src!r} holds no images with extensions {IMAGE_EXTENSIONS}")
        dataset = ImageFiles(files[rank::world], args.resolution)
        batches = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
        total = len(files)
    elif os.path.isfile(src) and src.endswith(".npz"):
        with np.load(src) as f:
            key = next((k for k in ("arr_0", "images") if k in f.files), None)
            if key is None:
                raise ValueError(f"{src!r} has no 'arr_0' or 'images' array of uint8 images: it holds {f.files}")
            images = f[key]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{src!r}[{key!r}] must be (N, H, W, C) uint8, got {images.shape} {images.dtype}")
        total = len(images)
        mine = images[rank::world]
        batches = (mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size))
    else:
        raise ValueError(f"--write-stats {src!r} is neither a folder of images nor an .npz file")
    if total < 2:
        raise ValueError(f"statistics need at least 2 images, {src!r} has {total}")
    extractor = make_extractor(args, device, None)
    acc = StatsAccumulator(extractor.dim)
    for i, images in enumerate(batches):
        acc.update(extractor(images))
        if i % 20 == 0:
            log(rank, f"features {min(acc.count * world, total)}/{total}")
    all_reduce_stats(acc, device)
    if rank != 0:
        return None
    mu, sigma = acc.statistics()
    save_stats(args.out, mu, sigma)
    print(f"wrote statistics of {acc.count} images (dimension {extractor.dim}) to {args.out}", flush=True)
    return mu, sigma


# --- samples for ADM's evaluator ---------------------------------------------------------------------------------

def export_adm(outdir: str, path: str | None, chunk: int = 1000) -> int:
    """The samples of a finished ``--outdir`` run as one npz for ADM's evaluator (openai/guided-diffusion
    ``evaluations/evaluator.py``: Inception Score, FID, sFID, precision and recall, the paper's metrics), the
    format of DiT's and MaskDiT's sampling scripts: ``arr_0``, the (N, H, W, 3) uint8 images in sample order.
    Written ``chunk`` images at a time (the images are held once, in the processes' files) into an uncompressed
    npz, atomically.  Returns N.  ValueError for a run that is not finished or not of RGB images."""
    if path is None:
        raise ValueError("--export-adm needs --out SAMPLES.npz")
    settings_file = os.path.join(outdir, "sampling.json")
    if not os.path.exists(settings_file):
        raise ValueError(f"--export-adm {outdir!r} holds no samples of maskdit.evaluate (no sampling.json)")
    with open(settings_file) as f:
        wanted = json.load(f)["num_samples"]
    parts = [np.load(f) for f in sample_files(outdir)]
    images = [p["images"] for p in parts]
    indices = [p["indices"] for p in parts]  # (each read from its file once)
    # (file, row) of every sample, in sample order
    where = np.concatenate([np.stack([np.full(len(i), k), np.arange(len(i))], 1) for k, i in enumerate(indices)])
    where = where[np.argsort(np.concatenate(indices))]
    if len(where) != wanted:
        raise ValueError(f"{outdir!r} holds {len(where)} samples, its run was for {wanted}: finish it first")
    shape = (len(where), *images[0].shape[1:])
    if len(shape) != 4 or shape[-1] != 3 or images[0].dtype != np.uint8:
        raise ValueError(f"ADM's evaluator takes RGB uint8 images (N, H, W, 3); these are {shape} {images[0].dtype}")

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf, \
                zf.open("arr_0.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                       "fortran_order": False, "shape": shape})
            for start in range(0, len(where), chunk):
                out.write(np.stack([images[k][i] for k, i in where[start:start + chunk]]).tobytes())

    atomic_write(path, write)
    print(f"wrote the {shape[0]} samples of {outdir} to {path} (arr_0 {shape} uint8, for ADM's evaluator)", flush=True)
    return shape[0]


def main(argv=None):
    """Run the CLI; returns the result dict (evaluate), (mu, sigma) (--write-stats) on rank 0, or the number of
    samples written (--export-adm)."""
    args = parse_args(argv)
    if args.export_adm is not None:
        return export_adm(args.export_adm, args.out)
    started_here = not dist.is_initialized()
    try:
        with contextlib.ExitStack() as held:
            return write_stats(args) if args.write_stats is not None else evaluate(args, held)
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()


def cli(argv=None) -> None:
    """``main`` with configuration and setup errors as one line (no stack trace)."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, ImportError, InceptionUnavailableError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
