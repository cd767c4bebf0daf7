"""bench/step_variants.py: variants parsed, applied and undone, the per-round speed-ups, and a tiny CPU run."""

import importlib
import json
import math

import pytest
import torch

from bench import step_variants
from maskdit import attention, create_model

LN = importlib.import_module("kernels.ln_modulate")
GATED = importlib.import_module("kernels.gated_residual")


def test_parse_variant_settings_and_labels():
    v = step_variants.parse_variant("split:ln_modulate.BWD_SPLIT_COLUMNS=True+gated_residual.BWD_STAGES=2+keep_norm")
    assert v == dict(name="split", sdpa=None, keep_norm=True, checkpointing=None,
                     constants={"ln_modulate": {"BWD_SPLIT_COLUMNS": True}, "gated_residual": {"BWD_STAGES": 2}})
    v = step_variants.parse_variant("sdpa=triton+checkpointing=decoder")
    assert (v["name"], v["sdpa"], v["checkpointing"], v["keep_norm"]) == \
        ("sdpa=triton+checkpointing=decoder", "triton", "decoder", False)
    assert step_variants.parse_variant("base") == dict(name="base", sdpa=None, keep_norm=False, checkpointing=None,
                                                       constants={})


@pytest.mark.parametrize("text, match", [
    ("fast", "'fast' is not a setting"),
    ("sdpa=fastest", "attention kernel must be one of"),
    ("checkpointing=half", "activation checkpointing must be one of"),
    ("ln_modulate.NOPE=1", "no launch-parameter constant 'NOPE'"),
    ("ln_modulate.BWD_STAGES=True", "must be of type int"),
    (":keep_norm", "empty label"),
])
def test_parse_variant_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        step_variants.parse_variant(text)


def test_command_line_rejects_duplicate_names_and_counts(capsys):
    defaults = ["base", "gelu_gemm", "gelu_gemm forward", "gelu_gemm backward", "keep_norm", "gelu_gemm+keep_norm"]
    assert [v["name"] for v in step_variants.parse_args([]).parsed] == defaults
    for argv, match in ((["--variants", "base", "a:base"], None), (["--variants", "base", "base"], "each name once"),
                        (["--rounds", "0"], "must be >= 1"), (["--variants", "base", "x:fast"], "not a setting")):
        if match is None:
            assert [v["name"] for v in step_variants.parse_args(argv).parsed] == ["base", "a"]
            continue
        with pytest.raises(SystemExit):
            step_variants.parse_args(argv)
        assert match in capsys.readouterr().err


def test_applied_sets_and_restores_everything():
    model = create_model("MaskDiT-XL/2", **step_variants.CPU_MODEL, backend="triton")
    variant = step_variants.parse_variant("sdpa=triton+keep_norm+checkpointing=decoder+ln_modulate.BWD_STAGES=1")
    before = LN.BWD_STAGES
    assert before != 1
    with step_variants.applied(variant, model):
        assert attention._sdpa_backend == "triton"
        assert model.keep_norm_outputs and model.activation_checkpointing == "decoder"
        assert LN.BWD_STAGES == 1
    assert attention._sdpa_backend is None
    assert not model.keep_norm_outputs and model.activation_checkpointing == "none"
    assert LN.BWD_STAGES == before
    with pytest.raises(RuntimeError), step_variants.applied(variant, model):  # undone after an error too
        raise RuntimeError
    assert attention._sdpa_backend is None and not model.keep_norm_outputs
    assert LN.BWD_STAGES == before


def test_summarize_pairs_rounds_and_skips_failures():
    def row(name, round_ms, error=None):
        return dict(variant=name, times=[t for t in round_ms for _ in range(3)], round_ms=round_ms, error=error)

    rows = [row("base", [10.0, 12.0, 11.0]), row("fast", [8.0, 12.0, 10.0]), row("oom", [], "out of memory")]
    step_variants.summarize(rows)
    assert rows[0]["speedup"] == 1.0 and rows[0]["step_ms"] == 11.0
    assert math.isclose(rows[1]["speedup"], 11 / 10) and math.isclose(rows[1]["speedup_min"], 1.0)
    assert math.isclose(rows[1]["speedup_max"], 1.25) and rows[1]["step_ms"] == 10.0
    assert rows[2]["speedup"] is None and rows[2]["step_ms"] is None
    failed_base = [row("base", [], "out of memory"), row("fast", [8.0])]
    step_variants.summarize(failed_base)
    assert failed_base[1]["speedup"] is None and failed_base[1]["step_ms"] == 8.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU check (on CUDA the script times the XL models)")
def test_tiny_cpu_run(tmp_path, monkeypatch):
    seen = []  # the settings each timed step ran with
    time_steps = step_variants.time_steps

    def spy(step, steps, device):
        seen.append((attention._sdpa_backend, GATED.BWD_STAGES))
        return time_steps(step, steps, device)

    monkeypatch.setattr(step_variants, "time_steps", spy)
    writes, write_results = [], step_variants.write_results  # saved after each round: a run cut short keeps them
    monkeypatch.setattr(step_variants, "write_results", lambda folder, name, payload, md: writes.append(
        [len(r["round_ms"]) for r in payload["rows"]]) or write_results(folder, name, payload, md))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        payload = step_variants.main(["--models", "MaskDiT-XL/2", "--variants", "base", "other:keep_norm+"
                                      "gated_residual.BWD_STAGES=1", "--rounds", "2", "--steps", "1", "--warmup", "0",
                                      "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    default_stages = GATED.BWD_STAGES
    assert seen == [(None, default_stages), (None, 1), (None, 1), (None, default_stages)]  # rotated in round 2
    assert writes == [[1, 1], [2, 2], [2, 2]]
    saved = json.loads((tmp_path / "step_variants.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert saved["settings"]["batch"] == 2 and saved["settings"]["rounds"] == 2
    for key in ("device", "torch", "triton", "date", "command"):
        assert key in saved
    rows = {r["variant"]: r for r in saved["rows"]}
    assert set(rows) == {"base", "other"}
    assert rows["base"]["speedup"] == 1.0
    for r in rows.values():
        assert r["error"] is None and r["step_ms"] > 0 and len(r["round_ms"]) == 2 and r["speedup"] > 0
    md = (tmp_path / "step_variants.md").read_text()
    assert "| MaskDiT-XL/2 | other |" in md and "| MaskDiT-XL/2 | base |" in md
