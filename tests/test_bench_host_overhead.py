"""bench/host_overhead.py: the host-side cost of a step with the Triton launches intercepted."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_overhead_counts_launches_and_times_both_backends(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # launches are intercepted, not run
    subprocess.run([sys.executable, "bench/host_overhead.py", "--depth", "2", "--steps", "2", "--out", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    rows = {r["backend"]: r for r in json.loads((tmp_path / "host_overhead.json").read_text())["rows"]}
    assert rows["torch"]["triton_launches"] == 0
    # 2 + 2 blocks: per block a modulated LayerNorm and two gated residuals forward, their backwards and the
    # recomputations, plus patch embedding, mask-token insertion and the loss
    assert rows["triton"]["triton_launches"] > 20
    assert all(r["host_ms"] > 0 and r["depth"] == 2 and r["decoder_depth"] == 2 for r in rows.values())
    assert "| MaskDiT-XL/2 | 2 + 2 | triton |" in (tmp_path / "host_overhead.md").read_text()
