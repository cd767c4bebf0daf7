"""Stable Diffusion KL VAE latents: loading the VAE, encoding to moments, per-step resampling, decoding, and
the on-disk format written by ``maskdit.prepare_latents``.

A latent folder holds ``meta.json`` and, per shard k, ``shard-0000k.npy`` (n, 2C, h, w) with the VAE
moments (the posterior mean in the first C channels, its log-variance in the last C) and ``labels-0000k.npy``
(n,) int64.  Training draws a fresh latent from the moments every step (the official recipe):
``z = (mean + exp(logvar / 2) * eps) * scale``.

diffusers is an optional dependency (``pip install 'maskdit[latents]'``): only ``load_vae`` imports it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import torch

SD_SCALE = 0.18215  # the SD KL-f8 VAE's latent scale (its config's scaling_factor)
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of diffusers' DiagonalGaussianDistribution and the official code
META_NAME = "meta.json"
LATENT_PREFIX = "latents:"  # dataset spec prefix: "latents:DIR"
INSTALL_HINT = "pip install 'maskdit[latents]' (or: pip install diffusers)"


def sample_latents(moments: torch.Tensor, generator: torch.Generator | None = None,
                   scale: float = SD_SCALE, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Draw z = (mean + exp(logvar/2) * eps) * scale from moments (..., 2C, h, w); float32, moments' device.

    ``eps`` (..., C, h, w) may be given (e.g. drawn for a whole global batch); else drawn from ``generator``.
    """
    mean, logvar = moments.float().chunk(2, dim=-3)
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    if eps is None:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale


def is_local_path(name: str) -> bool:
    """Whether a --vae value names a local folder (it exists, or looks like a path) rather than a hub repo."""
    return os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~"))


def resolve_vae_name(name: str) -> str:
    """A local folder as an absolute path (so meta.json stays valid from another directory); hub names as is."""
    return os.path.abspath(os.path.expanduser(name)) if is_local_path(name) else name


def load_vae(name: str, device: str | torch.device = "cpu"):
    """A diffusers ``AutoencoderKL`` in eval mode from a local folder (``save_pretrained`` format) or a hub
    name.  ImportError with the install command when diffusers is missing; ValueError (one line) when the
    weights cannot be loaded, e.g. offline."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(f"the VAE needs the optional package diffusers ({e}): {INSTALL_HINT}") from None

    local = is_local_path(name)
    if local:
        name = resolve_vae_name(name)
        if not os.path.isdir(name):
            raise ValueError(f"VAE folder {name!r} does not exist or is not a folder "
                             "(expected a diffusers AutoencoderKL folder with config.json and weights)")
    kwargs = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    try:
        with warnings.catch_warnings():  # diffusers passes a deprecated argument to the hub client
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            vae = AutoencoderKL.from_pretrained(name, **kwargs)
    except Exception as e:  # hub, network and file errors: one clear line instead of a stack trace
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        if local:
            raise ValueError(f"could not load the VAE from folder {name!r}: {reason}") from None
        raise ValueError(f"could not load the VAE weights {name!r} from the Hugging Face hub (offline or "
                         f"unreachable?): {reason}. Pass a local folder with --vae PATH (made elsewhere with "
                         f"AutoencoderKL.from_pretrained({name!r}).save_pretrained(PATH))") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_scale(vae) -> float:
    """The latent scale from the VAE's config (0.18215 for SD's KL-f8 VAE)."""
    return float(getattr(vae.config, "scaling_factor", None) or SD_SCALE)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> moments (N, 2C, h, w): [posterior mean, posterior logvar]."""
    param = next(vae.parameters())
    dist = vae.encode(images.to(param.device, param.dtype)).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1).float()


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, scale: float = SD_SCALE) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1], float32 on z's device."""
    param = next(vae.parameters())
    images = vae.decode(z.to(param.device, param.dtype) / scale).sample
    return images.float().clamp(-1, 1).to(z.device)


def meta_path(root: str) -> str:
    return os.path.join(root, META_NAME)


def read_meta(root: str) -> dict:
    """The ``meta.json`` of a latent folder; ValueError naming the folder if it is missing or unreadable."""
    path = meta_path(root)
    if not os.path.isdir(root):
        raise ValueError(f"latent folder {root!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"latent folder {root!r} has no {META_NAME} (write it with python -m maskdit.prepare_latents)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path!r}: {e}") from None


def latent_decoder(ckpt: dict, vae: str | None, device: torch.device):
    """A function latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] when the checkpoint was trained on
    latents (dataset ``latents:DIR``) or ``vae`` is given; None for pixel models.  The VAE defaults to the one
    in DIR/meta.json (or, that folder gone, the one the checkpoint recorded), the scale to the one the latents were
    made with (else the VAE's own, 0.18215 for SD)."""
    train_cfg = ckpt["config"].get("train", {})
    spec = str(train_cfg.get("dataset") or "")
    meta = None
    if spec.startswith(LATENT_PREFIX):
        try:
            meta = read_meta(spec[len(LATENT_PREFIX):])
        except ValueError as e:
            meta = train_cfg.get("latents")  # the VAE and scale the run recorded (train.py since it records them)
            if meta is None and vae is None:
                raise ValueError(f"the checkpoint was trained on {spec!r}, whose meta.json names the VAE, but {e}: "
                                 "pass --vae PATH_OR_HUB_NAME (the VAE that encoded those latents)") from None
    elif vae is None:
        return None
    model = load_vae(vae or meta["vae"], device)
    channels = ckpt["config"]["model"]["in_channels"]
    if model.config.latent_channels != channels:
        raise ValueError(f"the VAE has {model.config.latent_channels} latent channels, the model {channels}: "
                         "--vae only decodes models trained on that VAE's latents")
    scale = (meta or {}).get("scale") or vae_scale(model)
    return lambda z: decode_latents(model, z, scale)
