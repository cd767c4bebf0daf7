"""Kernel benchmark: each fused op against its eager PyTorch reference and ``torch.compile`` of that
reference, forward and backward, at MaskDiT-XL/2 shapes (batch 256, 128 of 256 tokens kept, D 1152,
D_dec 512), with GB/s against the measured device-to-device copy bandwidth.  Plus the activation
memory and time of one MaskDiT-XL/2 training step with each backend, and the fused ops' time at 4, 8
and 16 warps per program and, for the LayerNorm ops, 2 and 4 tokens per forward program and 8, 16 and 64
per backward program (to check the launchers' choices).  Ops whose backward adds per-sample sums also get
a row in deterministic mode (``kernels._common.deterministic``).  The MLP's GEMMs with the GELU in their
epilogues (``kernels.gelu_gemm``; compute-bound, so their "% copy BW" is only the floor their extra bytes set)
also get a row for what the triton backend runs without them (cuBLAS, then ``gelu_tanh_grad``).  Results are
rewritten after every stage.

    python bench/kernels.py [--batch 256] [--step-batch 32] [--out DIR]

Timing: ``triton.testing.do_bench`` (CUDA events, median over 200 ms); the backward is timed alone, on a
graph retained from one forward.  The bytes an op "must move" count each tensor it reads or writes once
(small per-sample tensors and index vectors included).  Without CUDA the script runs at tiny shapes on the
reference ops only, to check that it works.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    bench_ms,
    check_arguments,
    copy_bandwidth_gbs,
    environment,
    graph_ms,
    l2_cache_bytes,
    module_constants,
    results_folder,
    write_results,
)

TIMING_MS = 200  # do_bench's budget per measurement in ms (with bench_ms's 50, repeated runs spread up to 45%)


def _kernel_module(name: str):
    """A module of ``kernels/`` (the package's attributes of the same names are its functions)."""
    return importlib.import_module(f"kernels.{name}")


def op_specs(n: int, L: int, k: int, d: int, dd: int, c: int, p: int, device) -> list[dict]:
    """Inputs, functions and byte counts of every fused op at the given shapes."""
    import kernels

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=torch.float32, grad=False, scale=1.0):
        t = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    t_enc, t_dec = n * k, n * L
    seg = kernels.token_samples(n, k, device)
    bf = torch.bfloat16
    mod = rnd(n, 6 * d, dtype=bf, grad=True, scale=0.3)
    specs = []

    x = rnd(t_enc, d, grad=True)
    specs.append(dict(
        name="ln_modulate", module=_kernel_module("ln_modulate"), shape=f"x ({t_enc}, {d}) fp32 -> bf16",
        fused=lambda: kernels.ln_modulate(x, mod[:, :d], mod[:, d:2 * d], seg, out_dtype=bf),
        reference=lambda: kernels.ln_modulate_reference(x, mod[:, :d], mod[:, d:2 * d], seg, out_dtype=bf),
        leaves=[x, mod], fwd_bytes=t_enc * d * (4 + 2) + 8 * t_enc, bwd_bytes=t_enc * d * (4 + 2 + 4) + 8 * t_enc))

    # with the bias of the Linear layer that made h, as the triton backend's training step runs it (the bias
    # gradient summed in the backward, where bias_grad, below, would read the dh it writes again)
    h, h_bias = rnd(t_enc, d, dtype=bf, grad=True), rnd(d, grad=True)
    specs.append(dict(
        name="gated_residual_ln_modulate", module=_kernel_module("gated_residual"),
        shape=f"x ({t_enc}, {d}) fp32, h bf16, bias fp32 -> fp32, bf16",
        fused=lambda: kernels.gated_residual_ln_modulate(x, h, mod[:, 2 * d:3 * d], mod[:, 3 * d:4 * d],
                                                         mod[:, 4 * d:5 * d], seg, out_dtype=bf, bias=h_bias),
        reference=lambda: kernels.gated_residual_ln_modulate_reference(
            x, h, mod[:, 2 * d:3 * d], mod[:, 3 * d:4 * d], mod[:, 4 * d:5 * d], seg, out_dtype=bf, bias=h_bias),
        leaves=[x, h, mod, h_bias], fwd_bytes=t_enc * d * (4 + 2 + 4 + 2) + 8 * t_enc,
        bwd_bytes=t_enc * d * (4 + 2 + 4 + 2 + 4 + 2) + 8 * t_enc))

    a, dh = rnd(t_enc, 4 * d, dtype=bf, scale=2.0), rnd(t_enc, 4 * d, dtype=bf)
    specs.append(dict(
        name="gelu_tanh_grad", module=_kernel_module("gelu"), shape=f"a, dh ({t_enc}, {4 * d}) bf16 (a backward)",
        fused=lambda: kernels.gelu_tanh_grad(a, dh), reference=lambda: kernels.gelu_tanh_grad_reference(a, dh),
        leaves=[], fwd_bytes=t_enc * 4 * d * (2 + 2 + 2 + 2) + 4 * d * 4, bwd_bytes=0))

    # the MLP's products with the GELU in their epilogues (kernels.gelu_gemm) against cuBLAS and the separate
    # elementwise pass (the eager reference forward; the triton backend's gelu_tanh_grad kernel backward)
    mlp_y, w1, b1 = rnd(t_enc, d, dtype=bf), rnd(4 * d, d, dtype=bf, scale=d ** -0.5), rnd(4 * d, dtype=bf)
    mlp_flops = 2 * t_enc * d * 4 * d  # each of the three products
    specs.append(dict(
        name="linear_gelu", module=_kernel_module("gelu_gemm"),
        shape=f"y ({t_enc}, {d}) @ w1^T ({d}, {4 * d}) bf16 (a GEMM)",
        fused=lambda: kernels.gelu_gemm.linear_gelu(mlp_y, w1, b1),
        reference=lambda: kernels.gelu_gemm.linear_gelu_reference(mlp_y, w1, b1),
        leaves=[], fwd_bytes=(t_enc * d + 4 * d * d + 2 * t_enc * 4 * d) * 2, bwd_bytes=0,
        fwd_flops=mlp_flops))
    specs.append(dict(
        name="linear_gelu_output", module=_kernel_module("gelu_gemm"),
        shape=f"y ({t_enc}, {d}) @ w1^T ({d}, {4 * d}) bf16 (a GEMM, inference)",
        fused=lambda: kernels.gelu_gemm.linear_gelu_output(mlp_y, w1, b1),
        reference=lambda: kernels.gelu_gemm.linear_gelu_reference(mlp_y, w1, b1)[1],
        leaves=[], fwd_bytes=(t_enc * d + 4 * d * d + t_enc * 4 * d) * 2, bwd_bytes=0,
        fwd_flops=mlp_flops))
    mlp_dout, w2 = rnd(t_enc, d, dtype=bf), rnd(d, 4 * d, dtype=bf, scale=(4 * d) ** -0.5)
    mlp_a = rnd(t_enc, 4 * d, dtype=bf, scale=2.0)
    specs.append(dict(
        name="gelu_grad_gemm", module=_kernel_module("gelu_gemm"),
        shape=f"dout ({t_enc}, {d}) @ w2 ({d}, {4 * d}), a bf16 (a GEMM in a backward)",
        fused=lambda: kernels.gelu_gemm.gelu_grad_gemm(mlp_dout, w2, mlp_a),
        reference=lambda: kernels.gelu_gemm.gelu_grad_gemm_reference(mlp_dout, w2, mlp_a),
        baselines={"cuBLAS + gelu_tanh_grad kernel": lambda: kernels.gelu_tanh_grad(mlp_a, mlp_dout @ w2)},
        leaves=[], fwd_bytes=(t_enc * d + 4 * d * d + 3 * t_enc * 4 * d) * 2 + 4 * d * 4, bwd_bytes=0,
        fwd_flops=mlp_flops))

    dy = rnd(t_enc, d, dtype=bf)
    specs.append(dict(
        name="bias_grad", module=_kernel_module("bias"), shape=f"dy ({t_enc}, {d}) bf16 (a backward)",
        fused=lambda: kernels.bias_grad(dy), reference=lambda: kernels.bias_grad_reference(dy),
        leaves=[], fwd_bytes=t_enc * d * 2 + d * 4, bwd_bytes=0))

    dq, dk, dv = (rnd(t_enc, d, dtype=bf) for _ in range(3))
    specs.append(dict(
        name="stack_qkv_grad", module=_kernel_module("qkv_grad"), shape=f"3 x ({t_enc}, {d}) bf16 (a backward)",
        fused=lambda: kernels.stack_qkv_grad(dq, dk, dv),
        reference=lambda: kernels.stack_qkv_grad_reference(dq, dk, dv),
        leaves=[], fwd_bytes=t_enc * 3 * d * (2 + 2) + 3 * d * 4, bwd_bytes=0))

    # the weight average over MaskDiT-XL/2's parameters (shapes from the meta device), one step of train.py's EMA
    from kernels._common import interpreting
    from kernels.ema import MultiTensorLerp, lerp_reference
    from maskdit import create_model

    with torch.device("meta"):
        net = create_model("MaskDiT-XL/2" if device.type == "cuda" else "MaskDiT-T/2")
    shapes = [q.shape for q in net.parameters()]
    params = [torch.randn(sh, generator=g).to(device) for sh in shapes]
    averages = [q.clone() for q in params]
    w_ema = torch.tensor(1e-4, device=device)
    # (the fused rows need CUDA, or the interpreter for tests/test_bench_kernels.py)
    lerp = MultiTensorLerp(averages, params) if device.type == "cuda" or interpreting() else None
    numel = sum(q.numel() for q in params)
    specs.append(dict(
        name="ema (weight average)", module=_kernel_module("ema"),
        shape=f"{len(params)} fp32 tensors, {numel / 1e6:.0f}M values", fused=lambda: lerp(w_ema),
        reference=lambda: lerp_reference(averages, params, w_ema), leaves=[], compiled=False,
        fwd_bytes=3 * 4 * numel, bwd_bytes=0))

    img = rnd(n, c, p * int(L ** 0.5), p * int(L ** 0.5))
    ids = torch.rand(n, L, generator=g).argsort(1)[:, :k].reshape(-1).to(device)
    weight, bias = rnd(d, p * p * c, grad=True, scale=0.1), rnd(d, grad=True)
    pos = rnd(L, d)
    specs.append(dict(
        name="embed_kept_patches", module=_kernel_module("patch_embed"),
        shape=f"x ({n}, {c}, {img.shape[2]}, {img.shape[3]}) -> ({t_enc}, {d}) fp32",
        fused=lambda: kernels.embed_kept_patches(img, ids, seg, weight, bias, pos, p),
        reference=lambda: kernels.embed_kept_patches_reference(img, ids, seg, weight, bias, pos, p),
        leaves=[weight, bias], fwd_bytes=t_enc * (p * p * c * 4 + d * 4 + 12) + L * d * 4,
        bwd_bytes=t_enc * (d * 4 + p * p * c * 4 + 12)))

    xk = rnd(t_enc, dd, grad=True)
    mask_token, dpos = rnd(dd, grad=True), rnd(L, dd)
    specs.append(dict(
        name="insert_mask_tokens", module=_kernel_module("unmask"), shape=f"({t_enc}, {dd}) -> ({n}, {L}, {dd}) fp32",
        fused=lambda: kernels.insert_mask_tokens(xk, ids, seg, mask_token, dpos, n),
        reference=lambda: kernels.insert_mask_tokens_reference(xk, ids, seg, mask_token, dpos, n),
        leaves=[xk, mask_token], fwd_bytes=(t_enc + t_dec) * dd * 4 + L * dd * 4 + 12 * t_enc,
        bwd_bytes=(t_enc + t_dec) * dd * 4 + 4 * t_dec))

    pp = p * p * c
    f_tok = rnd(n, L, pp, dtype=bf, grad=True)
    y = rnd(n, c, img.shape[2], img.shape[3])
    noisy = y + rnd(n, c, img.shape[2], img.shape[3])
    sigma = torch.exp(rnd(n) * 1.2 - 1.2)
    masked = torch.ones(n, L, dtype=torch.bool, device=device)
    masked.view(-1)[(ids + torch.arange(n, device=device).repeat_interleave(k) * L)] = False
    specs.append(dict(
        name="edm_loss", module=_kernel_module("edm_loss"), shape=f"F ({n}, {L}, {pp}) bf16, images fp32",
        fused=lambda: kernels.edm_loss(f_tok, y, noisy, sigma, masked, p),
        reference=lambda: kernels.edm_loss_reference(f_tok, y, noisy, sigma, masked, p),
        leaves=[f_tok], fwd_bytes=t_dec * pp * 2 + 2 * y.numel() * 4 + t_dec,
        bwd_bytes=2 * t_dec * pp * 2 + 2 * y.numel() * 4 + t_dec))
    return specs


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def time_op(fn, leaves) -> tuple[float, float | None, str]:
    """(forward ms, backward ms, how the backward was timed): alone, over one forward's graph kept with
    ``retain_graph`` ("retained"), or, where a graph cannot be kept, forward+backward minus forward
    ("difference"); an op without ``leaves`` (itself a piece of a backward) has no backward (None, "none")."""
    outs = _outputs(fn())
    fwd = bench_ms(fn, rep=TIMING_MS)
    if not leaves:
        return fwd, None, "none"
    grads = [torch.randn_like(o) for o in outs]

    def bwd():
        torch.autograd.grad(outs, leaves, grads, allow_unused=True, retain_graph=True)

    try:
        return fwd, bench_ms(bwd, rep=TIMING_MS), "retained"
    except RuntimeError:
        def fwd_bwd():
            torch.autograd.grad(_outputs(fn()), leaves, grads, allow_unused=True)

        return fwd, max(bench_ms(fwd_bwd, rep=TIMING_MS) - fwd, 0.0), "difference"


def graph_times(fn, leaves) -> dict:
    """{"fwd": ms, "bwd": ms} of the op's kernels alone, replayed from CUDA graphs (``bench.common.graph_ms``):
    the launch overhead of the eager call left out, which at these sizes can exceed the kernels' time.  A part
    that cannot be captured (a backward whose graph cannot be retained) is left out."""
    def forward_and_grads():
        outs = _outputs(fn())
        return outs, [torch.randn_like(o) for o in outs]

    def bwd(state):
        outs, grads = state
        torch.autograd.grad(outs, leaves, grads, allow_unused=True, retain_graph=True)

    times = {}
    parts = [("fwd", lambda: graph_ms(fn)), ("bwd", lambda: graph_ms(bwd, setup=forward_and_grads))]
    for part, timed in parts[:2 if leaves else 1]:
        try:
            times[part] = timed()
        except Exception as e:  # the eager timing stands alone
            print(f"graph timing of the {part} failed: {type(e).__name__}: {e}", flush=True)
    return times


def kernel_rows(specs, bandwidth: float, with_fused: bool) -> list[dict]:
    """Fused op (and, where its backward has one, its deterministic-mode variant), eager reference and
    compiled reference, forward and backward."""
    from kernels import _common

    rows, l2_bytes = [], l2_cache_bytes()
    for spec in specs:
        impls = {"eager reference": spec["reference"]}
        if spec.get("compiled", True):  # (not for the EMA's hundreds of tensors: minutes of compilation)
            impls["compiled reference"] = torch.compile(spec["reference"])
        if with_fused:
            fused = {"triton (fused)": spec["fused"], **spec.get("baselines", {})}
            if hasattr(spec["module"], "deterministic"):  # backward without atomic adds
                fused["triton (fused, deterministic)"] = spec["fused"]
            impls = {**fused, **impls}
        for impl, fn in impls.items():
            row = dict(op=spec["name"], shape=spec["shape"], impl=impl)
            det = impl.endswith("deterministic)")
            _common.FORCE_DETERMINISTIC = det  # with torch's mode (its deterministic index_add_), as users get it
            torch.use_deterministic_algorithms(det)
            try:
                fwd, bwd, row["bwd_timing"] = time_op(fn, spec["leaves"])
                times = [("fwd", fwd, spec["fwd_bytes"])]
                if bwd is not None:
                    times.append(("bwd", bwd, spec["bwd_bytes"]))
                if torch.cuda.is_available():
                    times += [(f"{part}_graph", ms, spec[f"{part}_bytes"])
                              for part, ms in graph_times(fn, spec["leaves"]).items()]
                for part, ms, nbytes in times:
                    gbs = nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")
                    row.update({f"{part}_ms": ms, f"{part}_gbs": gbs, f"{part}_pct_copy_bw": 100 * gbs / bandwidth})
                    if part.endswith("_graph"):  # replays with no flush: an op this small may read from L2
                        row[f"{part}_fits_l2"] = nbytes <= l2_bytes
                    if "fwd_flops" in spec and part.startswith("fwd") and ms > 0:  # a GEMM's rate
                        row[f"{part}_tflops"] = spec["fwd_flops"] / (ms * 1e-3) / 1e12
            except Exception as e:  # keep going: one broken row must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            finally:
                _common.FORCE_DETERMINISTIC = False
                torch.use_deterministic_algorithms(False)
            rows.append(row)
    return rows


def launch_choices(module, warps, fwd_rows, bwd_rows, bwd_stages, bwd_tile_elems) -> list[tuple[str, dict]]:
    """``config_rows``' launch settings of one kernel module: ("defaults", {}) first, then (label, constants to
    set) for each other setting; a setting that would only repeat the module's own values is left out."""
    choices = [("defaults", {})]
    rules = [a for a in ("num_warps", "forward_warps") if hasattr(module, a)]  # functions of the block size
    constants = [a for a in ("NUM_WARPS", "FWD_WARPS", "BWD_WARPS") if hasattr(module, a)]
    if (rules or constants) and not hasattr(module, "GROUP_M"):  # (a GEMM tile's warps: not 4 (spills), not 16
        # (more shared memory than sm_90 has, offline sm_90 build))
        choices += [(f"{w} warps", {**{a: (lambda _elements, w=w: w) for a in rules}, **{a: w for a in constants}})
                    for w in warps]
    if hasattr(module, "FWD_ROWS"):
        choices += [(f"{r} rows a forward program", {"FWD_ROWS": r}) for r in fwd_rows]
    if hasattr(module, "FWD_ROWS") and hasattr(module, "BWD_ROWS"):
        choices += [(f"{r} rows a backward program", {"BWD_ROWS": r}) for r in bwd_rows]
    if hasattr(module, "TILE_ROWS"):  # gelu_tanh_grad and bias_grad: tiles of rows x a block of columns
        block = "BLOCK_H" if hasattr(module, "BLOCK_H") else "BLOCK_D"
        choices += [(f"{b}-column blocks", {block: b}) for b in (128, 256, 512)]
        choices += [(f"{r} rows a program", {"ROWS": r}) for r in (64, 1024)]
        t0, b0, w0 = module.TILE_ROWS, getattr(module, block), module.NUM_WARPS
        timed = {(t0, b0, w0), *((t0, b0, w) for w in warps), *((t0, b, w0) for b in (128, 256, 512))}  # above
        choices += [(f"{t}-row tiles of {b} columns, {w} warps", {"TILE_ROWS": t, block: b, "NUM_WARPS": w})
                    for t in (8, 16, 32) for b in (256, 512) for w in (2, 4, 8) if (t, b, w) not in timed]
    if hasattr(module, "GROUP_M"):  # gelu_gemm's GEMM tiles: (rows, columns, K step, pipeline stages)
        tiles = [(128, 128, 64, 4), (128, 256, 64, 2), (128, 256, 32, 4), (64, 256, 64, 4), (256, 128, 64, 3)]
        choices += [(f"{m} x {n} tiles, K steps of {k}, {st} stages",
                     {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "STAGES": st}) for m, n, k, st in tiles]
        choices += [(f"{g} row tiles a group", {"GROUP_M": g}) for g in (1, 16)]
        choices += [(f"{'flattened' if module.WARP_SPECIALIZE else 'warp-specialized'} tile loop",
                     {"WARP_SPECIALIZE": not module.WARP_SPECIALIZE})]
        choices += [(f"epilogue in {p} column parts", {"EPILOGUE_PARTS": p}) for p in (2, 4)]
    if hasattr(module, "CHUNK"):  # the EMA kernel (its table is built per MultiTensorLerp: time CHUNK 16384 only)
        choices += [(f"{b}-element steps", {"BLOCK": b}) for b in (1024, 4096)]
    if hasattr(module, "FWD_TOKENS"):  # embed_kept_patches' forward tile: tokens x output columns
        tiles = [(16, 128), (32, 128), (64, 128), (32, 64), (64, 64), (32, 256)]
        choices += [(f"{t} tokens x {b} columns a forward program", {"FWD_TOKENS": t, "FWD_BLOCK_D": b})
                    for t, b in tiles]
        other = "ieee" if module.FWD_PRECISION == "tf32x3" else "tf32x3"  # the products' other precision
        choices += [(f"{other} forward products, {t} tokens x {b} columns", {"FWD_PRECISION": other,
                                                                            "FWD_TOKENS": t, "FWD_BLOCK_D": b})
                    for t, b in ((16, 128), (32, 128), (64, 64))]
    if hasattr(module, "BWD_TILE_ELEMS"):
        choices += [(f"{e}-element backward tiles", {"BWD_TILE_ELEMS": e}) for e in bwd_tile_elems]
    if hasattr(module, "BWD_STAGES"):
        choices += [(f"{st} stages in the backward's row loop", {"BWD_STAGES": st}) for st in bwd_stages]
        if hasattr(module, "BWD_WARPS"):  # the LayerNorm ops: the stages at the other backward warps
            choices += [(f"{st} stages, {w} warps in the backward", {"BWD_STAGES": st, "BWD_WARPS": w})
                        for st in (1, 2, 3) for w in (4, 8) if w != module.BWD_WARPS]
    if hasattr(module, "BWD_SPLIT_COLUMNS"):  # the LayerNorm backwards' rows in two column blocks
        other = "one column block" if module.BWD_SPLIT_COLUMNS else "two column blocks"
        choices += [(f"backward rows in {other}, {w} warps, {st} stages",
                     {"BWD_SPLIT_COLUMNS": not module.BWD_SPLIT_COLUMNS, "BWD_WARPS": w, "BWD_STAGES": st})
                    for w in (4, 8) for st in (2, 3, 4)]
    if hasattr(module, "BWD_PROGRAMS"):  # gated backward: registers capped for 4 programs an SM (128 at 4 warps)
        choices += [("backward rows in two column blocks, 4 warps, 3 stages, registers for 4 programs an SM",
                     {"BWD_SPLIT_COLUMNS": True, "BWD_WARPS": 4, "BWD_STAGES": 3, "BWD_PROGRAMS": 4})]
    own = [(label, forced) for label, forced in choices[1:]
           if all(not callable(v) and getattr(module, k, None) == v for k, v in forced.items())]
    return [c for c in choices if c not in own]


def config_rows(specs, warps=(4, 8, 16), fwd_rows=(2, 4), bwd_rows=(8, 16, 64), bwd_stages=(1, 2, 3, 4),
                bwd_tile_elems=(2048, 8192)) -> list[dict]:
    """The fused ops' time with a launch parameter forced, to check the launchers' choices, beside a row with
    the defaults: the warps per program of every kernel of the op (``kernels._common.num_warps`` picks them
    from the block size, ``forward_warps`` for the LayerNorm forwards, constants ``NUM_WARPS``, ``FWD_WARPS``
    and ``BWD_WARPS`` elsewhere) and, for the LayerNorm ops, the tokens per forward program (``FWD_ROWS``, 1
    by default), the most tokens per backward program (``BWD_ROWS``, 32 by default, which
    ``rows_per_program`` keeps at these sizes); the software-pipeline stages of a backward's loop over rows
    (``BWD_STAGES``: the LayerNorm ops, also 1-3 stages at 4 and 8 backward warps, insert_mask_tokens,
    gelu_tanh_grad and bias_grad); the LayerNorm backwards' row in one or two power-of-two column blocks
    (``BWD_SPLIT_COLUMNS``, the other than the default, at 4 and 8 warps and 2-4 stages; the gated one also with
    registers capped for 4 programs an SM, ``BWD_PROGRAMS``); for ``edm_loss`` the
    elements of a backward program's tile (``BWD_TILE_ELEMS``, 4096 by default: 256 programs at batch 256); for
    ``embed_kept_patches`` the tokens and output columns of a forward program, also with the products' other
    precision (``FWD_PRECISION``: ieee or tf32x3); for ``gelu_tanh_grad`` and
    ``bias_grad`` their block, tile rows and warps together, and their rows a program; for the EMA its step; for
    ``gelu_gemm`` its GEMM tile (rows, columns, K step, pipeline stages), its row tiles a group, the
    warp-specialized tile loop and its epilogue's column parts.
    Eager and CUDA-graph (kernels alone) times."""
    rows = []
    for spec in specs:
        module = spec["module"]
        choices = launch_choices(module, warps, fwd_rows, bwd_rows, bwd_stages, bwd_tile_elems)
        for label, forced in choices:
            row = dict(op=spec["name"], config=label)
            try:
                with module_constants([module], **forced):
                    row["fwd_ms"], row["bwd_ms"], row["bwd_timing"] = time_op(spec["fused"], spec["leaves"])
                    row.update({f"{part}_graph_ms": ms
                                for part, ms in graph_times(spec["fused"], spec["leaves"]).items()})
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            rows.append(row)
    return rows


def _measure_step(backend: str, batch: int, device) -> dict:
    """Peak activation memory (GB above the memory held between steps) and median time of one
    MaskDiT-XL/2 forward + backward with the EDM loss under bf16 autocast."""
    from maskdit import EDMLoss, EDMPrecond, create_model, random_mask

    model = create_model("MaskDiT-XL/2", backend=backend).to(device)
    net, loss_fn = EDMPrecond(model), EDMLoss()
    images = torch.randn(batch, 4, 32, 32, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step():
        ids = random_mask(batch, 256, 0.5, device=device).ids_keep
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(net, images, labels, ids).mean()
        loss.backward()

    def fresh_step():  # as in training: the gradients written, not added to the last step's
        model.zero_grad(set_to_none=True)
        step()

    step()  # allocates the gradients
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    # do_bench's budgets are in ms: 3 s of timed steps, 10 or more up to 300 ms a step
    return dict(activation_gb=(torch.cuda.max_memory_allocated() - base) / 1e9,
                step_ms=bench_ms(fresh_step, warmup=300, rep=3000))


def train_step_rows(batch: int, device) -> list[dict]:
    """The training-step measurement for each backend."""
    rows = []
    for backend in ("torch", "triton"):
        row = dict(model="MaskDiT-XL/2", backend=backend, batch=batch)
        try:
            torch.cuda.empty_cache()
            row.update(_measure_step(backend, batch, device))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
    return rows


def _mark(row) -> str:
    return " d" if row.get("bwd_timing") == "difference" else ""


def _ms(row, part: str) -> str:
    """A time cell: ms, and a GEMM's TFLOP/s after it."""
    rate = f" ({row[f'{part}_tflops']:.0f} TFLOP/s)" if f"{part}_tflops" in row else ""
    return f"{row[f'{part}_ms']:.3f}{rate}"


def markdown(env, bandwidth, rows, step_rows, config_rows=()) -> str:
    lines = [f"## Fused kernels: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; "
             f"measured copy bandwidth {bandwidth:.0f} GB/s (read+write); timing: median of "
             f"{'triton.testing.do_bench (CUDA events)' if 'cpu' not in env['device'] else 'wall clock'}; "
             "bwd timed alone on a retained graph (d: as (fwd+bwd) - fwd, no graph could be kept). "
             "Eager: each call issued from Python (its host time counts when it exceeds the kernels'); graph: the "
             "op's kernels replayed from a CUDA graph (`bench.common.graph_ms`), the GPU time alone; L2: the op moves "
             "fewer bytes than the L2 cache holds, and the replays (no flush between calls) may read them from it, "
             "so that share of the copy bandwidth is not a memory roofline (and can pass 100%). The GEMMs' "
             "times carry their rate (TFLOP/s of the product).", "",
             "| op | shape | impl | fwd ms | fwd % copy BW | bwd ms | bwd % copy BW | fwd ms (graph) | "
             "fwd % (graph) | bwd ms (graph) | bwd % (graph) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        graph = " | ".join(f"{_ms(r, p)} | {r[f'{p}_pct_copy_bw']:.0f}%{' L2' if r.get(f'{p}_fits_l2') else ''}"
                           if f"{p}_ms" in r else "- | -" for p in ("fwd_graph", "bwd_graph"))
        bwd = f"{r['bwd_ms']:.3f}{_mark(r)} | {r['bwd_pct_copy_bw']:.0f}%" if "bwd_ms" in r else "- | -"
        lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | {_ms(r, 'fwd')} | {r['fwd_pct_copy_bw']:.0f}% | "
                     f"{bwd} | {graph} |")
    if step_rows:
        lines += ["", "| model | backend | batch | activation GB | step ms (fwd+bwd, bf16) |",
                  "|---|---|---:|---:|---:|"]
        for r in step_rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} | error: {r['error'][:80]} | |")
            else:
                lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['activation_gb']:.2f} | "
                             f"{r['step_ms']:.1f} |")
    if config_rows:
        lines += ["", "Fused ops with a launch parameter forced (graph: replayed from a CUDA graph, kernels alone; "
                  "vs defaults: graph time over the defaults row's, below 1 is faster):", "",
                  "| op | configuration | fwd ms | bwd ms | fwd ms (graph) | bwd ms (graph) | fwd vs defaults | "
                  "bwd vs defaults |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        defaults = {r["op"]: r for r in config_rows if r["config"] == "defaults" and "error" not in r}
        for r in config_rows:
            if "error" in r:
                lines.append(f"| {r['op']} | {r['config']} | error: {r['error'][:80]} | | | | | |")
                continue
            keys = ("fwd_graph_ms", "bwd_graph_ms")
            graph = " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in keys)
            base = defaults.get(r["op"], {})
            ratios = " | ".join(f"{r[k] / base[k]:.2f}" if k in r and base.get(k) else "-" for k in keys)
            bwd = "-" if r.get("bwd_ms") is None else f"{r['bwd_ms']:.3f}{_mark(r)}"
            lines.append(f"| {r['op']} | {r['config']} | {r['fwd_ms']:.3f} | {bwd} | {graph} | {ratios} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--step-batch", type=int, default=32, help="batch of the training-step measurement (0: skip)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help="time these ops alone (names as in the tables, e.g. ln_modulate gelu_tanh_grad)")
    parser.add_argument("--no-config-sweep", dest="config_sweep", action="store_false",
                        help="skip timing the fused ops with other launch parameters")
    args = parser.parse_args(argv)
    check_arguments(parser, args, at_least_one=("batch",))
    if args.step_batch < 0:
        parser.error(f"--step-batch must be >= 0 (0: no step rows), got {args.step_batch}")
    env = environment()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tiny = dict(n=2, L=16, k=8, d=72, dd=32, c=4, p=2)
    if args.ops:  # the names checked on tiny CPU tensors, before any GPU time is spent
        names = [spec["name"] for spec in op_specs(**tiny, device=torch.device("cpu"))]
        if set(args.ops) - set(names):
            parser.error(f"--ops: unknown op(s) {sorted(set(args.ops) - set(names))}; expected some of {names}")
    if cuda:
        shapes = dict(n=args.batch, L=256, k=128, d=1152, dd=512, c=4, p=2)
    else:  # a smoke run of the harness on the references (the fused kernels need CUDA to be timed)
        print("no CUDA: timing the PyTorch references at tiny shapes only")
        shapes = tiny
    bandwidth = copy_bandwidth_gbs()
    out = results_folder(args.out, env)
    results = dict(rows=[], step_rows=[], config_rows=[])

    def save():  # after every stage, so a run cut short by a time limit keeps what it measured
        payload = dict(env, copy_bandwidth_gbs=bandwidth, l2_cache_bytes=l2_cache_bytes(), shapes=shapes,
                       kernels=results["rows"], train_step=results["step_rows"], configs=results["config_rows"])
        return write_results(out, "kernels", payload, markdown(env, bandwidth, results["rows"],
                                                                results["step_rows"], results["config_rows"]))

    specs = op_specs(**shapes, device=device)
    if args.ops:
        specs = [spec for spec in specs if spec["name"] in args.ops]
    for spec in specs:
        results["rows"] += kernel_rows([spec], bandwidth, with_fused=cuda)
        save()
    if cuda and args.step_batch > 0:
        results["step_rows"] = train_step_rows(args.step_batch, device)
        save()
    if cuda and args.config_sweep:
        for spec in specs:
            results["config_rows"] += config_rows([spec])
            save()
    paths = save()
    print(markdown(env, bandwidth, results["rows"], results["step_rows"], results["config_rows"]))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
