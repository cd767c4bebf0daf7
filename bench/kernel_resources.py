"""Compile every Triton kernel of ``kernels/`` for a CUDA GPU on a machine without one, and report resources.

    python bench/kernel_resources.py                 # sm_90 (H100/H200), MaskDiT-XL/2 widths
    python bench/kernel_resources.py --arch 80 --out bench/results/offline-sm80

A training step of a MaskDiT with the XL/2 widths (D 1152, decoder 512, patch 2, 4 channels; one block each,
batch 2) runs on the CPU with the triton backend in fp32 and under bf16 and fp16 autocast (with PyTorch's
attention and with the project's Triton attention kernel), plus each op alone on fp16/bf16 inputs and the
attention kernel alone at the XL/2 head dims and sequence lengths; every kernel launch is intercepted (nothing
runs), and each distinct (kernel, argument types, constexprs, launch options; the deterministic backward
variants, the pipelined backwards and the patch embedding's tf32x3 forwards that ``bench/kernels.py`` times,
and the attention launch settings that ``bench/attention.py`` times included) is compiled by Triton for the
target GPU down to a cubin with ptxas, over ``--workers`` processes (2 CPUs: 74 s instead of 137 for 364
specialisations, the same rows). It catches what the interpreter (``TRITON_INTERPRET=1``) cannot: code that
does not compile for a GPU, register spills, and more shared memory a program than the GPU has
(``SHARED_LIMIT``). The table gives registers per thread, spilled bytes and shared memory per program. Needs no
GPU and no CUDA toolkit (Triton ships ptxas); must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bench.common import environment, module_constants, write_results  # noqa: E402


@dataclass(frozen=True)
class Launch:
    """One kernel specialisation as a launch would compile it."""

    kernel: JITFunction
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((name, value), ...)
    attrs: tuple  # ((path, ((attribute, value), ...)), ...)
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def __reduce__(self):  # to a compiling process: the kernel by its module and name
        fields = (self.signature, self.constexprs, self.attrs, self.num_warps, self.num_stages, self.maxnreg)
        return _rebuild_launch, (self.kernel.fn.__module__, self.name, *fields)

    def describe(self) -> str:
        ptr_types = sorted({t[1:] for _, t in self.signature if t.startswith("*")})
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        regs = f", maxnreg={self.maxnreg}" if self.maxnreg else ""
        return f"{self.name}[{'/'.join(ptr_types)}; {consts}; warps={self.num_warps}{regs}]"


def _rebuild_launch(module: str, name: str, *fields) -> Launch:
    return Launch(getattr(importlib.import_module(module), name), *fields)


def _launch_from_call(kernel: JITFunction, args, kwargs) -> Launch:
    """The specialisation Triton's launcher would compile for this call (types, constexprs, and the
    16-divisibility of pointers and ints, which decides vectorisation)."""
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    values = dict(zip(kernel.arg_names, args))
    values.update(kwargs)
    missing = [n for n in kernel.arg_names if n not in values]
    if missing:
        raise TypeError(f"{kernel.fn.__name__}: launch is missing arguments {missing}")
    sig, consts, attrs = [], [], []
    for i, p in enumerate(kernel.params):
        v = values[p.name]
        if p.is_constexpr:
            ty, key = "constexpr", None
        else:
            ty, key = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize, True)
        sig.append((p.name, ty))
        if ty == "constexpr":
            consts.append((p.name, v))
        elif isinstance(key, str) and BaseBackend.parse_attr(key):
            attrs.append(((i,), tuple(tuple(a) for a in BaseBackend.parse_attr(key))))
    return Launch(kernel, tuple(sig), tuple(consts), tuple(attrs), opts.get("num_warps", 4),
                  opts.get("num_stages", 3), opts.get("maxnreg"))


@contextlib.contextmanager
def intercept_launches(on_launch=None):
    """Within the block, Triton kernel launches are not run: each calls ``on_launch(kernel, args, kwargs)``
    (when given) instead, and the launchers accept CPU tensors (outputs stay unwritten)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("intercepting kernel launches needs compiled kernels: unset TRITON_INTERPRET")
    import kernels._common as common

    def run(self, *args, grid, warmup, **kwargs):
        if on_launch is not None:
            on_launch(self, args, kwargs)

    saved_run, saved_interp = JITFunction.run, common.interpreting
    JITFunction.run, common.interpreting = run, (lambda: True)
    try:
        yield
    finally:
        JITFunction.run, common.interpreting = saved_run, saved_interp


def _training_steps():
    """A MaskDiT training step (masked and all-token) at XL/2 widths, fp32 and bf16/fp16 autocast."""
    from maskdit import EDMLoss, EDMPrecond, create_model, random_mask

    torch.manual_seed(0)
    net = EDMPrecond(create_model("MaskDiT-XL/2", input_size=8, depth=1, decoder_depth=1, backend="triton"))
    loss_fn = EDMLoss()
    images, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    for amp in (None, torch.bfloat16, torch.float16):
        for ids_keep in (random_mask(2, 16, 0.5).ids_keep, None):
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = loss_fn(net, images, labels, ids_keep).mean()
            loss.backward()


def _ops_in_half_precision():
    """Each op alone on fp16 and bf16 inputs (the kernel tests' dtypes), forward and backward."""
    import kernels

    seg = kernels.token_samples(2, 3, "cpu")
    ids = torch.tensor([0, 2, 3, 1, 3, 0])  # 3 of 4 tokens kept per sample
    for dtype in (torch.float16, torch.bfloat16):
        for d in (72, 1152):
            def rnd(*shape):
                return torch.randn(*shape, dtype=dtype, requires_grad=True)
            x, h, gate, shift, scale = rnd(6, d), rnd(6, d), rnd(2, d), rnd(2, d), rnd(2, d)
            y = kernels.ln_modulate(x, shift, scale, seg)
            xr, y2 = kernels.gated_residual_ln_modulate(x, h, gate, shift, scale, seg)
            xb, yb = kernels.gated_residual_ln_modulate(x, h, gate, shift, scale, seg, bias=rnd(d))
            out = kernels.insert_mask_tokens(x, ids, seg, rnd(d), rnd(4, d), 2)
            emb = kernels.embed_kept_patches(rnd(2, 4, 4, 4), ids, seg, rnd(d, 16), rnd(d), rnd(4, d).detach(), 2)
            torch.autograd.backward([y.sum(), xr.sum(), y2.sum(), xb.sum(), yb.sum(), out.sum(), emb.sum()])
            kernels.bias_grad(rnd(6, d).detach())
            kernels.stack_qkv_grad(*(rnd(6, d).detach() for _ in range(3)))


def _patch_embed_tf32x3():
    """The patch embedding's forward on fp32 inputs at D 1152 (the training step's) with tf32x3 products, at
    the tiles ``bench/kernels.py`` times them with."""
    import kernels

    module = sys.modules["kernels.patch_embed"]
    seg = kernels.token_samples(2, 3, "cpu")
    ids = torch.tensor([0, 2, 3, 1, 3, 0])
    for tokens, cols in ((16, 128), (32, 128), (64, 128)):
        with module_constants([module], FWD_PRECISION="tf32x3", FWD_TOKENS=tokens, FWD_BLOCK_D=cols):
            kernels.embed_kept_patches(torch.randn(2, 4, 4, 4), ids, seg, torch.randn(1152, 16), torch.randn(1152),
                                       torch.randn(4, 1152), 2)


def _attention(dtypes=(torch.float16, torch.bfloat16), shapes=((72, 128), (72, 256), (32, 128), (32, 256))):
    """The attention kernels (``kernels.attention``) forward and backward, for each dtype and (head dim,
    tokens a sample) shape: ``qkv_attention`` of a packed projection output with an fp32 bias (the bias sums'
    backward) and ``flash_attention`` of its views, 16 heads (as at XL/2: the launch specialises on it), 2
    samples.  128 tokens: one backward program a sample; 256: several, the dQ part apart."""
    import kernels

    for dtype in dtypes:
        for head_dim, tokens in shapes:
            qkv = torch.randn(2 * tokens, 3, 16, head_dim, dtype=dtype, requires_grad=True)
            bias = torch.zeros(3 * 16 * head_dim, requires_grad=True)
            cu = torch.tensor([0, tokens, 2 * tokens], dtype=torch.int32)
            out = kernels.qkv_attention(qkv, bias, cu, tokens)
            out2 = kernels.flash_attention(*qkv.unbind(1), cu, tokens)
            torch.autograd.backward([out.sum(), out2.sum()])


def _attention_sweep():
    """``_attention`` on bf16 at each launch setting of ``bench/attention.py``'s sweep, at its shape."""
    from bench.attention import SWEEP, shapes

    module = sys.modules["kernels.attention"]
    for shape in shapes(2, 32):  # (XL/2 at 256x256; the batch does not matter here)
        for settings in SWEEP.get(shape["name"], []):
            with module_constants([module], **settings):
                _attention((torch.bfloat16,), [(shape["head_dim"], shape["seq"])])


def _gelu_gemm():
    """The MLP's products with the GELU in their epilogues (``kernels.gelu_gemm``: training forward, inference
    forward, backward) at the XL/2 encoder and decoder widths, on fp16 and bf16 with the defaults and on bf16
    (the benchmark's dtype) at each other launch setting ``bench/kernels.py`` times."""
    from bench.kernels import launch_choices

    module = sys.modules["kernels.gelu_gemm"]
    for label, forced in launch_choices(module, (4, 8, 16), (), (), (), ()):
        with module_constants([module], **forced):
            for dtype in (torch.float16, torch.bfloat16) if label == "defaults" else (torch.bfloat16,):
                for d in (512, 1152):
                    y, w1, w2 = torch.zeros(256, d, dtype=dtype), torch.zeros(4 * d, d, dtype=dtype), \
                        torch.zeros(d, 4 * d, dtype=dtype)
                    a, _ = module.linear_gelu(y, w1, torch.zeros(4 * d, dtype=dtype))
                    module.linear_gelu_output(y, w1, torch.zeros(4 * d, dtype=dtype))
                    module.gelu_grad_gemm(y, w2, a)


def _weight_average():
    """The EMA kernel (``kernels.ema``) on fp32, fp16 and bf16 tensors, with a float and a tensor weight, on
    16-byte aligned tensors and on views at odd offsets."""
    from kernels.ema import MultiTensorLerp

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        flat = torch.zeros(40001, dtype=dtype)
        for tensors in ([torch.zeros(40000, dtype=dtype), torch.zeros(7, dtype=dtype)], [flat[1:20001], flat[20001:]]):
            lerp = MultiTensorLerp(tensors, [t.clone() for t in tensors])
            lerp(0.5)
            lerp(torch.tensor(0.5))


def collect_launches() -> list[Launch]:
    """Every distinct kernel specialisation the scenarios launch, in first-launch order."""
    import kernels._common as common
    from maskdit.attention import sdpa_backend

    launches: list[Launch] = []

    def record(kernel, args, kwargs):
        launches.append(_launch_from_call(kernel, args, dict(kwargs)))

    with intercept_launches(record):
        _training_steps()
        with sdpa_backend("triton"):
            _training_steps()
        _ops_in_half_precision()
        _attention()
        _attention((torch.float32,))
        _attention_sweep()
        _weight_average()
        _gelu_gemm()
        common.FORCE_DETERMINISTIC = True  # the backward kernels' variants without atomic adds
        try:
            _ops_in_half_precision()
        finally:
            common.FORCE_DETERMINISTIC = False
        pipelined = [sys.modules[f"kernels.{name}"] for name in ("ln_modulate", "gated_residual", "unmask", "gelu",
                                                                "bias")]
        layer_norms = [sys.modules[f"kernels.{name}"] for name in ("ln_modulate", "gated_residual")]
        for stages in (1, 2, 3):  # the backwards' pipeline depths that bench/kernels.py times (at XL/2 widths)
            with module_constants(pipelined, BWD_STAGES=stages):
                _training_steps()
                with module_constants(layer_norms, BWD_WARPS=8):  # (the LayerNorm backwards at 8 warps too)
                    _training_steps()
        for warps in (4, 8):  # the LayerNorm backwards' rows in two column blocks (1024 + 128 at D 1152)
            with module_constants(layer_norms, BWD_SPLIT_COLUMNS=True, BWD_WARPS=warps):
                _training_steps()
                _ops_in_half_precision()
        _patch_embed_tf32x3()
        # ... with the gated backward's registers capped for 4 programs an SM (128 at 4 warps)
        with module_constants(layer_norms, BWD_SPLIT_COLUMNS=True), \
                module_constants([sys.modules["kernels.gated_residual"]], BWD_PROGRAMS=4):
            _training_steps()
    return list(dict.fromkeys(launches))


# the most shared memory a program may take (the opt-in maximum a block, bytes): a kernel that needs more
# compiles but fails at launch (Triton's OutOfResources)
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# ptxas and cuobjdump as shipped in Triton's wheel (x86-64 Linux)
NVIDIA_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and stack bytes (spills) of a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(NVIDIA_TOOLS / "cuobjdump"), "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return {"registers": int(reg.group(1)) if reg else None, "stack_bytes": int(stack.group(1)) if stack else None}


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one specialisation for ``sm_<arch>``; returns its resources (raises on a compile error)."""
    src = triton.compiler.ASTSource(fn=launch.kernel, signature=dict(launch.signature),
                                    constexprs=dict(launch.constexprs),
                                    attrs={path: [list(a) for a in attr] for path, attr in launch.attrs})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": launch.num_warps, "num_stages": launch.num_stages,
                                       **({"maxnreg": launch.maxnreg} if launch.maxnreg else {})})
    usage = _resource_usage(compiled.asm["cubin"])
    return {"kernel": launch.name, "spec": launch.describe(), "num_warps": launch.num_warps,
            "shared_bytes": compiled.metadata.shared, **usage}


def _compile_or_fail(launch: Launch, arch: int) -> dict:
    """``compile_launch``'s row, or {"spec", "error"} (every failing kernel is reported, not only the first)."""
    try:
        return compile_launch(launch, arch)
    except Exception as e:
        return {"spec": launch.describe(), "error": f"{type(e).__name__}: {e}"}


def compile_all(launches: list[Launch], arch: int, workers: int) -> list[dict]:
    """``_compile_or_fail`` of each launch, in order, over ``workers`` processes (spawned: each imports the
    kernels afresh; the compiles are independent, about a third of a second each)."""
    if workers <= 1:
        return [_compile_or_fail(launch, arch) for launch in launches]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_or_fail, launches, [arch] * len(launches), chunksize=8))


def markdown(env: dict, arch: int, launches: int, rows: list[dict], failures: list[dict]) -> str:
    lines = [f"## Triton kernels compiled for sm_{arch} (no GPU used)", "",
             f"triton {env['triton']}, torch {env['torch']}, {env['date']}, on {env['device']}; `{env['command']}`. "
             f"{launches} kernel specialisations launched by a MaskDiT training step at XL/2 widths (D 1152, "
             f"decoder 512; fp32, bf16 and fp16 autocast; PyTorch's and the Triton attention), by each op on "
             f"fp16/bf16 inputs (D 72 and 1152) and by the attention kernels (fp32, fp16, bf16; head dim 72 and 32, "
             f"128 and 256 tokens; bench/attention.py's launch settings), by the MLP's GELU GEMMs (fp16, bf16; "
             f"D 512 and 1152) and by bench/kernels.py's launch settings; "
             f"{len(failures)} failed to compile or need more shared memory than sm_{arch} has. Registers per thread "
             "and stack (spill) bytes from cuobjdump, shared memory from Triton.", "",
             "| kernel specialisation | regs/thread | stack bytes | shared bytes |", "|---|---:|---:|---:|"]
    lines += [f"| {r['spec']} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} |" for r in rows]
    lines += [f"\nFAILED {f['spec']}:\n{f['error']}" for f in failures]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    ap.add_argument("--out", help="write kernel_resources.json / .md into this folder")
    ap.add_argument("--workers", type=int, default=min(len(os.sched_getaffinity(0)), 8),
                    help="compiling processes (default: the CPUs this process may use, at most 8)")
    args = ap.parse_args(argv)
    launches = collect_launches()
    rows, failures = [], []
    for result in compile_all(launches, args.arch, args.workers):
        if "error" in result:
            failures.append(result)
            continue
        rows.append(result)
        if result["shared_bytes"] > SHARED_LIMIT.get(args.arch, float("inf")):
            failures.append({"spec": result["spec"], "error": f"shared memory {result['shared_bytes']} bytes > "
                             f"sm_{args.arch}'s {SHARED_LIMIT[args.arch]} a program: it would fail at launch"})
    env = environment()
    md = markdown(env, args.arch, len(launches), rows, failures)
    print(md)
    if args.out:
        payload = dict(env, arch=args.arch, rows=rows, failures=failures)
        print("wrote", *write_results(args.out, "kernel_resources", payload, md))
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
