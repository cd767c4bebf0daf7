"""The sampling command lines' shared parts (sample.py and ``maskdit.evaluate``): their options and checks, the
network (and VAE) of a checkpoint, the precision, per-image noise and drawing images with EDM's or DDPM's sampler."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from .ddpm import DDPM_TRAIN_STEPS, DIT_GUIDED_CHANNELS, ddpm_sample
from .edm import checkpoint_parameterization, edm_sample, make_denoiser
from .images import to_uint8
from .training import COMPILE_MODES, compile_network

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
