"""vitlab: Vision Transformers that train fast on the hardware you have.

Public API::

    import vitlab
    model = vitlab.create_model("vit_small_patch16_224", num_classes=10)
    vitlab.save_model(model, "out/small")       # config.json + model.safetensors
    same = vitlab.load_model("out/small")
"""
from __future__ import annotations

from typing import Any

from .config import PRESETS, ViTConfig, get_config, list_models, parse_variant
from .errors import (ConfigError, ConversionError, InputShapeError, ModelFileError, UnknownModelError,
                     VitlabError)
from .model import VisionTransformer
from .weights.modeldir import load_model, save_model

__version__ = "0.1.0"


def create_model(name: str | ViTConfig, attn_impl: str = "auto", **overrides: Any) -> VisionTransformer:
    """A freshly initialised model from a preset name, a variant ("S/16") or a ViTConfig.

    Keyword arguments override config fields, e.g. ``num_classes=10, img_size=32``.
    """
    cfg = name.replace(**overrides) if isinstance(name, ViTConfig) else get_config(name, **overrides)
    return VisionTransformer(cfg, attn_impl=attn_impl)


__all__ = [
    "VisionTransformer", "ViTConfig", "PRESETS", "create_model", "load_model", "save_model",
    "get_config", "parse_variant", "list_models", "VitlabError", "ConfigError", "UnknownModelError",
    "InputShapeError", "ModelFileError", "ConversionError", "__version__",
]
