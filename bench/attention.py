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
of 16 and 32 and to 128 (would a projection writing padded heads pay for its extra work?).  And the project's
Triton kernel (``kernels/attention.py``), twice: ``kernels.flash_attention`` on the same q, k, v views (its dq,
dk, dv then stacked by autograd into the projection's gradient, as the SDPA rows' are), and
``kernels.qkv_attention`` on the packed projection output with an fp32 bias leaf, whose backward writes that
gradient in one piece and sums the bias's: an SDPA step pays for the same in autograd's stack of dq, dk, dv
(in the SDPA rows' time) and the projection's bias sums, so this row's fwd + bwd is the one to hold against
theirs.  With ``--sweep``, instead of all that: at the MaskDiT encoder and decoder shapes, that row at the
kernel's launch parameters and with launch parameters of ``kernels/attention.py`` changed (``SWEEP``; the row
names them; ``make gpu-check`` part ``asweep``).  Reports the median forward and forward +
backward milliseconds (``triton.testing.do_bench``, CUDA events) and TFLOP/s (forward 4 * B * heads * S^2 *
head_dim; backward 2.5 times that).  A backend that rejects the inputs, or a launch setting that does not
compile, gets its error in the row.  Without CUDA, a smoke run at tiny shapes on the CPU (default and math; no
Triton rows: the interpreter takes seconds a call).  Writes attention.json / attention.md after each row (a
run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402
import kernels.attention as kernel_module  # noqa: E402
from bench.common import bench_ms, environment, module_constants, results_folder, write_results  # noqa: E402
from maskdit.attention import HAS_FLASH_ATTN  # noqa: E402
from maskdit.config import model_config  # noqa: E402

# launch parameters of kernels/attention.py tried against its defaults, each a row of its own (TRITON_QKV with
# these set): the forward's key step, query rows and warps; the backward's keys a program (64: the encoder's
# 128 keys in two programs, its dQ part apart; 256: the decoder's in one), query step (BWD_BLOCK_M where a
# program holds a whole sample, BWD_BLOCK_M_MULTI otherwise) and warps.  Only settings that build for sm_90
# without spilling (bench/results/offline-sm90): at head dim 72, 4 warps spill with 128-row tiles, and the
# encoder's one-program backward spills with query steps other than 64.
SWEEP = {
    "MaskDiT-XL/2 encoder": [dict(FWD_BLOCK_N=32), dict(FWD_BLOCK_N=128),
                             dict(FWD_BLOCK_M=64, FWD_BLOCK_N=32, FWD_WARPS=4), dict(BWD_BLOCK_N=64),
                             dict(BWD_BLOCK_N=64, BWD_BLOCK_M_MULTI=16),
                             dict(BWD_BLOCK_N=64, BWD_BLOCK_M_MULTI=16, BWD_WARPS=4)],
    "MaskDiT-XL/2 decoder": [dict(FWD_BLOCK_N=128), dict(FWD_BLOCK_M=64, FWD_WARPS=4), dict(BWD_BLOCK_M_MULTI=16),
                             dict(BWD_BLOCK_M_MULTI=64), dict(BWD_WARPS=4), dict(BWD_BLOCK_N=64),
                             dict(BWD_BLOCK_N=256, BWD_BLOCK_M=32)],
}
TRITON_QKV = "triton, qkv in one piece + bias sums"


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


@functools.lru_cache
def _offsets(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of ``batch`` samples of ``seq`` tokens (made once, as a training step makes its layout's)."""
    return torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=device)


def triton_flash(q, k, v):
    """``kernels.flash_attention`` on (B, heads, S, head_dim) views: their (B*S, heads, head_dim) views, one
    sample a sequence (views of the packed projection, no copy), and the output back as (B, heads, S, head_dim)."""
    b, h, s, d = q.shape
    out = kernels.flash_attention(*(t.transpose(1, 2).reshape(b * s, h, d) for t in (q, k, v)),
                                  _offsets(b, s, q.device), s)
    return out.view(b, s, h, d).transpose(1, 2)


def triton_qkv(qkv, bias, batch: int):
    """``kernels.qkv_attention`` of a packed (B*S, 3, heads, head_dim) projection output with its bias
    -> (B, heads, S, head_dim)."""
    t, _, h, d = qkv.shape
    s = t // batch
    return kernels.qkv_attention(qkv, bias, _offsets(batch, s, qkv.device), s).view(batch, s, h, d).transpose(1, 2)


def measure(shape: dict, fn, device, dtype, layout: str = "packed", padded_dim: int | None = None) -> dict:
    """Forward and forward + backward ms of ``fn``, and TFLOP/s, with q, k, v as views of one packed
    (B*S, 3, heads, head_dim) projection (``layout`` "packed", the model's) or as contiguous (B, heads, S,
    head_dim) tensors ("contiguous": what a projection writing head-major output would give), or ``fn(qkv,
    bias, B)`` of that packed projection and an fp32 (3 * heads * head_dim,) bias, the gradients of both taken
    ("qkv": ``triton_qkv``).  ``padded_dim``: the packed q, k, v carry that many values a head (the head dim and
    zeros, as a projection with zero rows would write them; ``fn`` must scale by the real head dim); FLOPs are
    counted at the real head dim."""
    b, s, h, d = shape["batch"], shape["seq"], shape["heads"], shape["head_dim"]
    width = padded_dim or d
    if layout == "contiguous":
        qkv = torch.randn(3, b, h, s, width, device=device, dtype=dtype, requires_grad=True)
        args, leaves = qkv.unbind(0), qkv
    else:
        qkv = torch.randn(b * s, 3, h, width, device=device, dtype=dtype)
        qkv[..., d:] = 0
        qkv.requires_grad_()
        if layout == "qkv":
            bias = torch.zeros(3 * h * width, device=device, dtype=torch.float32, requires_grad=True)
            args, leaves = (qkv, bias, b), (qkv, bias)
        else:
            args, leaves = [t.view(b, s, h, width).transpose(1, 2) for t in qkv.unbind(1)], qkv
    grad = torch.randn(b, h, s, width, device=device, dtype=dtype)
    fwd_flop = 4 * b * h * s * s * d

    def fwd():
        with torch.no_grad():
            fn(*args)

    def fwd_bwd():
        torch.autograd.grad(fn(*args), leaves, grad)

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


def run_row(shape: dict, name: str, fn, device, dtype, layout: str = "packed", padded: int | None = None,
            **extra) -> dict:
    """One table row: ``measure``'s figures, or the error of a backend (or launch setting) that fails here."""
    row = dict(shape, backend=name, layout=layout, padded_head_dim=padded, **extra)
    try:
        row.update(measure(shape, fn, device, dtype, layout, padded))
    except Exception as e:  # a backend that rejects these inputs, a kernel that does not compile: say so, go on
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")
        if not isinstance(e, RuntimeError):
            traceback.print_exc()
    return row


def sweep_rows(shape: dict, device, dtype):
    """The "triton, qkv ..." row at the kernel's launch parameters and at each of ``SWEEP``'s settings for this
    shape (none for other shapes)."""
    if shape["name"] not in SWEEP:
        return
    yield run_row(shape, TRITON_QKV, triton_qkv, device, dtype, "qkv", launch={})
    for settings in SWEEP[shape["name"]]:
        name = TRITON_QKV + ", " + " ".join(f"{k}={v}" for k, v in settings.items())
        with module_constants([kernel_module], **settings):
            yield run_row(shape, name, triton_qkv, device, dtype, "qkv", launch=settings)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, help="batch size (default 256; CPU 2)")
    p.add_argument("--input-size", type=int, help="latent size (default 32: 256x256 images; CPU 8)")
    p.add_argument("--out", help="results folder (default bench/results/<device>)")
    p.add_argument("--sweep", action="store_true",
                   help="only the Triton kernel's row at each launch setting of SWEEP (CUDA), into attention_sweep.*")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.sweep and not cuda:
        raise SystemExit("--sweep times the Triton kernel's launch settings: it needs CUDA")
    if not cuda:
        print("no CUDA: a smoke run at tiny shapes on the CPU, without the Triton rows (the table needs a GPU)")
    env = environment()
    folder = results_folder(args.out, env)
    rows = []

    def save():
        md = markdown(env, rows)
        return md, write_results(folder, "attention_sweep" if args.sweep else "attention", dict(env, rows=rows), md)

    for shape in shapes(args.batch or (256 if cuda else 2), args.input_size or (32 if cuda else 8)):
        if args.sweep:
            for row in sweep_rows(shape, device, dtype):
                rows.append(row)
                save()
            continue
        fns = backends(cuda)
        runs = [(name, fns[name], "packed", None) for name in fns] + [("default, contiguous q/k/v",
                                                                        fns["default"], "contiguous", None)]
        d = shape["head_dim"]
        if d % 32:  # (72 at XL) the same attention with each head zero-padded to a wider, kernel-friendlier dim
            runs += [(f"default, head dim padded to {w}", lambda q, k, v, d=d: F.scaled_dot_product_attention(
                q, k, v, scale=d ** -0.5), "packed", w) for w in sorted({-(-d // 16) * 16, -(-d // 32) * 32, 128})
                if w > d]
        if cuda:
            runs += [("triton (kernels.flash_attention)", triton_flash, "packed", None),
                     (TRITON_QKV, triton_qkv, "qkv", None)]
        for name, fn, layout, padded in runs:
            rows.append(run_row(shape, name, fn, device, dtype, layout, padded))
            save()
    md, paths = save()
    print(md)
    print("wrote", *paths)
    return rows


if __name__ == "__main__":
    main()
