"""The triton training step under variants of its settings, timed interleaved: which pending choice pays.

    python bench/step_variants.py [--models MaskDiT-XL/2 DiT-XL/2] [--batch 256] [--variants V ...]
                                  [--rounds 4] [--steps 5] [--warmup 2] [--out DIR]

A variant is one or more settings joined by "+", optionally named by a "LABEL:" prefix:

    base                   the defaults
    sdpa=KERNEL            the attention kernel (``maskdit.attention.set_sdpa_backend``: triton, cudnn, flash, ...)
    keep_norm              the modulated LayerNorm outputs kept for the backward (``DiT.set_keep_norm_outputs``)
    checkpointing=WHICH    activation checkpointing (``DiT.set_activation_checkpointing``)
    MODULE.NAME=VALUE      a launch-parameter constant of ``kernels.MODULE`` (as train_step.py's --kernel-constant)

The default variants are the choices not yet settled by a whole step: the MLP's GELU in its products' epilogues
(``kernels.gelu_gemm``: forward and backward, each alone, and both with the kept LayerNorm outputs).  The H100
run of 2026-11-27 timed the project's Triton attention kernel, the kept outputs and the LayerNorm backwards'
rows as two column blocks (``bench/results/nvidia-h100-80gb-hbm3/step_variants.md``).

Method (CUDA): per model, one model and one eager triton step (``bench.train_step.make_step``: bf16 autocast,
EDM loss forward + backward, fused AdamW, EMA) at ``--batch``; every variant first runs ``--warmup`` steps
(its kernels compile there), then ``--rounds`` rounds in which each variant runs ``--steps`` steps timed one
by one with CUDA events, the variants' order rotated from round to round so that drift (clocks, heat) falls
on all of them.  Reported per variant: the median step time over all its timed steps; its speed-up over the
first variant (``base`` by default), the ratio of their medians within each round, as the median over the
rounds with the lowest and highest; and its peak memory (``torch.cuda.max_memory_allocated`` over its
steps: weights, gradients, AdamW and EMA state included).  Interleaving compares like with like where
separate runs (``make gpu-check`` parts ``tattn``, ``keep``, ``split``) each build their own model on a GPU
that may have warmed up in between.  A variant that fails (out of memory, say) is recorded with its error
and left out of the later rounds.

Without CUDA the same machinery runs on a tiny MaskDiT (depth 1, width 64, 8x8x4 inputs, batch 2) under the
Triton interpreter, timed with ``time.perf_counter``: a check that every variant applies and is undone,
whose times mean nothing.

Writes step_variants.json (environment, settings, rows) and step_variants.md into ``--out`` (default
bench/results/<device>).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_arguments, environment, fmt, kernel_constants_set, results_folder, write_results  # noqa: E402
from bench.train_step import IN_CHANNELS, NUM_CLASSES, is_oom, kernel_constants, make_step, time_steps  # noqa: E402
from maskdit.attention import DENSE_KERNELS, sdpa_backend  # noqa: E402
from maskdit.models import CHECKPOINTING, create_model  # noqa: E402

GELU_GEMM = "gelu_gemm.FORWARD=True+gelu_gemm.BACKWARD=True"
DEFAULT_VARIANTS = ["base", f"gelu_gemm:{GELU_GEMM}", "gelu_gemm forward:gelu_gemm.FORWARD=True",
                    "gelu_gemm backward:gelu_gemm.BACKWARD=True", "keep_norm",
                    f"gelu_gemm+keep_norm:{GELU_GEMM}+keep_norm"]
CPU_MODEL = dict(input_size=8, depth=1, decoder_depth=1, hidden_size=64, num_heads=4, decoder_hidden_size=32,
                 decoder_num_heads=2)  # the tiny structure of the CPU check


def parse_variant(text: str) -> dict:
    """{"name", "sdpa", "keep_norm", "checkpointing", "constants"} from a variant's text ("LABEL:" names it,
    else the text does); ValueError naming the setting that is wrong."""
    label, colon, settings = text.partition(":")
    if not colon:
        label, settings = "", text
    elif not label.strip():
        raise ValueError(f"{text!r}: an empty label before ':'")
    variant = dict(name=label.strip() or text, sdpa=None, keep_norm=False, checkpointing=None, constants={})
    for setting in settings.split("+"):
        setting = setting.strip()
        key, sep, value = setting.partition("=")
        if setting == "base":
            continue
        if setting == "keep_norm":
            variant["keep_norm"] = True
        elif key == "sdpa" and sep:
            if value not in DENSE_KERNELS:
                raise ValueError(f"{setting!r}: the attention kernel must be one of {DENSE_KERNELS}")
            variant["sdpa"] = value
        elif key == "checkpointing" and sep:
            if value not in CHECKPOINTING:
                raise ValueError(f"{setting!r}: activation checkpointing must be one of {CHECKPOINTING}")
            variant["checkpointing"] = value
        elif "." in key and sep:
            for module, values in kernel_constants([setting]).items():
                variant["constants"].setdefault(module, {}).update(values)
        else:
            raise ValueError(f"{setting!r} is not a setting: base, keep_norm, sdpa=KERNEL, checkpointing=WHICH "
                             "or MODULE.NAME=VALUE")
    return variant


@contextlib.contextmanager
def applied(variant: dict, model):
    """Within the block, ``model`` and the kernels run with ``variant``'s settings; the defaults after it."""
    with contextlib.ExitStack() as stack:
        if variant["sdpa"] is not None:
            stack.enter_context(sdpa_backend(variant["sdpa"]))
        stack.enter_context(kernel_constants_set(variant["constants"]))
        keep, checkpointing = model.keep_norm_outputs, model.activation_checkpointing
        stack.callback(model.set_keep_norm_outputs, keep)
        stack.callback(model.set_activation_checkpointing, checkpointing)
        model.set_keep_norm_outputs(variant["keep_norm"])
        if variant["checkpointing"] is not None:
            model.set_activation_checkpointing(variant["checkpointing"])
        yield


def compare(name: str, variants: list[dict], args, device: torch.device, on_round=None) -> list[dict]:
    """The rows of one model: every variant warmed up, then timed in rotated rounds (``on_round(rows)``, the rows
    summarized so far, after each: results saved as they come)."""
    torch.manual_seed(0)
    shape = CPU_MODEL if device.type != "cuda" else dict(input_size=args.input_size)
    with device:
        model = create_model(name, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, backend="triton", **shape)
    step = make_step(model, args.batch, device, "none", ema=True)
    rows = [dict(model=name, batch=args.batch, variant=v["name"], times=[], round_ms=[], peak_mem_gb=None,
                 error=None) for v in variants]

    def visit(i: int, steps: int, timed: bool) -> None:
        row = rows[i]
        if row["error"] is not None:
            return
        try:
            with applied(variants[i], model):
                times, peak = time_steps(step, steps, device)  # (peak: over these steps, None on the CPU)
            if peak is not None:
                row["peak_mem_gb"] = max(peak, row["peak_mem_gb"] or 0.0)
        except Exception as e:  # a failing variant must not end the comparison
            row["error"] = "out of memory" if is_oom(e) else f"{type(e).__name__}: {e}"
            if not is_oom(e):
                traceback.print_exc()
        if row["error"] is not None:  # (after the except clause, which kept the failed step's frames alive)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        if timed:
            row["times"] += times
            row["round_ms"].append(statistics.median(times))

    for i in range(len(variants) if args.warmup else 0):
        visit(i, args.warmup, timed=False)
    for r in range(args.rounds):
        order = [(r + j) % len(variants) for j in range(len(variants))]
        for i in order:
            visit(i, args.steps, timed=True)
        done = [row for row in rows if row["error"] is None]
        print(f"{name} round {r + 1}/{args.rounds}: " +
              ", ".join(f"{row['variant']} {row['round_ms'][-1]:.1f} ms" for row in done), flush=True)
        summarize(rows)
        if on_round is not None:
            on_round(rows)
    summarize(rows)
    return rows


def summarize(rows: list[dict]) -> None:
    """Each row's median step and its speed-up over the first row: the ratios of their medians in the rounds
    both completed (median, lowest, highest); None where either failed."""
    base = rows[0]
    for row in rows:
        row["step_ms"] = statistics.median(row["times"]) if row["error"] is None and row["times"] else None
        pairs = list(zip(base["round_ms"], row["round_ms"])) if base["error"] is None and row["error"] is None \
            else []
        ratios = [b / v for b, v in pairs]
        row["speedup"] = statistics.median(ratios) if ratios else None
        row["speedup_min"] = min(ratios) if ratios else None
        row["speedup_max"] = max(ratios) if ratios else None


def markdown(env: dict, args, rows: list[dict]) -> str:
    cuda = any(r["peak_mem_gb"] is not None for r in rows)
    timing = "CUDA events" if cuda else "time.perf_counter (CPU check: the Triton interpreter, tiny model)"
    lines = [f"## Training-step variants: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; `{env['command']}`.",
             f"Eager triton step (bf16 autocast on CUDA, EDM loss fwd + bwd, fused AdamW, EMA), batch {args.batch}; "
             f"each variant {args.warmup} warm-up steps, then {args.rounds} rounds of {args.steps} timed steps "
             f"({timing}), the variants' order rotated each round. Speed-up over the first variant: median of "
             "the per-round ratios of median step times [lowest, highest].", "",
             "| model | variant | step ms | speed-up [range] | peak GB |", "|---|---|---:|---|---:|"]
    for r in rows:
        if r["error"] is not None:
            lines.append(f"| {r['model']} | {r['variant']} | {r['error'][:120]} | | |")
            continue
        spread = f" [{r['speedup_min']:.3f}, {r['speedup_max']:.3f}]" if r["speedup"] is not None else ""
        lines.append(f"| {r['model']} | {r['variant']} | {fmt(r['step_ms'], '.1f')} | "
                     f"{fmt(r['speedup'], '.3f', 'x')}{spread} | {fmt(r['peak_mem_gb'], '.2f')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["MaskDiT-XL/2", "DiT-XL/2"])
    p.add_argument("--batch", type=int, help="batch size (default 256 on CUDA, 2 on the CPU)")
    p.add_argument("--input-size", type=int, default=32, help="latent size on CUDA (default 32: 256x256 images)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="the first is the reference (default: base and the README's untimed choices)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps of a variant in a round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each variant first (compilation)")
    p.add_argument("--out", help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    check_arguments(p, args, models="models", at_least_one=("input_size",))
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        p.error("--rounds, --steps and --batch must be >= 1, --warmup >= 0")
    try:
        args.parsed = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        p.error(f"--variants: {e}")
    names = [v["name"] for v in args.parsed]
    if len(set(names)) != len(names):
        p.error(f"--variants: each name once, got {names}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            sys.exit("No CUDA device: the CPU check runs the Triton kernels in the interpreter; set TRITON_INTERPRET=1")
        print("No CUDA device: checking the variants on a tiny MaskDiT under the Triton interpreter (times mean "
              "nothing).", flush=True)
    args.batch = args.batch or (256 if device.type == "cuda" else 2)
    env = environment()
    settings = dict(batch=args.batch, input_size=args.input_size if device.type == "cuda" else CPU_MODEL,
                    rounds=args.rounds, steps=args.steps, warmup=args.warmup, variants=args.variants)
    rows = []

    def save(current: list[dict], final: bool = False) -> dict:
        """Write the rows so far (a run cut short keeps every round it finished)."""
        done = [{k: v for k, v in r.items() if k != "times"} for r in rows + current]
        md = markdown(env, args, done)
        payload = dict(env, settings=settings, rows=done)
        paths = write_results(results_folder(args.out, env), "step_variants", payload, md)
        if final:
            print(md)
            print("wrote", *paths)
        return payload

    for name in args.models:
        rows += compare(name, args.parsed, args, device, on_round=save)
        gc.collect()  # the model and its step, before the next model is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return save([], final=True)


if __name__ == "__main__":
    main()
