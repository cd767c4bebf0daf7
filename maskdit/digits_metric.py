"""A small-scale quality metric that runs anywhere: a tiny CNN trained once on the bundled 8x8 digits.

Its penultimate features give a "digits Frechet distance" (FID with this network in place of Inception)
and its predictions give the class accuracy of class-conditional samples.  The classifier trains in a
few seconds on a CPU (fixed seed, 80% split, small random shifts) and is cached with the feature
statistics of all real digits in ``<cache dir>/digits_classifier-<VERSION>.pt``; the cache directory is
the ``cache_dir`` argument, else ``$MASKDIT_CACHE``, else ``~/.cache/maskdit``.  Images are (N, 1, H, W)
in [-1, 1], the ``DigitsDataset`` format; other sizes are bilinearly resized to 16x16.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import atomic_save
from .fid import feature_statistics, frechet_distance

VERSION = "v1"  # bump when the architecture, the training recipe or the preprocessing changes
IMAGE_SIZE = 16
FEATURE_DIM = 64
SEED = 0
EPOCHS = 20
BATCH_SIZE = 64
LR = 2e-3
MAX_SHIFT = 2  # pixels (of 16) of random translation during training
HELDOUT_FRACTION = 0.2
RANGE_TOLERANCE = 1.5  # images beyond [-1.5, 1.5] are taken for another scale and refused


class DigitsClassifier(nn.Module):
    """Conv(16)-pool-Conv(32)-pool, a 64-d hidden layer (the features), a linear head to 10 classes."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        )
        self.hidden = nn.Linear(32 * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.heldout_accuracy = float("nan")
        self.register_buffer("ref_mu", torch.zeros(feature_dim, dtype=torch.float64))
        self.register_buffer("ref_sigma", torch.zeros(feature_dim, feature_dim, dtype=torch.float64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 16, 16) -> (N, feature_dim) penultimate activations (after ReLU)."""
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------------------
# data and training

def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from .data import DigitsDataset

    ds = DigitsDataset(IMAGE_SIZE)
    return ds.images, ds.labels


def split_indices(n: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (train, held-out) split of ``n`` items: a seeded permutation, the last 20% held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_heldout = round(n * HELDOUT_FRACTION)
    return perm[:n - n_heldout], perm[n - n_heldout:]


def heldout_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out real digits (images, labels), never seen in training (359 of the 1,797)."""
    images, labels = _digits()
    _, held = split_indices(len(labels))
    return images[held], labels[held]


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y, filling with the background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=g))
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


def train_classifier(epochs: int = EPOCHS, seed: int = SEED, verbose: bool = False) -> DigitsClassifier:
    """Train a fresh classifier on the fixed 80% split (CPU, one thread: deterministic for a given seed).

    Sets ``heldout_accuracy`` (on the other 20%) and the reference statistics of all 1,797 digits.  One
    thread is also the fastest for these small convolutions (and far faster on a busy machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed, verbose)
    finally:
        torch.set_num_threads(threads)


def _train(epochs: int, seed: int, verbose: bool) -> DigitsClassifier:
    images, labels = _digits()
    train_idx, held_idx = split_indices(len(labels), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * -(-len(train_idx) // BATCH_SIZE))
    x_train, y_train = images[train_idx], labels[train_idx]
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(train_idx), generator=g)
        for i in range(0, len(perm), BATCH_SIZE):
            idx = perm[i:i + BATCH_SIZE]
            x = _random_shift(x_train[idx], MAX_SHIFT, g)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            model.eval()
            acc = _accuracy(model, images[held_idx], labels[held_idx])
            print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    model.eval()
    model.heldout_accuracy = _accuracy(model, images[held_idx], labels[held_idx])
    mu, sigma = feature_statistics(_features(model, images))
    model.ref_mu.copy_(torch.from_numpy(mu))
    model.ref_sigma.copy_(torch.from_numpy(sigma))
    return model


# ----------------------------------------------------------------------------------------------------------
# cache

_LOADED: dict[str, DigitsClassifier] = {}


def cache_path(cache_dir: str | None = None) -> str:
    """``<cache_dir or $MASKDIT_CACHE or ~/.cache/maskdit>/digits_classifier-<VERSION>.pt``."""
    cache_dir = cache_dir or os.environ.get("MASKDIT_CACHE") or os.path.join("~", ".cache", "maskdit")
    return os.path.join(os.path.expanduser(cache_dir), f"digits_classifier-{VERSION}.pt")


def _load_cached(path: str) -> DigitsClassifier | None:
    """The cached classifier, or None when the file is missing, unreadable or of another version."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("version") != VERSION:
            return None
        model = DigitsClassifier()
        model.load_state_dict(ckpt["state_dict"])
        model.heldout_accuracy = float(ckpt["heldout_accuracy"])
    except Exception:
        return None
    return model.eval()


def load_classifier(cache_dir: str | None = None) -> DigitsClassifier:
    """The cached classifier (eval mode, CPU); trains and caches it on first use (a few seconds)."""
    path = cache_path(cache_dir)
    model = _LOADED.get(path)
    if model is None:
        model = _load_cached(path)
        if model is None:
            model = train_classifier()
            atomic_save({"version": VERSION, "state_dict": model.state_dict(),
                          "heldout_accuracy": model.heldout_accuracy}, path)
        model.requires_grad_(False)
        _LOADED[path] = model
    return model


# ----------------------------------------------------------------------------------------------------------
# features, predictions, statistics

def _prepare(images) -> torch.Tensor:
    """(N, 1, H, W) float tensor or array in [-1, 1] -> float32 CPU (N, 1, 16, 16), clamped to [-1, 1].

    Refused: integer images (0..255 pixels score as garbage, not as digits), values outside [-1.5, 1.5] (another
    scale) and non-finite values (``argmax`` would read NaN images as class 0)."""
    x = torch.as_tensor(images).detach()
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected single-channel images of shape (N, 1, H, W) in [-1, 1], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [-1, 1], got {x.dtype} (for 0..255 pixels: x / 127.5 - 1)")
    x = x.to("cpu", torch.float32)
    if x.numel():
        bad = (~x.isfinite()).sum().item()
        if bad:
            raise ValueError(f"the images hold {bad} non-finite values")
        lo, hi = x.min().item(), x.max().item()
        if lo < -RANGE_TOLERANCE or hi > RANGE_TOLERANCE:
            raise ValueError(f"expected images in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1)


@torch.no_grad()
def _features(model: DigitsClassifier, images, batch_size: int = 1000) -> torch.Tensor:
    x = _prepare(images)
    return torch.cat([model.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
                     or [torch.zeros(0, model.hidden.out_features)])


def features(images, cache_dir: str | None = None) -> torch.Tensor:
    """(N, 64) penultimate-layer features of (N, 1, H, W) images in [-1, 1]."""
    return _features(load_classifier(cache_dir), images)


@torch.no_grad()
def predict(images, cache_dir: str | None = None) -> torch.Tensor:
    """(N,) int64 predicted digit classes of (N, 1, H, W) images in [-1, 1]."""
    return load_classifier(cache_dir).head(features(images, cache_dir)).argmax(1)


def reference_statistics(cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of all 1,797 real digits (cached with the classifier)."""
    model = load_classifier(cache_dir)
    return model.ref_mu.numpy().copy(), model.ref_sigma.numpy().copy()


def digits_fd(images, cache_dir: str | None = None) -> float:
    """Frechet distance between the features of ``images`` and those of all real digits."""
    mu, sigma = feature_statistics(features(images, cache_dir))
    return frechet_distance(mu, sigma, *reference_statistics(cache_dir))


def class_accuracy(images, labels, cache_dir: str | None = None) -> float:
    """Fraction of ``images`` that the classifier assigns to ``labels`` (N,)."""
    labels = torch.as_tensor(labels).cpu().long()
    n = len(images)
    if n == 0 or labels.shape != (n,):
        raise ValueError(f"class_accuracy needs at least one image and labels of shape ({n},), "
                         f"got {tuple(labels.shape)}")
    return (predict(images, cache_dir) == labels).float().mean().item()


# ----------------------------------------------------------------------------------------------------------
# the metric of a class-conditional diffusion network

def digits_quality(model: nn.Module, device="cpu", num_per_class: int = 50, cfg_scale: float | None = 1.5,
                   steps: int = 20, seed: int = 0, batch_size: int = 250, cache_dir: str | None = None) -> dict:
    """Sample ``num_per_class`` digits per class from a class-conditional ``DiT`` (1 channel, 10 classes, on
    ``device``) with the EDM Heun sampler and score them.

    Returns ``{"digits_fd", "class_accuracy", "num_samples"}``.  The noise comes from one generator seeded
    with ``seed`` and does not depend on ``batch_size``.  The model runs in eval mode without gradients;
    its training flag is restored afterwards.
    """
    from .edm import EDMPrecond, edm_sample

    if getattr(model, "in_channels", None) != 1 or getattr(model, "num_classes", None) != 10:
        raise ValueError("digits_quality needs a class-conditional DiT with in_channels=1 and num_classes=10, got "
                         f"in_channels={getattr(model, 'in_channels', None)}, "
                         f"num_classes={getattr(model, 'num_classes', None)}")
    if num_per_class < 1 or batch_size < 1:
        raise ValueError(f"num_per_class and batch_size must be positive, got {num_per_class}, {batch_size}")
    device = torch.device(device)
    load_classifier(cache_dir)  # train/load first, outside the sampling
    labels = torch.arange(10, device=device).repeat_interleave(num_per_class)
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn((len(labels), 1, model.input_size, model.input_size), generator=g, device=device)
    net = EDMPrecond(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            samples = torch.cat([
                edm_sample(net, noise[i:i + batch_size], labels[i:i + batch_size], num_steps=steps,
                           cfg_scale=cfg_scale).cpu()
                for i in range(0, len(labels), batch_size)])
    finally:
        model.train(was_training)
    bad = (~samples.isfinite()).flatten(1).any(1).sum().item()
    if bad:
        raise ValueError(f"digits_quality: {bad} of {len(samples)} samples hold non-finite values "
                         "(the model's weights diverged?)")
    samples = samples.clamp(-1, 1)  # as when written as images
    feats = features(samples, cache_dir)
    mu, sigma = feature_statistics(feats)
    clf = load_classifier(cache_dir)
    with torch.no_grad():
        acc = (clf.head(feats).argmax(1) == labels.cpu()).float().mean().item()
    return {"digits_fd": frechet_distance(mu, sigma, *reference_statistics(cache_dir)),
            "class_accuracy": acc, "num_samples": len(labels)}
