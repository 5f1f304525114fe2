"""torchvision interop: `torchvision.models.VisionTransformer` (the `vit_b_16` layout).

torchvision's ViT is the same network as a class-token timm ViT with LayerNorm eps 1e-6: its
nn.MultiheadAttention packs q, k, v in `in_proj_weight` in the same order as timm's `qkv`, so the
conversion is a pure renaming.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config import IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from ..errors import ConversionError
from .keymap import rename
from .timm import infer_config

_L = "encoder.layers.encoder_layer_{i}."
# (vitlab/timm key, torchvision key)
TABLE: list[tuple[str, str]] = [
    ("cls_token", "class_token"),
    ("patch_embed.proj.weight", "conv_proj.weight"),
    ("patch_embed.proj.bias", "conv_proj.bias"),
    ("pos_embed", "encoder.pos_embedding"),
    ("blocks.{i}.norm1.weight", _L + "ln_1.weight"),
    ("blocks.{i}.norm1.bias", _L + "ln_1.bias"),
    ("blocks.{i}.attn.qkv.weight", _L + "self_attention.in_proj_weight"),
    ("blocks.{i}.attn.qkv.bias", _L + "self_attention.in_proj_bias"),
    ("blocks.{i}.attn.proj.weight", _L + "self_attention.out_proj.weight"),
    ("blocks.{i}.attn.proj.bias", _L + "self_attention.out_proj.bias"),
    ("blocks.{i}.norm2.weight", _L + "ln_2.weight"),
    ("blocks.{i}.norm2.bias", _L + "ln_2.bias"),
    ("blocks.{i}.mlp.fc1.weight", _L + "mlp.0.weight"),
    ("blocks.{i}.mlp.fc1.bias", _L + "mlp.0.bias"),
    ("blocks.{i}.mlp.fc2.weight", _L + "mlp.3.weight"),
    ("blocks.{i}.mlp.fc2.bias", _L + "mlp.3.bias"),
    ("norm.weight", "encoder.ln.weight"),
    ("norm.bias", "encoder.ln.bias"),
    ("head.weight", "heads.head.weight"),
    ("head.bias", "heads.head.bias"),
]
# Checkpoints from torchvision < 0.12 named the MLP layers linear_1 / linear_2.
_OLD_MLP = {"mlp.linear_1.": "mlp.0.", "mlp.linear_2.": "mlp.3."}


def from_torchvision(state: dict[str, torch.Tensor], base: ViTConfig | None = None,
                     source: str = "torchvision checkpoint", **known: Any) -> tuple[ViTConfig, dict]:
    """(config, timm-named state) from a torchvision VisionTransformer state dict."""
    if any(k.startswith("heads.pre_logits") for k in state):
        raise ConversionError(f"{source} has a pre-logits layer (representation_size); vitlab's ViT has none")
    if any(k.startswith("conv_proj.conv_") for k in state):
        raise ConversionError(f"{source} uses a convolutional stem (conv_stem_configs); not supported")
    fixed = {}
    for key, value in state.items():
        for old, new in _OLD_MLP.items():
            key = key.replace(old, new)
        fixed[key] = value
    ours = rename(fixed, TABLE, source)
    known.setdefault("norm_eps", 1e-6)  # torchvision's LayerNorm
    if base is None:  # torchvision's ViT weights expect ImageNet statistics
        known.setdefault("mean", IMAGENET_MEAN)
        known.setdefault("std", IMAGENET_STD)
    return infer_config(ours, base=base, source=source, **known), ours


def classic_vit_problems(cfg: ViTConfig) -> list[str]:
    """Why `cfg` is not the original ViT layout that torchvision and Hugging Face implement
    (class token read by the head after a final norm, learned positions, no LayerScale)."""
    problems = []
    if not (cfg.class_token and cfg.pool == "token" and not cfg.use_fc_norm):
        problems.append("it needs a class token read by pool='token' without fc_norm")
    if cfg.pos_embed != "learn":
        problems.append("it needs pos_embed='learn'")
    if cfg.init_values is not None:
        problems.append("it has no LayerScale")
    if cfg.conv_stem:
        problems.append("its patch embedding has no convolutional stem (conv_stem)")
    if cfg.num_classes == 0:
        problems.append("it needs a classifier head (num_classes > 0)")
    return problems


def torchvision_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """Arguments for `torchvision.models.vision_transformer.VisionTransformer` for this config."""
    problems = classic_vit_problems(cfg)
    if not cfg.qkv_bias:
        problems.append("it needs qkv_bias=True")
    if cfg.in_chans != 3:
        problems.append(f"it takes 3 input channels, not {cfg.in_chans}")
    if cfg.norm_eps != 1e-6:
        problems.append(f"its LayerNorm eps is 1e-6, not {cfg.norm_eps}")
    if problems:
        raise ConversionError("cannot express this model as a torchvision VisionTransformer: " + "; ".join(problems))
    return dict(image_size=cfg.img_size, patch_size=cfg.patch_size, num_layers=cfg.depth,
                num_heads=cfg.num_heads, hidden_dim=cfg.embed_dim, mlp_dim=cfg.mlp_hidden_dim,
                dropout=cfg.drop_rate, attention_dropout=cfg.attn_drop_rate, num_classes=cfg.num_classes)


def to_torchvision(model) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(constructor kwargs, state dict) of the torchvision VisionTransformer equal to `model`."""
    kwargs = torchvision_kwargs(model.config)
    return kwargs, rename(model.state_dict(), TABLE, "vitlab model", reverse=True)
