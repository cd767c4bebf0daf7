"""EDM (Karras et al. 2022) preconditioning, MaskDiT's training loss and the Heun sampler."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from . import ops
from .backends import get_ops
from .ddpm import DDPM_TRAIN_STEPS, DIT_GUIDED_CHANNELS, checked_null_label, ddpm_sample, linear_betas, uses_guidance
from .images import to_uint8
from .masking import mask_from_ids_keep, token_layout
from .training import COMPILE_MODES, compile_network


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
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
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


SAMPLING_PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def sampling_precision(name: str, device: torch.device):
    """Within the block the network runs in precision ``name``: "fp32" (full fp32 matrix products, as the official
    sampler), "tf32" (CUDA: fp32 with TF32 matrix products and convolutions, as DiT's sample.py allows) or "bf16"
    (``torch.autocast``: the network's matrix products in bfloat16).  ``EDMPrecond``'s preconditioning and
    ``edm_sample``'s Heun updates stay fp32/fp64 in all three.  ValueError as ``check_sampling_precision``."""
    check_sampling_precision(name, device)
    if name == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def check_sampling_precision(name: str, device: torch.device) -> None:
    """ValueError (naming ``--precision``) unless ``name`` is a precision ``sampling_precision`` can run on
    ``device``: tf32 needs CUDA."""
    if name not in SAMPLING_PRECISIONS:
        raise ValueError(f"--precision must be one of {SAMPLING_PRECISIONS}, got {name!r}")
    if name == "tf32" and device.type != "cuda":
        raise ValueError(f"--precision tf32 needs a CUDA device, got {device.type}")


SAMPLERS = ("edm", "ddpm")


def add_sampling_arguments(parser) -> None:
    """``--sampler``, ``--steps``, ``--cfg-channels`` (``resolve_sampling``), ``--precision``
    (``sampling_precision``), ``--compile`` (``maskdit.training.compile_network`` of the network) and the
    stochastic sampler's options for a command line."""
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="edm: EDM's Heun sampler (MaskDiT's); ddpm: facebookresearch/DiT's ancestral DDPM sampler "
                             "with its learned variance, for DDPM noise predictors (converted DiT weights). Default: "
                             "ddpm for a DDPM noise predictor (DiT's protocol, as its published FIDs), else edm")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: 40 with edm, 79 network evaluations; 250 with ddpm, of DiT's "
                             "1000 training steps)")
    parser.add_argument("--cfg-channels", type=int, default=None,
                        help="with --sampler ddpm: guide the noise of the first N channels only (default 3, as DiT's "
                             "sampler; the others take the conditional noise). EDM's sampler guides all channels")
    parser.add_argument("--precision", choices=SAMPLING_PRECISIONS, default="fp32",
                        help="the network's precision: fp32 (default, as the official sampler), tf32 (CUDA: TF32 "
                             "matrix products) or bf16 (autocast; several times faster on a GPU); the sampler's "
                             "updates stay fp64 in all")
    parser.add_argument("--compile", nargs="?", const="full", choices=COMPILE_MODES, default="none",
                        help="torch.compile the denoiser: 'full' (the whole network; the default when the flag has "
                             "no value) or 'regional' (each transformer block, the blocks of a stack sharing their "
                             "compiled graphs: much shorter compile time); the first batch compiles, and a last "
                             "batch shorter than --batch-size is filled up with extra draws that are dropped, so "
                             "nothing compiles again")
    add_stochastic_arguments(parser)


def resolve_sampling(args, ckpt: dict) -> None:
    """Fills in the defaults of a sampling command line (``add_sampling_arguments``) that depend on the checkpoint
    ``ckpt`` and checks them together: ``args.sampler`` (None: "ddpm" for a DDPM noise predictor, DiT's protocol;
    else "edm"), ``args.steps`` (None: 40 Heun steps, or 250 DDPM steps) and ``args.cfg_channels`` (None: DiT's 3
    with ddpm; all channels with edm).  ValueError naming the option for a combination that cannot run."""
    from .config import ModelConfig

    check_finite_options(args)
    parameterization = checkpoint_parameterization(ckpt)
    if args.sampler is None:
        args.sampler = "ddpm" if parameterization == "ddpm-eps" else "edm"
    if args.sampler == "edm":
        if args.cfg_channels is not None:
            raise ValueError("--cfg-channels applies to --sampler ddpm (DiT's guidance of some channels); EDM's "
                             "sampler guides all channels")
        args.steps = 40 if args.steps is None else args.steps
    else:
        if parameterization != "ddpm-eps":
            raise ValueError(f"--sampler ddpm samples a DDPM noise predictor (a checkpoint with parameterization "
                             f"'ddpm-eps', e.g. converted facebookresearch/DiT weights); this one is "
                             f"{parameterization!r}")
        if stochastic_options(args) != STOCHASTIC_DEFAULTS:
            raise ValueError("--s-churn, --s-min, --s-max and --s-noise are options of EDM's sampler; --sampler ddpm "
                             "draws its own noise at every step")
        args.steps = 250 if args.steps is None else args.steps
        if args.steps > DDPM_TRAIN_STEPS:
            raise ValueError(f"--steps with --sampler ddpm must be at most {DDPM_TRAIN_STEPS} (the network's training "
                             f"steps), got {args.steps}")
        channels = ModelConfig.from_dict(ckpt["config"]["model"]).in_channels
        args.cfg_channels = min(DIT_GUIDED_CHANNELS, channels) if args.cfg_channels is None else args.cfg_channels
        if not 1 <= args.cfg_channels <= channels:
            raise ValueError(f"--cfg-channels must be in [1, {channels}] (the model's channels), "
                             f"got {args.cfg_channels}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")


def draw_images(net: nn.Module, index: torch.Tensor, labels: torch.Tensor | None, args, device: torch.device,
                decode=None, fill_to: int = 0):
    """Images ``index`` of a sampling command line as (N, H, W, C) uint8: image i's noise from ``ImageNoise(args.seed,
    index)``, class ``labels`` (None: unconditional), ``edm_sample`` (or, ``args.sampler`` "ddpm", ``ddpm_sample``
    with ``args.cfg_channels``) with ``args.steps``, ``args.cfg_scale``, the stochastic options and
    ``sampling_precision(args.precision)``; the samples decoded by ``decode`` (latents to images) when given, and
    rounded to pixels as the sampler's protocol does (``to_uint8``: DiT's rounds, MaskDiT's truncates). Shared by
    sample.py and ``maskdit.evaluate``. Fewer images than ``fill_to`` are drawn as ``fill_to`` (the images after
    ``index[-1]`` too, then dropped; image i's draw does not depend on the others), so that a compiled ``net`` sees
    the same shapes in every batch (``sampling_fill``).  ValueError naming the images that came out
    non-finite."""
    model = net.model
    n = len(index)
    if n < fill_to:
        index = torch.cat([index, index[-1] + torch.arange(1, fill_to - n + 1)])
        labels = None if labels is None else torch.cat([labels, labels[-1:].expand(fill_to - n)])
    draws = ImageNoise(args.seed, index)
    noise = draws.randn((model.in_channels, model.input_size, model.input_size)).to(device)
    y = labels.to(device) if labels is not None else None
    with sampling_precision(args.precision, device):
        if args.sampler == "ddpm":
            out = ddpm_sample(net, noise, y, num_steps=args.steps, cfg_scale=args.cfg_scale,
                              guided_channels=args.cfg_channels, randn_like=draws.randn_like)[:n]
            rounding = "round"  # (as DiT's sample_ddp.py)
        else:
            out = edm_sample(net, noise, y, num_steps=args.steps, cfg_scale=args.cfg_scale,
                             **stochastic_options(args), randn_like=draws.randn_like)[:n]
            rounding = "truncate"  # (as MaskDiT's sampling script)
    bad = ~torch.isfinite(out.flatten(1)).all(1)
    if bad.any():  # (to_uint8 would turn them into black pixels, and an FID would count them)
        raise ValueError(f"the sampler gave non-finite values (NaN or inf) for images {index[:n][bad.cpu()].tolist()}"
                         ": the checkpoint's weights or the sampling settings are broken")
    return to_uint8(decode(out) if decode is not None else out, rounding)


def sampling_network(ckpt: dict, args, device: torch.device):
    """(denoiser, decode) of a checkpoint for a sampling command line (``resolve_sampling`` done), shared by sample.py
    and ``maskdit.evaluate``: its ``args.weights`` in the network on ``device`` (eval mode), wrapped as its
    parameterization says (``make_denoiser``) and compiled as ``args.compile`` says (the denoiser; with
    ``args.sampler`` "ddpm", which calls the network itself, the network inside it); ``decode`` maps latents to
    images with its VAE (``args.vae`` or the one it was trained with), None for an image model.  ValueError for
    missing weights, weights that do not fit the config, or latents that have no VAE to decode them."""
    from .config import ModelConfig
    from .latents import latent_decoder
    from .models import DiT

    if args.weights not in ckpt:
        raise ValueError(f"the checkpoint has no {args.weights!r} weights")
    model = DiT(ModelConfig.from_dict(ckpt["config"]["model"]))
    try:
        model.load_state_dict(ckpt[args.weights])
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's {args.weights!r} weights do not fit its model config "
                         f"({model.config.name}): {e}") from None
    model.to(device).eval()
    parameterization = checkpoint_parameterization(ckpt)
    if args.sampler == "ddpm":
        net = make_denoiser(compile_network(model, args.compile), parameterization)
    else:
        net = compile_network(make_denoiser(model, parameterization), args.compile)
    decode = latent_decoder(ckpt, args.vae, device)
    if decode is None and model.in_channels not in (1, 3):
        raise ValueError(f"the model makes {model.in_channels}-channel samples (VAE latents?), which need decoding "
                         "to images: pass --vae PATH_OR_HUB_NAME")
    return net, decode


def sampling_fill(args, num_images: int) -> int:
    """``draw_images``' ``fill_to`` for ``num_images`` images in batches of ``args.batch_size``: with ``args.compile``
    the batch size (at most ``num_images``), so that a short last batch does not compile the network again;
    eager, 0 (no filling)."""
    return min(args.batch_size, num_images) if args.compile != "none" else 0


STOCHASTIC_DEFAULTS = dict(s_churn=0.0, s_min=0.0, s_max=float("inf"), s_noise=1.0)


def add_stochastic_arguments(parser) -> None:
    """The stochastic sampler's options (``edm_sample``'s s_churn, s_min, s_max, s_noise) for a command line."""
    g = parser.add_argument_group("stochastic sampling (EDM's S_churn etc.; off by default, as for the paper's FIDs)")
    d = STOCHASTIC_DEFAULTS
    g.add_argument("--s-churn", type=float, default=d["s_churn"],
                   help="total noise added back over the steps (default 0)")
    g.add_argument("--s-min", type=float, default=d["s_min"], help="lowest sigma that gets noise added (default 0)")
    g.add_argument("--s-max", type=float, default=d["s_max"], help="highest such sigma (default inf)")
    g.add_argument("--s-noise", type=float, default=d["s_noise"], help="scale of the added noise (default 1)")


def check_finite_options(args) -> None:
    """ValueError naming the option unless ``--cfg-scale`` is finite and the stochastic options are in range
    (checked before anything is sampled or written: a run refused later would leave its settings behind)."""
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    for flag, value in (("--s-churn", args.s_churn), ("--s-noise", args.s_noise), ("--s-min", args.s_min)):
        if not 0 <= value < math.inf:
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
    if not args.s_min <= args.s_max:  # (--s-max may be inf: no upper bound)
        raise ValueError(f"--s-max must be >= --s-min, got --s-min {args.s_min} and --s-max {args.s_max}")


def stochastic_options(args) -> dict:
    """``edm_sample`` keywords from the options of ``add_stochastic_arguments``."""
    return dict(s_churn=args.s_churn, s_min=args.s_min, s_max=args.s_max, s_noise=args.s_noise)


class ImageNoise:
    """Unit Gaussian noise per image: image i draws from its own generator, seeded by (seed, i), so samples
    do not depend on the batch they are drawn in (EDM's StackedRandomGenerator).  ``randn(shape)`` gives
    each image's next draw, stacked; ``randn_like(x)`` the same shaped and placed like x (for ``edm_sample``'s
    stochastic steps)."""

    def __init__(self, seed: int, index: torch.Tensor):
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in index]

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"x holds {x.shape[0]} images, these generators {len(self.generators)}")
        return self.randn(tuple(x.shape[1:])).to(device=x.device, dtype=x.dtype)
