"""Datasets (bundled digits, image folders) and a resumable, epoch-seeded shuffling batch sampler."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

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


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class name>/*.png|jpg|...``, RGB, center-cropped and resized, scaled to [-1, 1].

    Every file is opened and verified on construction, so a corrupt file fails at start, by name.
    """

    channels = 3

    def __init__(self, root: str, image_size: int):
        from PIL import Image

        if not os.path.isdir(root):
            raise ValueError(f"dataset folder {root!r} does not exist")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.class_names:
            raise ValueError(f"dataset folder {root!r} has no class sub-folders (expected root/<class>/<image>)")
        self.files, labels = [], []
        for label, name in enumerate(self.class_names):
            for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name))):
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        self.files.append(os.path.join(dirpath, fn))
                        labels.append(label)
        if not self.files:
            raise ValueError(f"dataset folder {root!r} holds no images with extensions {IMAGE_EXTENSIONS}")
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
        from PIL import Image

        with Image.open(self.files[i]) as im:
            arr = center_crop_resize(im, self.image_size)
        x = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()
        return x, self.labels[i]


def make_dataset(spec: str, image_size: int):
    """``"digits"`` or the path of an image folder."""
    if spec == "digits":
        return DigitsDataset(image_size)
    return ImageFolderDataset(spec, image_size)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of indices from a fresh permutation each epoch, seeded by (seed, epoch); drops the last
    partial batch.  ``start_batch`` resumes mid-stream: batch b of the stream is always the same."""

    def __init__(self, num_items: int, batch_size: int, seed: int, start_batch: int = 0):
        if batch_size > num_items:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({num_items} items)")
        self.num_items, self.batch_size, self.seed, self.start_batch = num_items, batch_size, seed, start_batch
        self.batches_per_epoch = num_items // batch_size

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self):
        b = self.start_batch
        while True:
            epoch, offset = divmod(b, self.batches_per_epoch)
            perm = self.epoch_permutation(epoch)
            for j in range(offset, self.batches_per_epoch):
                yield perm[j * self.batch_size:(j + 1) * self.batch_size].tolist()
            b = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # an endless stream; len is one epoch
        return self.batches_per_epoch


def batch_iterator(dataset, batch_size: int, seed: int, start_batch: int = 0, num_workers: int = 0):
    """Endless iterator of (images, labels) batches starting at batch ``start_batch`` of the stream."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, start_batch)
    if isinstance(dataset, DigitsDataset):  # in memory: index directly, no worker processes
        for idx in sampler:
            idx = torch.tensor(idx)
            yield dataset.images[idx], dataset.labels[idx]
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                             persistent_workers=num_workers > 0)
        yield from loader
