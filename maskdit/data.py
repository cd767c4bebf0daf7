"""Datasets (bundled digits, image folders, VAE latents) and a resumable, epoch-seeded shuffling batch sampler."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .latents import LATENT_PREFIX, read_meta, sample_latents
from .training import default_signal_handlers

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), 1 channel, bilinearly resized
    to ``image_size`` and scaled to [-1, 1].  Held in memory."""

    num_classes = 10
    channels = 1

    def __init__(self, image_size: int = 16):
        from sklearn.datasets import load_digits

        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        digits = load_digits()
        x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # [0, 1], (N, 1, 8, 8)
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = (x.clamp(0, 1) * 2 - 1).contiguous()
        self.labels = torch.from_numpy(digits.target.astype(np.int64))
        self.class_names = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def center_crop_resize(img, size: int) -> np.ndarray:
    """ADM-style center crop: box-downsample while the short side >= 2*size, bicubic resize so the short
    side is ``size``, then crop the centre.  PIL image in, (size, size, 3) uint8 out."""
    from PIL import Image

    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def image_files(folder: str) -> list[str]:
    """The image files (``IMAGE_EXTENSIONS``) under ``folder``, recursively, folder by folder in sorted order."""
    return [os.path.join(dirpath, fn) for dirpath, _, filenames in sorted(os.walk(folder)) for fn in sorted(filenames)
            if fn.lower().endswith(IMAGE_EXTENSIONS)]


def read_image(path: str, size: int) -> np.ndarray:
    """The image file ``path`` as ``center_crop_resize`` makes it, (size, size, 3) uint8; ValueError naming the file
    if it cannot be read (e.g. "image file is truncated", which ``Image.verify`` does not see)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return center_crop_resize(im, size)
    except Exception as e:
        raise ValueError(f"corrupt or unreadable image file {path!r}: {e}") from None


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class name>/*.png|jpg|...``, RGB, center-cropped and resized, scaled to [-1, 1].

    Every file's header is verified on construction, so most corrupt files fail at start, by name; data that only
    decoding finds broken (a truncated JPEG) fails when its item is read, by name too.
    """

    channels = 3

    def __init__(self, root: str, image_size: int):
        from PIL import Image

        if not os.path.isdir(root):
            raise ValueError(f"dataset folder {root!r} " + ("is a file, not a folder of class folders"
                                                            if os.path.exists(root) else "does not exist"))
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        # (hidden folders, e.g. .ipynb_checkpoints, are no classes)
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.class_names:
            raise ValueError(f"dataset folder {root!r} has no class sub-folders (expected root/<class>/<image>)")
        self.files, labels = [], []
        for label, name in enumerate(self.class_names):
            files = image_files(os.path.join(root, name))
            self.files += files
            labels += [label] * len(files)
        if not self.files:
            raise ValueError(f"dataset folder {root!r} holds no images with extensions {IMAGE_EXTENSIONS}")
        present = set(labels)
        empty = [name for label, name in enumerate(self.class_names) if label not in present]
        if empty:  # a class without images would still take a label (and shift the classes after it)
            raise ValueError(f"dataset folder {root!r}: class folder(s) {empty} hold no images with extensions "
                             f"{IMAGE_EXTENSIONS}")
        for path in self.files:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:
                raise ValueError(f"corrupt or unreadable image file {path!r}: {e}") from None
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.image_size = image_size
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        arr = read_image(self.files[i], self.image_size)
        x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()
        return x, self.labels[i]


class LatentDataset(torch.utils.data.Dataset):
    """VAE moments written by ``python -m maskdit.prepare_latents`` (``root/meta.json`` and .npy shards, read
    memory-mapped).  An item is (moments (2C, h, w) float32, label).  The moments are not the model's input:
    a training loop turns each batch into latents with ``prepare_batch`` (a fresh draw every step, the official
    recipe), when the dataset has ``is_latent``.

    The model's input is C x h x h: ``channels`` = C (4 for SD's VAE) and ``image_size`` = h (32 at 256x256);
    ``resolution`` is the pixel size h * 8.  The optional ``image_size`` argument is only checked: None, h or
    the pixel resolution are accepted, anything else is a ValueError.
    """

    is_latent = True

    def __init__(self, root: str, image_size: int | None = None):
        meta = read_meta(root)
        shards = sorted(meta.get("shards", []), key=lambda e: e["index"])
        if not meta.get("complete") or not shards:
            raise ValueError(f"latent folder {root!r} is incomplete ({len(shards)} of {meta.get('num_shards')} "
                             "shards): rerun python -m maskdit.prepare_latents with the same arguments to finish it")
        self.root, self.meta = root, meta
        self.class_names = list(meta["classes"])
        self.num_classes = len(self.class_names)
        self.channels, self.image_size = meta["channels"], meta["latent_size"]
        self.resolution, self.scale, self.vae = meta["resolution"], meta["scale"], meta["vae"]
        if image_size not in (None, self.image_size, self.resolution):
            raise ValueError(f"image size {image_size} does not fit the latents in {root!r}: they are "
                             f"{self.channels}x{self.image_size}x{self.image_size}, encoded from {self.resolution}x"
                             f"{self.resolution} images (give {self.image_size}, {self.resolution} or nothing)")
        self.paths, self._arrays, labels = [], [], []
        for e in shards:
            path = os.path.join(root, e["moments"])
            try:
                x = np.load(path, mmap_mode="r")
                y = np.load(os.path.join(root, e["labels"]))
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read latent shard {path!r}: {err}") from None
            if x.shape != (e["count"], 2 * self.channels, self.image_size, self.image_size) or len(y) != e["count"]:
                raise ValueError(f"latent shard {path!r} has shape {x.shape} and {len(y)} labels, meta.json says "
                                 f"{e['count']} x {2 * self.channels}x{self.image_size}x{self.image_size}")
            self.paths.append(path)
            self._arrays.append(x)
            labels.append(y)
        self.offsets = np.cumsum([0] + [len(y) for y in labels])
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))

    def __getstate__(self):  # DataLoader workers started by spawn re-open the files instead of copying them
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} latents")
        i %= len(self)
        if self._arrays is None:
            self._arrays = [np.load(p, mmap_mode="r") for p in self.paths]
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        x = np.array(self._arrays[k][i - self.offsets[k]], dtype=np.float32)  # a copy out of the memory map
        return torch.from_numpy(x), self.labels[i]

    def prepare_batch(self, moments: torch.Tensor, generator: torch.Generator | None = None,
                      eps: torch.Tensor | None = None) -> torch.Tensor:
        """Moments (N, 2C, h, w) -> latents z (N, C, h, w) = (mean + exp(logvar/2) * eps) * scale, on their device
        (``eps`` given, or drawn from ``generator``)."""
        return sample_latents(moments, generator, self.scale, eps)


def absolute_dataset_spec(spec: str) -> str:
    """``spec`` with its folder made absolute ("digits" as it is): a checkpoint then names its data wherever it is
    read (a resume, sample.py's VAE lookup) from."""
    if spec == "digits":
        return spec
    if spec.startswith(LATENT_PREFIX):
        return LATENT_PREFIX + os.path.abspath(spec[len(LATENT_PREFIX):])
    return os.path.abspath(spec)


def make_dataset(spec: str, image_size: int | None):
    """``"digits"``, ``"latents:DIR"`` (a ``LatentDataset``; image_size only checked, may be None) or the path
    of an image folder."""
    if spec.startswith(LATENT_PREFIX):
        return LatentDataset(spec[len(LATENT_PREFIX):], image_size)
    if spec == "digits":
        return DigitsDataset(image_size)
    return ImageFolderDataset(spec, image_size)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of indices from a fresh permutation each epoch, seeded by (seed, epoch); drops the last
    partial batch.  ``start_batch`` resumes mid-stream: batch b of the stream is always the same.

    Shared by several processes: each (global) batch is cut into ``num_parts`` equal contiguous parts and
    only the parts listed in ``parts`` are yielded, in that order, one list each (process r of W, each
    accumulating A micro-batches: ``num_parts`` W*A, ``parts`` r*A .. r*A+A-1).  Every process computes the
    same permutation, so the stream is defined by the global batch whatever the number of processes.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_batch: int = 0, num_parts: int = 1,
                 parts: list[int] | None = None):
        if batch_size > num_items:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_items} items)")
        parts = list(range(num_parts)) if parts is None else list(parts)
        if num_parts < 1 or batch_size % num_parts or not all(0 <= p < num_parts for p in parts):
            raise ValueError(f"cannot take parts {parts} of a batch of {batch_size} cut into {num_parts} parts")
        self.num_items, self.batch_size, self.seed, self.start_batch = num_items, batch_size, seed, start_batch
        self.batches_per_epoch = num_items // batch_size
        self.part_size, self.parts = batch_size // num_parts, parts

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self):
        b = self.start_batch
        while True:
            epoch, offset = divmod(b, self.batches_per_epoch)
            perm = self.epoch_permutation(epoch)
            for j in range(offset, self.batches_per_epoch):
                for part in self.parts:
                    start = j * self.batch_size + part * self.part_size
                    yield perm[start:start + self.part_size].tolist()
            b = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # an endless stream; len is one epoch
        return self.batches_per_epoch * len(self.parts)


def batch_iterator(dataset, batch_size: int, seed: int, start_batch: int = 0, num_workers: int = 0,
                   num_parts: int = 1, parts: list[int] | None = None):
    """Endless iterator of (images, labels) batches starting at batch ``start_batch`` of the stream; with
    ``num_parts`` / ``parts`` (see ``EpochBatchSampler``) the given parts of each batch, one at a time."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, start_batch, num_parts, parts)
    if isinstance(dataset, DigitsDataset):  # in memory: index directly, no worker processes
        for idx in sampler:
            idx = torch.tensor(idx)
            yield dataset.images[idx], dataset.labels[idx]
    else:
        # (its own generator for the workers' seeds: drawn from torch's global one, they would change that state,
        # which checkpoints save and a resume restores)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             persistent_workers=num_workers > 0,
                                             worker_init_fn=default_signal_handlers if num_workers else None,
                                             generator=torch.Generator().manual_seed(seed))
        yield from loader
