"""bench/attention.py: attention per SDPA backend at the training step's shapes (CPU: a smoke run)."""

import torch

from bench import attention


def test_shapes_are_the_xl2_step_layers():
    enc, dec, dit = attention.shapes(256, 32)
    assert (enc["seq"], enc["heads"], enc["head_dim"], enc["layers"]) == (128, 16, 72, 28)
    assert (dec["seq"], dec["head_dim"]) == (256, dec["head_dim"]) and dec["heads"] * dec["head_dim"] == 512
    assert (dit["seq"], dit["head_dim"], dit["layers"]) == (256, 72, 28)


def test_backends_agree_and_rows_are_written(tmp_path):
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    fns = attention.backends(cuda=False)
    torch.testing.assert_close(fns["math"](q, k, v), fns["default"](q, k, v))
    rows = attention.main(["--batch", "1", "--input-size", "4", "--out", str(tmp_path)])
    # the encoder's and DiT's head dim 72 also zero-padded to 80, 96 and 128
    assert len(rows) == 3 * (len(fns) + 1) + 2 * 3 and not any("error" in r for r in rows)
    assert [r["layout"] for r in rows[:len(fns) + 1]] == ["packed"] * len(fns) + ["contiguous"]
    assert [r["padded_head_dim"] for r in rows if r["name"] == "DiT-XL/2"][-3:] == [80, 96, 128]
    assert all(r["fwd_bwd_ms"] > 0 and r["step_ms"] > 0 for r in rows)
    assert "| MaskDiT-XL/2 encoder | 1 x 16 x 2 x 72 | math |" in (tmp_path / "attention.md").read_text()


def test_zero_padded_heads_give_the_same_attention():
    """The padded rows' premise: heads zero-padded from 72 to 80 values, scaled by 72 ** -0.5, give the same
    output in their first 72 values and zeros after them."""
    q, k, v = (torch.randn(2, 3, 5, 72, dtype=torch.float64) for _ in range(3))
    pad = [torch.nn.functional.pad(t, (0, 8)) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*pad, scale=72 ** -0.5)
    torch.testing.assert_close(out[..., :72], torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert not out[..., 72:].any()
