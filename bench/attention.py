"""Attention at the training step's shapes, per SDPA backend: which kernel to use for short sequences.

    python bench/attention.py [--batch 256] [--out DIR]

MaskDiT's encoder attends over 128 kept tokens (head dim 72 at XL/2), its decoder over 256 tokens (head dim
32), DiT over 256 (head dim 72): short sequences, where a FlashAttention-style kernel has one or two key
tiles per query tile and its efficiency is far from a long-sequence figure.  For each shape, q, k and v are
views of one packed (T, 3, heads, head_dim) bf16 projection, as in ``maskdit.models.Attention``, and
``F.scaled_dot_product_attention`` runs with PyTorch's own choice ("default") and with each backend forced
(cuDNN, flash, memory-efficient, math; flash-attn's ``flash_attn_func`` too when installed), FlexAttention
compiled by Inductor (Triton kernels generated for each shape, forward and backward), and PyTorch's
choice on contiguous (B, heads, S, head_dim) q, k, v (does the packed layout cost copies?), and, for a head
dim that is not a multiple of 32 (72 at XL), PyTorch's choice with each head zero-padded to the next multiple
of 16 and 32 and to 128 (would a projection writing padded heads pay for its extra work?).  Reports the
median forward and forward + backward milliseconds (``triton.testing.do_bench``, CUDA events) and TFLOP/s
(forward 4 * B * heads * S^2 * head_dim; backward 2.5 times that).  A backend that rejects the inputs gets
its error in the row.  Without CUDA, a smoke run at tiny shapes on the CPU (default and math).
Writes attention.json / attention.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import bench_ms, environment, results_folder, write_results  # noqa: E402
from maskdit.attention import HAS_FLASH_ATTN  # noqa: E402
from maskdit.config import model_config  # noqa: E402


def shapes(batch: int, input_size: int) -> list[dict]:
    """(name, batch, sequence, heads, head_dim) of the attention layers of the XL/2 training step."""
    mask = model_config("MaskDiT-XL/2", input_size=input_size)
    dit = model_config("DiT-XL/2", input_size=input_size)
    tokens = (input_size // 2) ** 2
    return [
        dict(name="MaskDiT-XL/2 encoder", batch=batch, seq=tokens // 2, heads=mask.num_heads,
             head_dim=mask.hidden_size // mask.num_heads, layers=mask.depth),
        dict(name="MaskDiT-XL/2 decoder", batch=batch, seq=tokens, heads=mask.decoder_num_heads,
             head_dim=mask.decoder_hidden_size // mask.decoder_num_heads, layers=mask.decoder_depth),
        dict(name="DiT-XL/2", batch=batch, seq=tokens, heads=dit.num_heads, head_dim=dit.hidden_size // dit.num_heads,
             layers=dit.depth),
    ]


def backends(cuda: bool) -> dict:
    """name -> callable(q, k, v) on (B, heads, S, head_dim) views."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    out = {"default": F.scaled_dot_product_attention, "math": forced(SDPBackend.MATH)}
    if cuda:
        out.update({"cudnn": forced(SDPBackend.CUDNN_ATTENTION), "flash": forced(SDPBackend.FLASH_ATTENTION),
                    "efficient": forced(SDPBackend.EFFICIENT_ATTENTION)})
        try:  # a Triton kernel Inductor generates for these shapes (forward and backward)
            from torch.nn.attention.flex_attention import flex_attention

            out["flex (compiled)"] = torch.compile(flex_attention, dynamic=False)
        except ImportError:
            pass
        if HAS_FLASH_ATTN:
            from flash_attn import flash_attn_func

            out["flash-attn package"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return out


def measure(shape: dict, fn, device, dtype, layout: str = "packed", padded_dim: int | None = None) -> dict:
    """Forward and forward + backward ms of ``fn``, and TFLOP/s, with q, k, v as views of one packed
    (B*S, 3, heads, head_dim) projection (``layout`` "packed", the model's) or as contiguous (B, heads, S,
    head_dim) tensors ("contiguous": what a projection writing head-major output would give).  ``padded_dim``:
    the packed q, k, v carry that many values a head (the head dim and zeros, as a projection with zero rows
    would write them; ``fn`` must scale by the real head dim); FLOPs are counted at the real head dim."""
    b, s, h, d = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"]
    width = padded_dim or d
    if layout == "packed":
        qkv = torch.randn(b * s, 3, h, width, device=device, dtype=dtype)
        qkv[..., d:] = 0
        qkv.requires_grad_()
        q, k, v = (t.view(b, s, h, width).transpose(1, 2) for t in qkv.unbind(1))
    else:
        qkv = torch.randn(3, b, h, s, width, device=device, dtype=dtype, requires_grad=True)
        q, k, v = qkv.unbind(0)
    grad = torch.randn(b, h, s, width, device=device, dtype=dtype)
    fwd_flop = 4 * b * h * s * s * d

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(fn(q, k, v), qkv, grad)

    fwd_ms, total_ms = bench_ms(fwd), bench_ms(fwd_bwd)
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=total_ms, fwd_tflops=fwd_flop / (fwd_ms * 1e-3) / 1e12,
                fwd_bwd_tflops=3.5 * fwd_flop / (total_ms * 1e-3) / 1e12,
                step_ms=total_ms * shape["layers"])


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"## Attention per SDPA backend: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; `{env['command']}`. "
             "bf16 (fp32 on the CPU), q/k/v views of one packed projection; median of `triton.testing.do_bench` "
             "(CUDA events). TFLOP/s: forward 4 B h S^2 d, backward 2.5x. Step ms: fwd+bwd times the layers of "
             "that kind in one training step.", "",
             "| layers | B x heads x S x head_dim | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | "
             "step ms |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        dims = f"{r['batch']} x {r['heads']} x {r['seq']} x {r['head_dim']}"
        if "error" in r:
            lines.append(f"| {r['name']} | {dims} | {r['backend']} | error: {r['error'][:90]} | | | | |")
        else:
            lines.append(f"| {r['name']} | {dims} | {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
                         f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} | {r['step_ms']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, help="batch size (default 256; CPU 2)")
    p.add_argument("--input-size", type=int, help="latent size (default 32: 256x256 images; CPU 8)")
    p.add_argument("--out", help="results folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        print("no CUDA: a smoke run at tiny shapes on the CPU (the table needs a GPU)")
    env = environment()
    rows = []
    for shape in shapes(args.batch or (256 if cuda else 2), args.input_size or (32 if cuda else 8)):
        fns = backends(cuda)
        runs = [(name, fns[name], "packed", None) for name in fns] + [("default, contiguous q/k/v",
                                                                        fns["default"], "contiguous", None)]
        d = shape["head_dim"]
        if d % 32:  # (72 at XL) the same attention with each head zero-padded to a wider, kernel-friendlier dim
            runs += [(f"default, head dim padded to {w}", lambda q, k, v, d=d: F.scaled_dot_product_attention(
                q, k, v, scale=d ** -0.5), "packed", w) for w in sorted({-(-d // 16) * 16, -(-d // 32) * 32, 128})
                if w > d]
        for name, fn, layout, padded in runs:
            row = dict(shape, backend=name, layout=layout, padded_head_dim=padded)
            try:
                row.update(measure(shape, fn, device, dtype, layout, padded))
            except Exception as e:  # a backend that rejects these inputs: say so and go on
                row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")
                if not isinstance(e, RuntimeError):
                    traceback.print_exc()
            rows.append(row)
    md = markdown(env, rows)
    print(md)
    print("wrote", *write_results(results_folder(args.out, env), "attention", dict(env, rows=rows), md))
    return rows


if __name__ == "__main__":
    main()
