"""Mask-ratio schedules (the official ``get_mask_ratio_fn``) and per-sample ratio distributions."""

from __future__ import annotations

import math
from typing import Callable

import torch

SCHEDULES = ("constant", "zero", "cosine", "linear", "exp") + tuple(f"cosine{k}" for k in range(2, 7))


def mask_ratio_schedule(name: str, ratio: float, cosine_power: float = 4.0) -> Callable[[float], float]:
    """The mask ratio as a function of the progress x in [0, 1] through the run (or tuning phase).

    constant: ratio; zero: 0; cosine: ratio * cos(pi x / 2) ** cosine_power (``cosineK`` fixes the power
    to K, the official names, e.g. cosine4); linear: ratio * x (the official meaning: rises from 0);
    exp: ratio * exp(-7 x).
    """
    if name not in SCHEDULES:
        raise ValueError(f"--mask-schedule must be one of {SCHEDULES}, got {name!r}")
    if name.startswith("cosine") and name != "cosine":
        cosine_power = int(name[len("cosine"):])
    if not cosine_power >= 0:
        raise ValueError(f"--mask-cosine-power must be >= 0 (the ratio falls from its scale to 0), got {cosine_power}")
    return {
        "constant": lambda x: ratio,
        "zero": lambda x: 0.0,
        "cosine": lambda x: ratio * math.cos(math.pi * x / 2) ** cosine_power,
        "linear": lambda x: ratio * x,
        "exp": lambda x: ratio * math.exp(-7 * x),
    }["cosine" if name.startswith("cosine") else name]


def _parsed_distribution(spec: str) -> tuple[str, list[float]]:
    """(kind, numbers) of a valid ``--mask-ratio-dist`` spec (see ``ratio_distribution``); ValueError otherwise."""
    kind, _, rest = spec.partition(":")
    try:
        args = [float(a) for a in rest.split(":")] if rest else []
    except ValueError:
        args = None
    if (kind == "none" and args == []
            or kind == "unmasked" and args is not None and len(args) == 1 and 0 <= args[0] <= 1
            or kind == "uniform" and args is not None and len(args) == 2 and 0 <= args[0] <= args[1] < 1):
        return kind, args
    raise ValueError(f"--mask-ratio-dist must be 'none', 'unmasked:F' with F in [0, 1], or 'uniform:LO:HI' with "
                     f"0 <= LO <= HI < 1; got {spec!r}")


def ratio_distribution(spec: str) -> Callable[[int, float, torch.Generator], float | list[float]]:
    """Per-sample mask ratios for a batch, from ``--mask-ratio-dist``:

    "none": every sample uses the scheduled ratio (a float is returned);
    "unmasked:F": round(F * batch) randomly chosen samples keep every token, the others the scheduled ratio;
    "uniform:LO:HI": each sample draws its ratio uniformly from [LO, HI) (the schedule is not used).
    Draws use a CPU generator, so the lengths are known on the host without a device sync.
    """
    kind, args = _parsed_distribution(spec)
    if kind == "none":
        return lambda batch, ratio, gen: ratio
    if kind == "unmasked":
        frac = args[0]

        def unmasked(batch, ratio, gen):
            chosen = torch.randperm(batch, generator=gen)[:round(frac * batch)]
            ratios = torch.full((batch,), ratio, dtype=torch.float64)
            ratios[chosen] = 0.0
            return ratios.tolist()

        return unmasked
    lo, hi = args

    def uniform(batch, ratio, gen):
        return (lo + (hi - lo) * torch.rand(batch, generator=gen, dtype=torch.float64)).tolist()

    return uniform


def highest_mask_ratio(ratio: float, spec: str) -> float:
    """The highest mask ratio a sample can get from the schedules of scale ``ratio`` (none exceeds it) and the
    per-sample distribution ``spec`` of ``ratio_distribution`` (uniform:LO:HI draws below HI)."""
    kind, args = _parsed_distribution(spec)
    return args[1] if kind == "uniform" else ratio
