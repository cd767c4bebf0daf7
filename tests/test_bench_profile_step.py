"""bench/profile_step.py: host time, kernel time and the profiles of a training step."""

import json

from bench import profile_step


def test_profile_step_reports_times_and_tables(tmp_path):
    rows = profile_step.main(["--models", "MaskDiT-S/2", "--backends", "torch", "--batch", "2", "--input-size", "8",
                              "--steps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "profile_step.json").read_text())["rows"]
    assert len(rows) == len(saved) == 1
    r = saved[0]
    assert r["host_ms"] > 0 and r["wall_ms"] >= r["host_ms"] and r["profiler_ops_per_step"] > 100
    assert r["kernel_ms"] == 0.0  # no CUDA kernels on the CPU
    assert "aten::" in r["tables"]["cpu"] and "train_step.py" in r["tables"]["cprofile_cumulative"]
    assert "| MaskDiT-S/2 | torch | 2 |" in (tmp_path / "profile_step.md").read_text()
