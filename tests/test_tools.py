"""tools/compare_official.py (its checks need the official repositories, which CI does not have): it imports, and
refuses to run without a checkout."""

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_official_needs_a_checkout(tmp_path):
    path = os.path.join(ROOT, "tools", "compare_official.py")
    spec = importlib.util.spec_from_file_location("compare_official", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # (this project's names it uses still exist)
    with pytest.raises(SystemExit):
        tool.main([])
    with pytest.raises(SystemExit):
        tool.main(["--dit", str(tmp_path / "missing")])
    assert tool.rel(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])) == 0.25
