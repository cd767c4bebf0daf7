"""Model table: parameters and forward GMACs of every size, beside the DiT paper's figures.

    python bench/compute_table.py            # markdown on stdout, compute.json/.md in bench/results/
                                             # (runs anywhere: the meta device)

GMACs are multiply-accumulates of one forward pass at batch 1 (the DiT paper's "Gflops"), counted by
``torch.utils.flop_counter`` (matrix products and attention).  MaskDiT's training forward sees
int(L * (1 - 0.5)) tokens in its encoder; inference sees all of them.  Training GFLOPs per image count
the forward and the backward (2 FLOPs per multiply-accumulate).  The DiT columns are the DiT paper's models
(``learn_sigma=True``: 2C output channels, as its Table 4 counted them; this project's DiT defaults to C).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_arguments, environment, write_results  # noqa: E402
from maskdit.config import PATCH_SIZES  # noqa: E402
from maskdit.flops import count_parameters, forward_gmacs, train_gflops  # noqa: E402

# The DiT paper's Table 4 (256x256: 32x32x4 latents) and its XL/2 figure at 512x512 (64x64x4).
DIT_PAPER_GMACS = {(name, 32): g for name, g in {
    "DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64,
    "DiT-S/4": 1.41, "DiT-B/4": 5.56, "DiT-L/4": 19.70, "DiT-XL/4": 29.05,
    "DiT-S/8": 0.36, "DiT-B/8": 1.42, "DiT-L/8": 5.01, "DiT-XL/8": 7.39,
}.items()}
DIT_PAPER_GMACS[("DiT-XL/2", 64)] = 524.6


def rows(sizes=("S", "B", "L", "XL"), patches=PATCH_SIZES, input_size=32, in_channels=4, num_classes=1000):
    """One dict per size/patch: parameters and GMACs of DiT and MaskDiT (training at ratio 0.5, inference)."""
    out = []
    for size in sizes:
        for p in patches:
            shape = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
            dit, mdit = f"DiT-{size}/{p}", f"MaskDiT-{size}/{p}"
            dit_shape = dict(shape, learn_sigma=True)  # the DiT paper's models
            dit_g = forward_gmacs(dit, **dit_shape)
            train_g = forward_gmacs(mdit, mask_ratio=0.5, **shape)
            out.append(dict(
                size=f"{size}/{p}", dit_params=count_parameters(dit, **dit_shape),
                maskdit_params=count_parameters(mdit, **shape), dit_gmacs=dit_g,
                paper_gmacs=DIT_PAPER_GMACS.get((dit, input_size)),
                maskdit_train_gmacs=train_g, maskdit_infer_gmacs=forward_gmacs(mdit, **shape),
                train_ratio=train_g / dit_g,
                dit_train_gflops=train_gflops(dit, **dit_shape),
                maskdit_train_gflops=train_gflops(mdit, mask_ratio=0.5, **shape),
            ))
    return out


def markdown(table, title):
    lines = [f"### {title}", "",
             "| size | DiT params | DiT GMACs | paper | MaskDiT params | MaskDiT train GMACs (r=0.5) | "
             "vs DiT | MaskDiT inference GMACs | train GFLOP/img DiT | train GFLOP/img MaskDiT |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        paper = f"{r['paper_gmacs']:.2f}" if r["paper_gmacs"] else "-"
        lines.append(f"| {r['size']} | {r['dit_params'] / 1e6:.1f}M | {r['dit_gmacs']:.2f} | {paper} | "
                     f"{r['maskdit_params'] / 1e6:.1f}M | {r['maskdit_train_gmacs']:.2f} | "
                     f"{100 * r['train_ratio']:.1f}% | {r['maskdit_infer_gmacs']:.2f} | "
                     f"{r['dit_train_gflops']:.1f} | {r['maskdit_train_gflops']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="folder for compute.json / .md (default bench/results: counts, the same on every machine)")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    tables = {
        "256x256 (32x32x4 latents), batch 1": rows(),
        "512x512 (64x64x4 latents), batch 1": rows(sizes=("XL",), patches=(2,), input_size=64),
        "The CPU default: 16x16x1 digits, 10 classes": rows(sizes=("T",), patches=(2,), input_size=16,
                                                             in_channels=1, num_classes=10),
    }
    md = "\n\n".join(markdown(table, title) for title, table in tables.items())
    print(md)
    payload = {**environment(), "gmacs": "multiply-accumulates of one forward at batch 1 (the DiT paper's 'Gflops')",
               "dit": "learn_sigma=True (the DiT paper's models)", "tables": tables}
    write_results(args.out, "compute", payload, md)


if __name__ == "__main__":
    main()
