"""make gpu-check runs where nobody can fix it mid-run (a short, rare GPU lease): its script must parse,
and every benchmark it calls must accept the flags it passes."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def test_script_parses_and_make_target_calls_it():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    assert "bash bench/gpu_check.sh" in open(os.path.join(ROOT, "Makefile")).read()


def test_every_benchmark_call_uses_known_flags():
    calls = re.findall(r"\$PY (bench/\w+\.py)([^|\n]*)", open(SCRIPT).read())
    assert {c[0] for c in calls} >= {"bench/kernels.py", "bench/varlen.py", "bench/train_step.py"}
    for script, args in calls:
        flags = re.findall(r"(--[\w-]+)", args)
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, check=True, capture_output=True,
                                   text=True).stdout
        for flag in flags:
            assert flag in help_text, (script, flag)
