"""maskdit.cuda_graphs.GraphedStep: a captured training step replays the eager step (CUDA), and bad
arguments are named (anywhere)."""

import copy
import json
import os

import pytest
import torch

from maskdit import EDMLoss, EDMPrecond, create_model
from maskdit.cuda_graphs import GraphedStep
from maskdit.masking import random_mask, token_layout
from tests.conftest import randomize

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
LR = 1e-3


def test_rejects_bad_arguments_and_cpu_inputs():
    with pytest.raises(ValueError, match="step_fn must be callable"):
        GraphedStep(None)
    with pytest.raises(ValueError, match="warmup_steps must be a positive int"):
        GraphedStep(lambda: None, warmup_steps=0)
    step = GraphedStep(lambda *x: None)
    with pytest.raises(ValueError, match=r"inputs\[0\] must be a CUDA tensor .* got cpu"):
        step(torch.zeros(2))
    with pytest.raises(ValueError, match=r"inputs\[0\] must be a CUDA tensor .* got int"):
        step(3)
    assert step.calls == 0 and not step.captured


def _setup(backend: str):
    torch.manual_seed(0)
    model = randomize(create_model("MaskDiT-S/2", input_size=8, in_channels=4, num_classes=10, backend=backend,
                                   depth=2, decoder_depth=1, hidden_size=72, num_heads=4, decoder_hidden_size=40,
                                   decoder_num_heads=2)).cuda()
    return model


def _step_fn(model, optimizer, amp: bool):
    net, loss_fn = EDMPrecond(model), EDMLoss()

    def step(images, labels, ids_keep, sigma, noise):
        layout = token_layout(ids_keep, images.shape[0], model.num_tokens, images.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            loss = loss_fn(net, images, labels, layout, sigma=sigma, noise=noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _batches(count: int, n: int = 6):
    out = []
    for _ in range(count):
        out.append((torch.randn(n, 4, 8, 8, device="cuda"), torch.randint(0, 10, (n,), device="cuda"),
                    random_mask(n, 16, 0.5, device="cuda").ids_keep, EDMLoss().sample_sigma(n, "cuda"),
                    torch.randn(n, 4, 8, 8, device="cuda")))
    return out


@cuda
@pytest.mark.parametrize("backend,amp", [("torch", False), ("triton", False), ("triton", True)])
def test_replays_match_eager_steps(backend, amp):
    eager_model = _setup(backend)
    graph_model = copy.deepcopy(eager_model)
    eager_opt = torch.optim.AdamW(eager_model.parameters(), lr=LR, fused=True)
    graph_opt = torch.optim.AdamW(graph_model.parameters(), lr=LR, fused=True, capturable=True)
    eager_step, graph_step = _step_fn(eager_model, eager_opt, amp), _step_fn(graph_model, graph_opt, amp)
    warmup, batches = 2, _batches(5)
    eager_losses = [eager_step(*b).item() for b in batches]
    graphed = GraphedStep(graph_step, warmup_steps=warmup)
    graph_losses = []
    for i, b in enumerate(batches):
        graph_losses.append(graphed(*b).item())
        assert graphed.captured == (i >= warmup)
    tol = 2e-2 if amp else 1e-4
    torch.testing.assert_close(graph_losses, eager_losses, rtol=tol, atol=tol)
    # the replays did the optimizer's work: same step count, moments and parameters as the eager steps
    # (compared in the mean, since atomics-ordered sums may flip Adam's first update of a tiny gradient)
    steps = len(batches)
    for pe, pg in zip(eager_model.parameters(), graph_model.parameters()):
        se, sg = eager_opt.state[pe], graph_opt.state[pg]
        assert int(sg["step"]) == int(se["step"]) == steps
        for key in ("exp_avg", "exp_avg_sq"):
            scale = se[key].abs().mean() + 1e-12
            assert (sg[key] - se[key]).abs().mean() <= (0.05 if amp else 1e-3) * scale, key
    moved = torch.cat([(pg - pe).abs().flatten() for pe, pg in zip(eager_model.parameters(), graph_model.parameters())])
    assert moved.mean() <= (0.1 if amp else 0.01) * LR


@cuda
def test_call_checks_inputs_against_the_capture():
    model = _setup("torch")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True, capturable=True)
    batch = _batches(1)[0]
    graphed = GraphedStep(_step_fn(model, opt, False), warmup_steps=1)
    graphed(*batch)
    graphed(*batch)
    assert graphed.captured
    with pytest.raises(ValueError, match="expected 5 inputs"):
        graphed(*batch[:4])
    with pytest.raises(ValueError, match=r"inputs\[0\] must have shape \(6, 4, 8, 8\)"):
        graphed(batch[0][:3], *batch[1:])


TRAIN = ["--image-size", "8", "--batch-size", "16", "--grid-per-class", "0", "--log-every", "1", "--precision", "fp32"]


@pytest.mark.parametrize("extra,message", [
    (["--precision", "fp16"], "--cuda-graph supports --precision fp32 and bf16"),
    (["--compile", "regional"], "--cuda-graph runs the eager step"),
    (["--mask-schedule", "cosine"], "the same number of kept tokens every step"),
    (["--mask-ratio-dist", "unmasked:0.1"], "the same number of kept tokens every step"),
    (["--device", "cpu"], "--cuda-graph needs one process on a CUDA device"),
])
def test_train_cuda_graph_conditions_are_named(tmp_path, extra, message):
    import train

    with pytest.raises(ValueError, match=message):
        train.main(TRAIN + ["--steps", "1", "--cuda-graph", "--out", str(tmp_path / "run"), *extra])
    assert not (tmp_path / "run").exists()


def test_train_cuda_graph_refuses_several_processes(tmp_path, monkeypatch):
    """Two processes on CUDA devices, faked (the check comes before any CUDA work): refused by name."""
    import train
    from maskdit import distributed

    monkeypatch.setattr(distributed, "setup", lambda device: distributed.DistEnv(
        rank=0, world_size=2, device=torch.device("cuda", 0)))
    with pytest.raises(ValueError, match="--cuda-graph needs one process on a CUDA device, got 2 process"):
        train.main(TRAIN + ["--steps", "1", "--cuda-graph", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def _losses(run_dir, key="loss"):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


@cuda
@pytest.mark.parametrize("model,extra", [("MaskDiT-T/2", []), ("DiT-T/2", ["--mask-ratio", "0"]),
                                         ("MaskDiT-T/2", ["--grad-accum", "2", "--batch-size", "8"])])
def test_train_with_cuda_graph_matches_eager_and_resumes(tmp_path, model, extra):
    import train

    base = TRAIN + ["--model", model, "--device", "cuda", "--backend", "triton", "--ckpt-every", "4", *extra]
    eager = train.main(base + ["--steps", "6", "--out", str(tmp_path / "eager")])
    graph = train.main(base + ["--steps", "6", "--cuda-graph", "--out", str(tmp_path / "graph")])
    assert len(_losses(graph)) == 6
    torch.testing.assert_close(_losses(graph), _losses(eager), rtol=1e-3, atol=1e-5)
    # the logged gradient norms too: read after the replay from the gradients the graph keeps in place
    torch.testing.assert_close(_losses(graph, "grad_norm"), _losses(eager, "grad_norm"), rtol=1e-3, atol=1e-6)
    # resumed (optimizer state loaded, then captured again), eager and captured agree on the next steps
    train.main(["--resume", eager, "--steps", "9", "--device", "cuda"])
    train.main(["--resume", graph, "--steps", "9", "--device", "cuda", "--cuda-graph"])
    torch.testing.assert_close(_losses(graph), _losses(eager), rtol=1e-3, atol=1e-5)
    assert len(_losses(graph)) == 9


@cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eager_training_step_never_syncs(backend):
    """The step of bench/train_step.py (mask draw and packing, loss, backward, fused AdamW with the non-finite
    guard, EMA) issues no device synchronisation: the host can run ahead of the GPU."""
    from bench.train_step import make_step

    model = _setup(backend)
    step = make_step(model, 6, torch.device("cuda"), "none", ema=True)
    step()  # first calls may initialise lazily (cuBLAS handles, Triton builds)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
