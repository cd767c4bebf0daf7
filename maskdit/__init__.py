"""MaskDiT: fast training of diffusion models with masked transformers (Zheng et al., TMLR 2024)."""

from .config import MODEL_NAMES, ModelConfig, model_config
from .ddpm import ddpm_sample
from .edm import DDPMPrecond, EDMLoss, EDMPrecond, edm_sample, make_denoiser
from .masking import Mask, random_mask
from .models import DiT, create_model

__all__ = [
    "MODEL_NAMES", "ModelConfig", "model_config", "create_model", "DiT", "random_mask", "Mask",
    "EDMPrecond", "DDPMPrecond", "make_denoiser", "EDMLoss", "edm_sample", "ddpm_sample",
    "convert_official_state_dict",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``convert_official_state_dict`` on first use: importing ``maskdit.convert`` with the package would make
    ``python -m maskdit.convert`` warn that the module was imported before it ran."""
    if name == "convert_official_state_dict":
        from .convert import convert_official_state_dict

        return convert_official_state_dict
    raise AttributeError(f"module 'maskdit' has no attribute {name!r}")
