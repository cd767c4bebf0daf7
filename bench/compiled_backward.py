"""Memory of a training step compiled whole (``train.py --compile``), from its compiled graphs, on any machine.

    python bench/compiled_backward.py [--models DiT-T/2 MaskDiT-T/2] [--backends torch triton]
                                      [--checkpointing none decoder all] [--batch 8] [--out DIR]

``torch.compile`` decides itself what a step keeps for its backward and what its backward recomputes
(AOTAutograd's partitioner, which also honours activation checkpointing inside compiled code).  This script
compiles the EDM training loss of each model with Inductor's decompositions and partitioner (no code
generation: the captured graphs run eagerly, the triton kernels' launches intercepted) and reads two numbers
off the graphs: the bytes the forward graph saves for the backward, and the peak of the backward graph,
found by walking its nodes in order, allocating each node's outputs and freeing every storage after its last
use (saved inputs included, freed as the compiled backward frees them).  The walk follows the captured node
order, which Inductor may still reorder and fuse: it compares settings, it is not a GPU's exact peak (that is
``bench/train_step.py``'s ``peak GB``).  What checkpointing inside compiled code costs or saves shows only
here: the saved bytes drop, and the backward's recomputation must not raise its peak above the uncheckpointed
one.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from importlib import import_module

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, results_folder, write_results  # noqa: E402
from bench.kernel_resources import intercept_launches  # noqa: E402
from maskdit import EDMLoss, EDMPrecond, create_model, random_mask  # noqa: E402
from maskdit.distributed import LossModule  # noqa: E402
from maskdit.masking import token_layout  # noqa: E402
from maskdit.models import CHECKPOINTING  # noqa: E402


def _storages(value) -> list:
    return [t.untyped_storage() for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def backward_peak_bytes(graph: torch.fx.Graph) -> int:
    """Peak bytes alive while ``graph``'s nodes run in order: each node's output storages are allocated when
    it runs (views share their base's) and freed after the last node that reads any tensor on them."""
    nodes = list(graph.nodes)
    last_use = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    holders, sizes, alive, peak = {}, {}, 0, 0  # storage -> nodes holding it alive; storage -> bytes
    node_storages = {}
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        storages = _storages(node.meta.get("val"))
        node_storages[node] = [st._cdata for st in storages]
        for st in storages:
            if st._cdata not in holders:
                holders[st._cdata], sizes[st._cdata] = set(), int(st.nbytes())
                alive += sizes[st._cdata]
            holders[st._cdata].add(node)
        peak = max(peak, alive)
        for done in [n for n in (*node.all_input_nodes, node) if last_use.get(n, -1) <= i]:
            for key in node_storages.get(done, ()):
                if key in holders:
                    holders[key].discard(done)
                    if not holders[key]:
                        alive -= sizes.pop(key)
                        del holders[key]
    return peak


def measure(name: str, backend: str, checkpointing: str, batch: int) -> dict:
    """Saved bytes and backward-graph peak of one compiled training step (``train.py --compile`` full)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model(name, backend=backend).set_activation_checkpointing(checkpointing)
    graphs = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    compiler = aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward"),
                            decompositions=lambda: import_module("torch._inductor.compile_fx").select_decomp_table(),
                            partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))
    loss = torch.compile(LossModule(EDMPrecond(model), EDMLoss()), backend=compiler)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    ratio = 0.5 if model.config.use_decoder else 0.0
    ids = random_mask(batch, model.num_tokens, ratio, generator=g).ids_keep if ratio else None
    layout = None if ids is None else token_layout(ids, batch, model.num_tokens, images.device)
    sigma, noise = EDMLoss().sample_sigma(batch, "cpu", g), torch.randn(images.shape, generator=g)
    with intercept_launches(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss(images, labels, layout, sigma, noise).mean().backward()
    # the forward graph returns the step's outputs, then what it saves: the backward graph's inputs of the same names
    output = next(n for n in graphs["forward"].graph.nodes if n.op == "output")
    backward_inputs = {n.name for n in graphs["backward"].graph.nodes if n.op == "placeholder"}
    saved = {st._cdata: int(st.nbytes()) for node in tree_leaves(output.args)
             if isinstance(node, torch.fx.Node) and node.name in backward_inputs
             for st in _storages(node.meta.get("val"))}
    peak = backward_peak_bytes(graphs["backward"].graph)
    torch._dynamo.reset()
    return dict(model=name, backend=backend, checkpointing=checkpointing, batch=batch, mask_ratio=ratio,
                saved_mb=sum(saved.values()) / 1e6, backward_peak_mb=peak / 1e6)


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"## Compiled training step (full graph): saved bytes and backward peak, batch {rows[0]['batch']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; {env['device']}; `{env['command']}`. "
             "Inductor's decompositions and partitioner, bf16 autocast, 256x256 (32x32x4 latents); the backward "
             "peak walks the captured backward graph in order (saved inputs included; see the script).", "",
             "| model | backend | checkpointing | mask ratio | saved MB | backward peak MB "
             "| peak vs no checkpointing |",
             "|---|---|---|---:|---:|---:|---:|"]
    base = {(r["model"], r["backend"]): r["backward_peak_mb"] for r in rows if r["checkpointing"] == "none"}
    for r in rows:
        ref = base.get((r["model"], r["backend"]))
        ratio = f"{r['backward_peak_mb'] / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['model']} | {r['backend']} | {r['checkpointing']} | {r['mask_ratio']} | "
                     f"{r['saved_mb']:.1f} | {r['backward_peak_mb']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["DiT-T/2", "MaskDiT-T/2"])
    ap.add_argument("--backends", nargs="+", choices=("torch", "triton"), default=["torch", "triton"])
    ap.add_argument("--checkpointing", nargs="+", choices=CHECKPOINTING, default=["none", "decoder", "all"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<device>)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the kernels' launches are intercepted, not interpreted")
    rows = []
    for name in args.models:
        for backend in args.backends:
            for which in args.checkpointing:
                if which == "decoder" and not name.startswith("MaskDiT"):
                    continue
                rows.append(measure(name, backend, which, args.batch))
                print(rows[-1], flush=True)
    env = environment()
    md = markdown(env, rows)
    print(md)
    print("wrote", *write_results(results_folder(args.out, env), "compiled_backward", dict(env, rows=rows), md))
    return rows


if __name__ == "__main__":
    main()
