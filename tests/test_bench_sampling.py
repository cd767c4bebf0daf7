"""bench/sampling.py at tiny settings: the result files, their fields and the throughput arithmetic."""

import json
import math

import pytest

from bench import sampling

TINY = ["--models", "DiT-T/2", "MaskDiT-T/2", "--batch", "2", "--steps", "3", "--timed-steps", "2",
        "--impls", "regional", "eager", "compile", "--compile-backend", "eager", "--precisions", "fp32",
        "--compile-precisions", "fp32",
        "--repeats", "1", "--warmup", "1", "--input-size", "8", "--in-channels", "1", "--num-classes", "4"]


def test_heun_evals():
    assert sampling.heun_evals(40) == 79
    assert sampling.heun_evals(1) == 1


def test_timed_steps_must_not_exceed_steps(tmp_path):
    with pytest.raises(SystemExit):
        sampling.main(["--steps", "3", "--timed-steps", "4", "--out", str(tmp_path)])


def test_sampling_bench_tiny(tmp_path, capsys):
    payload = sampling.main(TINY + ["--check-full", "--out", str(tmp_path)])
    with open(tmp_path / "sampling.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(payload))
    for key in ("device", "torch", "triton", "cuda", "python", "date", "command"):
        assert key in saved
    assert "bench/sampling.py" in saved["command"]

    rows = saved["rows"]
    assert [(r["model"], r["impl"]) for r in rows] == [  # regional rows last: they compile the blocks in place
        ("DiT-T/2", "eager"), ("DiT-T/2", "compile"), ("DiT-T/2", "regional"),
        ("MaskDiT-T/2", "eager"), ("MaskDiT-T/2", "compile"), ("MaskDiT-T/2", "regional")]
    for r in rows:
        assert "error" not in r, r
        assert r["precision"] == "fp32" and r["batch"] == 2 and r["network_batch"] == 4
        assert (r["steps"], r["evals"], r["timed_steps"], r["timed_evals"]) == (3, 5, 2, 3)
        assert r["extrapolated"] is True
        assert r["seconds_per_batch"] > 0 and r["imgs_per_s"] > 0
        assert math.isclose(r["imgs_per_s"], r["batch"] / r["seconds_per_batch"], rel_tol=1e-9)
        assert math.isclose(r["seconds_per_eval"], r["timed_seconds"] / r["timed_evals"], rel_tol=1e-9)
        assert math.isclose(r["seconds_per_batch"], r["seconds_per_eval"] * r["evals"], rel_tol=1e-9)
        assert r["full_seconds_per_batch"] > 0 and "extrapolation_error_pct" in r

    md = (tmp_path / "sampling.md").read_text()
    out = capsys.readouterr().out
    assert "| model | impl | precision |" in md and "MaskDiT-T/2 | compile | fp32" in md
    assert md.strip() in out


def test_no_extrapolation_when_all_steps_timed(tmp_path):
    args = ["--models", "DiT-T/2", "--batch", "1", "--steps", "2", "--timed-steps", "2", "--impls", "eager",
            "--precisions", "fp32", "--repeats", "1", "--warmup", "1", "--input-size", "8", "--in-channels", "1",
            "--num-classes", "4", "--out", str(tmp_path)]
    (row,) = sampling.main(args)["rows"]
    assert row["extrapolated"] is False
    assert math.isclose(row["seconds_per_batch"], row["timed_seconds"], rel_tol=1e-9)


def test_kernel_constants_hold_for_the_run(tmp_path, monkeypatch):
    import kernels

    seen = []
    model_rows = sampling.model_rows
    monkeypatch.setattr(sampling, "model_rows",
                        lambda *a, **kw: seen.append(kernels.gelu_gemm.FORWARD) or model_rows(*a, **kw))
    args = ["--models", "DiT-T/2", "--batch", "1", "--steps", "2", "--timed-steps", "1", "--impls", "eager",
            "--precisions", "fp32", "--repeats", "1", "--warmup", "0", "--input-size", "8", "--in-channels", "1",
            "--num-classes", "4", "--kernel-constant", "gelu_gemm.FORWARD=True", "--out", str(tmp_path)]
    sampling.main(args)
    assert seen == [True] and kernels.gelu_gemm.FORWARD is False
    assert "kernels.gelu_gemm.FORWARD = True" in (tmp_path / "sampling.md").read_text()
    with pytest.raises(SystemExit):
        sampling.main(args[:-4] + ["--kernel-constant", "gelu_gemm.NOPE=1"])


def test_rows_are_saved_as_they_come(tmp_path, monkeypatch):
    """A run stopped after its first row (a time limit during the compiled row's compilation) leaves that row."""
    measure, measured = sampling.measure, []

    def stopped_after_one(*args):
        if measured:
            raise KeyboardInterrupt  # (as a kill would: nothing after this point runs)
        measured.append(True)
        return measure(*args)

    monkeypatch.setattr(sampling, "measure", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        sampling.main(TINY + ["--out", str(tmp_path)])
    rows = json.loads((tmp_path / "sampling.json").read_text())["rows"]
    assert [(r["model"], r["impl"]) for r in rows] == [("DiT-T/2", "eager")] and "error" not in rows[0]
    assert "| DiT-T/2 | eager |" in (tmp_path / "sampling.md").read_text()
