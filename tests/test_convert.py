"""Official checkpoints -> this project's networks.

The state dicts here carry the official key names and shapes (Anima-Lab/MaskDiT under its EDMPrecond
``model.`` prefix; facebookresearch/DiT bare), with random values.  ``official_forward`` is an
independent implementation of the official networks working directly on those tensors (Conv2d patch
embedding, one-hot label Linear, repeat+cat+gather unmasking, einsum unpatchify), so the test checks
every layout change the conversion makes.
"""

import argparse
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from maskdit import convert_official_state_dict, create_model, random_mask
from maskdit.convert import convert_file, infer_config, load_official_file

D, DEPTH, HEADS = 192, 6, 3  # the "T" size, so the converted model is a named one
DEC_D, DEC_DEPTH, DEC_HEADS = 512, 2, 16
P, C, SIZE, NC = 2, 4, 8, 7


def official_shapes(source, learn_sigma=False, d=D, depth=DEPTH, dec_d=DEC_D, dec_depth=DEC_DEPTH, c=C, p=P,
                    size=SIZE, nc=NC):
    """Key -> shape of an official state dict (MaskDiT keys without the ``model.`` prefix)."""
    shapes = {
        "x_embedder.proj.weight": (d, c, p, p), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (d, nc) if source == "maskdit" else (nc + 1, d),
    }

    def block(prefix, w, cd):
        shapes.update({
            f"{prefix}.attn.qkv.weight": (3 * w, w), f"{prefix}.attn.qkv.bias": (3 * w,),
            f"{prefix}.attn.proj.weight": (w, w), f"{prefix}.attn.proj.bias": (w,),
            f"{prefix}.mlp.fc1.weight": (4 * w, w), f"{prefix}.mlp.fc1.bias": (4 * w,),
            f"{prefix}.mlp.fc2.weight": (w, 4 * w), f"{prefix}.mlp.fc2.bias": (w,),
            f"{prefix}.adaLN_modulation.1.weight": (6 * w, cd), f"{prefix}.adaLN_modulation.1.bias": (6 * w,),
        })

    for i in range(depth):
        block(f"blocks.{i}", d, d)
    c_out = 2 * c if learn_sigma else c
    final_d = d
    grid = size // p
    shapes["pos_embed"] = (1, grid * grid, d)
    if source == "maskdit":
        shapes.update({
            "decoder_layer.linear.weight": (dec_d, d), "decoder_layer.linear.bias": (dec_d,),
            "decoder_layer.adaLN_modulation.1.weight": (2 * d, d), "decoder_layer.adaLN_modulation.1.bias": (2 * d,),
            "mask_token": (1, 1, dec_d), "decoder_pos_embed": (1, grid * grid, dec_d),
        })
        for i in range(dec_depth):
            block(f"decoder_blocks.{i}", dec_d, d)
        final_d = dec_d
    shapes.update({
        "final_layer.linear.weight": (p * p * c_out, final_d), "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * final_d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * final_d,),
    })
    return shapes


def official_state_dict(source, learn_sigma=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * (0.5 / math.sqrt(s[-1])) for k, s in
          official_shapes(source, learn_sigma).items()}
    sd["pos_embed"] = torch.randn(sd["pos_embed"].shape, generator=g)  # any fixed values: they must be copied
    if source == "maskdit":
        sd["decoder_pos_embed"] = torch.randn(sd["decoder_pos_embed"].shape, generator=g)
        return {"model." + k: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------- the official networks, independently
def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _block(sd, pre, x, c, heads):
    mod = F.linear(F.silu(c), sd[f"{pre}.adaLN_modulation.1.weight"], sd[f"{pre}.adaLN_modulation.1.bias"])
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
    B, T, d = x.shape
    h = _modulate(_ln(x), sh1, sc1)
    qkv = F.linear(h, sd[f"{pre}.attn.qkv.weight"], sd[f"{pre}.attn.qkv.bias"]).reshape(B, T, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).softmax(-1)
    a = (att @ v).transpose(1, 2).reshape(B, T, d)
    x = x + g1.unsqueeze(1) * F.linear(a, sd[f"{pre}.attn.proj.weight"], sd[f"{pre}.attn.proj.bias"])
    h = _modulate(_ln(x), sh2, sc2)
    h = F.gelu(F.linear(h, sd[f"{pre}.mlp.fc1.weight"], sd[f"{pre}.mlp.fc1.bias"]), approximate="tanh")
    return x + g2.unsqueeze(1) * F.linear(h, sd[f"{pre}.mlp.fc2.weight"], sd[f"{pre}.mlp.fc2.bias"])


def _final(sd, pre, x, c):
    shift, scale = F.linear(F.silu(c), sd[f"{pre}.adaLN_modulation.1.weight"],
                            sd[f"{pre}.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    return F.linear(_modulate(_ln(x), shift, scale), sd[f"{pre}.linear.weight"], sd[f"{pre}.linear.bias"])


def official_forward(sd, source, x, t, labels, mask=None):
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    if mask is not None:
        h = torch.gather(h, 1, mask.ids_keep.unsqueeze(-1).repeat(1, 1, D))
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    if source == "maskdit":  # one-hot Linear; the null class is the all-zero vector
        onehot = torch.zeros(len(labels), NC)
        real = labels < NC
        onehot[real.nonzero()[:, 0], labels[real]] = 1
        yemb = onehot @ sd["y_embedder.embedding_table.weight"].t()
    else:
        yemb = sd["y_embedder.embedding_table.weight"][labels]
    c = temb + yemb
    for i in range(DEPTH):
        h = _block(sd, f"blocks.{i}", h, c, HEADS)
    if source == "maskdit":
        h = _final(sd, "decoder_layer", h, c)
        if mask is not None:
            mt = sd["mask_token"].repeat(h.shape[0], mask.ids_restore.shape[1] - h.shape[1], 1)
            h = torch.cat([h, mt], dim=1)
            h = torch.gather(h, 1, mask.ids_restore.unsqueeze(-1).repeat(1, 1, h.shape[2]))
        h = h + sd["decoder_pos_embed"]
        for i in range(DEC_DEPTH):
            h = _block(sd, f"decoder_blocks.{i}", h, c, DEC_HEADS)
    h = _final(sd, "final_layer", h, c)
    g, c_out = SIZE // P, h.shape[-1] // (P * P)
    h = h.reshape(h.shape[0], g, g, P, P, c_out)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c_out, SIZE, SIZE)


# ---------------------------------------------------------------- tests
def _inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, C, SIZE, SIZE, generator=g), torch.randn(n, generator=g)


@pytest.mark.parametrize("masked", [False, True])
def test_maskdit_conversion_gives_official_outputs(masked):
    sd = official_state_dict("maskdit")
    ours = create_model("MaskDiT-T/2", input_size=SIZE, in_channels=C, num_classes=NC,
                        decoder_depth=DEC_DEPTH, decoder_hidden_size=DEC_D, decoder_num_heads=DEC_HEADS)
    ours.load_state_dict(convert_official_state_dict(sd, "maskdit"), strict=True)
    x, t = _inputs()
    labels = torch.tensor([0, 6, NC])  # NC: the null class
    mask = random_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(2)) if masked else None
    with torch.no_grad():
        expect = official_forward(sd, "maskdit", x, t, labels, mask)
        got = ours(x, t, labels, mask.ids_keep if masked else None)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_dit_conversion_gives_official_outputs():
    sd = official_state_dict("dit", learn_sigma=True)
    ours = create_model("DiT-T/2", input_size=SIZE, in_channels=C, num_classes=NC, learn_sigma=True)
    ours.load_state_dict(convert_official_state_dict(sd, "dit"), strict=True)
    x, t = _inputs()
    labels = torch.tensor([NC, 2, 5])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, labels), official_forward(sd, "dit", x, t, labels),
                                   rtol=1e-4, atol=1e-5)


def test_prefixes_and_training_checkpoint_layout():
    sd = official_state_dict("maskdit")
    wrapped = {"module._orig_mod." + k: v for k, v in sd.items()}
    a, b = convert_official_state_dict(sd, "maskdit"), convert_official_state_dict(wrapped, "maskdit")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_infer_config():
    cfg = infer_config(official_state_dict("maskdit"), "maskdit")
    assert (cfg.name, cfg.input_size, cfg.in_channels, cfg.num_classes) == ("MaskDiT-T/2", SIZE, C, NC)
    assert (cfg.decoder_depth, cfg.decoder_hidden_size, cfg.null_class) == (DEC_DEPTH, DEC_D, "zero")
    cfg = infer_config(official_state_dict("dit", learn_sigma=True), "dit")
    assert (cfg.name, cfg.learn_sigma, cfg.null_class, cfg.num_classes) == ("DiT-T/2", True, "learned", NC)


def test_maskdit_trained_without_mae_has_no_mask_token():
    """The official code makes the mask token only with an MAE coefficient > 0: a state dict without one
    converts to a model with zeros at the masked positions (learn_mask_token=False), loading strictly."""
    official = {k: v for k, v in official_state_dict("maskdit").items() if not k.endswith("mask_token")}
    cfg = infer_config(official, "maskdit")
    assert cfg.learn_mask_token is False and infer_config(official_state_dict("maskdit"), "maskdit").learn_mask_token
    create_model(cfg.name, **{k: v for k, v in cfg.to_dict().items() if k != "name"}).load_state_dict(
        convert_official_state_dict(official, "maskdit"), strict=True)


def test_official_xl2_shapes_load_strictly():
    """The released MaskDiT-XL/2 and DiT-XL/2 key sets and shapes, on the meta device."""
    with torch.device("meta"):
        for name, source, kw in [("MaskDiT-XL/2", "maskdit", {}), ("DiT-XL/2", "dit", dict(learn_sigma=True))]:
            shapes = official_shapes(source, kw.get("learn_sigma", False), d=1152, depth=28, dec_d=512, dec_depth=8,
                                     c=4, p=2, size=32, nc=1000)
            prefix = "model." if source == "maskdit" else ""
            official = {prefix + k: torch.empty(s) for k, s in shapes.items()}
            ours = create_model(name, **kw)
            ours.load_state_dict(convert_official_state_dict(official, source), strict=True, assign=True)
            assert infer_config(official, source).name == name


def test_bad_inputs():
    with pytest.raises(ValueError, match="source"):
        convert_official_state_dict({}, "mdt")
    with pytest.raises(ValueError, match="not an official"):
        convert_official_state_dict({"foo": torch.zeros(1)}, "dit")
    with pytest.raises(ValueError, match="not a tensor"):
        convert_official_state_dict({"ema": {"a": torch.zeros(1)}}, "dit")


def test_a_training_file_keeps_its_model_and_ema_weights_apart(tmp_path):
    """The official training file holds the trained weights ("model") and their average ("ema"): a tuning run
    goes on training the first and averaging into the second, as the official tuning loads them."""
    model_sd, ema_sd = official_state_dict("maskdit", seed=1), official_state_dict("maskdit", seed=2)
    torch.save({"model": model_sd, "ema": ema_sd, "opt": {}}, tmp_path / "official.pt")
    convert_file(str(tmp_path / "official.pt"), str(tmp_path / "both.pt"), "maskdit")
    both = torch.load(tmp_path / "both.pt", weights_only=False)
    for slot, sd in (("model", model_sd), ("ema", ema_sd)):
        want = convert_official_state_dict(sd, "maskdit")
        assert both[slot].keys() == want.keys() and all(torch.equal(both[slot][k], want[k]) for k in want), slot
    convert_file(str(tmp_path / "official.pt"), str(tmp_path / "ema.pt"), "maskdit", key="ema")
    ema_only = torch.load(tmp_path / "ema.pt", weights_only=False)
    assert ema_only["model"] is ema_only["ema"]  # one set of weights, stored once
    assert all(torch.equal(ema_only["model"][k], both["ema"][k]) for k in both["ema"])


def test_the_wrong_source_is_refused_not_converted(tmp_path):
    """Each kind of file converted as the other: refused, naming the right --source, and nothing written."""
    for source, other in (("dit", "maskdit"), ("maskdit", "dit")):
        src, dst = tmp_path / f"{source}.pt", tmp_path / f"{source}-as-{other}.pt"
        torch.save({"ema": official_state_dict(source)}, src)
        with pytest.raises(ValueError, match=f"not a {other} state dict; is it --source {source}"):
            convert_file(str(src), str(dst), other)
        assert not dst.exists()
    # a MaskDiT file whose label table would pass: its decoder still tells
    sd = {k: v for k, v in official_state_dict("maskdit").items() if "y_embedder" not in k}
    torch.save({"ema": sd}, src)
    with pytest.raises(ValueError, match="MaskDiT's decoder, .*: is it --source maskdit"):
        convert_file(str(src), str(dst), "dit")


def test_weights_that_do_not_fit_the_inferred_network_are_refused(tmp_path):
    sd = official_state_dict("dit")
    sd["blocks.0.mlp.fc1.weight"] = sd["blocks.0.mlp.fc1.weight"][:-1]  # one hidden unit short
    torch.save({"ema": sd}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="(?s)the converted weights do not fit DiT-T/2: .*size mismatch for "
                                         "blocks.0.mlp.fc1.weight"):
        convert_file(str(tmp_path / "bad.pt"), str(tmp_path / "out.pt"), "dit")
    assert not (tmp_path / "out.pt").exists()


def test_cli_converts_a_training_checkpoint_file(tmp_path):
    sd = official_state_dict("maskdit")
    src = tmp_path / "official.pt"
    # as the official train.py saves it: its argparse arguments beside the weights
    torch.save({"model": sd, "ema": sd, "opt": {}, "args": argparse.Namespace(config="a.yaml", lr=1e-4)}, src)
    dst = tmp_path / "converted.pt"
    res = subprocess.run([sys.executable, "-m", "maskdit.convert", str(src), str(dst), "--source", "maskdit"],
                         capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert res.returncode == 0, res.stderr
    assert "MaskDiT-T/2" in res.stdout
    assert "Warning" not in res.stderr, res.stderr  # e.g. runpy's, had `import maskdit` imported the module first
    ckpt = torch.load(dst, weights_only=False)
    assert ckpt["parameterization"] == "edm"
    from maskdit.config import ModelConfig
    from maskdit.models import DiT
    DiT(ModelConfig.from_dict(ckpt["config"]["model"])).load_state_dict(ckpt["ema"], strict=True)


class _Pickled:  # an arbitrary class: a weights-only load must refuse it
    pass


def test_files_that_cannot_be_converted_say_why(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_official_file(str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .* as a PyTorch checkpoint"):
        load_official_file(str(tmp_path / "text.pt"))
    torch.save({"ema": official_state_dict("dit"), "extra": _Pickled()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match=r"pickled objects other than tensors and argparse arguments \(.*_Pickled\)"):
        load_official_file(str(tmp_path / "code.pt"))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a dict"):
        load_official_file(str(tmp_path / "list.pt"))
    res = subprocess.run([sys.executable, "-m", "maskdit.convert", str(tmp_path / "missing.pt"), str(tmp_path / "o.pt"),
                          "--source", "dit"], capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: official checkpoint"), res.stderr


def test_converted_dit_weights_sample_as_a_ddpm_noise_predictor(tmp_path, monkeypatch):
    """facebookresearch/DiT's weights predict DDPM noise at 1000 discrete steps: the converted checkpoint says so,
    and sample.py samples it through DDPMPrecond (EDM's preconditioning would feed it ln(sigma)/4 as its step)."""
    import sample
    from maskdit import sampling
    from maskdit.convert import convert_file
    from maskdit.edm import DDPMPrecond, checkpoint_parameterization, make_denoiser

    src, dst = tmp_path / "dit.pt", tmp_path / "dit-converted.pt"
    torch.save(official_state_dict("dit", learn_sigma=True), src)
    convert_file(str(src), str(dst), "dit")
    converted = torch.load(dst, weights_only=False)
    assert converted["parameterization"] == "ddpm-eps"
    del converted["parameterization"]  # as maskdit.convert wrote it before it recorded one: by its source format
    assert checkpoint_parameterization(converted) == "ddpm-eps"
    assert checkpoint_parameterization({"model": {}}) == "edm"
    made = []

    def spy(model, parameterization="edm"):
        made.append(make_denoiser(model, parameterization))
        return made[-1]

    monkeypatch.setattr(sampling, "make_denoiser", spy)  # (what sample.py's sampling_network wraps the network with)
    with pytest.raises(ValueError, match="4-channel samples .* pass --vae"):  # latents (no VAE here to decode them)
        sample.main(["--ckpt", str(dst), "--labels", "1", "--steps", "2", "--device", "cpu", "--out",
                     str(tmp_path / "s")])
    assert len(made) == 1 and isinstance(made[0], DDPMPrecond)


def test_official_files_load_where_torch_lacks_safe_globals(tmp_path, monkeypatch):
    """torch 2.4 has no safe_globals context: the arguments' class joins the process-wide allow-list instead."""
    allowed = torch.serialization.get_safe_globals()
    monkeypatch.delattr(torch.serialization, "safe_globals")
    try:
        torch.save({"ema": official_state_dict("dit"), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "o.pt")
        assert load_official_file(str(tmp_path / "o.pt"))["args"].lr == 1e-4
        torch.save({"ema": official_state_dict("dit"), "extra": _Pickled()}, tmp_path / "code.pt")
        with pytest.raises(ValueError, match="pickled objects other than tensors"):
            load_official_file(str(tmp_path / "code.pt"))
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(allowed)
