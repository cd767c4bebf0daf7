"""Image grids and uint8 conversion for samples."""

from __future__ import annotations

import numpy as np
import torch

PIXEL_ROUNDINGS = ("truncate", "round")


def to_uint8(images: torch.Tensor, rounding: str = "truncate") -> np.ndarray:
    """(N, C, H, W) in [-1, 1] (values outside clamped) -> (N, H, W, C) uint8.  ``rounding`` "truncate": (x + 1) *
    127.5 truncated, as the official MaskDiT sampling script does before its FID; "round": 127.5 x + 128 truncated,
    i.e. rounded, as facebookresearch/DiT's sample_ddp.py (and EDM's) do: pixels half a level brighter on average,
    a shift that can move FID, so each protocol keeps its own."""
    if rounding not in PIXEL_ROUNDINGS:
        raise ValueError(f"rounding must be one of {PIXEL_ROUNDINGS}, got {rounding!r}")
    x = images.float().clamp(-1, 1)
    x = (x + 1) * 127.5 if rounding == "truncate" else (127.5 * x + 128.0).clamp(max=255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images_u8: np.ndarray, rows: int, path: str, scale: int = 1, pad: int = 1) -> None:
    """Save (N, H, W, C) uint8 images as a PNG grid with ``rows`` rows (row-major), upscaled by ``scale``."""
    from PIL import Image

    n, h, w, c = images_u8.shape
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = images_u8[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), resample=Image.NEAREST)
    img.save(path)
