"""make gpu-check runs where nobody can fix it mid-run (a short, rare GPU lease): its script must parse,
every benchmark it calls must accept the flags it passes, and every part it runs must be documented."""

import functools
import os
import re
import subprocess
import sys

from maskdit.attention import DENSE_KERNELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def _script() -> str:
    """The script with its continued lines joined (a call's flags on one line)."""
    return open(SCRIPT).read().replace("\\\n", " ")


@functools.lru_cache
def _help(script: str) -> str:
    return subprocess.run([sys.executable, script, "--help"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def test_script_parses_and_make_target_calls_it():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    assert "bash bench/gpu_check.sh" in open(os.path.join(ROOT, "Makefile")).read()


def test_every_benchmark_call_uses_known_flags():
    calls = re.findall(r"\$PY (bench/\w+\.py)([^|\n]*)", _script())
    assert {c[0] for c in calls} >= {"bench/kernels.py", "bench/attention.py", "bench/varlen.py",
                                     "bench/train_step.py"}
    for script, args in calls:
        for flag in re.findall(r"(--[\w-]+)", args):
            assert flag in _help(script), (script, flag)


def test_attention_kernels_it_forces_exist():
    """The sdpa part's loop and every --sdpa-backend value name a kernel ``set_sdpa_backend`` takes."""
    text = _script()
    (loop,) = re.findall(r"for k in ([\w ]+); do", text)
    assert "triton" in loop.split()
    named = re.findall(r"--sdpa-backend (\w+)", text)
    assert "triton" in named
    assert set(loop.split()) | set(named) <= set(DENSE_KERNELS)


def test_every_part_is_documented_in_the_header():
    """The header comment gives the default parts and names each optional one in quotes."""
    text = open(SCRIPT).read()
    header = " ".join(line.lstrip("# ") for line in text[:text.index("set -u")].splitlines())
    parts = re.findall(r'\$PARTS == \*" (\w+) "\*', text)
    (default,) = re.findall(r"GPU_CHECK_PARTS:-([\w ]+)\}", text)
    assert {"tests", "kernels", "attention", "train_step", "sdpa", "tattn", "asweep"} <= set(parts)
    assert f'(default: "{default}"' in header
    assert not [p for p in parts if p not in default.split() and f'"{p}"' not in header]


def test_attention_parts_have_time_for_the_triton_rows():
    """bench/attention.py compiles and times the Triton kernel's rows after the SDPA rows (part "attention"),
    and its launch settings with --sweep (part "asweep")."""
    text = _script()
    assert re.search(r"timeout 150 \$PY bench/attention.py --out", text)
    assert re.search(r"timeout 150 \$PY bench/attention.py --sweep --out", text)


def test_python_snippets_run_with_the_scripts_pythonpath():
    """The device slug (the default results folder) and the versions line come from ``bench.common``, imported
    with the script's ``PYTHONPATH=.``: a broken import would only show on the GPU machine."""
    snippets = re.findall(r'\$PY -c "([^"]*bench\.common[^"]*)"', _script())
    assert len(snippets) == 2
    env = dict(os.environ, PYTHONPATH=".")
    outputs = [subprocess.run([sys.executable, "-c", s], cwd=ROOT, env=env, check=True, capture_output=True,
                              text=True).stdout.strip() for s in snippets]
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", outputs[0])
    assert re.fullmatch(r"python \S+ torch \S+ triton \S+ cuda \S+", outputs[1])


def test_results_are_packed_into_out_by_default(tmp_path):
    """With $OUT set (a lent machine returns that folder, a few files of it) the results are also packed into
    $OUT/gpu-check.tgz, after the first part already (device.txt); no part runs here."""
    import tarfile

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "RESULTS_DIR": str(out / "results"), "GPU_CHECK_PARTS": "none",
           "PYTHON": sys.executable}
    env.pop("GPU_CHECK_ARCHIVE", None)
    subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, check=True, capture_output=True)
    with tarfile.open(out / "gpu-check.tgz") as archive:
        assert "./device.txt" in archive.getnames()
    assert (out / "results" / "device.txt").read_text().strip()
