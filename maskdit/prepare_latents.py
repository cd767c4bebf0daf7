"""Encode an image folder into VAE latent moments, for training with ``--dataset latents:OUT``.

    python -m maskdit.prepare_latents --images data/imagenet/train --out data/latents256
    python -m maskdit.prepare_latents --images DIR --out OUT --vae path/to/vae-folder --device cuda

Images are read like ``ImageFolderDataset`` (root/<class>/<images>, classes sorted, ADM center crop to
--resolution), encoded by a diffusers ``AutoencoderKL`` (default: the hub's stabilityai/sd-vae-ft-ema; offline,
pass a local folder), and their moments (mean, logvar) written in shards of --shard-size images; see
``maskdit.latents`` for the format.  Resumable: each shard is written atomically and recorded in meta.json,
so a rerun with the same arguments keeps the finished shards and encodes only the missing ones.  One run at a
time per --out (a lock file, OUT/.lock: a second run is refused).
Needs the optional dependency diffusers: pip install 'maskdit[latents]'.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from maskdit.data import ImageFolderDataset
from maskdit.distributed import pick_device
from maskdit.files import atomic_write, atomic_write_json, folder_lock, make_output_folder, remove_partial_files
from maskdit.latents import (
    DEFAULT_VAE,
    META_NAME,
    encode_moments,
    load_vae,
    meta_path,
    resolve_vae_name,
    vae_scale,
)

FORMAT = "maskdit-latents-v1"
# meta.json keys that must match for a rerun to continue (rather than mix) an earlier run's shards
SETTINGS = ("format", "resolution", "vae", "dtype", "shard_size", "classes", "num_images", "files_sha1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="image folder root/<class>/<images>")
    p.add_argument("--out", required=True, help="output folder for meta.json and the shards")
    p.add_argument("--resolution", type=int, default=256, help="pixel resolution of the center crop (default 256)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"local AutoencoderKL folder or hub name (default {DEFAULT_VAE})")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (default 32)")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard file (default 10000)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage type of the moments (default float32; float16 halves the disk space)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image loading processes")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


def shard_files(index: int) -> tuple[str, str]:
    return f"shard-{index:05d}.npy", f"labels-{index:05d}.npy"


def files_fingerprint(dataset: ImageFolderDataset, root: str) -> str:
    """SHA-1 of the (label, relative path) list: a rerun on a changed folder is detected, not mixed in."""
    h = hashlib.sha1()
    for path, label in zip(dataset.files, dataset.labels.tolist()):
        h.update(f"{label}\t{os.path.relpath(path, root)}\n".encode())
    return h.hexdigest()


def shard_ok(out: str, entry: dict, meta: dict) -> bool:
    """Whether a shard recorded in meta.json is on disk with the expected shapes and type."""
    if not meta.get("channels"):
        return False
    try:
        x = np.load(os.path.join(out, entry["moments"]), mmap_mode="r")
        y = np.load(os.path.join(out, entry["labels"]), mmap_mode="r")
    except (OSError, ValueError):
        return False
    n, c, s = entry["count"], meta["channels"], meta["latent_size"]
    return x.shape == (n, 2 * c, s, s) and x.dtype == np.dtype(meta["dtype"]) and y.shape == (n,)


def start_or_resume(out: str, settings: dict) -> dict:
    """The meta dict to continue from: an earlier run's (its valid shards only) if its settings match, else new."""
    meta = dict(settings, shards=[], complete=False, channels=None, latent_size=None, downsample=None, scale=None)
    if not os.path.isfile(meta_path(out)):
        return meta
    try:
        with open(meta_path(out)) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--out {out!r}: cannot read its {META_NAME} ({e}); delete it or use another --out") from None
    differ = [k for k in SETTINGS if old.get(k) != settings[k]]
    if differ:
        files = {"classes", "files_sha1"}
        shown = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in differ if k not in files]
        shown += ["the image files changed"] if files & set(differ) else []
        raise ValueError(f"--out {out!r} already holds latents made with other settings ({', '.join(shown)}); "
                         "use another --out or delete that folder to start over")
    old["shards"] = [e for e in old.get("shards", []) if shard_ok(out, e, old)]
    return old


def write_meta(out: str, meta: dict) -> None:
    atomic_write_json(meta_path(out), meta)


def plan_batches(todo: list[int], n: int, shard_size: int, batch_size: int) -> tuple[list[list[int]], list]:
    """Index batches over the images of the shards ``todo``, never crossing a shard boundary, and for each
    batch the shard it completes (None if it is not a shard's last batch)."""
    batches, ends = [], []
    for k in todo:
        stop = min((k + 1) * shard_size, n)
        for s in range(k * shard_size, stop, batch_size):
            batches.append(list(range(s, min(s + batch_size, stop))))
            ends.append(k if s + batch_size >= stop else None)
    return batches, ends


def write_shard(out: str, meta: dict, index: int, moments: np.ndarray, labels: np.ndarray) -> None:
    """Write shard ``index`` atomically, then record it in meta.json (a kill in between only costs a re-encode)."""
    names = shard_files(index)
    atomic_write(os.path.join(out, names[0]), lambda f: np.save(f, moments))
    atomic_write(os.path.join(out, names[1]), lambda f: np.save(f, labels))
    meta["shards"].append({"index": index, "moments": names[0], "labels": names[1],
                           "start": index * meta["shard_size"], "count": len(labels)})
    meta["shards"].sort(key=lambda e: e["index"])
    meta["complete"] = len(meta["shards"]) == meta["num_shards"]
    write_meta(out, meta)


def prepare_latents(images: str, out: str, resolution: int = 256, vae: str = DEFAULT_VAE, batch_size: int = 32,
                    shard_size: int = 10_000, dtype: str = "float32", num_workers: int = 0, device: str = "auto",
                    progress: bool = True) -> dict:
    """Encode ``images`` into ``out`` (or finish an interrupted run); returns the final meta.json dict."""
    if batch_size < 1 or shard_size < 1 or num_workers < 0:
        raise ValueError(f"--batch-size and --shard-size must be >= 1 and --num-workers >= 0, "
                         f"got {batch_size}, {shard_size}, {num_workers}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {dtype!r}")
    if resolution < 1:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    try:
        dataset = ImageFolderDataset(images, resolution)
    except ValueError as e:
        raise ValueError(f"--images: {e}") from None
    make_output_folder(out, "--out")
    with folder_lock(out, "--out"):  # one run a folder: another would delete this one's partial shards
        remove_partial_files(out)  # (atomic_write's temporary shards and meta.json of a killed run)
        n = len(dataset)
        settings = {"format": FORMAT, "resolution": resolution, "vae": resolve_vae_name(vae), "dtype": dtype,
                    "shard_size": shard_size, "classes": dataset.class_names, "num_images": n,
                    "files_sha1": files_fingerprint(dataset, images)}
        meta = start_or_resume(out, settings)
        meta["num_shards"] = -(-n // shard_size)
        done = {e["index"] for e in meta["shards"]}
        todo = [k for k in range(meta["num_shards"]) if k not in done]
        meta["complete"] = not todo
        if not todo:
            write_meta(out, meta)
            print(f"{out}: all {meta['num_shards']} shards already encoded ({n} images)")
            return meta

        dev = pick_device(device)
        model = load_vae(vae, dev)
        factor = 2 ** (len(model.config.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")
        meta["scale"] = vae_scale(model)
        write_meta(out, meta)  # (only now: a run that cannot load its VAE leaves no settings to hold --out to)

        batches, ends = plan_batches(todo, n, shard_size, batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
        bar = tqdm(total=n, initial=sum(e["count"] for e in meta["shards"]), unit="img", desc="encode",
                   dynamic_ncols=True, disable=None if progress else True)
        parts, labels = [], []
        for (x, y), end in zip(loader, ends):
            moments = encode_moments(model, x.to(dev))
            if meta["channels"] is None:
                meta["channels"], meta["latent_size"] = moments.shape[1] // 2, moments.shape[-1]
                meta["downsample"] = resolution // moments.shape[-1]
            elif moments.shape[1:] != (2 * meta["channels"], meta["latent_size"], meta["latent_size"]):
                raise ValueError(f"the VAE gives moments of shape {tuple(moments.shape[1:])}, the existing shards in "
                                 f"{out!r} hold {2 * meta['channels']}x{meta['latent_size']}x{meta['latent_size']}")
            parts.append(moments.cpu().numpy().astype(dtype))
            labels.append(y.numpy().astype(np.int64))
            bar.update(len(y))
            if end is not None:  # the shard is complete
                write_shard(out, meta, end, np.concatenate(parts), np.concatenate(labels))
                parts, labels = [], []
                if bar.disable:  # not a terminal: a log line per shard instead of the bar
                    written = sum(e["count"] for e in meta["shards"])
                    print(f"shard {end + 1}/{meta['num_shards']} written ({written}/{n} images encoded)", flush=True)
        bar.close()
        print(f"{out}: encoded {len(todo)} shard(s); {len(meta['shards'])}/{meta['num_shards']} shards, {n} images, "
              f"latents {meta['channels']}x{meta['latent_size']}x{meta['latent_size']}")
        return meta


def main(argv=None) -> dict:
    a = parse_args(argv)
    return prepare_latents(a.images, a.out, resolution=a.resolution, vae=a.vae, batch_size=a.batch_size,
                           shard_size=a.shard_size, dtype=a.dtype, num_workers=a.num_workers, device=a.device)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, ImportError) as e:  # bad input, missing diffusers, unreachable weights: one line
        sys.exit(f"error: {e}")
