"""MaskDiT: fast training of diffusion models with masked transformers (Zheng et al., TMLR 2024)."""

from .config import MODEL_NAMES, ModelConfig, model_config
from .convert import convert_official_state_dict
from .edm import EDMLoss, EDMPrecond, edm_sample
from .masking import Mask, random_mask
from .models import DiT, create_model

__all__ = [
    "MODEL_NAMES", "ModelConfig", "model_config", "create_model", "DiT", "random_mask", "Mask",
    "EDMPrecond", "EDMLoss", "edm_sample", "convert_official_state_dict",
]
__version__ = "0.1.0"
