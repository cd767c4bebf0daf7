"""Time to quality on this machine: DiT and MaskDiT of the same size trained on the bundled digits for the
same wall-clock budget, the digits metric (``maskdit.digits_metric``: Frechet distance of a small
digits classifier's features, and the class accuracy of guided samples) evaluated at regular intervals.

    python bench/quality.py [--budget 240] [--evals 6] [--size T/2] [--out DIR]     (make quality)

Training time excludes evaluation time.  Writes quality.json, quality.md and quality.png (metric against
training seconds for both models) and prints the ratio of times at which MaskDiT first reaches DiT's
final quality (the paper's claim at ImageNet scale: about 31% of DiT's training time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, results_folder, write_results  # noqa: E402


def run(model: str, budget: float, evals: int, extra: list[str]) -> list[dict]:
    """Train ``model`` for ``budget`` training seconds; the evaluation records of its log."""
    import train

    with tempfile.TemporaryDirectory() as out:
        train.main(["--model", model, "--steps", "1000000", "--time-budget", str(budget),
                    "--eval-every-seconds", str(budget / evals), "--grid-per-class", "0", "--ckpt-every", "1000000",
                    "--out", out, *extra])
        with open(os.path.join(out, "log.jsonl")) as f:
            return [r for r in map(json.loads, f) if "digits_fd" in r]


def first_time_reaching(records: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation whose Frechet distance is <= target."""
    return next((r["train_seconds"] for r in records if r["digits_fd"] <= target), None)


def plot(curves: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: quality.png not drawn")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, records in curves.items():
        t = [r["train_seconds"] for r in records]
        axes[0].plot(t, [r["digits_fd"] for r in records], marker="o", label=name)
        axes[1].plot(t, [r["class_accuracy"] for r in records], marker="o", label=name)
    axes[0].set(xlabel="training seconds (2 CPU cores)", ylabel="digits Frechet distance (lower is better)",
                yscale="log")
    axes[1].set(xlabel="training seconds (2 CPU cores)", ylabel="class accuracy of guided samples")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per model (default 240)")
    parser.add_argument("--evals", type=int, default=6, help="evaluations per run (default 6)")
    parser.add_argument("--size", default="T/2", help="model size for both (default T/2)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    parser.add_argument("train_args", nargs="*", help="extra train.py flags after --")
    args = parser.parse_args(argv)
    env = environment()
    curves = {name: run(name, args.budget, args.evals, args.train_args)
              for name in (f"DiT-{args.size}", f"MaskDiT-{args.size}")}
    dit, maskdit = curves.values()
    target = dit[-1]["digits_fd"]
    t_dit, t_maskdit = dit[-1]["train_seconds"], first_time_reaching(maskdit, target)
    ratio = t_maskdit / t_dit if t_maskdit is not None else None
    lines = [f"## Time to quality on digits: {env['device']}", "",
             f"Same training budget ({args.budget:.0f} s each, evaluation excluded), {env['date']}, "
             f"torch {env['torch']}. Metric: digits Frechet distance / class accuracy (maskdit.digits_metric).",
             "", "| model | train s | steps | digits FD | class acc |", "|---|---:|---:|---:|---:|"]
    for name, records in curves.items():
        for r in records:
            lines.append(f"| {name} | {r['train_seconds']:.0f} | {r['step']} | {r['digits_fd']:.3f} | "
                         f"{r['class_accuracy']:.3f} |")
    verdict = (f"MaskDiT first reaches DiT's final digits FD ({target:.3f}) after {t_maskdit:.0f} s, "
               f"{100 * ratio:.0f}% of DiT's {t_dit:.0f} s" if ratio is not None else
               f"MaskDiT does not reach DiT's final digits FD ({target:.3f}) within the budget")
    verdict += f"; DiT itself first reached it after {first_time_reaching(dit, target):.0f} s."
    lines += ["", verdict]
    md = "\n".join(lines)
    print(md)
    out = results_folder(args.out, env)
    os.makedirs(out, exist_ok=True)
    plot(curves, os.path.join(out, "quality.png"))
    write_results(out, "quality", dict(env, budget_s=args.budget, curves=curves, target_fd=target,
                                       maskdit_seconds_to_target=t_maskdit, dit_seconds=t_dit, ratio=ratio), md)


if __name__ == "__main__":
    main()
