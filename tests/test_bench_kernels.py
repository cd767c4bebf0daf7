"""bench/kernels.py's launch-parameter sweep on the CPU (the Triton interpreter, tiny shapes, timing stubbed):
every forced configuration of every fused op must run, forward and backward, and give the default's outputs
(NaN-poisoned).
A GPU run records a failing configuration as an error row and goes on, so a broken variant (a constant that
a kernel no longer takes, a tile that does not cover the row) would otherwise only show up in its table."""

import pytest
import torch

from bench import kernels as bench_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(DEVICE == "cuda", reason="a GPU runs the sweep itself (make gpu-check)")
def test_every_launch_configuration_runs_and_matches_the_defaults(monkeypatch):
    from kernels import _common

    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)  # an element a variant leaves unwritten stays NaN
    specs = bench_kernels.op_specs(n=2, L=16, k=8, d=72, dd=32, c=4, p=2, device=torch.device(DEVICE))
    results = {}

    def run_once(fn, leaves):
        outs = bench_kernels._outputs(fn())
        grads = ()
        if leaves:
            dy = [torch.ones_like(o) for o in outs]
            grads = torch.autograd.grad(outs, leaves, dy, allow_unused=True)
        results.setdefault(fn, []).append([t.detach().clone() for t in (*outs, *grads) if t is not None])
        return 0.0, (0.0 if leaves else None), "retained"

    monkeypatch.setattr(bench_kernels, "time_op", run_once)
    monkeypatch.setattr(bench_kernels, "graph_times", lambda fn, leaves: {})
    rows = bench_kernels.config_rows(specs, warps=(4, 8), fwd_rows=(2,), bwd_rows=(8,), bwd_stages=(1, 2),
                                     bwd_tile_elems=(512,))
    errors = [(r["op"], r["config"], r["error"]) for r in rows if "error" in r]
    assert not errors, errors
    configs = {(r["op"], r["config"]) for r in rows}
    assert len(configs) == len(rows) > 5 * len(specs)
    assert ("embed_kept_patches", "ieee forward products, 16 tokens x 128 columns") in configs
    for spec in specs:
        runs = results[spec["fused"]]
        assert len(runs) == sum(1 for r in rows if r["op"] == spec["name"]), spec["name"]
        for run in runs[1:]:  # the first is the defaults row
            for a, b in zip(run, runs[0]):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{spec['name']}: {m}")


@pytest.mark.parametrize("name", ["ln_modulate", "gated_residual", "gelu", "bias", "qkv_grad", "ema", "patch_embed",
                                  "unmask", "edm_loss", "gelu_gemm"])
def test_launch_choices_never_repeat_the_defaults(name):
    """Each row of the launch-parameter table sets something the defaults row does not (a module's own value,
    e.g. bias_grad's 512-column blocks, would only time the defaults again), under a label of its own."""
    import importlib

    module = importlib.import_module(f"kernels.{name}")
    choices = bench_kernels.launch_choices(module, (4, 8, 16), (2, 4), (8, 16, 64), (1, 2, 3, 4), (2048, 4096, 8192))
    assert choices[0] == ("defaults", {}) and len(choices) > 1
    labels = [label for label, _ in choices]
    assert len(set(labels)) == len(labels)
    for label, forced in choices[1:]:
        assert any(callable(v) or getattr(module, k) != v for k, v in forced.items()), label


def test_graph_cells_of_ops_that_fit_in_l2_are_marked():
    """A graph replay of an op smaller than the L2 cache reads from L2: its copy-bandwidth share says so."""
    env = dict(device="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6", cuda="13.0", date="2026-11-27")
    row = dict(op="edm_loss", shape="s", impl="triton (fused)", fwd_ms=0.01, fwd_pct_copy_bw=50.0,
               fwd_graph_ms=0.008, fwd_graph_pct_copy_bw=120.0, fwd_graph_fits_l2=True,
               bwd_graph_ms=0.2, bwd_graph_pct_copy_bw=80.0, bwd_graph_fits_l2=False)
    line = [ln for ln in bench_kernels.markdown(env, 3000.0, [row], []).splitlines() if ln.startswith("| edm_loss")][0]
    assert "| 120% L2 |" in line and "| 80% |" in line


def test_unknown_ops_are_refused_before_anything_is_measured(monkeypatch, capsys):
    monkeypatch.setattr(bench_kernels, "copy_bandwidth_gbs", lambda: pytest.fail("measured before checking --ops"))
    with pytest.raises(SystemExit):
        bench_kernels.main(["--ops", "ln_modulate", "no_such_op"])
    assert "--ops: unknown op(s) ['no_such_op']" in capsys.readouterr().err
