"""facebookresearch/DiT's own sampler: ancestral DDPM steps on a respaced schedule, with the learned variance.

DiT-XL/2's published FIDs (2.27 with guidance 1.5) come from this protocol: 250 of the 1000 training steps,
x_{t-1} ~ N(mean(x_t, eps), var) with var interpolated by the network between the posterior variance and beta_t,
classifier-free guidance on the noise of the first 3 latent channels.  ``ddpm_sample`` runs it on a
``maskdit.edm.DDPMPrecond`` (a converted DiT checkpoint's denoiser); ``maskdit.edm.edm_sample`` runs EDM's Heun
sampler on the same network instead.  The schedule is computed in float64 and each coefficient rounded to float32,
the updates in float32, as DiT's ``gaussian_diffusion`` does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

DDPM_TRAIN_STEPS = 1000  # DiT's
DIT_GUIDED_CHANNELS = 3  # the noise channels DiT's sampler guides (its forward_with_cfg)


def linear_betas(num_steps: int = DDPM_TRAIN_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear betas (float64, as numpy's ``linspace``, which DiT's schedule uses)."""
    if num_steps < 1 or not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need num_steps >= 1 and 0 < beta_start <= beta_end < 1, got {num_steps}, "
                         f"{beta_start}, {beta_end}")
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def respaced_steps(num_train_steps: int, num_steps: int) -> list[int]:
    """The ``num_steps`` training steps that a respaced sampler visits, increasing: 0, then every
    (num_train_steps - 1) / (num_steps - 1) steps rounded, ending at num_train_steps - 1 (DiT's ``space_timesteps``
    with one section: ``create_diffusion(str(num_steps))``)."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}] (the training steps), got {num_steps}")
    stride = (num_train_steps - 1) / (num_steps - 1) if num_steps > 1 else 1
    steps, position = [], 0.0
    for _ in range(num_steps):  # (accumulated as DiT does, so rounding ties fall the same way)
        steps.append(round(position))
        position += stride
    return steps


class RespacedSchedule:
    """The DDPM process on ``steps`` of a process with ``betas``: step k goes from training step steps[k-1] to
    steps[k] (beta_k = 1 - abar[steps[k]] / abar[steps[k-1]]), and its posterior q(x_{k-1} | x_k, x_0) (float64)."""

    def __init__(self, betas: np.ndarray, steps: list[int]):
        abar_train = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
        self.steps = list(steps)
        kept = abar_train[self.steps]
        self.betas = 1.0 - kept / np.append(1.0, kept[:-1])
        # (the products again from these betas, as DiT's respaced process computes them: equal to ``kept`` but for
        # the last bits)
        self.abar = abar = np.cumprod(1.0 - self.betas)
        abar_prev = np.append(1.0, abar[:-1])
        self.sqrt_recip_abar = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_abar = np.sqrt(1.0 / abar - 1)
        self.posterior_variance = self.betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_mean_coef1 = self.betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - self.betas) / (1.0 - abar)
        # the log variances of the steps that add noise (k >= 1; none with one step).  At step 0 the posterior
        # variance is 0: as DiT's, its log there is clipped to step 1's, and the fixed variance is step 1's posterior
        # variance instead of beta_0
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.array([])
        self.log_betas = np.log(self.betas)
        self.fixed_log_variance = np.log(np.append(pv[1], self.betas[1:])) if len(pv) > 1 else np.array([])

    COEFFICIENTS = ("sqrt_recip_abar", "sqrt_recipm1_abar", "posterior_mean_coef1", "posterior_mean_coef2",
                    "posterior_log_variance_clipped", "log_betas", "fixed_log_variance")

    def tables(self, device) -> dict[str, torch.Tensor]:
        """Each coefficient of ``COEFFICIENTS``, one value a step, rounded to float32 on ``device`` (copied once)."""
        return {name: torch.tensor(getattr(self, name), dtype=torch.float32, device=device)
                for name in self.COEFFICIENTS}


def uses_guidance(class_labels: torch.Tensor | None, cfg_scale: float | None) -> bool:
    """Whether a sampler guides: labels given and a scale other than None or 1 (else the conditional network alone);
    ValueError for a scale that is not finite."""
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number or None, got {cfg_scale}")
    return class_labels is not None and cfg_scale is not None and cfg_scale != 1


def checked_null_label(model: nn.Module, class_labels: torch.Tensor | None, null_label: int | None) -> int | None:
    """A sampler's null class: ``null_label``, by default ``model.num_classes``; ValueError unless ``class_labels``
    lie in [0, null class] (one read of the labels a sampling call).  Shared by both samplers."""
    if null_label is None and class_labels is not None:
        null_label = model.num_classes
    if class_labels is not None and class_labels.numel():
        lo, hi = int(class_labels.min()), int(class_labels.max())
        if lo < 0 or hi > null_label:
            raise ValueError(f"class_labels must be in [0, {null_label}] ({null_label}: the null class), got values "
                             f"in [{lo}, {hi}]")
    return null_label


def guided_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None,
                 cfg_scale: float | None, guided_channels: int, null_label: int) -> torch.Tensor:
    """The network's output (N, C or 2C, H, W) in float32 at ``x``, step ``t`` (N,), with classifier-free guidance
    as DiT's ``forward_with_cfg``: the first ``guided_channels`` noise channels are eps_u + s (eps_c - eps_u), the
    other channels (the rest of the noise, the variance) the conditional output's.  The conditional and
    unconditional evaluations run as one batch.  Scale None (or 1, or no labels): the conditional output alone."""
    if not uses_guidance(class_labels, cfg_scale):
        return model(x, t, class_labels).float()
    null = torch.full_like(class_labels, null_label)
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null])).float()
    cond, uncond = both.chunk(2)
    k = guided_channels
    return torch.cat([uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)


@torch.no_grad()
def ddpm_sample(net: nn.Module, noise: torch.Tensor, class_labels: torch.Tensor | None = None, num_steps: int = 250,
                cfg_scale: float | None = 1.5, guided_channels: int | None = DIT_GUIDED_CHANNELS,
                null_label: int | None = None,
                randn_like=torch.randn_like) -> torch.Tensor:
    """DiT's sampler: ancestral DDPM sampling from unit-variance ``noise`` (x_T) over ``num_steps`` respaced steps of
    the denoiser ``net``'s process (``net``: a ``maskdit.edm.DDPMPrecond``, whose ``model`` predicts the noise, one
    evaluation a step).

    Each step predicts x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (unclipped, as DiT samples), takes the
    posterior mean of x_{t-1} and adds ``randn_like`` noise (e.g. ``ImageNoise.randn_like``; none at the last step)
    with the network's variance: exp(f log beta_t + (1 - f) log posterior variance), f = (v + 1) / 2 from the
    network's second C output channels (learn_sigma); a network with C outputs takes DiT's fixed variance beta_t.
    ``class_labels`` (N,) int64; ``null_label`` defaults to ``net.model.num_classes``; guidance ``cfg_scale`` on the
    first ``guided_channels`` channels of the noise (DiT's 3; None: all C).  Returns x_0 (float32).
    """
    betas = getattr(net, "betas", None)
    if betas is None or not hasattr(net, "model"):
        raise ValueError(f"ddpm_sample needs a DDPM denoiser (maskdit.edm.DDPMPrecond around a noise predictor), "
                         f"got {type(net).__name__}")
    model = net.model
    channels = noise.shape[1]
    guided_channels = channels if guided_channels is None else guided_channels
    if uses_guidance(class_labels, cfg_scale) and not 1 <= guided_channels <= channels:
        raise ValueError(f"guided_channels must be in [1, {channels}] (the noise's channels) or None, "
                         f"got {guided_channels}")
    null_label = checked_null_label(model, class_labels, null_label)
    schedule = RespacedSchedule(betas, respaced_steps(len(betas), num_steps))
    x = noise.float()
    n = x.shape[0]
    tables = schedule.tables(x.device)
    for k in reversed(range(num_steps)):
        c = {name: table[k] for name, table in tables.items() if len(table)}
        t = torch.full((n,), float(schedule.steps[k]), device=x.device)  # the training step: the network's label
        out = guided_noise(model, x, t, class_labels, cfg_scale, guided_channels, null_label)
        if out.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"the network gives {out.shape[1]} channels for {channels}-channel inputs: expected "
                             f"{channels} (noise) or {2 * channels} (noise and variance, learn_sigma)")
        eps = out[:, :channels]
        x0 = c["sqrt_recip_abar"] * x - c["sqrt_recipm1_abar"] * eps
        mean = c["posterior_mean_coef1"] * x0 + c["posterior_mean_coef2"] * x
        if k == 0:
            x = mean  # (no noise at the last step)
            break
        if out.shape[1] == 2 * channels:
            frac = (out[:, channels:] + 1) / 2
            log_variance = frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance_clipped"]
        else:
            log_variance = c["fixed_log_variance"]
        x = mean + torch.exp(0.5 * log_variance) * randn_like(x)
    return x
