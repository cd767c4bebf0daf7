"""Where a training step's time goes: host (Python, autograd, launches) against GPU kernels, per backend.

    python bench/profile_step.py [--models MaskDiT-XL/2 DiT-XL/2] [--backends torch triton] [--batch 32]
                                 [--steps 5] [--out DIR]

The step is ``bench/train_step.py``'s (EDM loss fwd + bwd, fused AdamW, EMA; bf16 autocast on CUDA).  For
each model and backend, after three warm-up steps:

- ``host_ms``: time for ``step()`` to return when it starts on an idle GPU (the time the host needs to
  issue a step; with a device sync inside the step it also holds the GPU work before that sync);
  ``wall_ms``: until ``torch.cuda.synchronize`` returns after it; medians over ``--steps`` steps.
  A step runs at the larger of its host time and its GPU time when nothing syncs: ``host_ms`` above the
  kernels' time means the step is host-bound.
- ``kernel_ms``: the summed GPU time of the kernels of one step (``torch.profiler``, CUDA activity), and
  that time by kind of kernel (``kernel_kind``: matrix products, attention, this project's Triton kernels,
  multi-tensor optimizer/EMA updates, memsets and memcpys, other PyTorch kernels): what bounds a
  large-batch step's MFU.
- the profiler's operator table by self CPU time, and by self GPU time (one step's worth, two steps
  profiled), and Python's ``cProfile`` over three steps (top functions by own time and by cumulative time).

Writes profile_step.json (figures) and profile_step.md (figures and tables) into ``--out`` (default
bench/results/<device>).  On the CPU it runs a tiny configuration so the script is exercised.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_arguments, environment, results_folder, sync, write_results  # noqa: E402
from bench.train_step import IN_CHANNELS, NUM_CLASSES, make_step  # noqa: E402
from maskdit.backends import BACKENDS  # noqa: E402
from maskdit.models import create_model  # noqa: E402

# (kind, substrings of kernel names), first match wins; the fused kernels are named by ``kernels/``'s functions
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn", "cudnn")),  # (cuDNN runs only attention here)
    ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "ampere_", "hopper_")),
    ("optimizer and EMA (multi-tensor)", ("multi_tensor", "fused_adam", "foreach", "_lerp_kernel")),
    ("fused Triton (kernels/)", ("_ln_modulate_", "_gated_residual_", "_unmask_", "_edm_loss_", "_patch_", "_gelu_",
                                 "_column_sums_", "_stack_qkv_grad_")),
    ("memset and memcpy", ("memset", "memcpy")),  # the profiler's names: "Memset (Device)", "Memcpy DtoD ..."
)


TOP_KERNELS = 30  # kernels listed by name, most GPU time first


def device_kernels(events) -> list:
    """The kernels' own events among a profile's: on the device, less the ranges ``record_function`` marks there
    (``Optimizer.step#AdamW.step`` spans the optimizer's kernels: counting it too counts them twice), and an
    operator's device time repeats its kernels' (so operators are left out too)."""
    return [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its name (``KERNEL_KINDS``; "other PyTorch kernels" otherwise)."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other PyTorch kernels"


def profile(name: str, backend: str, batch: int, input_size: int, steps: int, device: torch.device) -> dict:
    """Figures and tables of one configuration."""
    torch.manual_seed(0)
    with device:
        model = create_model(name, input_size, IN_CHANNELS, NUM_CLASSES, backend=backend)
    step = make_step(model, batch, device, "none", ema=True)
    for _ in range(3):
        step()
    sync(device)
    host, wall = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        sync(device)
        host.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(device)
    events = prof.key_averages()
    kernels = device_kernels(prof.events())
    kernel_us = sum(e.device_time_total for e in kernels) / 2
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}  # kernel name -> [ms a step, calls a step]
    for e in kernels:
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time_total / 2e3
        entry = by_name.setdefault(e.name, [0.0, 0.0])
        entry[0] += e.device_time_total / 2e3
        entry[1] += 0.5
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    calls = sum(e.count for e in events) / 2
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=30)
    gpu_table = events.table(sort_by="self_device_time_total", row_limit=25) if device.type == "cuda" else ""

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(3):
        step()
    sync(device)
    pr.disable()
    tables = []
    for key, limit in (("tottime", 35), ("cumulative", 45)):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).strip_dirs().sort_stats(key).print_stats(limit)
        tables.append(s.getvalue())
    del model, step
    return dict(model=name, backend=backend, batch=batch, host_ms=statistics.median(host),
                wall_ms=statistics.median(wall), kernel_ms=kernel_us / 1e3, profiler_ops_per_step=calls,
                kernel_ms_by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
                top_kernels=[dict(name=n, kind=kernel_kind(n), ms=ms, calls=calls) for n, (ms, calls) in top],
                tables=dict(cpu=cpu_table, gpu=gpu_table, cprofile_tottime=tables[0], cprofile_cumulative=tables[1]))


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"## Step profile: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; `{env['command']}`.", "",
             "| model | backend | batch | host ms | wall ms | kernel ms | profiled ops a step |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['backend']} | {r['batch']} | {r['host_ms']:.1f} | {r['wall_ms']:.1f} | "
              f"{r['kernel_ms']:.1f} | {r['profiler_ops_per_step']:.0f} |" for r in rows]
    kinds = [r for r in rows if r["kernel_ms_by_kind"]]
    if kinds:
        lines += ["", "GPU time of one step by kind of kernel (ms, share of the step's kernel time):", "",
                  "| model | backend | batch | kind | ms | share |", "|---|---|---:|---|---:|---:|"]
        for r in kinds:
            lines += [f"| {r['model']} | {r['backend']} | {r['batch']} | {kind} | {ms:.1f} | "
                      f"{100 * ms / r['kernel_ms']:.0f}% |" for kind, ms in r["kernel_ms_by_kind"].items()]
    tops = [r for r in rows if r.get("top_kernels")]
    if tops:
        lines += ["", f"The {TOP_KERNELS} kernels with the most GPU time a step (names cut at 90 characters):", "",
                  "| model | backend | batch | kernel | kind | ms | calls |", "|---|---|---:|---|---|---:|---:|"]
        for r in tops:
            lines += [f"| {r['model']} | {r['backend']} | {r['batch']} | `{k['name'][:90]}` | {k['kind']} | "
                      f"{k['ms']:.2f} | {k['calls']:.0f} |" for k in r["top_kernels"]]
    for r in rows:
        for key, text in r["tables"].items():
            if text:
                lines += ["", f"### {r['model']} {r['backend']}: {key}", "", "```", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--models", nargs="+", default=["MaskDiT-XL/2", "DiT-XL/2"] if cuda else ["MaskDiT-S/2"])
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["torch", "triton"] if cuda else ["torch"])
    p.add_argument("--batch", type=int, default=32 if cuda else 2)
    p.add_argument("--input-size", type=int, default=32 if cuda else 8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_arguments(p, args, models="models", at_least_one=("batch", "input_size", "steps"))
    device = torch.device("cuda" if cuda else "cpu")
    env = environment()
    rows = []
    for name in args.models:
        for backend in args.backends:
            r = profile(name, backend, args.batch, args.input_size, args.steps, device)
            print(f"{name} {backend} batch {args.batch}: host {r['host_ms']:.1f} ms, wall {r['wall_ms']:.1f} ms, "
                  f"kernels {r['kernel_ms']:.1f} ms", flush=True)
            rows.append(r)
            write_results(results_folder(args.out, env), "profile_step", dict(env, rows=rows), markdown(env, rows))
    return rows


if __name__ == "__main__":
    main()
