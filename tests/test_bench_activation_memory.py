"""bench/activation_memory.py: exact counts of the tensors saved for the backward."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.activation_memory import held_bytes, training_loss
from maskdit import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_saved_bytes_are_affine_in_the_batch():
    model = create_model("MaskDiT-T/2", input_size=8, backend="torch")
    b1, b2, b3 = (held_bytes(model, b, 0.5) for b in (2, 4, 7))
    assert b1 < b2 < b3 and (b2 - b1) * 5 == (b3 - b1) * 2  # per-image bytes x batch + a fixed part


def test_fused_backend_saves_less_and_the_table_is_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # launches are intercepted
    subprocess.run([sys.executable, "bench/activation_memory.py", "--models", "DiT-T/2", "MaskDiT-T/2", "--batch",
                    "16", "--checkpointing", "none", "--compile", "none", "--out", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    payload = json.loads((tmp_path / "activation_memory.json").read_text())
    rows = {(r["model"], r["backend"]): r for r in payload["rows"] if not r["keep_norm_outputs"]}
    kept = {r["model"]: r for r in payload["rows"] if r["keep_norm_outputs"]}
    for model in ("DiT-T/2", "MaskDiT-T/2"):
        assert 0 < rows[(model, "triton")]["activation_gb"] < rows[(model, "torch")]["activation_gb"]
        # keeping the modulated LayerNorm outputs costs memory, still less than the torch backend's
        assert rows[(model, "triton")]["activation_gb"] < kept[model]["activation_gb"] < rows[(model, "torch")][
            "activation_gb"]
    assert rows[("MaskDiT-T/2", "triton")]["activation_mb_per_image"] < rows[("DiT-T/2", "triton")][
        "activation_mb_per_image"]
    md = (tmp_path / "activation_memory.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| MaskDiT-T/2 | triton | none | none | 0.5 |"))
    vs_dit, total_vs_dit = (float(c.strip().rstrip("x")) for c in line.strip("|").split("|")[-2:])
    m, d = rows[("MaskDiT-T/2", "triton")], rows[("DiT-T/2", "triton")]
    assert abs(vs_dit - m["activation_gb"] / d["activation_gb"]) < 0.006 and vs_dit < 1
    assert abs(total_vs_dit - (m["activation_gb"] + m["static_gb"]) / (d["activation_gb"] + d["static_gb"])) < 0.006


@pytest.mark.parametrize("compile_mode", ["regional", "full"])
def test_compiled_triton_training_keeps_no_more_than_eager(compile_mode):
    """The recomputations of the triton backend (modulated LN outputs, the MLP's GELU) survive the compiler's
    partitioner: compiled, the step saves what the eager step keeps."""
    torch._dynamo.reset()
    model = create_model("MaskDiT-T/2", input_size=8, backend="triton")
    eager = held_bytes(model, 3, 0.5)
    compiled = held_bytes(model, 3, 0.5, training_loss(model, compile_mode), compiled=True)
    torch._dynamo.reset()
    assert compiled <= eager * 1.01
