"""Import official checkpoints: Anima-Lab/MaskDiT ("maskdit") and facebookresearch/DiT ("dit").

    python -m maskdit.convert SRC.pt DST.pt --source maskdit|dit

writes a checkpoint holding ``model``/``ema`` state dicts for this project's network and its ``config``,
which ``sample.py`` and ``maskdit.checkpoint.load_checkpoint`` read.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import sys

import torch

from .checkpoint import atomic_save, load_failure
from .config import DECODER, SIZES, ModelConfig, model_config

SOURCES = ("maskdit", "dit")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_ADALN = re.compile(r"^(.*)\.adaLN_modulation\.1\.(weight|bias)$")
_LINEAR = re.compile(r"^(decoder_layer|final_layer)\.linear\.(weight|bias)$")
_DROP = ("feat_norm.",)  # parameter-free modules of the official code


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def select_state_dicts(obj: dict, key: str | None = None) -> tuple[dict, dict]:
    """The (model, ema) state dicts inside an official file: ``obj[key]`` for both; else, in a training file with
    both, ``obj["model"]`` (the trained weights: what a tuning run goes on training, as the official tuning loads
    them) and ``obj["ema"]`` (the released checkpoints' averaged weights, which sampling uses); else
    ``obj["ema"]`` or ``obj`` itself for both."""
    if key is not None:
        if key not in obj:
            raise ValueError(f"checkpoint has no entry {key!r}; entries: {sorted(obj)[:10]}")
        return obj[key], obj[key]
    if isinstance(obj.get("ema"), dict):
        return (obj["model"] if isinstance(obj.get("model"), dict) else obj["ema"]), obj["ema"]
    return obj, obj


def convert_official_state_dict(state_dict: dict, source: str) -> dict:
    """Map an official state dict to this project's key names and layouts.

    source="maskdit": Anima-Lab/MaskDiT (keys under the EDMPrecond ``model.`` prefix; one-hot
    ``Linear(num_classes, D)`` label embedding whose null class is the zero vector; decoder keys);
    the result loads with ``strict=True`` into ``create_model("MaskDiT-...")`` (null_class="zero").
    source="dit": facebookresearch/DiT (``nn.Embedding(num_classes + 1, D)`` with a learned null row,
    ``learn_sigma=True``); loads into ``create_model("DiT-...", learn_sigma=True)``.
    The per-layer adaLN Linears are stacked, in network order, into the one ``adaLN_modulation``.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    out, adaln = {}, {}
    for raw_key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise ValueError(f"state dict entry {raw_key!r} is not a tensor; pass the network's state dict")
        key = _strip_prefixes(raw_key)
        if key.startswith(_DROP):
            continue
        if (m := _ADALN.match(key)) is not None:
            adaln[(_adaln_order(m.group(1)), m.group(2))] = value
            continue
        if (m := _LINEAR.match(key)) is not None:
            key = f"{m.group(1)}.{m.group(2)}"
        if key == "x_embedder.proj.weight":  # Conv2d (D, C, p, p) -> Linear on (p, p, C)-ordered patches
            key, value = "x_embedder.weight", value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
        elif key == "x_embedder.proj.bias":
            key = "x_embedder.bias"
        elif key in ("pos_embed", "decoder_pos_embed"):
            value = value.reshape(value.shape[-2], value.shape[-1])
        elif key == "mask_token":
            value = value.reshape(-1)
        elif key == "y_embedder.embedding_table.weight" and source == "maskdit":
            value = value.t()  # Linear weight (D, num_classes) -> table (num_classes, D)
        elif key in ("cls_token", "cls_token_embedder.weight", "feat_embedder.weight", "enc_feat_embedder.weight"):
            raise ValueError(f"official option not supported here (key {raw_key!r}): only the released "
                             "architecture (no cls token, no external features) converts")
        out[key] = value.contiguous()
    if "x_embedder.weight" not in out or "pos_embed" not in out or not adaln:
        raise ValueError(f"not an official {source} DiT/MaskDiT state dict: no x_embedder.proj.weight/pos_embed/"
                         f"adaLN_modulation (first keys: {list(state_dict)[:5]})")
    for kind in ("weight", "bias"):
        out[f"adaLN_modulation.{kind}"] = torch.cat([v for (_, k), v in sorted(adaln.items()) if k == kind])
    return out


def _adaln_order(module: str) -> tuple[int, int]:
    """Position of an official adaLN Linear in the network order: encoder blocks, bridge, decoder blocks, final."""
    name, _, index = module.partition(".")
    group = {"blocks": 0, "decoder_layer": 1, "decoder_blocks": 2, "final_layer": 3}.get(name)
    if group is None:
        raise ValueError(f"unexpected adaLN module {module!r} in the official state dict")
    return group, int(index or 0)


def infer_config(state_dict: dict, source: str) -> ModelConfig:
    """The ``ModelConfig`` of an official state dict: patch size and channels from the patch Conv2d,
    size from width and depth, heads from the size table, decoder from its keys."""
    sd = {_strip_prefixes(k): v for k, v in state_dict.items()}
    if "x_embedder.proj.weight" not in sd:
        raise ValueError("not an official DiT/MaskDiT state dict: no x_embedder.proj.weight")
    d, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    sizes = [s for s, (dep, hid, _) in SIZES.items() if (dep, hid) == (depth, d)]
    if not sizes:
        raise ValueError(f"no known size has depth {depth} and width {d}; known (depth, width, heads): {SIZES}")
    grid = int(round(sd["pos_embed"].shape[-2] ** 0.5))
    out_dim = sd["final_layer.linear.weight"].shape[0]
    table = sd.get("y_embedder.embedding_table.weight")
    use_decoder = "decoder_layer.linear.weight" in sd
    if table is None:
        num_classes = 0
    else:  # MaskDiT's Linear(num_classes, D) weight is (D, num_classes); DiT's Embedding(num_classes + 1, D) table
        if (table.shape[0] if source == "maskdit" else table.shape[1]) != d:
            other = "dit" if source == "maskdit" else "maskdit"
            raise ValueError(f"the label embedding has shape {tuple(table.shape)} at width {d}: not a {source} state "
                             f"dict; is it --source {other}?")
        num_classes = table.shape[1] if source == "maskdit" else table.shape[0] - 1
    if use_decoder and source == "dit":
        raise ValueError("the state dict has MaskDiT's decoder, which facebookresearch/DiT has not: is it --source "
                         "maskdit?")
    overrides = dict(learn_sigma=out_dim == 2 * in_channels * patch * patch,
                     null_class="zero" if source == "maskdit" else "learned")
    if use_decoder:
        dec_hidden = sd["decoder_layer.linear.weight"].shape[0]
        _, default_hidden, default_heads = DECODER["default"]
        if dec_hidden != default_hidden:
            raise ValueError(f"decoder width {dec_hidden} differs from the official {default_hidden}: its head "
                             "count cannot be inferred; build the model with create_model(..., decoder_num_heads=)")
        overrides.update(decoder_depth=len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")}),
                         decoder_hidden_size=dec_hidden, decoder_num_heads=default_heads,
                         learn_mask_token="mask_token" in sd)  # (trained without MAE: zeros, no token)
    family = "MaskDiT" if use_decoder else "DiT"
    return model_config(f"{family}-{sizes[0]}/{patch}", input_size=grid * patch, in_channels=in_channels,
                        num_classes=num_classes, **overrides)


def load_official_file(path: str) -> dict:
    """An official checkpoint file, loaded without running pickled code (``weights_only``).  The official
    training scripts (Anima-Lab/MaskDiT's and facebookresearch/DiT's ``train.py``) also store their
    ``argparse.Namespace`` of arguments under ``"args"``: that one class is allowed."""
    if not os.path.isfile(path):
        raise ValueError(f"official checkpoint {path!r} does not exist")
    allow = getattr(torch.serialization, "safe_globals", None)  # (torch 2.5+; 2.4 has the process-wide list only)
    if allow is None:
        torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        with allow([argparse.Namespace]) if allow is not None else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise ValueError(f"cannot read {path!r} as a PyTorch checkpoint") from None
        raise ValueError(f"{path!r} holds pickled objects other than tensors and argparse arguments ({found[1]}), "
                         "which are not loaded: unpickling them could run code") from None
    except Exception as e:  # truncated, corrupt or not a checkpoint: the unpickler fails in many ways
        raise ValueError(f"cannot read {path!r} as a PyTorch checkpoint ({load_failure(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _check_loads(state: dict, config: ModelConfig) -> None:
    """ValueError unless the converted ``state`` loads with strict=True into the network of ``config`` (built on
    the meta device: no memory, no initialisation)."""
    from .models import DiT

    with torch.device("meta"):
        model = DiT(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"the converted weights do not fit {config.name}: {e}") from None


def convert_file(src: str, dst: str, source: str, key: str | None = None) -> ModelConfig:
    """Convert an official checkpoint file into a checkpoint that ``sample.py`` loads (with its
    ``parameterization``: "edm" for MaskDiT's, "ddpm-eps" for DiT's)."""
    obj = load_official_file(src)
    official_model, official_ema = select_state_dicts(obj, key)
    config = infer_config(official_ema, source)
    ema = convert_official_state_dict(official_ema, source)
    model = ema if official_model is official_ema else convert_official_state_dict(official_model, source)
    for state in (ema,) if model is ema else (ema, model):  # (one dict, stored once, when they are the same)
        _check_loads(state, config)
    # what the network predicts: DiT's weights are a DDPM noise predictor (sampled through edm.DDPMPrecond)
    parameterization = "ddpm-eps" if source == "dit" else "edm"
    atomic_save({"model": model, "ema": ema, "config": {"model": config.to_dict()}, "step": 0,
                 "parameterization": parameterization, "source": {"file": src, "format": source}}, dst)
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="official checkpoint (.pt)")
    parser.add_argument("dst", help="output checkpoint (.pt)")
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument("--key", default=None, help="entry of the file holding the weights, for both the model and "
                        "the EMA (default: a training file's 'model' and 'ema' each in its place; else 'ema' if "
                        "present, else the whole file)")
    args = parser.parse_args(argv)
    config = convert_file(args.src, args.dst, args.source, args.key)
    print(f"wrote {args.dst}: {config.name} (input {config.input_size}, {config.in_channels} channels, "
          f"{config.num_classes} classes, learn_sigma={config.learn_sigma})")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a missing, unreadable or unrecognised file: one line, no stack trace
        sys.exit(f"error: {e}")
