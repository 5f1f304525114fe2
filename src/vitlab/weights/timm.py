"""timm interop. timm's ViT key names are vitlab's own, so weights need no renaming: what is left is
inferring a ViTConfig from a state dict's shapes, and the timm constructor arguments for a config.

The attention head count cannot be read from shapes; it comes from a preset, an explicit value,
or the ViT-paper rule of 64-wide heads (true for Ti/S/B/L, not for H, which has 16 heads of 80).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..config import SIZES, ViTConfig
from ..errors import ConfigError, ConversionError
from .keymap import block_count


def infer_config(state: dict[str, torch.Tensor], base: ViTConfig | None = None, source: str = "checkpoint",
                 **known: Any) -> ViTConfig:
    """The config whose model has exactly the tensors of timm-named `state`.

    Fields that shapes do not determine (heads, eps, dropout, mean/std, names) come from `known`,
    then from `base` (e.g. a preset), then from defaults.
    """
    if "patch_embed.proj.weight" not in state:
        raise ConversionError(f"{source} has no 'patch_embed.proj.weight': not a ViT state dict in timm "
                              f"layout (first keys: {list(state)[:4]})")
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.ndim != ndim or 0 in value.shape:
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConversionError(f"{source}: {key!r} has shape {found}; expected a non-empty {ndim}-D tensor")
        return tuple(value.shape)

    D, C, p, p2 = shape("patch_embed.proj.weight", 4)
    if p != p2:
        raise ConversionError(f"{source}: non-square patches {p}x{p2} are not supported")
    class_token = "cls_token" in state
    prefix = 1 if class_token else 0
    fields: dict[str, Any] = {}
    if "pos_embed" in state:
        one, n_tokens, width = shape("pos_embed", 3)
        if one != 1 or width != D or n_tokens <= prefix:
            raise ConversionError(f"{source}: pos_embed has shape {(one, n_tokens, width)}; expected "
                                  f"(1, {prefix} + patches, {D})")
        n_grid = n_tokens - prefix
        grid = math.isqrt(n_grid)
        if grid * grid != n_grid:
            raise ConversionError(f"{source}: pos_embed has {n_grid} patch positions, not a square grid")
        fields.update(pos_embed="learn", img_size=grid * p)
    else:
        fields["pos_embed"] = "sincos"
    if "fc_norm.weight" in state:  # timm's global_pool='avg' default
        pool, fc_norm = "avg", True
    elif "norm.weight" in state:
        pool, fc_norm = ("token" if class_token else "avg"), False
    else:
        raise ConversionError(f"{source} has neither 'norm.weight' nor 'fc_norm.weight'")
    fields.update(pool=pool, fc_norm=None if fc_norm == (pool == "avg") else fc_norm)  # None: the default
    depth = block_count(state)
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in state:
        raise ConversionError(f"{source} has no transformer blocks ('blocks.0.mlp.fc1.weight' is missing)")
    hidden, fc1_in = shape("blocks.0.mlp.fc1.weight", 2)
    if fc1_in != D:
        raise ConversionError(f"{source}: blocks.0.mlp.fc1.weight has shape {(hidden, fc1_in)} but the patch "
                              f"embedding is {D} wide")
    fields.update(
        patch_size=p, in_chans=C, embed_dim=D, depth=depth, class_token=class_token,
        mlp_ratio=hidden / D, qkv_bias="blocks.0.attn.qkv.bias" in state,
        num_classes=shape("head.weight", 2)[0] if "head.weight" in state else 0,
        # The stored gamma overwrites this start value; only its presence matters.
        init_values=1e-5 if "blocks.0.ls1.gamma" in state else None,
    )
    if "num_heads" not in known and (base is None or base.embed_dim != D):
        paper = [heads for width, d, heads in SIZES.values() if (width, d) == (D, depth)]
        if paper:  # a paper size (ViT-H: 16 heads of 80, not 64-wide heads)
            known["num_heads"] = paper[0]
        elif D % 64:
            raise ConversionError(f"{source}: cannot infer the head count for width {D}; give it "
                                  f"(--num-heads) or a preset (--preset)")
        else:
            known["num_heads"] = D // 64
    merged = {**(base.to_dict() if base else {}), **fields, **known}
    if merged.get("class_names") is not None and len(merged["class_names"]) != fields["num_classes"]:
        merged["class_names"] = None  # the base's names describe another head
    if "mean" not in known and "std" not in known and len(merged.get("mean", ())) != C:
        merged["mean"], merged["std"] = (0.5,) * C, (0.5,) * C  # the base's statistics are for other channels
    if merged.get("img_size") is None:
        raise ConversionError(f"{source} has fixed position embeddings; give the image size")
    try:
        return ViTConfig.from_dict(merged)
    except ConfigError as e:
        raise ConversionError(f"{source}: {e}") from None


def timm_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """Arguments for `timm.models.vision_transformer.VisionTransformer` that build the same network
    (same keys, same outputs). Fixed sin-cos positions have no timm equivalent."""
    if cfg.pos_embed != "learn":
        raise ConversionError("timm's VisionTransformer has no fixed 2-D sin-cos position embedding; "
                              "only pos_embed='learn' models convert to timm")
    if cfg.conv_stem:
        raise ConversionError(f"timm's VisionTransformer has no convolutional stem (conv_stem={list(cfg.conv_stem)}); "
                              f"only models with the linear patch embedding convert to timm")
    return dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, global_pool=cfg.pool, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        init_values=cfg.init_values, class_token=cfg.class_token, fc_norm=cfg.use_fc_norm,
        drop_rate=0.0, pos_drop_rate=cfg.drop_rate, proj_drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate, patch_drop_rate=cfg.patch_drop_rate,
        norm_layer=_layer_norm(cfg.norm_eps),
    )


def _layer_norm(eps: float):
    from functools import partial
    return partial(torch.nn.LayerNorm, eps=eps)
