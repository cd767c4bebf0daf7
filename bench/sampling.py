"""Sampling throughput: images per second of the EDM Heun sampler (``maskdit.edm_sample``) for DiT-XL/2
and MaskDiT-XL/2, eager and ``torch.compile``d, on CUDA in bf16 autocast (and fp32).

    python bench/sampling.py [--models DiT-XL/2 MaskDiT-XL/2] [--batch 64] [--steps 40] [--timed-steps 5]
                             [--impls eager regional compile] [--precisions bf16 fp32] [--compile-precisions bf16]
                             [--check-full] [--out DIR]

What is timed.  ``edm_sample(net, noise, labels, num_steps=S, cfg_scale=1.5)`` with ``net`` the EDM
denoiser (``EDMPrecond``) around a randomly initialised network (32x32x4 latents, 1000 classes; the
throughput does not depend on the weights), ``backend="triton"`` on CUDA.  S Heun steps make 2S-1 network
evaluations (the last step is an Euler step), so the 40-step sampler makes 79.  Classifier-free guidance
batches the conditional and unconditional halves: every evaluation runs the network on 2 x batch images.
``compile`` wraps the denoiser in ``torch.compile``, ``regional`` compiles its transformer blocks
(``maskdit.training.compile_network``: sample.py's and ``maskdit.evaluate``'s ``--compile full`` and
``--compile regional``); compilation happens in the warm-up calls, never in the timed ones.  On CUDA only
the bf16 rows are compiled by default (each whole XL/2 compilation costs a long warm-up; fp32 is reported
eager); ``--compile-precisions bf16 fp32`` compiles both.  A network's regional rows run after its other
rows (its blocks stay compiled).  bf16 runs the sampler
under ``torch.autocast(dtype=torch.bfloat16)`` (the denoiser's preconditioning and the Heun updates stay
fp32/fp64, as in ``edm_sample``); fp32 runs without autocast at PyTorch's default float32 matmul precision
(recorded in the JSON).

Conversion.  A full 40-step run at batch 64 on an XL/2 network takes many seconds, so by default only
``--timed-steps`` T sampler steps (2T-1 evaluations) are timed and converted with the time per evaluation:

    seconds_per_eval  = median time of the T-step sampler / (2T - 1)
    seconds_per_batch = seconds_per_eval x (2 x steps - 1)            (79 evaluations for 40 steps)
    imgs_per_s        = batch / seconds_per_batch

Every evaluation has the same shapes whatever the noise level, and the sampler's own work (fp64 Heun
updates) is per evaluation too, so the conversion is exact up to the small per-call setup.  ``--check-full``
also times the full ``--steps`` run and reports the deviation of the converted figure from it.  With
``--timed-steps`` equal to ``--steps`` nothing is converted.

Timing: CUDA events around each sampler call (``torch.cuda.synchronize`` before and after), median of
``--repeats``; elsewhere wall clock.  Without CUDA the GPU figures cannot be measured: the script says so
and runs a tiny configuration (DiT-T/2 and MaskDiT-T/2, 16x16x1 inputs, 10 classes, batch 8, fp32) so
that it is exercised.  Writes sampling.json (environment + rows) and sampling.md under ``--out``, rewritten after
every row (a run cut short, by a time limit during a compilation say, keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    check_arguments,
    environment,
    kernel_constants_set,
    results_folder,
    sync,
    time_call,
    write_results,
)
from bench.train_step import kernel_constants  # noqa: E402
from maskdit import EDMPrecond, create_model, edm_sample  # noqa: E402
from maskdit.training import compile_network  # noqa: E402

CFG_SCALE = 1.5
GPU_DEFAULTS = dict(models=["DiT-XL/2", "MaskDiT-XL/2"], batch=64, input_size=32, in_channels=4, num_classes=1000,
                    precisions=["bf16", "fp32"], compile_precisions=["bf16"], repeats=3, warmup=1)
CPU_DEFAULTS = dict(models=["DiT-T/2", "MaskDiT-T/2"], batch=8, input_size=16, in_channels=1, num_classes=10,
                    precisions=["fp32"], compile_precisions=["fp32"], repeats=3, warmup=1)
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODE = {"eager": "none", "regional": "regional", "compile": "full"}  # impl -> compile_network's mode


def heun_evals(steps: int) -> int:
    """Network evaluations of the EDM Heun sampler with ``steps`` steps (the last step is Euler)."""
    return 2 * steps - 1


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` (at least one) calls of ``fn()``, each timed alone (``time_call``)."""
    return statistics.median(time_call(fn, device) for _ in range(max(1, repeats)))


def build_denoiser(name: str, args, device: torch.device) -> EDMPrecond:
    """The EDM denoiser around a randomly initialised network ``name`` (eval mode, on ``device``)."""
    backend = args.backend if args.backend != "auto" else "triton" if device.type == "cuda" else "torch"
    with torch.device(device):  # initialise the weights in place (XL/2: 675M parameters)
        model = create_model(name, input_size=args.input_size, in_channels=args.in_channels,
                             num_classes=args.num_classes, backend=backend)
    return EDMPrecond(model).eval()


def make_sampler(net, inputs: dict, precision: str, device: torch.device, num_classes: int):
    """A function of ``num_steps`` that runs the guided Heun sampler on fixed noise and labels."""
    amp = AMP_DTYPES[precision]

    def sample(num_steps: int) -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            return edm_sample(net, inputs["noise"], inputs["labels"], num_steps=num_steps, cfg_scale=CFG_SCALE,
                              null_label=num_classes)

    return sample


def sampler_inputs(batch: int, args, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, args.in_channels, args.input_size, args.input_size, generator=g)
    labels = torch.randint(0, args.num_classes, (batch,), generator=g)
    return dict(noise=noise.to(device), labels=labels.to(device))


def measure(denoiser: EDMPrecond, name: str, impl: str, precision: str, args, device: torch.device) -> dict:
    """One table row: warm-up (compilation included), then the median time of the timed sampler run."""
    row = dict(model=name, impl=impl, precision=precision, batch=args.batch, steps=args.steps,
               evals=heun_evals(args.steps), timed_steps=args.timed_steps, timed_evals=heun_evals(args.timed_steps),
               network_batch=2 * args.batch, cfg_scale=CFG_SCALE, backend=denoiser.model.backend)
    torch._dynamo.reset()
    net = compile_network(denoiser, COMPILE_MODE[impl], backend=args.compile_backend)
    if impl != "eager":
        row["compile_backend"] = args.compile_backend
    sample = make_sampler(net, sampler_inputs(args.batch, args, device), precision, device, args.num_classes)

    t0 = time.perf_counter()
    for _ in range(max(1, args.warmup)):  # the first call compiles; the same shapes serve every later call
        sample(args.timed_steps)
    sync(device)
    row["warmup_seconds"] = time.perf_counter() - t0

    timed = median_seconds(lambda: sample(args.timed_steps), device, args.repeats)
    per_eval = timed / row["timed_evals"]
    row.update(repeats=args.repeats, timed_seconds=timed, seconds_per_eval=per_eval,
               seconds_per_batch=per_eval * row["evals"], extrapolated=args.timed_steps != args.steps)
    row["imgs_per_s"] = args.batch / row["seconds_per_batch"]
    if args.check_full and row["extrapolated"]:
        full = median_seconds(lambda: sample(args.steps), device, args.repeats)
        row.update(full_seconds_per_batch=full, full_imgs_per_s=args.batch / full,
                   extrapolation_error_pct=100 * (row["seconds_per_batch"] - full) / full)
    return row


def model_rows(name: str, args, device: torch.device, rows: list[dict], on_row=lambda: None) -> None:
    """Every (precision, impl) row of one network, appended to ``rows`` (``on_row()`` after each); a failing row
    records its error and the others go on."""
    try:
        denoiser = build_denoiser(name, args, device)
    except Exception as e:
        traceback.print_exc()
        rows.append(dict(model=name, impl="-", precision="-", batch=args.batch, error=f"{type(e).__name__}: {e}"))
        on_row()
        return
    # (regional compilation changes the network in place: its rows come last)
    rows_to_run = [(impl, precision) for precision in args.precisions for impl in args.impls]
    for impl, precision in sorted(rows_to_run, key=lambda row: row[0] == "regional"):
        if impl != "eager" and precision not in args.compile_precisions:
            continue
        try:
            rows.append(measure(denoiser, name, impl, precision, args, device))
        except Exception as e:  # keep going: one broken row must not hide the others
            traceback.print_exc()
            rows.append(dict(model=name, impl=impl, precision=precision, batch=args.batch,
                             error=f"{type(e).__name__}: {e}"))
        print(format_row(rows[-1], args.check_full), file=sys.stderr, flush=True)
        on_row()
    del denoiser
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def method_text(args, env: dict, device: torch.device) -> str:
    amp = "bf16 = torch.autocast(bfloat16)" if "bf16" in args.precisions else ""
    fp32 = f"fp32 = no autocast, float32 matmul precision '{torch.get_float32_matmul_precision()}'"
    precision = "; ".join(p for p in (amp, fp32 if "fp32" in args.precisions else "") if p)
    timing = "CUDA events" if device.type == "cuda" else "wall clock"
    conversion = (f"timed {args.timed_steps} Heun steps ({heun_evals(args.timed_steps)} evaluations); "
                  f"s/batch = (median time / {heun_evals(args.timed_steps)}) x {heun_evals(args.steps)} evaluations "
                  f"of the {args.steps}-step sampler; images/s = batch / s/batch"
                  if args.timed_steps != args.steps else f"timed the full {args.steps}-step sampler")
    constants = "".join(f" kernels.{m}.{k} = {v!r};" for m, kv in args.kernel_constants.items() for k, v in kv.items())
    return (f"EDM Heun sampler, {args.steps} steps = {heun_evals(args.steps)} network evaluations, guidance "
            f"{CFG_SCALE} (each evaluation runs the network on 2 x batch), {args.input_size}x{args.input_size}x"
            f"{args.in_channels} inputs, {args.num_classes} classes, random weights; {precision}.{constants} "
            f"{conversion}. Median of {args.repeats} runs ({timing}) after {args.warmup} warm-up run(s), which "
            f"include compilation. torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}.")


TABLE_HEAD = ["| model | impl | precision | batch | steps (evals) | s/eval | s/batch | images/s |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
CHECK_HEAD = ["| model | impl | precision | batch | steps (evals) | s/eval | s/batch | images/s | "
              "full-run s/batch | converted vs full |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]


def format_row(r: dict, check_full: bool = False) -> str:
    head = f"| {r['model']} | {r['impl']} | {r['precision']} | {r['batch']} |"
    if "error" in r:
        return f"{head} error: {r['error'][:100]} | | | |" + (" | |" if check_full else "")
    line = (f"{head} {r['steps']} ({r['evals']}) | {r['seconds_per_eval'] * 1e3:.2f} ms | "
            f"{r['seconds_per_batch']:.3f} | {r['imgs_per_s']:.2f} |")
    if check_full:
        if "full_seconds_per_batch" in r:
            line += f" {r['full_seconds_per_batch']:.3f} | {r['extrapolation_error_pct']:+.1f}% |"
        else:
            line += " | |"
    return line


def markdown(env: dict, args, rows: list[dict], device: torch.device) -> str:
    lines = [f"## Sampling throughput: {env['device']}", "", method_text(args, env, device), ""]
    if device.type != "cuda":
        lines += ["No CUDA: a tiny configuration that exercises the script, not the GPU figures.", ""]
    lines += CHECK_HEAD if args.check_full else TABLE_HEAD
    lines += [format_row(r, args.check_full) for r in rows]
    return "\n".join(lines)


def parse_args(argv, cuda: bool) -> argparse.Namespace:
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=defaults["models"], help="model names (maskdit.MODEL_NAMES)")
    p.add_argument("--batch", type=int, default=defaults["batch"], help="images per sampler call")
    p.add_argument("--steps", type=int, default=40, help="sampler steps of the reported figure")
    p.add_argument("--timed-steps", type=int, default=5, help="sampler steps actually timed (<= --steps)")
    p.add_argument("--impls", nargs="+", choices=tuple(COMPILE_MODE), default=["eager", "regional", "compile"],
                   help="eager, regional (blocks compiled) and compile (the whole denoiser compiled)")
    p.add_argument("--precisions", nargs="+", choices=tuple(AMP_DTYPES), default=defaults["precisions"])
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="network ops: auto = triton (fused kernels) on CUDA, torch elsewhere")
    p.add_argument("--compile-precisions", nargs="+", choices=tuple(AMP_DTYPES), default=defaults["compile_precisions"],
                   help="precisions that also get a compiled row (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    p.add_argument("--repeats", type=int, default=defaults["repeats"], help="timed runs (median)")
    p.add_argument("--warmup", type=int, default=defaults["warmup"], help="untimed runs first (compile in the first)")
    p.add_argument("--check-full", action="store_true", help="also time the full --steps run (checks the conversion)")
    p.add_argument("--input-size", type=int, default=defaults["input_size"])
    p.add_argument("--in-channels", type=int, default=defaults["in_channels"])
    p.add_argument("--num-classes", type=int, default=defaults["num_classes"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: unchanged)")
    p.add_argument("--kernel-constant", nargs="+", default=[], metavar="MODULE.NAME=VALUE",
                   help="set constants of kernels/ modules for the run, as bench/train_step.py's (e.g. "
                        "gelu_gemm.INFERENCE=False: the MLP's GELU outside fc1's product)")
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    check_arguments(p, args, models="models", at_least_one=("batch", "steps", "timed_steps", "repeats", "input_size",
                                                            "in_channels", "num_classes"))
    if not 1 <= args.timed_steps <= args.steps:
        p.error(f"--timed-steps must be in [1, --steps], got {args.timed_steps}")
    try:
        args.kernel_constants = kernel_constants(args.kernel_constant)
    except ValueError as e:
        p.error(f"--kernel-constant: {e}")
    return args


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args = parse_args(argv, cuda)
    command = " ".join([os.path.basename(sys.executable), "bench/sampling.py", *(argv if argv is not None
                                                                                  else sys.argv[1:])])
    env = environment(command)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cuda:
        print("no CUDA: the GPU figures (XL/2, batch 64, bf16) need CUDA; running a tiny CPU configuration "
              f"({', '.join(args.models)}, batch {args.batch}, {args.input_size}x{args.input_size}x{args.in_channels}, "
              f"{', '.join(args.precisions)}) to exercise the script", flush=True)
    print(*(CHECK_HEAD if args.check_full else TABLE_HEAD), sep="\n", file=sys.stderr, flush=True)  # progress
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "kernel_constant")}
    out = results_folder(args.out, env)
    rows: list[dict] = []

    def save():  # after every row, so a run cut short by a time limit (a long compilation) keeps what it measured
        payload = dict(env, float32_matmul_precision=torch.get_float32_matmul_precision(),
                       cpu_threads=torch.get_num_threads(), settings=settings, rows=rows)
        return payload, write_results(out, "sampling", payload, markdown(env, args, rows, device))

    with kernel_constants_set(args.kernel_constants):
        for name in args.models:
            model_rows(name, args, device, rows, on_row=save)
    payload, paths = save()
    print(markdown(env, args, rows, device))
    print("wrote", *paths)
    return payload


if __name__ == "__main__":
    main()
