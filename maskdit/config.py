"""Model sizes and names: "DiT-XL/2", "MaskDiT-B/4", ... (see ``MODEL_NAMES``)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

# depth, hidden size, heads.  S/B/L/XL are the DiT paper's sizes; T ("tiny") is this project's
# CPU-sized model so the whole pipeline runs on a laptop in minutes.
SIZES: dict[str, tuple[int, int, int]] = {
    "T": (6, 192, 3),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
FAMILIES = ("DiT", "MaskDiT")

# The official MaskDiT decoder (8 blocks of width 512, 16 heads) is the same for every encoder
# size; the tiny size gets a decoder to match its scale.
DECODER = {"default": (8, 512, 16), "T": (2, 128, 4)}

MODEL_NAMES = tuple(f"{fam}-{size}/{p}" for fam in FAMILIES for size in SIZES for p in PATCH_SIZES)
_NAME_RE = re.compile(r"^(DiT|MaskDiT)-(T|S|B|L|XL)/(\d+)$")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter that defines a network; ``create_model`` builds one from it."""

    name: str
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    patch_size: int = 2
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = False
    # "learned": nn.Embedding row ``num_classes`` is a trained null class (DiT);
    # "zero": the null class embeds to exactly 0 (MaskDiT's one-hot Linear embedding).
    null_class: str = "learned"
    use_decoder: bool = False
    decoder_depth: int = 8
    decoder_hidden_size: int = 512
    decoder_num_heads: int = 16
    # MaskDiT's decoder input at masked positions: a learnable token (True), or zeros (False), as the official
    # code builds it with an MAE coefficient > 0 or = 0 (train.py follows --mae-coef)
    learn_mask_token: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> "ModelConfig":
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"model {self.name!r}: {msg}")

        need(isinstance(self.input_size, int) and self.input_size > 0,
             f"input_size must be a positive int, got {self.input_size!r}")
        need(self.input_size % self.patch_size == 0,
             f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        need(self.in_channels > 0, f"in_channels must be positive, got {self.in_channels}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        need(self.hidden_size % 4 == 0,
             f"hidden_size must be divisible by 4 (2-D sin-cos embedding), got {self.hidden_size}")
        need(self.null_class in ("learned", "zero"),
             f"null_class must be 'learned' or 'zero', got {self.null_class!r}")
        if self.use_decoder:
            need(self.decoder_hidden_size % self.decoder_num_heads == 0,
                 f"decoder_hidden_size {self.decoder_hidden_size} is not divisible by "
                 f"decoder_num_heads {self.decoder_num_heads}")
            need(self.decoder_hidden_size % 4 == 0,
                 f"decoder_hidden_size must be divisible by 4, got {self.decoder_hidden_size}")
            need(self.decoder_depth >= 0, f"decoder_depth must be >= 0, got {self.decoder_depth}")
            need(isinstance(self.learn_mask_token, bool),
                 f"learn_mask_token must be a bool, got {self.learn_mask_token!r}")
        return self


def parse_model_name(name: str) -> tuple[str, str, int]:
    """Split "MaskDiT-XL/2" into ("MaskDiT", "XL", 2); raise ValueError naming the valid choices."""
    m = _NAME_RE.match(name) if isinstance(name, str) else None
    if m is None or int(m.group(3)) not in PATCH_SIZES:
        raise ValueError(
            f"unknown model name {name!r}; expected FAMILY-SIZE/PATCH with FAMILY in {FAMILIES}, "
            f"SIZE in {tuple(SIZES)}, PATCH in {PATCH_SIZES}, e.g. 'MaskDiT-XL/2'")
    return m.group(1), m.group(2), int(m.group(3))


def model_config(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 **overrides) -> ModelConfig:
    """The configuration of a named model, with any field overridden by keyword."""
    family, size, patch = parse_model_name(name)
    depth, hidden, heads = SIZES[size]
    dec_depth, dec_hidden, dec_heads = DECODER.get(size, DECODER["default"])
    base = dict(
        name=name, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
        patch_size=patch, depth=depth, hidden_size=hidden, num_heads=heads,
        use_decoder=family == "MaskDiT",
        null_class="zero" if family == "MaskDiT" else "learned",
        decoder_depth=dec_depth, decoder_hidden_size=dec_hidden, decoder_num_heads=dec_heads,
    )
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; valid: {sorted(known - {'name'})}")
    base.update(overrides)
    return ModelConfig(**base).validate()
