import math

import pytest
import torch

from maskdit.schedules import SCHEDULES, highest_mask_ratio, mask_ratio_schedule, ratio_distribution


@pytest.mark.parametrize("name,start,middle,end", [
    ("constant", 0.5, 0.5, 0.5),
    ("zero", 0.0, 0.0, 0.0),
    ("cosine", 0.5, 0.5 * math.cos(math.pi / 4) ** 4, 0.0),
    ("cosine4", 0.5, 0.5 * math.cos(math.pi / 4) ** 4, 0.0),
    ("cosine2", 0.5, 0.5 * 0.5, 0.0),
    ("linear", 0.0, 0.25, 0.5),
    ("exp", 0.5, 0.5 * math.exp(-3.5), 0.5 * math.exp(-7)),
])
def test_schedule_values(name, start, middle, end):
    f = mask_ratio_schedule(name, 0.5)
    assert f(0.0) == pytest.approx(start, abs=1e-12)
    assert f(0.5) == pytest.approx(middle, abs=1e-12)
    assert f(1.0) == pytest.approx(end, abs=1e-12)


def test_cosine_power_and_official_names():
    assert mask_ratio_schedule("cosine", 0.5, cosine_power=2)(0.5) == pytest.approx(0.25)
    assert {f"cosine{k}" for k in range(2, 7)} <= set(SCHEDULES)
    with pytest.raises(ValueError, match="--mask-schedule"):
        mask_ratio_schedule("cos4", 0.5)  # the official config's name its own code rejects


def test_ratio_distributions():
    g = torch.Generator().manual_seed(0)
    assert ratio_distribution("none")(8, 0.5, g) == 0.5
    r = ratio_distribution("unmasked:0.25")(8, 0.5, g)
    assert sorted(r) == [0.0, 0.0] + [0.5] * 6
    u = ratio_distribution("uniform:0.1:0.6")(1000, 0.5, g)
    assert min(u) >= 0.1 and max(u) < 0.6 and abs(sum(u) / 1000 - 0.35) < 0.02
    for bad in ("unmasked", "unmasked:2", "uniform:0.5:0.2", "uniform:0:1", "gauss:1", "none:3", "none:x",
                "uniform:a:b"):
        with pytest.raises(ValueError, match="--mask-ratio-dist"):
            ratio_distribution(bad)
        with pytest.raises(ValueError, match="--mask-ratio-dist"):
            highest_mask_ratio(0.5, bad)


def test_highest_mask_ratio():
    """The schedules' scale, or a uniform distribution's upper end (the schedule unused there)."""
    assert highest_mask_ratio(0.5, "none") == 0.5
    assert highest_mask_ratio(0.5, "unmasked:0.25") == 0.5
    assert highest_mask_ratio(0.5, "uniform:0.1:0.8") == 0.8
