"""EDM (Karras et al. 2022) preconditioning, MaskDiT's training loss and the Heun sampler."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import ops
from .backends import get_ops
from .ddpm import DDPM_TRAIN_STEPS, checked_null_label, linear_betas, uses_guidance
from .masking import mask_from_ids_keep, token_layout

MAE_EPS = 1e-6  # the MAE target's variance epsilon (the official code's; kernels.edm_loss.MAE_EPS)


def per_sample_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a scalar or one per sample) as one fp32 value per sample of ``x``, on its device: (N,)."""
    return torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])


class EDMPrecond(nn.Module):
    """Denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, class) around a raw network ``model``.

    c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.
    With ``learn_sigma`` networks only the first C output channels are used.  Computed in fp32.
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.model = model
        self.sigma_data = sigma_data

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for sigma of any shape."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        sigma = per_sample_sigma(sigma, x).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f = self.model(c_in * x, c_noise.flatten(), class_labels, ids_keep)
        return c_skip * x + c_out * f[:, :x.shape[1]].float()

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The noise levels the denoiser takes: any (continuous time)."""
        return sigma


class DDPMPrecond(nn.Module):
    """A discrete-time DDPM network that predicts the noise (facebookresearch/DiT's: ``num_steps`` 1000, betas
    linear from ``beta_start`` 1e-4 to ``beta_end`` 0.02, timestep t as its noise label) as an EDM denoiser.

    Step t has sigma_t = sqrt((1 - abar_t) / abar_t) and takes x_t = x / sqrt(1 + sigma_t^2) for x = y + sigma_t n
    (EDM's variance-exploding x): D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)), t(sigma) the step
    whose sigma_t is nearest (EDM's iDDPMPrecond, on DiT's schedule).  ``round_sigma`` gives those sigma_t, which
    ``edm_sample`` steps through; ``sigma_min``/``sigma_max`` bound them.  With ``learn_sigma`` networks the first
    C output channels are the noise.  Computed in fp32 (the schedule in fp64, as DiT's).  ``maskdit.ddpm.ddpm_sample``
    samples it with DiT's own DDPM sampler instead.
    """

    def __init__(self, model: nn.Module, num_steps: int = DDPM_TRAIN_STEPS, beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        super().__init__()
        self.model = model
        self.betas = linear_betas(num_steps, beta_start, beta_end)  # (float64, for ddpm_sample too)
        abar = torch.cumprod(1 - torch.from_numpy(self.betas), 0)
        sigmas = ((1 - abar) / abar).sqrt().float()  # increasing in t
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        weight = next(model.parameters(), None)  # (the levels live where the network does: no copies per call)
        self.register_buffer("sigmas", sigmas.to(weight.device if weight is not None else "cpu"), persistent=False)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The step t (int64, shaped like ``sigma``) whose sigma_t is nearest to ``sigma``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.sigmas.device)
        return (sigma.reshape(-1, 1) - self.sigmas).abs().argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The sigma_t nearest to ``sigma`` (its dtype and device)."""
        sigma = torch.as_tensor(sigma)
        return self.sigmas[self.timestep(sigma)].to(device=sigma.device, dtype=sigma.dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        sigma = per_sample_sigma(sigma, x).reshape(-1, 1, 1, 1)
        t = self.timestep(sigma.flatten()).to(x.device).float()
        eps = self.model(x / (1 + sigma ** 2).sqrt(), t, class_labels, ids_keep)
        return x - sigma * eps[:, :x.shape[1]].float()


PARAMETERIZATIONS = {"edm": EDMPrecond, "ddpm-eps": DDPMPrecond}


def checkpoint_parameterization(ckpt: dict) -> str:
    """What a checkpoint's network predicts: its ``parameterization``, else (files ``maskdit.convert`` wrote before
    it recorded one) "ddpm-eps" for converted facebookresearch/DiT weights, else "edm"."""
    if "parameterization" in ckpt:
        return ckpt["parameterization"]
    source = ckpt.get("source")
    return "ddpm-eps" if isinstance(source, dict) and source.get("format") == "dit" else "edm"


def make_denoiser(model: nn.Module, parameterization: str = "edm") -> nn.Module:
    """The denoiser D(x; sigma) of a network trained as ``parameterization``: "edm" (``EDMPrecond``: this project's
    and MaskDiT's training) or "ddpm-eps" (``DDPMPrecond``: facebookresearch/DiT's weights, as ``maskdit.convert``
    marks them in the checkpoint's ``parameterization``)."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {sorted(PARAMETERIZATIONS)}, got {parameterization!r}")
    return PARAMETERIZATIONS[parameterization](model)


class EDMLoss:
    """MaskDiT's EDM loss: lambda-weighted DSM on visible tokens + ``mae_coef`` x MAE on masked tokens.

    sigma = exp(N(P_mean, P_std^2)); x = y + n, n = sigma eps; D = net(x, sigma).
    DSM: lambda (D - y)^2 averaged over each token's p*p*C values, then over the sample's visible
    tokens, lambda = (s^2 + sd^2)/(s sd)^2.  MAE: the noisy input y + n, patchified and normalised per
    patch ((t - mean)/sqrt(var + 1e-6), unbiased var), against D patchified; per-token MSE averaged over
    the masked tokens, no lambda.  Each sample averages over its own visible and masked counts (with
    per-sample ratios they differ; a sample that keeps every token has only the DSM term).  Without
    ``ids_keep`` only DSM over all tokens.  Returns (N,).

    When the network runs the triton backend the loss is the fused kernel ``kernels.edm_loss`` on the
    network's token-layout output (no unpatchify/patchify round trip); otherwise ``from_denoised``.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, mae_coef: float = 0.1):
        if not (P_std > 0 and sigma_data > 0 and mae_coef >= 0):
            raise ValueError(f"need P_std > 0, sigma_data > 0 and mae_coef >= 0, got {P_std}, {sigma_data}, {mae_coef}")
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.mae_coef = mae_coef

    def sample_sigma(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        rnd = torch.randn(n, device=device, generator=generator)
        return (rnd * self.P_std + self.P_mean).exp()

    def __call__(self, net: EDMPrecond, images: torch.Tensor, labels: torch.Tensor | None,
                 ids_keep: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        y = images.float().contiguous()  # the fused loss reads (N, C, H, W) rows; channels_last or slices too
        n_batch = y.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(n_batch, y.device, generator)
        if noise is None:
            noise = torch.randn(y.shape, device=y.device, generator=generator)
        sigma = sigma.float().reshape(n_batch, 1, 1, 1)
        noisy = (y + noise.float() * sigma).contiguous()
        model = net.model
        if ids_keep is not None and hasattr(model, "num_tokens"):  # pack once for the network and the loss
            ids_keep = token_layout(ids_keep, n_batch, model.num_tokens, y.device)
        if get_ops(getattr(model, "backend", "torch"), y.device).name == "triton":  # other networks: reference
            from kernels.edm_loss import edm_loss

            _, _, c_in, c_noise = net.coefficients(sigma)
            f_tok = model.forward_tokens(c_in * noisy, c_noise.flatten(), labels, ids_keep)
            if ids_keep is None:
                masked = torch.zeros(n_batch, model.num_tokens, dtype=torch.bool, device=y.device)
            else:
                masked = ids_keep.masked()
            return edm_loss(f_tok, y, noisy, sigma.flatten(), masked, model.patch_size, self.sigma_data, self.mae_coef)
        denoised = net(noisy, sigma.flatten(), labels, ids_keep)
        return self.from_denoised(denoised, y, noisy, sigma.flatten(), ids_keep, model.patch_size)

    def from_denoised(self, denoised: torch.Tensor, y: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
                      ids_keep: torch.Tensor | None, patch_size: int) -> torch.Tensor:
        """The per-sample loss (N,) from the denoiser output D, the clean y and the noisy input y + n."""
        sd = self.sigma_data
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        d_tok = ops.patchify(denoised, patch_size)
        dsm = weight[:, None] * (d_tok - ops.patchify(y, patch_size)).square().mean(dim=-1)  # (N, L)
        if ids_keep is None:
            return dsm.mean(dim=1)
        masked = mask_from_ids_keep(ids_keep, dsm.shape[1]).to(dsm.dtype)
        visible = 1 - masked
        loss = (dsm * visible).sum(dim=1) / visible.sum(dim=1)
        if self.mae_coef > 0:
            target = ops.patchify(noisy, patch_size)
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + MAE_EPS).sqrt()
            mae = (d_tok - target).square().mean(dim=-1)
            loss = loss + self.mae_coef * (mae * masked).sum(dim=1) / masked.sum(dim=1).clamp(min=1)
        return loss


def edm_sigma_steps(num_steps: int = 40, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    device=None) -> torch.Tensor:
    """The EDM discretisation sigma_0 > ... > sigma_{num_steps-1}, followed by 0 (float64); ValueError unless
    0 < sigma_min <= sigma_max < inf and rho > 0."""
    if not (0 < sigma_min <= sigma_max < math.inf and 0 < rho < math.inf):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf and 0 < rho < inf (the denoiser's own sigma range "
                         f"applied), got sigma_min={sigma_min}, sigma_max={sigma_max}, rho={rho}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    steps = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([steps, torch.zeros_like(steps[:1])])


def guided_denoise(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None,
                   cfg_scale: float | None, null_label: int) -> torch.Tensor:
    """D(x; sigma, class) with classifier-free guidance on all channels: D_u + s (D_c - D_u).

    ``sigma``: a scalar or one per sample.  The conditional and unconditional evaluations run as one batch.
    Scale None (or 1, or no labels): the conditional denoiser alone.
    """
    if not uses_guidance(class_labels, cfg_scale):
        return net(x, sigma, class_labels)
    null = torch.full_like(class_labels, null_label)
    sigma = per_sample_sigma(sigma, x).repeat(2)  # for both halves
    both = net(torch.cat([x, x]), sigma, torch.cat([class_labels, null]))
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def edm_sample(net: nn.Module, noise: torch.Tensor, class_labels: torch.Tensor | None = None,
               num_steps: int = 40, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               cfg_scale: float | None = 1.5, null_label: int | None = None, s_churn: float = 0.0,
               s_min: float = 0.0, s_max: float = float("inf"), s_noise: float = 1.0,
               randn_like=torch.randn_like) -> torch.Tensor:
    """EDM Heun sampler (2nd order, 2*num_steps-1 evaluations) from unit-variance ``noise``.

    ``net`` is a denoiser (``EDMPrecond``, ``DDPMPrecond``: its ``round_sigma``, if any, gives the noise levels
    stepped through, within its ``sigma_min``/``sigma_max`` when it has them); ``class_labels`` (N,) int64;
    ``null_label`` defaults to ``net.model.num_classes``. Deterministic by default (``s_churn`` 0, as for the
    paper's FIDs): the same noise gives the same samples, so draw it with a seeded generator. ``s_churn`` > 0 is
    EDM's stochastic sampler (its Algorithm 2, the official ``edm_sampler``'s S_churn, S_min, S_max, S_noise): at
    each step with s_min <= sigma <= s_max the noise level first rises by gamma = min(s_churn / num_steps, sqrt(2)
    - 1) of itself, with fresh noise from ``randn_like`` (e.g. ``ImageNoise.randn_like``) times ``s_noise``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not s_churn >= 0 or not s_noise >= 0 or not s_min <= s_max:
        raise ValueError(f"need s_churn >= 0, s_noise >= 0 and s_min <= s_max, got s_churn={s_churn}, "
                         f"s_noise={s_noise}, s_min={s_min}, s_max={s_max}")
    null_label = checked_null_label(net.model, class_labels, null_label)
    # the noise levels the denoiser takes (a discrete-time one: its own, EDM's iDDPM sampling)
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", float("inf")))
    round_sigma = getattr(net, "round_sigma", lambda sigma: sigma)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, noise.device)
    t_steps = torch.cat([round_sigma(t_steps[:-1]), t_steps[-1:]])
    gamma_max = min(s_churn / num_steps, 2 ** 0.5 - 1)

    def denoise(x, t):
        return guided_denoise(net, x.float(), t.float(), class_labels, cfg_scale, null_label).double()

    x_next = noise.double() * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if gamma_max > 0:  # raise the noise level to t_hat, adding fresh noise (drawn at every step, as the
            # official sampler does, also where gamma is 0 outside [s_min, s_max])
            gamma = gamma_max if s_min <= t_cur <= s_max else 0.0
            t_hat = round_sigma(t_cur + gamma * t_cur)  # (as the official sampler computes it, to the last bit)
            x_cur = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * s_noise * randn_like(x_cur)
            t_cur = t_hat
        d_cur = (x_cur - denoise(x_cur, t_cur)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()
