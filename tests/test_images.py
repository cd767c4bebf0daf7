import numpy as np
import pytest
import torch

from maskdit.images import save_grid, to_uint8


def test_to_uint8_truncates_like_the_official_sampler_and_clamps():
    """(x + 1) * 127.5 truncated (official MaskDiT sample.py), values outside [-1, 1] clamped, NHWC layout."""
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 2, 4)
    got = to_uint8(x)
    assert got.dtype == np.uint8 and got.shape == (1, 2, 4, 1)
    assert got.ravel().tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    rgb = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = np.floor((rgb.numpy() + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(to_uint8(rgb), expected)


def test_to_uint8_rounds_like_dits_sampler():
    """rounding="round": clamp(127.5 x + 128, 0, 255) truncated, as facebookresearch/DiT's sample_ddp.py."""
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 2, 4)
    assert to_uint8(x, "round").ravel().tolist() == [0, 0, 0, 128, 191, 255, 255, 255]
    rgb = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    dits = torch.clamp(127.5 * rgb + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert np.array_equal(to_uint8(rgb, "round"), dits)
    assert (to_uint8(rgb, "round").astype(int) - to_uint8(rgb)).mean() > 0.3  # (half a level on average)
    with pytest.raises(ValueError, match="rounding must be one of"):
        to_uint8(rgb, "floor")


def test_save_grid_places_images_row_major(tmp_path):
    from PIL import Image

    images = np.stack([np.full((2, 3, 3), 10 * (i + 1), dtype=np.uint8) for i in range(3)])
    save_grid(images, rows=2, path=str(tmp_path / "g.png"), pad=1)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 3)
    assert (grid[1:3, 1:4] == 10).all() and (grid[1:3, 5:8] == 20).all() and (grid[4:6, 1:4] == 30).all()
    assert (grid[4:6, 5:8] == 255).all() and (grid[0] == 255).all()
