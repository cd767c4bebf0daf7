"""Variable-length encoder benchmark (CUDA): MaskDiT-XL/2 training steps (forward + backward of the EDM
loss, bf16 autocast, triton backend) with

- equal lengths (128 of 256 tokens): the default path (dense SDPA on the packed tokens' (N, K) view)
  against the same batch forced through the varlen attention kernel;
- mixed per-sample ratios (a quarter of each batch unmasked): varlen attention against padding every
  sample to the longest (padded SDPA with a key mask).

    python bench/varlen.py [--batch 64] [--out DIR]

Timing: ``triton.testing.do_bench`` (CUDA events, median).  Writes varlen.json / varlen.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import bench_ms, environment, results_folder, write_results  # noqa: E402
from maskdit import EDMLoss, EDMPrecond, create_model, random_mask  # noqa: E402
from maskdit.attention import HAS_FLASH_ATTN, HAS_TORCH_VARLEN, PATHS_USED, forced_path  # noqa: E402


def step_fn(net, loss_fn, batch, ratios, device):
    images = torch.randn(batch, 4, 32, 32, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    ids = random_mask(batch, 256, ratios, device=device).ids_keep

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(net, images, labels, ids).mean()
        loss.backward()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/varlen.py needs CUDA")
    env = environment()
    device = torch.device("cuda")
    varlen = "flash-attn-varlen" if HAS_FLASH_ATTN else "torch-varlen" if HAS_TORCH_VARLEN else "xformers-blockdiag"
    model = create_model("MaskDiT-XL/2", backend="triton").to(device)
    net, loss_fn = EDMPrecond(model), EDMLoss()
    b = args.batch
    mixed = [0.0] * (b // 4) + [0.5] * (b - b // 4)
    cases = [("equal lengths K=128", [0.5] * b, None), ("equal lengths K=128", [0.5] * b, varlen),
             ("mixed: 1/4 unmasked", mixed, None), ("mixed: 1/4 unmasked", mixed, "padded-sdpa")]
    out = results_folder(args.out, env)
    rows = []
    for name, ratios, path in cases:
        row = dict(case=name, batch=b, forced_path=path)
        try:
            step = step_fn(net, loss_fn, b, ratios, device)
            with forced_path(path):
                PATHS_USED.clear()
                step()
                row["path"] = ",".join(sorted(PATHS_USED))
                ms = bench_ms(step, warmup=200, rep=1500)  # do_bench's budgets in ms: ~20 steps timed
            row.update(step_ms=ms, imgs_per_s=b / (ms * 1e-3))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        paths = write_results(out, "varlen", dict(env, rows=rows), markdown(env, b, rows))  # after every case
    print(markdown(env, b, rows))
    print("wrote", *paths)


def markdown(env: dict, batch: int, rows: list[dict]) -> str:
    lines = [f"## Variable-length encoder: {env['device']}", "",
             f"MaskDiT-XL/2, batch {batch}, bf16 autocast, triton backend, fwd+bwd of the EDM loss; "
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; do_bench median.", "",
             "| case | attention path (encoder, decoder) | step ms | images/s |", "|---|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['forced_path']} | error: {r['error'][:80]} | |")
        else:
            lines.append(f"| {r['case']} | {r['path']} | {r['step_ms']:.1f} | {r['imgs_per_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
