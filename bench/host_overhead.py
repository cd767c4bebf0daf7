"""Host-side cost of a training forward + backward with each backend, the GPU's work left out.

    python bench/host_overhead.py [--model MaskDiT-XL/2] [--steps 8] [--out DIR]

The model keeps the named structure (depth, decoder depth, every op) at width 64 on 8x8x4 latents, on
the CPU, so that the arithmetic is negligible; the Triton kernels' launches are intercepted (nothing runs,
their launchers still validate and allocate).  What remains is Python, autograd and dispatch work: the
time a host needs to issue one step.  A GPU step is bound by it whenever the GPU finishes its kernels
sooner, which happens at small batches.  Reports the median over ``--steps`` steps after two warm-up
steps, and the Triton launches a step makes.  Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import check_arguments, environment, results_folder, write_results  # noqa: E402
from bench.kernel_resources import intercept_launches  # noqa: E402

WIDTH = dict(hidden_size=64, num_heads=4, decoder_hidden_size=32, decoder_num_heads=2)


def measure(model_name: str, backend: str, steps: int, depth: int | None = None) -> dict:
    """Median host milliseconds of one EDM-loss forward + backward (and Triton launches per step)."""
    from maskdit import EDMLoss, EDMPrecond, create_model, random_mask

    torch.manual_seed(0)
    overrides = dict(WIDTH, **({"depth": depth, "decoder_depth": depth} if depth else {}))
    model = create_model(model_name, input_size=8, num_classes=10, backend=backend, **overrides)
    net, loss_fn = EDMPrecond(model), EDMLoss()
    images, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    masked = model.config.use_decoder
    launches, times = [], []
    with intercept_launches(lambda *_: launches.append(1)):
        for i in range(steps + 2):
            ids = random_mask(2, 16, 0.5).ids_keep if masked else None
            launches.clear()
            t0 = time.perf_counter()
            loss_fn(net, images, labels, ids).mean().backward()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    return dict(model=model_name, backend=backend, depth=model.config.depth,
                decoder_depth=model.config.decoder_depth if masked else 0, host_ms=statistics.median(times),
                triton_launches=len(launches))


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"## Host-side cost of a training forward + backward: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; `{env['command']}`. The model's "
             "structure at width 64 on 8x8x4 latents (arithmetic negligible), Triton launches intercepted; "
             "median of the timed steps.", "",
             "| model | blocks (encoder + decoder) | backend | host ms a step | Triton launches a step |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['depth']} + {r['decoder_depth']} | {r['backend']} | {r['host_ms']:.1f} | "
                     f"{r['triton_launches']} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="MaskDiT-XL/2")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--depth", type=int, help="override the encoder and decoder depths (tests)")
    p.add_argument("--out", help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    check_arguments(p, argparse.Namespace(model=[args.model], steps=args.steps, depth=args.depth, out=args.out),
                    models="model", at_least_one=("steps", "depth"))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: the kernels' launches are intercepted, not interpreted")
    torch.set_num_threads(1)
    rows = [measure(args.model, backend, args.steps, args.depth) for backend in ("torch", "triton")]
    env = environment()
    md = markdown(env, rows)
    print(md)
    print("wrote", *write_results(results_folder(args.out, env), "host_overhead", dict(env, rows=rows), md))
    return rows


if __name__ == "__main__":
    main()
