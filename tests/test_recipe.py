"""The official initialisation and the recipe's defaults (../shared/maskdit-reference.md and the official code).

Most model tests randomise every parameter first (``conftest.randomize``), and the training tests pass their own
flags, so nothing else would notice a default or an init drifting from the paper's recipe.
"""

import importlib
import inspect
import math

import pytest
import torch
import torch.nn as nn

from maskdit import create_model, ops
from maskdit.config import model_config
from maskdit.edm import EDMLoss, EDMPrecond, edm_sample
from maskdit.masking import token_layout
from maskdit.models import TimestepEmbedder, sincos_pos_embed_2d


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("MaskDiT-S/2", input_size=32, in_channels=4, num_classes=1000)


def test_adaln_zero_final_and_bridge_layers_start_at_zero(model):
    for layer in (model.adaLN_modulation, model.final_layer, model.decoder_layer):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_other_linears_are_xavier_uniform_with_zero_bias(model):
    """Every other Linear, the patch embedding (a Linear on flattened patches) included; not the timestep MLP."""
    skip = {id(m) for m in (model.adaLN_modulation, model.final_layer, model.decoder_layer, *model.t_embedder.mlp)}
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in skip]
    assert "x_embedder" in dict(linears)
    for name, m in linears:
        bound = math.sqrt(6 / sum(m.weight.shape))
        assert m.weight.abs().max() <= bound + 1e-7, name
        assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
        assert torch.count_nonzero(m.bias) == 0, name


def test_embedders_and_mask_token_are_normal_with_std_0_02(model):
    for w in (model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight, model.y_embedder.embedding_table.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
    torch.manual_seed(1)  # the 512 values of one token are too few: pool 8 models
    tokens = torch.stack([create_model("MaskDiT-T/2", input_size=8, decoder_hidden_size=512).mask_token
                          for _ in range(8)])
    assert tokens.mean().abs().item() < 0.003 and tokens.std().item() == pytest.approx(0.02, rel=0.1)


def test_positional_embeddings_are_fixed_sincos_buffers(model):
    assert torch.equal(model.pos_embed, sincos_pos_embed_2d(384, 16))
    assert torch.equal(model.decoder_pos_embed, sincos_pos_embed_2d(512, 16))
    parameters = dict(model.named_parameters())
    assert "pos_embed" not in parameters and "decoder_pos_embed" not in parameters


def test_timestep_embedding_size():
    """256 sinusoid frequencies (their max_period 10000: ``test_models.test_timestep_embedding_closed_form``)."""
    assert TimestepEmbedder(8).frequency_embedding_size == 256


def test_layernorm_eps_is_1e_6_in_both_backends():
    """On a row of variance 1.1e-7 an eps of 1e-5 instead of 1e-6 would shrink the output about 3 times."""
    x = torch.zeros(1, 8)
    x[0, 0] = 1e-3
    y = ops.ln_modulate(x, torch.zeros(1, 8), torch.zeros(1, 8), token_layout(None, 1, 1, "cpu"))
    torch.testing.assert_close(y, nn.functional.layer_norm(x, (8,), eps=1e-6))
    kernel_eps = [importlib.import_module(f"kernels.{name}").LN_EPS for name in ("ln_modulate", "gated_residual")]
    assert kernel_eps == [1e-6, 1e-6]


def test_model_sizes():
    c = model_config("MaskDiT-XL/2")
    assert (c.depth, c.hidden_size, c.num_heads, c.patch_size) == (28, 1152, 16, 2)
    for size in "SBLX":
        name = f"MaskDiT-{size}L/2" if size == "X" else f"MaskDiT-{size}/2"
        c = model_config(name)
        assert (c.decoder_depth, c.decoder_hidden_size, c.decoder_num_heads) == (8, 512, 16), name


def test_edm_defaults():
    loss = EDMLoss()
    assert (loss.P_mean, loss.P_std, loss.sigma_data, loss.mae_coef) == (-1.2, 1.2, 0.5, 0.1)
    assert EDMPrecond(nn.Identity()).sigma_data == 0.5
    d = {k: v.default for k, v in inspect.signature(edm_sample).parameters.items()}
    assert (d["num_steps"], d["sigma_min"], d["sigma_max"], d["rho"], d["cfg_scale"], d["s_churn"]) == \
        (40, 0.002, 80.0, 7.0, 1.5, 0.0)


def test_train_defaults_follow_the_recipe():
    """Adam (weight decay 0, betas (0.9, 0.999), eps 1e-8), lr 1e-4 at XL, mask ratio 0.5, MAE weight 0.1, label
    dropout 0.1, samples with 40 Heun steps at guidance 1.5, EMA decay 0.9999.  The CPU-sized T models take lr
    1e-3 and EMA 0.999 instead (their demo runs are a few thousand steps; ``--help`` says so)."""
    import train
    from maskdit.training import make_optimizer

    cfg = train.resolve_config(train.parse_args(["--model", "MaskDiT-XL/2"]), None)
    assert cfg["lr"] == 1e-4 and cfg["betas"] == (0.9, 0.999) and cfg["weight_decay"] == 0.0
    assert (cfg["mask_ratio"], cfg["mae_coef"], cfg["label_dropout"]) == (0.5, 0.1, 0.1)
    assert (cfg["sample_steps"], cfg["cfg_scale"], cfg["ema_decay"]) == (40, 1.5, 0.9999)
    tiny = train.resolve_config(train.parse_args(["--model", "MaskDiT-T/2"]), None)
    assert (tiny["lr"], tiny["ema_decay"]) == (1e-3, 0.999)
    group = make_optimizer(nn.Linear(2, 2), cfg["lr"], cfg["betas"], cfg["weight_decay"]).param_groups[0]
    assert (group["eps"], group["betas"], group["weight_decay"]) == (1e-8, (0.9, 0.999), 0.0)


def test_sample_script_defaults():
    """MaskDiT's (EDM's Heun sampler, 40 steps, guidance 1.5 on all channels); for DiT's weights DiT's sample_ddp.py
    (250 DDPM steps, guidance 1.5 on 3 channels)."""
    import sample
    from maskdit.config import model_config
    from maskdit.sampling import resolve_sampling

    args = sample.parse_args(["--ckpt", "x"])
    resolve_sampling(args, {})
    assert (args.sampler, args.steps, args.cfg_scale, args.cfg_channels) == ("edm", 40, 1.5, None)
    args = sample.parse_args(["--ckpt", "x"])
    resolve_sampling(args, {"parameterization": "ddpm-eps",
                            "config": {"model": model_config("DiT-XL/2", learn_sigma=True).to_dict()}})
    assert (args.sampler, args.steps, args.cfg_scale, args.cfg_channels) == ("ddpm", 250, 1.5, 3)
