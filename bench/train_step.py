"""Training-step benchmark: DiT against MaskDiT, eager and compiled, PyTorch and Triton backends, over batch sizes.

    python bench/train_step.py [--models M ...] [--impls I ...] [--batches B ...] [--steps 20] [--warmup 5]
                               [--input-size 32] [--no-ema] [--threads N] [--quick] [--out DIR]
                               [--kernel-constant MODULE.NAME=VALUE ...]

One step is what ``train.py`` does per step, data loading and label dropout left out: draw sigma and the
noise (and, for MaskDiT, ``random_mask`` at ratio 0.5 packed by ``token_layout`` outside the compiled
function), the mean EDM loss of ``EDMPrecond(model)`` under bf16 autocast (the function ``train.py``
compiles with ``--compile``), ``zero_grad(set_to_none=True)``, backward, the fused AdamW step (with
``train.py``'s no-sync non-finite guard) and the EMA update (``--no-ema`` leaves it out).  DiT rows mask nothing.

Implementations: ``torch`` (plain PyTorch ops, eager; the EMA as ``torch._foreach`` ops), ``torch+compile``,
``triton`` (fused kernels, eager), ``triton+compile``; ``+compile`` wraps the loss function in ``torch.compile``
(default mode). Optional: ``torch+regional``, ``triton+regional`` (``maskdit.training.compile_blocks``: each
transformer block compiled, the blocks of a stack sharing their graphs; compile time of a couple of blocks, no
fusion across blocks), ``torch+graph``, ``triton+graph`` (``maskdit.cuda_graphs.GraphedStep``: the whole step,
draws included, captured into one CUDA graph after two eager steps and replayed, so no host work remains; AdamW
built with ``capturable=True``, autocast without its cast cache).

Method (CUDA): build the model on the GPU, run ``--warmup`` steps (compilation and autotuning happen
here), then time ``--steps`` steps one by one with CUDA events and report the median.  Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients, AdamW and EMA state included);
for ``+graph`` rows over all steps from the first (the graph's memory is allocated during the capture).
Achieved TFLOP/s = ``maskdit.flops.train_gflops`` (matrix products and attention of the model's forward +
backward per image) x batch / step time; MFU = that / the dense bf16 matmul rate (8192^3,
``triton.testing.do_bench``) measured in the same run.  Speed-ups: each MaskDiT row against the DiT of the
same size, implementation and batch, and each row against eager ``torch`` for the same model and batch.
An out-of-memory batch is recorded as such (larger batches of the same model and implementation are
then skipped and marked out of memory too), the memory is freed and the sweep goes on.  Models are freed
between configurations (and ``torch._dynamo`` reset, so no configuration reuses another's graphs).

``--quick`` (``make gpu-check``, about 3 minutes on an H200): MaskDiT-XL/2 then DiT-XL/2, ``torch`` and
``triton`` eager and compiled per block (``+regional``: compiles in about 15-20 s where whole-graph
``+compile`` took over two minutes), and ``triton+graph``, batch 256 (the targets' batch; DiT-XL/2 at 256
peaks at 75 GB with the triton backend and 102 GB with torch on an H200: on an 80 GB card expect
out-of-memory rows, which are recorded as such), 20 timed steps after 3 warm-up steps.

Without CUDA the GPU tables cannot be measured: the script then runs DiT-S/2 against MaskDiT-S/2 at 16x16x4
latents, ``torch`` backend, eager, fp32 (no autocast), batch 8, timed with ``time.perf_counter``; MFU is
against an fp32 1024^3 CPU matmul timed the same way (``bench.common.bench_ms``); no memory figure.  (At
16x16 latents MaskDiT-S/2 costs more FLOPs than DiT-S/2: its 8-block, 512-wide decoder on all 64 tokens
outweighs the halved S encoder; MaskDiT's saving needs the large encoders and 256 tokens of the GPU runs.)

Writes train_step.json (environment, matmul rate, settings, rows), train_step.md and, when matplotlib is
installed, train_step_throughput.png and train_step_memory.png into ``--out`` (default
bench/results/<device>).
"""

from __future__ import annotations

import argparse
import ast
import copy
import gc
import importlib
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    bench_ms,
    check_arguments,
    environment,
    fmt,
    kernel_constants_set,
    results_folder,
    stack_dumps,
    sync,
    time_call,
    write_results,
)
from maskdit.attention import DENSE_KERNELS, sdpa_backend  # noqa: E402
from maskdit.cuda_graphs import GraphedStep  # noqa: E402
from maskdit.edm import EDMLoss, EDMPrecond  # noqa: E402
from maskdit.flops import train_gflops  # noqa: E402
from maskdit.masking import random_mask, token_layout  # noqa: E402
from maskdit.models import CHECKPOINTING, create_model  # noqa: E402
from maskdit.training import EMA, compile_blocks, make_optimizer  # noqa: E402

IMPLS = ("torch", "torch+compile", "triton", "triton+compile", "torch+regional", "triton+regional", "torch+graph",
         "triton+graph")
MASK_RATIO = 0.5
IN_CHANNELS, NUM_CLASSES = 4, 1000
EMA_DECAY = 0.9999  # the official recipe's
GRAPH_WARMUP = 2  # eager steps before a +graph step is captured (measure() warms up past the capture)

# Defaults per mode; flags given on the command line override them.
CUDA_DEFAULTS = dict(models=["DiT-XL/2", "MaskDiT-XL/2"], impls=list(IMPLS[:4]), batches=[32, 64, 128, 256],
                     steps=20, warmup=5, input_size=32)
QUICK_DEFAULTS = dict(CUDA_DEFAULTS, models=["MaskDiT-XL/2", "DiT-XL/2"],
                      impls=["torch", "triton", "torch+regional", "triton+regional", "triton+graph"], batches=[256],
                      steps=20, warmup=3)
CPU_DEFAULTS = dict(models=["DiT-S/2", "MaskDiT-S/2"], impls=["torch"], batches=[8], steps=5, warmup=2,
                    input_size=16)
CPU_QUICK_DEFAULTS = dict(CPU_DEFAULTS, steps=3, warmup=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="model names (CUDA default: DiT-XL/2 MaskDiT-XL/2; add DiT-B/2 "
                                               "MaskDiT-B/2 for smaller GPUs; CPU default: DiT-S/2 MaskDiT-S/2)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, help="implementations (CUDA default: the first four; "
                                                             "CPU: torch)")
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (CUDA default: 32 64 128 256; CPU: 8)")
    p.add_argument("--steps", type=int, help="timed steps per configuration (default 20; CPU 5)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compilation included (default 5; CPU 2)")
    p.add_argument("--input-size", type=int, help="latent size (default 32: 256x256 images; CPU 16)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="include train.py's EMA update in the step (default on)")
    p.add_argument("--threads", type=int, help="CPU only: torch.set_num_threads (default torch's; on a busy "
                                               "machine 1 avoids OpenMP threads waiting on each other)")
    p.add_argument("--activation-checkpointing", choices=CHECKPOINTING, default="none",
                   help="DiT.set_activation_checkpointing for every model ('decoder': MaskDiT rows only, DiT rows "
                        "run without)")
    p.add_argument("--keep-norm-outputs", action="store_true",
                   help="DiT.set_keep_norm_outputs for every model (triton rows: the modulated LayerNorm outputs "
                        "kept for the backward, not recomputed)")
    p.add_argument("--sdpa-backend", choices=("auto", *DENSE_KERNELS), default="auto",
                   help="the attention kernel (maskdit.attention.set_sdpa_backend; default PyTorch's choice)")
    p.add_argument("--kernel-constant", nargs="+", default=[], metavar="MODULE.NAME=VALUE",
                   help="launch parameters of the triton rows' kernels for the whole run, e.g. "
                        "ln_modulate.BWD_SPLIT_COLUMNS=True (an existing upper-case constant of kernels.MODULE, "
                        "a value of its type)")
    p.add_argument("--quick", action="store_true", help="XL/2 models, torch and triton eager and regional, and "
                                                        "triton+graph, batch 256, 20 steps")
    p.add_argument("--stack-dumps", type=float, default=0.0, metavar="SECONDS",
                   help="during each configuration's first step (compilation), write every thread's Python stack "
                        "every SECONDS to first_step_stacks.txt in the results folder, also when a time limit "
                        "kills the run: where a long compile spends its time (default 0: off)")
    p.add_argument("--out", help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    defaults = (QUICK_DEFAULTS if args.quick else CUDA_DEFAULTS) if cuda else \
        (CPU_QUICK_DEFAULTS if args.quick else CPU_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or min(args.batches) < 1:
        p.error("--steps and --batches must be >= 1, --warmup >= 0")
    check_arguments(p, args, models="models", at_least_one=("input_size",))
    args.batches = sorted(set(args.batches))
    try:
        args.kernel_constants = kernel_constants(args.kernel_constant)
    except ValueError as e:
        p.error(f"--kernel-constant: {e}")
    return args


def kernel_constants(assignments: list[str]) -> dict[str, dict]:
    """{module: {NAME: value}} from "MODULE.NAME=VALUE" strings (the value a Python literal of the constant's
    type); ValueError naming what is wrong."""
    out: dict[str, dict] = {}
    for text in assignments:
        target, sep, value_text = text.partition("=")
        module, _, name = target.strip().rpartition(".")
        if not sep or not module or not name:
            raise ValueError(f"expected MODULE.NAME=VALUE, got {text!r}")
        try:
            mod = importlib.import_module(f"kernels.{module}")
        except ImportError as e:
            raise ValueError(f"no kernel module kernels.{module} ({e})") from None
        if not name.isupper() or not hasattr(mod, name):
            raise ValueError(f"kernels.{module} has no launch-parameter constant {name!r}")
        try:
            value = ast.literal_eval(value_text.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{text!r}: the value must be a Python literal") from None
        current = getattr(mod, name)
        if type(value) is not type(current):
            raise ValueError(f"kernels.{module}.{name} must be of type {type(current).__name__} (it is {current!r}), "
                             f"got {value!r}")
        out.setdefault(module, {})[name] = value
    return out


def matmul_rate(device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, description) of a large dense matmul: bf16 8192^3 on CUDA (median, ``bench_ms``), fp32 1024^3 on
    the CPU (the fastest of 30 calls: a CPU's rate swings with the machine's other load, and a slow reference
    would put MFU above 100%)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b) if device.type == "cuda" else \
        bench_ms(lambda: a @ b, warmup=15, rep=300, return_mode="min")  # (3 untimed calls, 30 timed)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12, f"{str(dtype).replace('torch.', '')} {n}x{n}x{n} matmul on {device.type}"


def make_step(model, batch: int, device: torch.device, compile_mode: str, ema: bool):
    """A closure running one training step as train.py does (no data loading, no label dropout).  With
    ``compile_mode`` "graph" the whole step (mask, sigma and noise draws included) is captured into a CUDA
    graph (``maskdit.cuda_graphs.GraphedStep``) after ``GRAPH_WARMUP`` eager steps, and replayed."""
    net, loss_fn = EDMPrecond(model), EDMLoss()
    masked = model.config.use_decoder
    graphed = compile_mode == "graph"
    optimizer = make_optimizer(model, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, capturable=graphed)
    averager = EMA(model, copy.deepcopy(model).eval(), fused=EMA.fused_for(model.backend)) if ema else None
    images = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    # the cast cache must not outlive a capture (PyTorch's CUDA-graph rules); eager steps keep it
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda",
                              cache_enabled=not graphed)

    def batch_loss(images, labels, ids_keep, sigma, noise):
        return loss_fn(net, images, labels, ids_keep, sigma=sigma, noise=noise).mean()

    if compile_mode == "full":
        batch_loss = torch.compile(batch_loss)
    elif compile_mode == "regional":
        compile_blocks(model)

    def one_step(images, labels):
        ids_keep = None
        if masked:  # packed outside the compiled function, as in train.py
            ids_keep = random_mask(batch, model.num_tokens, MASK_RATIO, device=device).ids_keep
            ids_keep = token_layout(ids_keep, batch, model.num_tokens, device)
        sigma = loss_fn.sample_sigma(batch, device)
        noise = torch.randn(images.shape, device=device)
        with autocast:
            loss = batch_loss(images, labels, ids_keep, sigma, noise)
        optimizer.zero_grad(set_to_none=True)
        bad = ~torch.isfinite(loss.detach())
        loss.backward()
        optimizer.found_inf = bad.float()  # train.py's guard: the fused AdamW skips a non-finite step, no sync
        optimizer.step()
        del optimizer.found_inf
        if averager is not None:
            averager.update((1 - EMA_DECAY) * (~bad).float())  # a skipped step leaves the EMA as it is
        return loss.detach()

    if not graphed:
        return lambda: one_step(images, labels)
    graph_step = GraphedStep(one_step, warmup_steps=GRAPH_WARMUP)
    return lambda: graph_step(images, labels)


def time_steps(step, steps: int, device: torch.device, reset_peak: bool = True) -> tuple[list[float], float | None]:
    """Milliseconds of each of ``steps`` steps, and the peak memory (GB) over them (None on the CPU); with
    ``reset_peak`` False, the peak since the caller last reset it."""
    if device.type != "cuda":
        return [time_call(step, device) * 1e3 for _ in range(steps)], None
    torch.cuda.synchronize()
    if reset_peak:
        torch.cuda.reset_peak_memory_stats()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events], torch.cuda.max_memory_allocated() / 1e9


def measure(name: str, impl: str, batch: int, args, device: torch.device) -> dict:
    """One configuration: build the model on the device, warm up, time; step_ms is the median."""
    torch.manual_seed(0)
    with device:
        model = create_model(name, args.input_size, IN_CHANNELS, NUM_CLASSES, backend=impl.split("+")[0])
    if args.activation_checkpointing != "decoder" or model.config.use_decoder:
        model.set_activation_checkpointing(args.activation_checkpointing)
    model.set_keep_norm_outputs(args.keep_norm_outputs)
    step = make_step(model, batch, device, compile_mode(impl), args.ema)
    first_s = None
    # +graph: the eager steps, the capture and one replay all before the timed steps.  A replay allocates
    # nothing (the graph's memory was allocated while capturing): its peak is taken from the first step on.
    graphed = compile_mode(impl) == "graph"
    warmup = max(args.warmup, GRAPH_WARMUP + 2) if graphed else args.warmup
    if graphed and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stacks = os.path.join(args.results, "first_step_stacks.txt") if args.stack_dumps > 0 else None
    for i in range(warmup):
        t0 = time.perf_counter()
        if i == 0:  # the first step pays for compilation (and Triton's kernel builds)
            with stack_dumps(stacks, args.stack_dumps, f"{name} {impl} batch {batch}, first step"):
                step()
                sync(device)
            first_s = time.perf_counter() - t0
        else:
            step()
    times, peak = time_steps(step, args.steps, device, reset_peak=not graphed)
    ms = statistics.median(times)
    return dict(step_ms=ms, step_ms_min=min(times), imgs_per_s=batch / (ms * 1e-3), peak_mem_gb=peak,
                first_step_s=first_s)


def compile_mode(impl: str) -> str:
    """'none', 'full' (``+compile``), 'regional' (``+regional``) or 'graph' (``+graph``)."""
    return {"compile": "full", "regional": "regional", "graph": "graph"}[impl.split("+")[1]] if "+" in impl else "none"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    """Release the last configuration: its objects, compiled graphs and cached CUDA blocks."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def new_row(name: str, impl: str, batch: int, args, device: torch.device, gflops: float) -> dict:
    """A result row with every field, the measured ones None until measured."""
    return dict(model=name, impl=impl, batch=batch, resolution=8 * args.input_size, input_size=args.input_size,
                mask_ratio=MASK_RATIO if name.startswith("MaskDiT") else 0.0,
                precision="bf16" if device.type == "cuda" else "fp32", train_gflops_per_img=gflops,
                step_ms=None, step_ms_min=None, imgs_per_s=None, peak_mem_gb=None, tflops=None, mfu=None,
                first_step_s=None,
                oom=False, error=None)


def fill_row(row: dict, args, device: torch.device, matmul_tflops: float) -> None:
    """Measure the row's configuration into it; an error (out of memory or other) is recorded, not raised."""
    try:
        row.update(measure(row["model"], row["impl"], row["batch"], args, device))
        row["tflops"] = row["train_gflops_per_img"] * row["batch"] / row["step_ms"]  # GFLOP / ms = TFLOP / s
        row["mfu"] = row["tflops"] / matmul_tflops if matmul_tflops else None
    except Exception as e:  # one failing configuration must not end the sweep
        row.update(oom=is_oom(e), error="out of memory" if is_oom(e) else f"{type(e).__name__}: {e}")
        if not row["oom"]:
            traceback.print_exc()


def sweep(args, device: torch.device, matmul_tflops: float, on_row=None) -> list[dict]:
    """Every model x implementation x batch (ascending: once a batch runs out of memory the larger ones are
    marked so without running), memory freed after each; then the speed-up fields.  ``on_row(rows)`` is
    called after every row (to save partial results)."""
    rows = []
    for name in args.models:
        gflops = train_gflops(name, args.input_size, IN_CHANNELS, NUM_CLASSES,
                              mask_ratio=MASK_RATIO if name.startswith("MaskDiT") else 0.0)
        for impl in args.impls:
            oom_at = None
            for batch in args.batches:
                row = new_row(name, impl, batch, args, device, gflops)
                if oom_at is None:
                    fill_row(row, args, device, matmul_tflops)
                    free_memory(device)  # after fill_row: a caught exception no longer holds the model
                    oom_at = batch if row["oom"] else None
                else:
                    row.update(oom=True, error=f"out of memory (skipped: batch {oom_at} already ran out)")
                rows.append(row)
                print(progress_line(row), flush=True)
                if on_row is not None:
                    on_row(rows)
    add_speedups(rows)
    return rows


def progress_line(r: dict) -> str:
    head = f"{r['model']} {r['impl']} batch {r['batch']}:"
    if r["step_ms"] is None:
        return f"{head} {r['error']}"
    mem = f", {r['peak_mem_gb']:.1f} GB" if r["peak_mem_gb"] is not None else ""
    return f"{head} {r['step_ms']:.1f} ms, {r['imgs_per_s']:.0f} img/s, {r['tflops']:.3g} TFLOP/s{mem}"


def _ratio(base: dict | None, row: dict) -> float | None:
    if base is None or base.get("step_ms") is None or row.get("step_ms") is None:
        return None
    return base["step_ms"] / row["step_ms"]


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_dit``: MaskDiT rows against DiT of the same size, impl and batch (None for DiT rows);
    ``speedup_vs_torch_eager``: every row against eager ``torch`` for its model and batch.  Ratios of
    step times (= ratios of images/s); None where either side has no time (out of memory, not run)."""
    index = {(r["model"], r["impl"], r["batch"]): r for r in rows}
    for r in rows:
        dit = None
        if r["model"].startswith("MaskDiT-"):
            dit = index.get((r["model"].replace("MaskDiT-", "DiT-", 1), r["impl"], r["batch"]))
        r["speedup_vs_dit"] = _ratio(dit, r)
        r["speedup_vs_torch_eager"] = _ratio(index.get((r["model"], "torch", r["batch"])), r)


def markdown(env: dict, matmul: tuple[float, str], args, rows: list[dict]) -> str:
    cuda = any(r["precision"] == "bf16" for r in rows)
    timing = "median of CUDA-event step times" if cuda else "median of time.perf_counter step times"
    constants = "".join(f"; kernels.{m}.{k} = {v!r}" for m, kv in args.kernel_constants.items() for k, v in kv.items())
    lines = [f"## Training step: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; "
             f"{args.input_size}x{args.input_size}x{IN_CHANNELS} latents ({8 * args.input_size}x"
             f"{8 * args.input_size} images), {NUM_CLASSES} classes; {'bf16 autocast' if cuda else 'fp32'}; "
             f"step = EDM loss fwd + bwd + fused AdamW{' + EMA' if args.ema else ''}; MaskDiT ratio {MASK_RATIO}; "
             f"{args.warmup} warm-up then {args.steps} timed steps, {timing}"
             f"{'' if args.sdpa_backend == 'auto' else f'; attention kernel: {args.sdpa_backend}'}"
             f"{'; modulated LayerNorm outputs kept (DiT.set_keep_norm_outputs)' if args.keep_norm_outputs else ''}"
             f"{constants}.",
             f"MFU against the measured {matmul[1]}: {matmul[0]:.3g} TFLOP/s.  TFLOP/s counts the model's "
             "matrix products and attention (maskdit.flops.train_gflops).  Speed-ups are step-time ratios.", "",
             "First step: seconds of the first warm-up step (compilation included).", "",
             "| model | impl | batch | res | step ms | img/s | peak GB | TFLOP/s | MFU | vs DiT | vs torch eager "
             "| first step s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['impl']} | {r['batch']} | {r['resolution']} |"
        if r["step_ms"] is None:
            lines.append(f"{head} {'OOM' if r['oom'] else 'error'} | | | | | | | |")
            continue
        lines.append(f"{head} {r['step_ms']:.1f} | {r['imgs_per_s']:.0f} | {fmt(r['peak_mem_gb'], '.2f')} | "
                     f"{r['tflops']:.3g} | {fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f', '%')} | "
                     f"{fmt(r['speedup_vs_dit'], '.2f', 'x')} | {fmt(r['speedup_vs_torch_eager'], '.2f', 'x')} | "
                     f"{fmt(r['first_step_s'], '.1f')} |")
    if any(r["mfu"] is not None and r["mfu"] > 1 for r in rows):
        lines += ["", "MFU above 100%: the matmul reference ran slower than the model's products (a machine busy with "
                  "other work while it was measured?); take these MFU figures as unreliable."]
    errors = [r for r in rows if r["error"] and not r["oom"]]
    if errors:
        lines += ["", "Errors:"] + [f"- {r['model']} {r['impl']} batch {r['batch']}: {r['error'][:200]}"
                                    for r in errors]
    return "\n".join(lines)


def plots(rows: list[dict], out: str) -> list[str]:
    """Throughput and peak memory: against batch size, a line per model + impl, or, with one batch size,
    bars per model and impl; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plots (pip install matplotlib)")
        return []
    os.makedirs(out, exist_ok=True)
    paths, lines = [], {(r["model"], r["impl"]): [] for r in rows}
    for r in rows:
        lines[(r["model"], r["impl"])].append(r)
    batches = sorted({r["batch"] for r in rows})
    models, impls = list(dict.fromkeys(r["model"] for r in rows)), list(dict.fromkeys(r["impl"] for r in rows))
    for key, ylabel, name in (("imgs_per_s", "images / s", "train_step_throughput.png"),
                              ("peak_mem_gb", "peak memory (GB)", "train_step_memory.png")):
        if all(r[key] is None for r in rows):
            print(f"no {key} values: {name} not drawn")
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if len(batches) == 1:  # bars: x = model, one bar per implementation (missing: out of memory or error)
            width = 0.8 / len(impls)
            for j, impl in enumerate(impls):
                xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(models))]
                ys = [next((r[key] for r in lines.get((m, impl), []) if r[key] is not None), 0.0) for m in models]
                ax.bar(xs, ys, width, color=f"C{IMPLS.index(impl)}", label=impl)
            ax.set_xticks(range(len(models)), models)
            ax.set(ylabel=ylabel, title=f"Training step, batch {batches[0]}: {ylabel}")
        else:
            for (model, impl), group in lines.items():  # colour: implementation; dashed: DiT, solid: MaskDiT
                pts = [(r["batch"], r[key]) for r in group if r[key] is not None]
                if pts:
                    masked = model.startswith("MaskDiT")
                    ax.plot(*zip(*pts), marker="o" if masked else "s", color=f"C{IMPLS.index(impl)}",
                            label=f"{model} {impl}", linestyle="-" if masked else "--")
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set(xlabel="batch size", ylabel=ylabel, title=f"Training step: {ylabel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = environment()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print("No CUDA device: the GPU tables (bf16, CUDA events, peak memory, triton and compiled rows) need "
              f"CUDA. Running the reduced CPU benchmark instead: {' vs '.join(args.models)}, "
              f"{args.input_size}x{args.input_size} latents, {', '.join(args.impls)}, fp32, "
              f"batch {' '.join(map(str, args.batches))}, {args.steps} timed steps.", flush=True)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    matmul = matmul_rate(device)
    print(f"matmul rate: {matmul[0]:.3g} TFLOP/s ({matmul[1]})", flush=True)
    out = args.results = results_folder(args.out, env)
    settings = dict(models=args.models, impls=args.impls, batches=args.batches, steps=args.steps,
                    warmup=args.warmup, input_size=args.input_size, ema=args.ema, quick=args.quick,
                    activation_checkpointing=args.activation_checkpointing, sdpa_backend=args.sdpa_backend,
                    keep_norm_outputs=args.keep_norm_outputs, kernel_constants=args.kernel_constants,
                    mask_ratio=MASK_RATIO, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                    precision="bf16 autocast" if device.type == "cuda" else "fp32",
                    timing="median of per-step CUDA events" if device.type == "cuda" else
                    "median of per-step time.perf_counter", cpu_threads=torch.get_num_threads())

    def save(rows):  # after every row, so a run cut short keeps what it measured
        add_speedups(rows)
        payload = dict(env, matmul_tflops=matmul[0], matmul=matmul[1], settings=settings, rows=rows)
        return payload, write_results(out, "train_step", payload, markdown(env, matmul, args, rows))

    with sdpa_backend(args.sdpa_backend), kernel_constants_set(args.kernel_constants):
        rows = sweep(args, device, matmul[0], on_row=save)
    payload, paths = save(rows)
    print(markdown(env, matmul, args, rows))
    paths += tuple(plots(rows, out))
    print("wrote", *paths)
    return payload


if __name__ == "__main__":
    main()
