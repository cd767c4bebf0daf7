"""This project against the official code, on the same weights, inputs and random draws.

    python tools/compare_official.py --maskdit PATH/TO/Anima-Lab/MaskDiT --dit PATH/TO/facebookresearch/DiT
    TRITON_INTERPRET=1 python tools/compare_official.py --maskdit ... --backend triton   # the fused kernels (slow)

Needs checkouts of the official repositories (either or both) and ``timm``, which their networks import; nothing of
theirs is copied into this project: their modules are imported from the checkouts, and MaskDiT's ``edm_sampler`` is
compiled from its ``sample.py`` alone (that script's other imports, lmdb and the VAE, are not needed).

MaskDiT (Anima-Lab/MaskDiT): its ``EDMPrecond`` network (DiT-S/2 with its decoder and mask token, 8x8x4 inputs, 10
classes, every weight random) is converted with ``maskdit.convert``; its ``EDMLoss`` at mask ratios 0.5, 0.25 and 0
is compared with ``maskdit.EDMLoss`` given the same noise levels, noise and masks (drawn in the official order):
per-sample losses, and every parameter's gradient (the official gradients converted as the weights are); then its
``edm_sampler`` with ``maskdit.edm_sample`` on this project's network, deterministic, stochastic and guided.

DiT (facebookresearch/DiT): its DiT-S/2 (learn_sigma, every weight random) converted, the outputs compared; its
``diffusion`` package's ``p_sample_loop`` with ``maskdit.ddpm_sample`` on the same network and noise (guided as its
``forward_with_cfg``; learned variance, and a fixed-variance network), then end to end (its network and sampler
against this project's).

Prints a line a check with its largest difference and tolerance (fp32 throughout); exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import maskdit  # noqa: E402
from maskdit.convert import convert_official_state_dict, infer_config  # noqa: E402
from maskdit.ddpm import ddpm_sample  # noqa: E402
from maskdit.edm import DDPMPrecond, EDMPrecond, edm_sample  # noqa: E402
from maskdit.models import DiT  # noqa: E402
from maskdit.sampling import ImageNoise  # noqa: E402

FAILED: list[str] = []


def report(name: str, diff: float, tol: float) -> None:
    ok = diff <= tol
    if not ok:
        FAILED.append(name)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {diff:.3g} (tolerance {tol:g})", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to the largest |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def allow_timm_without_torchvision() -> None:
    """timm imports torchvision at import time; the official networks use only timm's PatchEmbed, Attention and Mlp,
    which do not need it.  Where torchvision cannot be imported (e.g. beside a CPU-only torch build), stand in for it
    with modules whose every attribute is a distinct dummy class."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        sys.modules.pop("torchvision", None)
    made: dict = {}

    class Any(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return made.setdefault((cls.__qualname__, name), Any(f"{cls.__qualname__}.{name}", (), {
                "__init__": lambda self, *a, **k: None}))

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return getattr(Any("torchvision", (), {}), f"{self.__name__}.{name}")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] == "torchvision":
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

        def create_module(self, spec):
            module = Stub(spec.name)
            module.__path__, module.__version__ = [], "0.0"
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def function_from_file(path: str, name: str, namespace: dict):
    """The top-level function ``name`` of the Python file ``path``, compiled alone in ``namespace``."""
    tree = ast.parse(open(path).read(), path)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


def randomize(module: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.3 if "pos_embed" in name else std)


class DDPLike(torch.nn.Module):
    """The official loss reads ``net.module`` (a DistributedDataParallel wrapper)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def check_maskdit(root: str, backend: str) -> None:
    sys.path.insert(0, root)
    from models.maskdit import EDMPrecond as OfficialPrecond
    from train_utils.loss import EDMLoss as OfficialLoss

    torch.manual_seed(0)
    classes, res, channels, n = 10, 8, 4, 6
    official = OfficialPrecond(res, channels, num_classes=classes, model_type="DiT-S/2", use_decoder=True,
                               mae_loss_coef=0.1, class_dropout_prob=0.0)
    randomize(official)
    state = {k: v.detach().clone() for k, v in official.state_dict().items()}
    model = DiT(infer_config(state, "maskdit"), backend=backend)
    model.load_state_dict(convert_official_state_dict(state, "maskdit"), strict=True)
    net = EDMPrecond(model)
    y = torch.randn(n, channels, res, res)
    labels = torch.randint(0, classes, (n,))
    onehot = F.one_hot(labels, classes).float()
    tokens = (res // 2) ** 2
    for ratio in (0.5, 0.25, 0.0):
        official.train(ratio > 0)
        model.train(ratio > 0)
        official.zero_grad()
        model.zero_grad()
        torch.manual_seed(1)
        want = OfficialLoss()(DDPLike(official) if ratio else official, y, onehot, mask_ratio=ratio,
                              mae_loss_coef=0.1 if ratio else 0)
        torch.manual_seed(1)  # the official draws, in its order: noise levels, noise, the mask's uniform noise
        sigma = (torch.randn([n, 1, 1, 1]) * 1.2 - 1.2).exp()
        noise = torch.randn_like(y)
        ids_keep = torch.argsort(torch.rand(n, tokens), dim=1)[:, :int(tokens * (1 - ratio))] if ratio else None
        got = maskdit.EDMLoss(mae_coef=0.1 if ratio else 0)(net, y, labels, ids_keep, sigma=sigma.flatten(),
                                                            noise=noise)
        report(f"MaskDiT loss, mask ratio {ratio} (relative)", ((got - want).abs() / want.abs()).max().item(), 1e-5)
        want.mean().backward()
        got.mean().backward()
        grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in official.named_parameters()}
        grads = convert_official_state_dict({**state, **grads}, "maskdit")
        worst = max(rel(p.grad, grads[k]) for k, p in model.named_parameters() if p.grad is not None)
        report(f"MaskDiT gradients, mask ratio {ratio} (relative to each parameter's largest)", worst, 1e-4)

    model.eval()
    official_sampler = function_from_file(os.path.join(root, "sample.py"), "edm_sampler", {"torch": torch, "np": np})

    class Wrapped(torch.nn.Module):  # the official sampler's interface around this project's denoiser
        sigma_min, sigma_max = 0, float("inf")

        def forward(self, x, sigma, class_labels=None, cfg_scale=None, feat=None):
            if cfg_scale is None:
                return {"x": net(x, sigma, class_labels)}
            return {"x": guided(x, sigma, class_labels, cfg_scale)}

        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)

    def guided(x, sigma, labels, scale):  # as the official forward_with_cfg: the network output F guided
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = net.coefficients(sigma)
        f = model(torch.cat([c_in * x] * 2), torch.cat([c_noise.flatten()] * 2),
                  torch.cat([labels, torch.full_like(labels, classes)]))
        cond, uncond = f.chunk(2)
        return c_skip * x + c_out * (uncond + scale * (cond - uncond))

    labels = labels[:3]
    with torch.no_grad():
        for churn, s_min, s_max, cfg in ((0, 0, float("inf"), None), (40, 0.05, 50, None), (0, 0, float("inf"), 1.5)):
            a, b = ImageNoise(3, torch.arange(3)), ImageNoise(3, torch.arange(3))
            noise = a.randn((channels, res, res))
            b.randn((channels, res, res))
            want = official_sampler(Wrapped(), noise, labels, cfg_scale=cfg, num_steps=18, S_churn=churn,
                                    S_min=s_min, S_max=s_max, S_noise=1.003, randn_like=a.randn_like).float()
            got = edm_sample(net, noise, labels, num_steps=18, cfg_scale=cfg, s_churn=churn, s_min=s_min,
                             s_max=s_max, s_noise=1.003, randn_like=b.randn_like)
            # guidance: the official guides F, this project D = c_skip x + c_out F (equal up to rounding)
            report(f"MaskDiT edm_sampler, 18 steps, churn {churn}, guidance {cfg}", rel(got, want),
                   0.0 if cfg is None else 1e-5)
    sys.path.remove(root)


def check_dit(root: str, backend: str) -> None:
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("dit_official_models", os.path.join(root, "models.py"))
    official_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official_models)
    from diffusion import create_diffusion

    torch.manual_seed(0)
    classes, res, channels, n = 10, 8, 4, 3
    official = official_models.DiT_models["DiT-S/2"](input_size=res, in_channels=channels, num_classes=classes,
                                                     class_dropout_prob=0.1, learn_sigma=True).eval()
    randomize(official)
    state = {k: v.detach().clone() for k, v in official.state_dict().items()}
    model = DiT(infer_config(state, "dit"), backend=backend).eval()
    model.load_state_dict(convert_official_state_dict(state, "dit"), strict=True)
    x, t = torch.randn(n, channels, res, res), torch.tensor([0, 417, 999])
    y = torch.tensor([1, classes, 7])  # (the null class too)
    with torch.no_grad():
        report("DiT network output", rel(model(x, t.float(), y), official(x, t, y)), 1e-5)

    def dit_cfg(network):  # DiT's forward_with_cfg around a network taking (x, t, y)
        def forward(x, t, y, cfg_scale):
            half = x[: len(x) // 2]
            out = network(torch.cat([half, half]), t, y)
            eps, rest = out[:, :3], out[:, 3:]
            cond, uncond = torch.split(eps, len(eps) // 2)
            guided = uncond + cfg_scale * (cond - uncond)
            return torch.cat([torch.cat([guided, guided]), rest], dim=1)
        return forward

    ours = lambda x, t, y: model(x, t.float(), y)  # noqa: E731
    z, labels = torch.randn(n, channels, res, res), torch.tensor([1, 5, 9])
    double = lambda x: torch.randn(2 * x.shape[0], *x.shape[1:])[: x.shape[0]]  # noqa: E731  (DiT draws 2N)
    with torch.no_grad():
        for steps in (250, 50, 7):
            diffusion = create_diffusion(str(steps))
            torch.manual_seed(5)
            want = diffusion.p_sample_loop(ours, z.shape, z.clone(), clip_denoised=False, model_kwargs=dict(y=labels),
                                           device="cpu")
            torch.manual_seed(5)
            got = ddpm_sample(DDPMPrecond(model), z.clone(), labels, num_steps=steps, cfg_scale=None)
            report(f"DiT sampler, {steps} steps, no guidance", rel(got, want), 0.0)
            torch.manual_seed(7)
            want = diffusion.p_sample_loop(dit_cfg(ours), (2 * n, *z.shape[1:]), torch.cat([z, z]),
                                           clip_denoised=False, device="cpu",
                                           model_kwargs=dict(y=torch.cat([labels, torch.full_like(labels, classes)]),
                                                             cfg_scale=1.5)).chunk(2)[0]
            torch.manual_seed(7)
            got = ddpm_sample(DDPMPrecond(model), z.clone(), labels, num_steps=steps, cfg_scale=1.5, randn_like=double)
            report(f"DiT sampler, {steps} steps, guidance 1.5 on 3 channels", rel(got, want), 0.0)
        fixed = maskdit.create_model("DiT-S/2", input_size=res, in_channels=channels, num_classes=classes,
                                     backend=backend).eval()  # C outputs: DiT's fixed variance
        randomize(fixed)
        diffusion = create_diffusion("13", learn_sigma=False)
        torch.manual_seed(5)
        want = diffusion.p_sample_loop(lambda x, t, y: fixed(x, t.float(), y), z.shape, z.clone(), clip_denoised=False,
                                       model_kwargs=dict(y=labels), device="cpu")
        torch.manual_seed(5)
        got = ddpm_sample(DDPMPrecond(fixed), z.clone(), labels, num_steps=13, cfg_scale=None)
        report("DiT sampler, 13 steps, fixed variance", rel(got, want), 0.0)
        # end to end: DiT's network and sampler against this project's
        diffusion = create_diffusion("250")
        torch.manual_seed(7)
        want = diffusion.p_sample_loop(official.forward_with_cfg, (2 * n, *z.shape[1:]), torch.cat([z, z]),
                                       clip_denoised=False, device="cpu",
                                       model_kwargs=dict(y=torch.cat([labels, torch.full_like(labels, classes)]),
                                                         cfg_scale=1.5)).chunk(2)[0]
        torch.manual_seed(7)
        got = ddpm_sample(DDPMPrecond(model), z.clone(), labels, num_steps=250, cfg_scale=1.5, randn_like=double)
        report("DiT end to end (its network and sampler), 250 steps, guidance 1.5", rel(got, want), 1e-4)
    sys.path.remove(root)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maskdit", help="a checkout of github.com/Anima-Lab/MaskDiT")
    p.add_argument("--dit", help="a checkout of github.com/facebookresearch/DiT")
    p.add_argument("--backend", choices=("torch", "triton"), default="torch",
                   help="this project's network backend (triton on CPU: TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.maskdit is None and args.dit is None:
        p.error("give --maskdit and/or --dit (checkouts of the official repositories)")
    for flag, root in (("--maskdit", args.maskdit), ("--dit", args.dit)):
        if root is not None and not os.path.isdir(root):
            p.error(f"{flag} {root!r} is not a folder")
    torch.backends.cuda.matmul.allow_tf32 = False
    allow_timm_without_torchvision()
    if args.maskdit:
        check_maskdit(os.path.abspath(args.maskdit), args.backend)
    if args.dit:
        check_dit(os.path.abspath(args.dit), args.backend)
    print(f"{len(FAILED)} check(s) failed" if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
