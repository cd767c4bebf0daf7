"""Row-tile building blocks of the LayerNorm kernels (``ln_modulate``, ``gated_residual``).

A program owns a tile of ``BLOCK_M`` consecutive token rows and walks the hidden dimension in chunks of
``BLOCK_D`` columns (D need not be a power of two: 1152 is nine 128-wide chunks, where a whole-row block
would pad to 2048 and waste 44% of the registers).  Row statistics are merged chunk by chunk; a second
walk over the chunks (re-reading what the first read, from L2) writes the outputs.  Per-sample column sums
of the backward are reduced over the tile's rows of each sample and added once per (tile, sample, chunk).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl


class Tile(NamedTuple):
    block_m: int  # token rows per program
    block_d: int  # columns per chunk
    num_warps: int


def tile(d: int) -> Tile:
    """The tile of the LayerNorm kernels for hidden size ``d``: 8 rows x 128 columns, 4 warps (8 values a
    thread per tensor: at D 1152 on sm_90 at most 124 registers a thread, against 235 with 16 rows,
    ``bench/kernel_resources.py``); narrower rows take a narrower chunk."""
    return Tile(8, min(128, max(16, triton.next_power_of_2(d))), 4)


@triton.jit
def merge_chunk_stats(mean, m2, count, x, valid):
    """Merge a chunk (``x`` [BLOCK_M, BLOCK_D], zero where not ``valid``) into the running per-row mean,
    sum of squared deviations and count (Chan et al.'s pairwise update: no cancellation for large means)."""
    n_c = tl.sum(valid.to(tl.float32), axis=1)
    c_mean = tl.sum(x, axis=1) / tl.maximum(n_c, 1.0)
    dev = tl.where(valid, x - c_mean[:, None], 0.0)
    c_m2 = tl.sum(dev * dev, axis=1)
    total = count + n_c
    frac = n_c / tl.maximum(total, 1.0)
    delta = c_mean - mean
    return mean + delta * frac, m2 + c_m2 + delta * delta * count * frac, total


@triton.jit
def _flush(PTR, part, s, last, cols, cmask, D, DETERMINISTIC: tl.constexpr):
    if DETERMINISTIC:
        tl.store(PTR + last * D + cols, part, mask=cmask & ((cols * 0 + last) >= 0))
    else:  # (a sample without rows in the tile, between two that have some, gets zeros added)
        tl.atomic_add(PTR + s * D + cols, part, mask=cmask)


@triton.jit
def add_sample_sums(PTR_A, a, PTR_B, b, PTR_C, c, s_rows, rows, rmask, cols, cmask, D, s_lo, s_hi,
                    NUM: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Add the column sums of the first ``NUM`` of ``a``, ``b``, ``c`` ([BLOCK_M, BLOCK_D] each) over the
    tile's rows of each sample s in [s_lo, s_hi] (usually one) to row s of PTR_A, PTR_B, PTR_C (N, D) with
    atomic adds; deterministic, store each sample's sums in that sample's last row of the tile in (T, D)
    buffers that the launcher reduces per sample in a fixed order (``_common.per_sample_sums``)."""
    for s in range(s_lo, s_hi + 1):
        sel = (s_rows == s) & rmask
        if DETERMINISTIC:
            last = tl.max(tl.where(sel, rows, -1), axis=0)
        else:
            last = s  # (unused)
        _flush(PTR_A, tl.sum(tl.where(sel[:, None], a, 0.0), axis=0), s, last, cols, cmask, D, DETERMINISTIC)
        if NUM > 1:
            _flush(PTR_B, tl.sum(tl.where(sel[:, None], b, 0.0), axis=0), s, last, cols, cmask, D, DETERMINISTIC)
        if NUM > 2:
            _flush(PTR_C, tl.sum(tl.where(sel[:, None], c, 0.0), axis=0), s, last, cols, cmask, D, DETERMINISTIC)
