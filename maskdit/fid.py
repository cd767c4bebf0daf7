"""Frechet Inception Distance: feature statistics, the Frechet distance, reference files, Inception features.

    mu, sigma = feature_statistics(features)                 # (N, D) -> (D,), (D, D), float64
    ref = load_reference_stats("VIRTUAL_imagenet256_labeled.npz")
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma)

The distance needs numpy and torch only (no scipy).  ``InceptionFeatures`` wraps torch-fidelity's Inception-v3 (the
TF-FID-compatible network behind ADM's reference statistics); torch-fidelity is an optional dependency,
``pip install -e .[fid]``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

from .files import atomic_write

INCEPTION_DIM = 2048
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file in the torch hub cache


class InceptionUnavailableError(RuntimeError):
    """torch-fidelity is not installed, or its Inception-v3 weights cannot be obtained."""


class ReferenceStats(NamedTuple):
    mu: np.ndarray
    sigma: np.ndarray


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix (rounding's negative eigenvalues clipped to 0)."""
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2): the sum of the square roots of the eigenvalues of sigma1 sigma2, taken from a
    symmetric PSD matrix with the same eigenvalues: L^T sigma2 L with sigma1 = L L^T (Cholesky), or
    sqrt(sigma1) sigma2 sqrt(sigma1) when sigma1 is singular.  float64 torch on the CPU."""
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)
    chol, info = torch.linalg.cholesky_ex(s1)
    if info.item() == 0:
        m = chol.T @ s2 @ chol
    else:
        root1 = _sqrt_psd(s1)
        m = root1 @ s2 @ root1
    w = torch.linalg.eigvalsh((m + m.T) / 2)
    return float(w.clamp(min=0).sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2).

    The trace of the matrix square root comes from the eigenvalues of a symmetric PSD matrix similar to
    sigma1 sigma2 (``_trace_sqrt_product``), so singular (rank-deficient) covariances need no special case and
    no complex arithmetic; if an eigen-decomposition fails to converge, ``eps`` is added to the diagonals (the
    usual fallback of the reference implementations).  Accepts numpy arrays or tensors.
    """
    mu1, mu2 = _as_float64(mu1).reshape(-1), _as_float64(mu2).reshape(-1)
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds non-finite values")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError):
        offset = eps * np.eye(d)
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return max(float(fid), 0.0)  # rounding can leave a tiny negative value for identical statistics


class StatsAccumulator:
    """Running mean and covariance of feature rows, in float64, without keeping the features.

    Holds the count, the sum and the sum of outer products of ``features - shift`` (a shift near the mean,
    e.g. the first row, keeps the final subtraction well conditioned).  ``tensors`` / ``load_tensors``
    expose the sums for a ``torch.distributed.all_reduce`` across processes (every process must use the
    same shift: the default, 0, is fine for Inception features, which are O(1)).
    """

    def __init__(self, dim: int, shift=None):
        self.dim = dim
        self.shift = np.zeros(dim) if shift is None else _as_float64(shift).reshape(dim)
        self.count = 0
        self.total = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def update(self, features, chunk_size: int = 4096) -> None:
        """Add rows (N, dim) (numpy or tensor), converted to float64 a chunk at a time."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got shape {features.shape}")
        for start in range(0, features.shape[0], chunk_size):
            x = features[start:start + chunk_size].astype(np.float64) - self.shift
            self.count += x.shape[0]
            self.total += x.sum(axis=0)
            self.outer += x.T @ x

    def tensors(self) -> torch.Tensor:
        """The sums as one float64 vector [count, total, outer] (for an all_reduce)."""
        return torch.from_numpy(np.concatenate([[float(self.count)], self.total, self.outer.reshape(-1)]))

    def load_tensors(self, flat: torch.Tensor) -> None:
        """Replace the sums by ``flat`` (the layout of ``tensors``), e.g. after an all_reduce."""
        flat = flat.detach().cpu().double().numpy()
        self.count = int(round(flat[0]))
        self.total = flat[1:1 + self.dim].copy()
        self.outer = flat[1 + self.dim:].reshape(self.dim, self.dim).copy()

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (dim,) and unbiased covariance (dim, dim), like ``np.mean`` and ``np.cov(rowvar=False)``."""
        if self.count < 2:
            raise ValueError(f"the covariance needs at least 2 feature rows, got {self.count}")
        mean = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean + self.shift, (sigma + sigma.T) / 2


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of ``features`` (N, D), in float64 (like ``np.cov``),
    accumulated a chunk at a time (N x D is never copied to float64 at once)."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    acc = StatsAccumulator(features.shape[1], shift=features[0])
    acc.update(features)
    return acc.statistics()


def load_reference_stats(path: str) -> ReferenceStats:
    """``mu`` and ``sigma`` from an npz file: ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``:
    ``mu``, ``sigma`` and the images ``arr_0``, which are not read) or a file written by ``save_stats``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics file {path!r} does not exist (an npz with 'mu' and 'sigma', "
                                "e.g. ADM's VIRTUAL_imagenet256_labeled.npz, or one written by --write-stats)")
    try:
        f = np.load(path)
    except (OSError, EOFError, ValueError) as e:  # not an npz (zip) file, a truncated one, a pickle
        raise ValueError(f"cannot read reference statistics file {path!r}: {e}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"reference statistics file {path!r} is a single array, not an npz with 'mu' and 'sigma'")
    with f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise ValueError(f"reference statistics file {path!r} lacks {missing}: it holds {sorted(f.files)}; "
                             "expected 'mu' and 'sigma' (compute them with --write-stats)")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics in {path!r} have shapes mu {mu.shape}, sigma {sigma.shape}; "
                         "expected (D,) and (D, D)")
    return ReferenceStats(mu, sigma)


def save_stats(path: str, mu, sigma) -> None:
    """Write ``mu`` and ``sigma`` (float64) to an npz file that ``load_reference_stats`` reads (``atomic_write``:
    a kill leaves no partial file; as ``np.savez``, ".npz" is added to a path without it)."""
    path = path if path.endswith(".npz") else path + ".npz"
    atomic_write(path, lambda f: np.savez(f, mu=_as_float64(mu), sigma=_as_float64(sigma)))


def inception_weights_cache() -> str:
    """Where torch-fidelity's downloader keeps the Inception weights (the torch hub cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS_FILE)


class InceptionFeatures:
    """2048-d pool3 features of uint8 images with torch-fidelity's ``FeatureExtractorInceptionV3``.

    Images (N, H, W, C) uint8, C = 3 (or 1: repeated to RGB), any size (resized to 299 inside the network,
    as TF-FID does).  ``weights_path`` is a local copy of the weights; by default torch-fidelity loads them
    from the torch hub cache or downloads them.  Raises ``InceptionUnavailableError`` when torch-fidelity is
    missing or the weights cannot be obtained.
    """

    dim = INCEPTION_DIM

    def __init__(self, device="cpu", weights_path: str | None = None):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as e:  # ImportError, or e.g. a torchvision build that does not match torch
            raise InceptionUnavailableError(
                f"FID needs the optional package torch-fidelity, which cannot be imported ({type(e).__name__}: {e}); "
                "install it with `pip install torch-fidelity` (or `pip install -e .[fid]`), with a torchvision "
                "build that matches torch") from None
        if weights_path is not None and not os.path.isfile(weights_path):
            raise InceptionUnavailableError(f"Inception weights file {weights_path!r} does not exist")
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=weights_path)
        except (OSError, RuntimeError) as e:  # URLError (offline), HTTP errors, a corrupt or mismatched file
            if weights_path is not None:
                raise InceptionUnavailableError(f"cannot load Inception weights from {weights_path!r}: {e}") from None
            from torch_fidelity import feature_extractor_inceptionv3 as fe

            url = getattr(fe, "URL_INCEPTION_V3", "torch-fidelity's release page")
            raise InceptionUnavailableError(
                f"cannot obtain torch-fidelity's Inception-v3 weights offline ({type(e).__name__}: {e}). "
                f"Download {url} on a machine with network access and put it at {inception_weights_cache()}, "
                "or pass its path with --inception-weights") from None
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        """(N, H, W, C) uint8 images (numpy or tensor) -> (N, 2048) float32 features."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"expected (N, H, W, 1|3) uint8 images, got {tuple(x.shape)} {x.dtype}")
        x = x.permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous().to(self.device)
        (features,) = self.net(x)
        return features.float().cpu().numpy()
