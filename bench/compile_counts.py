"""How many times ``train.py --compile`` compiles the training forward under a changing mask ratio.

    python bench/compile_counts.py [--steps 24] [--modes full regional]

Runs short CPU trainings of a tiny MaskDiT (8x8 digits, 16 tokens) with a constant ratio, a cosine
schedule (K changes as the ratio falls from 0.5 to 0) and per-sample ratios, under each compilation mode
(``--compile full``: the whole training forward; ``regional``: each block), and prints the number of
graphs Dynamo compiled in each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402


def compilations(flags: list[str], steps: int, mode: str = "full") -> tuple[int, int]:
    """(frames compiled, distinct K values seen) for a run with ``flags``."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    seen = set()
    real = train.random_mask

    def spy(*args, **kwargs):
        mask = real(*args, **kwargs)
        ids = mask.ids_keep
        seen.add(ids.shape[1] if isinstance(ids, torch.Tensor) else tuple(len(i) for i in ids))
        return mask

    train.random_mask = spy
    try:
        with tempfile.TemporaryDirectory() as out:
            train.main(["--image-size", "8", "--batch-size", "8", "--steps", str(steps), "--grid-per-class", "0",
                        "--log-every", str(steps), "--device", "cpu", "--compile", mode, "--out", out, *flags])
    finally:
        train.random_mask = real
    return counters["stats"]["unique_graphs"], len(seen)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--modes", nargs="+", default=["full", "regional"], choices=["full", "regional"])
    args = parser.parse_args(argv)
    rows = []
    for mode in args.modes:
        for name, flags in [("constant 0.5", []), ("cosine 0.5 -> 0", ["--mask-schedule", "cosine"]),
                            ("per-sample unmasked:0.25", ["--mask-ratio-dist", "unmasked:0.25"]),
                            ("per-sample uniform:0.2:0.8", ["--mask-ratio-dist", "uniform:0.2:0.8"])]:
            graphs, distinct = compilations(flags, args.steps, mode)
            rows.append((mode, name, distinct, graphs))
    print(f"| --compile | run ({args.steps} steps) | distinct kept-token layouts | compiled graphs |")
    print("|---|---|---:|---:|")
    for mode, name, distinct, graphs in rows:
        print(f"| {mode} | {name} | {distinct} | {graphs} |")


if __name__ == "__main__":
    main()
