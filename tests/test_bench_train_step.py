"""bench/train_step.py: a tiny real run of its CPU path, and the sweep's bookkeeping (speed-ups, out of memory)."""

import json
import math
import os
import sys

import pytest
import torch

from bench import train_step
from maskdit import create_model

FIELDS = ("model", "impl", "batch", "resolution", "step_ms", "imgs_per_s", "peak_mem_gb", "tflops", "mfu",
          "speedup_vs_dit", "speedup_vs_torch_eager", "oom", "error")


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture
def one_thread():
    """One CPU thread: on a busy 2-core machine two OpenMP threads can make these tiny steps 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_run_writes_consistent_results(tmp_path, one_thread):
    payload = train_step.main(["--models", "DiT-T/2", "MaskDiT-T/2", "--impls", "torch", "--batches", "4",
                               "--steps", "2", "--warmup", "1", "--input-size", "8", "--out", str(tmp_path)])
    with open(tmp_path / "train_step.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    for key in ("device", "torch", "triton", "cuda", "date", "command", "matmul_tflops", "settings"):
        assert key in saved
    assert saved["matmul_tflops"] > 0
    rows = {r["model"]: r for r in saved["rows"]}
    assert set(rows) == {"DiT-T/2", "MaskDiT-T/2"}
    for r in rows.values():
        assert all(k in r for k in FIELDS)
        assert (r["impl"], r["batch"], r["resolution"], r["oom"], r["error"]) == ("torch", 4, 64, False, None)
        assert r["step_ms"] > 0 and _close(r["imgs_per_s"], 4 / (r["step_ms"] * 1e-3))
        assert _close(r["tflops"], r["train_gflops_per_img"] * 4 / r["step_ms"])
        assert _close(r["mfu"], r["tflops"] / saved["matmul_tflops"])
        assert r["speedup_vs_torch_eager"] == 1.0
        if not torch.cuda.is_available():
            assert r["peak_mem_gb"] is None
    assert rows["DiT-T/2"]["speedup_vs_dit"] is None
    assert _close(rows["MaskDiT-T/2"]["speedup_vs_dit"], rows["DiT-T/2"]["step_ms"] / rows["MaskDiT-T/2"]["step_ms"])
    md = (tmp_path / "train_step.md").read_text()
    assert "| model | impl | batch |" in md and "| MaskDiT-T/2 | torch | 4 | 64 |" in md
    png = os.path.exists(tmp_path / "train_step_throughput.png")
    try:
        import matplotlib  # noqa: F401
        assert png
    except ImportError:
        assert not png


def test_sdpa_backend_flag(tmp_path, one_thread, monkeypatch):
    from maskdit import attention

    seen = []
    real = attention._dense_sdpa

    def recording(q, k, v):
        if not q.is_meta:  # (the FLOP count on the meta device runs SDPA whatever the kernel: maskdit.flops)
            seen.append(attention._sdpa_backend)
        return real(q, k, v)

    monkeypatch.setattr(attention, "_dense_sdpa", recording)
    payload = train_step.main(["--models", "MaskDiT-T/2", "--impls", "torch", "--batches", "2", "--steps", "1",
                               "--warmup", "0", "--input-size", "8", "--sdpa-backend", "math", "--out", str(tmp_path)])
    assert seen and set(seen) == {"math"} and payload["settings"]["sdpa_backend"] == "math"
    assert attention._sdpa_backend is None  # restored after the run
    assert "attention kernel: math" in (tmp_path / "train_step.md").read_text()


def test_triton_attention_run(tmp_path, one_thread, small_attention_tiles):
    """``make gpu-check`` part "tattn" on the CPU: the triton backend's step on the Triton attention kernel (the
    interpreter, blocks of 16 for speed) times a row, with the FLOPs counted as with SDPA."""
    from maskdit.attention import PATHS_USED

    before = PATHS_USED["triton"]
    args = ["--models", "MaskDiT-T/2", "--batches", "2", "--steps", "1", "--warmup", "0", "--input-size", "8"]
    row, = train_step.main(args + ["--impls", "triton", "--sdpa-backend", "triton", "--out", str(tmp_path)])["rows"]
    assert PATHS_USED["triton"] > before and row["step_ms"] > 0 and not row["error"]
    sdpa, = train_step.main(args + ["--impls", "torch", "--out", str(tmp_path / "sdpa")])["rows"]
    assert row["train_gflops_per_img"] == sdpa["train_gflops_per_img"]


def test_sweep_records_oom_and_speedups(monkeypatch):
    """Step times made up by a fake measurement: MaskDiT triton runs out of memory at batch 8, so batch 16
    is skipped as out of memory; speed-ups are the step-time ratios and None where a side is missing."""
    step_ms = {("DiT-T/2", "torch"): 10.0, ("DiT-T/2", "triton"): 8.0,
               ("MaskDiT-T/2", "torch"): 6.0, ("MaskDiT-T/2", "triton"): 4.0}
    calls = []

    def fake_measure(name, impl, batch, args, device):
        calls.append((name, impl, batch))
        if (name, impl) == ("MaskDiT-T/2", "triton") and batch >= 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ms = step_ms[(name, impl)] * batch
        return dict(step_ms=ms, step_ms_min=ms, imgs_per_s=batch / (ms * 1e-3), peak_mem_gb=0.1 * batch)

    monkeypatch.setattr(train_step, "measure", fake_measure)
    args = train_step.parse_args(["--models", "DiT-T/2", "MaskDiT-T/2", "--impls", "torch", "triton",
                                  "--batches", "16", "4", "8", "--input-size", "8"])
    rows = train_step.sweep(args, torch.device("cpu"), matmul_tflops=2.0)
    assert ("MaskDiT-T/2", "triton", 16) not in calls and len(calls) == 11
    index = {(r["model"], r["impl"], r["batch"]): r for r in rows}
    assert len(index) == 12
    for key in (("MaskDiT-T/2", "triton", 8), ("MaskDiT-T/2", "triton", 16)):
        r = index[key]
        assert r["oom"] and "out of memory" in r["error"]
        assert r["step_ms"] is None and r["speedup_vs_dit"] is None and r["speedup_vs_torch_eager"] is None
    r = index[("MaskDiT-T/2", "triton", 4)]
    assert r["speedup_vs_dit"] == pytest.approx(8.0 / 4.0) and r["speedup_vs_torch_eager"] == pytest.approx(6.0 / 4.0)
    assert r["mfu"] == pytest.approx(r["tflops"] / 2.0)
    assert index[("MaskDiT-T/2", "torch", 16)]["speedup_vs_dit"] == pytest.approx(10.0 / 6.0)
    assert index[("DiT-T/2", "triton", 8)]["speedup_vs_torch_eager"] == pytest.approx(10.0 / 8.0)
    md = train_step.markdown(dict(device="test", torch="x", triton="y", cuda=None, date="today"), (2.0, "fake"),
                             args, rows)
    assert md.count("| OOM |") == 2 and "Errors:" not in md


def test_kernel_constants_hold_for_the_run_and_are_recorded(tmp_path, monkeypatch):
    """--kernel-constant sets a kernel module's launch parameter during the sweep only, and the results say so."""
    from kernels import gated_residual

    seen = []
    monkeypatch.setattr(train_step, "sweep", lambda args, device, tflops, on_row: seen.append(
        (gated_residual.BWD_SPLIT_COLUMNS, gated_residual.BWD_STAGES)) or [])
    default = gated_residual.BWD_SPLIT_COLUMNS, gated_residual.BWD_STAGES
    payload = train_step.main(["--models", "DiT-T/2", "--kernel-constant", "gated_residual.BWD_SPLIT_COLUMNS=True",
                               "gated_residual.BWD_STAGES=2", "--out", str(tmp_path)])
    assert seen == [(True, 2)] and (gated_residual.BWD_SPLIT_COLUMNS, gated_residual.BWD_STAGES) == default
    assert payload["settings"]["kernel_constants"] == {"gated_residual": {"BWD_SPLIT_COLUMNS": True, "BWD_STAGES": 2}}
    assert "kernels.gated_residual.BWD_SPLIT_COLUMNS = True" in (tmp_path / "train_step.md").read_text()


@pytest.mark.parametrize("bad,message", [
    ("BWD_STAGES=2", "MODULE.NAME=VALUE"), ("nosuch.BWD_STAGES=2", "no kernel module"),
    ("ln_modulate.bwd_stages=2", "no launch-parameter constant"), ("ln_modulate.BWD_STAGES=two", "Python literal"),
    ("ln_modulate.BWD_STAGES=True", "type int"), ("ln_modulate.BWD_SPLIT_COLUMNS=1", "type bool")])
def test_bad_kernel_constants_are_named(bad, message, capsys):
    with pytest.raises(SystemExit):
        train_step.parse_args(["--kernel-constant", bad])
    assert "--kernel-constant" in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        train_step.kernel_constants([bad])


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    row = dict(model="DiT-T/2", impl="torch", batch=4, imgs_per_s=1.0, peak_mem_gb=None)
    assert train_step.plots([row], str(tmp_path)) == []
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("batches", [[4, 8], [256]])
def test_plots_lines_over_batches_or_bars_for_one(tmp_path, batches):
    pytest.importorskip("matplotlib")
    rows = [dict(model=m, impl=i, batch=b, imgs_per_s=float(b), peak_mem_gb=None if i == "triton" else 1.0)
            for m in ("DiT-T/2", "MaskDiT-T/2") for i in ("torch", "triton") for b in batches
            if (m, i) != ("DiT-T/2", "triton")]  # a missing configuration (e.g. out of memory)
    paths = train_step.plots(rows, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["train_step_throughput.png", "train_step_memory.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)


@pytest.mark.parametrize("backend, fused", [("torch", False), ("triton", None)])
def test_torch_rows_keep_the_ema_plain(monkeypatch, backend, fused):
    """The torch rows are the plain-PyTorch baseline: their EMA is foreach ops, never kernels.ema's launch."""
    seen = []

    class SpyEMA(train_step.EMA):
        def __init__(self, model, ema_model, fused=None):
            seen.append(fused)
            super().__init__(model, ema_model, fused=fused)

    monkeypatch.setattr(train_step, "EMA", SpyEMA)
    model = create_model("MaskDiT-T/2", 8, 4, 10, backend=backend)
    train_step.make_step(model, 2, torch.device("cpu"), "none", ema=True)
    assert seen == [fused]


@pytest.mark.parametrize("script, argv, message", [
    ("train_step", ["--models", "Foo-X/2"], "--models: unknown model name 'Foo-X/2'"),
    ("train_step", ["--input-size", "0"], "--input-size must be >= 1"),
    ("sampling", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("sampling", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("sampling", ["--out", __file__ + "/sub"], "cannot create the folder"),
    ("sampling", ["--out", ""], "--out must name a folder"),
])
def test_bad_benchmark_arguments_fail_before_measuring(script, argv, message, capsys):
    """One line naming the flag (argparse's exit status 2) before any timing, whose work they would lose."""
    from bench import sampling

    with pytest.raises(SystemExit) as e:
        train_step.parse_args(argv) if script == "train_step" else sampling.parse_args(argv, cuda=False)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_stack_dumps_of_the_first_step(tmp_path, one_thread):
    """--stack-dumps: the first (compiling) step's stacks, written while it runs, labelled by configuration;
    the helper writes from its own thread (a dump per period while the block runs, none after it)."""
    import time

    from bench.common import stack_dumps

    path = tmp_path / "stacks.txt"
    with stack_dumps(str(path), 0.05, "waiting"):
        time.sleep(0.3)
    text = path.read_text()
    time.sleep(0.15)
    assert path.read_text() == text  # cancelled with the block
    assert text.startswith("== waiting\n") and text.count("-- dump ") >= 2
    assert "test_stack_dumps_of_the_first_step" in text
    train_step.main(["--models", "DiT-T/2", "--impls", "torch", "--batches", "2", "--steps", "1", "--warmup", "1",
                     "--input-size", "8", "--stack-dumps", "0.001", "--out", str(tmp_path)])
    assert (tmp_path / "first_step_stacks.txt").read_text().startswith("== DiT-T/2 torch batch 2, first step\n")
    with stack_dumps(None, 0.01, "off"):
        pass
