"""Architecture configuration: a frozen dataclass, a table of named presets and a paper-style parser.

Sizes follow the ViT paper (Dosovitskiy et al., arXiv 2010.11929, Table 1) and DeiT (arXiv
2012.12877) for Ti/S; preset names follow timm's (`vit_base_patch16_224`) so that a timm user finds
the model they expect. Small-image presets (28-px greyscale, 32-px RGB) use 4- or 2-px patches,
global average pooling and fixed 2-D sin-cos positions, which train faster from scratch
("Better plain ViT baselines", arXiv 2205.01580).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, UnknownModelError

POOLS = ("token", "avg")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POS_EMBEDS = ("learn", "sincos")

# Upper bounds that no published ViT comes near, so that a corrupted or hostile config fails at once
# instead of allocating for minutes. For scale: ViT-22B (arXiv 2302.05442), the largest published
# ViT, has width 6144, depth 48, MLP ratio 4 and 21.7B parameters; SAM's encoder reads 1024 px
# images as a 64x64 patch grid; ImageNet-21k has 21,843 classes.
LIMITS: dict[str, float] = {
    "img_size": 8192,
    "patch_size": 8192,
    "in_chans": 1024,
    "embed_dim": 16384,
    "depth": 1024,
    "num_heads": 16384,
    "num_classes": 1_000_000,
    "mlp_ratio": 64.0,
    "num_patches": 256 * 256,
    "stem_layers": 16,
    "stem_channels": 4096,
    "num_params": 30e9,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_float(value: Any) -> bool:
    """A finite real number (ints count; bools, strings, NaN and infinities do not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to rebuild a VisionTransformer, plus how its inputs must be prepared."""

    img_size: int = 224
    """Side of the square input image, in pixels."""
    patch_size: int = 16
    """Side of a square patch; must divide img_size."""
    in_chans: int = 3
    """Input channels (1 for greyscale, 3 for RGB)."""
    num_classes: int = 1000
    """Classifier outputs; 0 means no head (the model returns pooled features)."""
    embed_dim: int = 768
    """Token width D."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads; must divide embed_dim."""
    mlp_ratio: float = 4.0
    """MLP hidden width = mlp_ratio * embed_dim."""
    qkv_bias: bool = True
    """Bias on the fused query/key/value projection."""
    class_token: bool = True
    """Prepend a learnable class token."""
    pool: str = "token"
    """How the head reads the sequence: 'token' (class token) or 'avg' (mean of patch tokens)."""
    fc_norm: bool | None = None
    """LayerNorm after pooling instead of before it; None means timm's default (True iff pool='avg')."""
    pos_embed: str = "learn"
    """Position embedding: 'learn' (a parameter) or 'sincos' (fixed 2-D sin-cos, not saved)."""
    drop_rate: float = 0.0
    """Dropout after the position embedding, in the MLP and after the attention projection."""
    attn_drop_rate: float = 0.0
    """Dropout on the attention probabilities."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate, rising linearly from 0 at the first block to this at the last."""
    drop_path_skip: bool = False
    """Training only: stochastic depth runs each residual branch on the kept samples alone and adds
    it back scaled (DINOv2), instead of computing it for all and masking; same expectation."""
    patch_drop_rate: float = 0.0
    """Training only: the fraction of each image's patch tokens dropped at random after the position
    embedding (PatchDropout, arXiv 2208.07220); prefix tokens are kept, evaluation sees every token."""
    conv_stem: tuple[int, ...] = ()
    """Output channels of 3x3 conv + BatchNorm + ReLU layers in front of the patch projection (a
    convolutional stem; Xiao et al., "Early convolutions help transformers see better", arXiv
    2106.14881). Each layer halves the resolution while the rest of the patch side is even, else
    keeps it; the projection (kernel = stride) covers what is left of the patch. Empty: the plain
    linear patch embedding of the ViT paper."""
    stem_full_res: int = 0
    """How many of the first conv-stem layers keep the input's full resolution (stride 1) before the
    halving starts, as CNNs for small images do (a ResNet for CIFAR keeps 32x32 in its first stage).
    0: the first layer already halves it. The token grid is the same either way."""
    init_values: float | None = None
    """LayerScale initial value (CaiT, arXiv 2103.17239); None disables LayerScale."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon (timm and torchvision use 1e-6, Hugging Face 1e-12, nn.LayerNorm 1e-5)."""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted from [0, 1] pixels before the model sees them."""
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    """Per-channel std that [0, 1] pixels are divided by."""
    class_names: tuple[str, ...] | None = None
    """Label of each output, if known."""
    name: str | None = None
    """The preset or variant this config came from, for display only."""

    def __post_init__(self) -> None:
        # JSON and YAML give lists; keep the dataclass hashable and comparable.
        for key in ("mean", "std", "class_names", "conv_stem"):
            value = getattr(self, key)
            if isinstance(value, list):
                object.__setattr__(self, key, tuple(value))
        if self.conv_stem == () and _is_int(self.stem_full_res) and self.stem_full_res >= 0:
            # no stem, nothing kept at full resolution: `--set model.conv_stem=[]` over a recipe whose
            # stem starts at full resolution gives the plain patch embedding, equal to any other
            object.__setattr__(self, "stem_full_res", 0)
        self.validate()

    # ---- derived values -------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.img_size // self.patch_size

    @property
    def stem_strides(self) -> tuple[int, ...]:
        """Stride of each conv-stem layer: 1 for the first `stem_full_res`, then 2 while the rest of the
        patch side is even, else 1."""
        strides, rest = [], self.patch_size
        for i, _ in enumerate(self.conv_stem):
            strides.append(2 if i >= self.stem_full_res and rest % 2 == 0 else 1)
            rest //= strides[-1]
        return tuple(strides)

    @property
    def proj_size(self) -> int:
        """Kernel (= stride) of the patch projection: the patch side left after the conv stem."""
        return self.patch_size // math.prod(self.stem_strides)

    @property
    def label_names(self) -> list[str]:
        """The name of each output class: class_names, else "0" .. "num_classes-1"."""
        return list(self.class_names or [str(i) for i in range(self.num_classes)])

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @property
    def seq_len(self) -> int:
        """Tokens seen by the attention layers."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def num_params(self) -> int:
        """Parameter count, from the shapes alone (nothing is allocated)."""
        return sum(math.prod(shape) for key, shape in self.state_shapes().items()
                   if not key.endswith(("running_mean", "running_var")))  # conv-stem statistics: buffers

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """{key: shape} of the state dict that a model with this config saves (timm names), derived
        without building it: what a weights file is checked against before anything is allocated.
        A test checks it against the real model's state dict for every layout."""
        D, H = self.embed_dim, self.mlp_hidden_dim
        shapes: dict[str, tuple[int, ...]] = {}
        if self.class_token:
            shapes["cls_token"] = (1, 1, D)
        if self.pos_embed == "learn":
            shapes["pos_embed"] = (1, self.seq_len, D)
        channels = self.in_chans
        for i, width in enumerate(self.conv_stem):
            shapes[f"patch_embed.stem.{i}.conv.weight"] = (width, channels, 3, 3)
            shapes.update({f"patch_embed.stem.{i}.norm.{k}": (width,)
                           for k in ("weight", "bias", "running_mean", "running_var")})
            channels = width
        shapes["patch_embed.proj.weight"] = (D, channels, self.proj_size, self.proj_size)
        shapes["patch_embed.proj.bias"] = (D,)
        block = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D),
                 **({"attn.qkv.bias": (3 * D,)} if self.qkv_bias else {}),
                 "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
                 **({"ls1.gamma": (D,)} if self.init_values else {}),
                 "norm2.weight": (D,), "norm2.bias": (D,), "mlp.fc1.weight": (H, D), "mlp.fc1.bias": (H,),
                 "mlp.fc2.weight": (D, H), "mlp.fc2.bias": (D,),
                 **({"ls2.gamma": (D,)} if self.init_values else {})}
        for i in range(self.depth):
            shapes.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
        norm = "fc_norm" if self.use_fc_norm else "norm"
        shapes.update({f"{norm}.weight": (D,), f"{norm}.bias": (D,)})
        if self.num_classes:
            shapes.update({"head.weight": (self.num_classes, D), "head.bias": (self.num_classes,)})
        return shapes

    @property
    def use_fc_norm(self) -> bool:
        return self.pool == "avg" if self.fc_norm is None else self.fc_norm

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) the model expects."""
        return (self.in_chans, self.img_size, self.img_size)

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming every bad field and its value (types first, then ranges and
        cross-field rules). NaN and infinities fail every float check."""
        problems = []
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_classes"):
            value, low, high = getattr(self, key), (0 if key == "num_classes" else 1), LIMITS.get(key)
            if not _is_int(value):
                problems.append(f"{key}={value!r} must be an integer")
            elif value < low or (high is not None and value > high):
                problems.append(f"{key}={value!r} must be in [{low}, {high if high is not None else 'inf'}]"
                                + (" (see vitlab.config.LIMITS)" if high is not None and value > high else ""))
        for key in ("qkv_bias", "class_token", "drop_path_skip"):
            if not isinstance(getattr(self, key), bool):
                problems.append(f"{key}={getattr(self, key)!r} must be true or false")
        if self.fc_norm is not None and not isinstance(self.fc_norm, bool):
            problems.append(f"fc_norm={self.fc_norm!r} must be true, false or null")
        for key, choices in (("pool", POOLS), ("pos_embed", POS_EMBEDS)):
            if not isinstance(getattr(self, key), str) or getattr(self, key) not in choices:
                problems.append(f"{key}={getattr(self, key)!r} must be one of {choices}")
        if not _is_float(self.mlp_ratio) or not 0 < self.mlp_ratio <= LIMITS["mlp_ratio"]:
            problems.append(f"mlp_ratio={self.mlp_ratio!r} must be a number in (0, {LIMITS['mlp_ratio']}]")
        for key in ("drop_rate", "attn_drop_rate", "drop_path_rate", "patch_drop_rate"):
            value = getattr(self, key)
            if not _is_float(value) or not 0.0 <= value < 1.0:
                problems.append(f"{key}={value!r} must be a number in [0, 1)")
        if self.init_values is not None and (not _is_float(self.init_values) or not self.init_values > 0):
            problems.append(f"init_values={self.init_values!r} must be a finite number > 0, or null")
        if not _is_float(self.norm_eps) or not 0 < self.norm_eps < 1:
            problems.append(f"norm_eps={self.norm_eps!r} must be a number in (0, 1)")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not all(_is_float(v) for v in value):
                problems.append(f"{key}={value!r} must be a list of finite numbers, one per channel")
            elif key == "std" and any(v <= 0 for v in value):
                problems.append(f"std={value} must be > 0")
        if self.class_names is not None and (not isinstance(self.class_names, tuple)
                                             or not all(isinstance(n, str) for n in self.class_names)):
            problems.append(f"class_names={_short(self.class_names)} must be a list of strings, or null")
        if not isinstance(self.conv_stem, tuple) or len(self.conv_stem) > LIMITS["stem_layers"] or not all(
                _is_int(c) and 1 <= c <= LIMITS["stem_channels"] for c in self.conv_stem):
            problems.append(f"conv_stem={_short(self.conv_stem)} must be a list of at most {LIMITS['stem_layers']} "
                            f"channel counts in [1, {LIMITS['stem_channels']}] (empty: no conv stem)")
        elif not _is_int(self.stem_full_res) or not 0 <= self.stem_full_res <= len(self.conv_stem):
            problems.append(f"stem_full_res={self.stem_full_res!r} must be a whole number from 0 to the "
                            f"{len(self.conv_stem)} conv-stem layers (conv_stem={list(self.conv_stem)})")
        if self.name is not None and not isinstance(self.name, str):
            problems.append(f"name={self.name!r} must be a string or null")
        if problems:  # the cross-field checks below need values of the right types and sizes
            raise ConfigError("invalid ViTConfig: " + "; ".join(problems))
        if self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
        elif self.num_patches > LIMITS["num_patches"]:
            problems.append(f"img_size={self.img_size} with patch_size={self.patch_size} gives {self.num_patches} "
                            f"patches, more than {LIMITS['num_patches']} (see vitlab.config.LIMITS)")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.mlp_hidden_dim < 1:
            problems.append(f"mlp_ratio={self.mlp_ratio} gives an MLP of width {self.mlp_hidden_dim} "
                            f"(embed_dim={self.embed_dim})")
        if self.pool == "token" and not self.class_token:
            problems.append("pool='token' needs class_token=True")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            problems.append(f"pos_embed='sincos' needs embed_dim divisible by 4, got embed_dim={self.embed_dim}")
        for key in ("mean", "std"):
            if len(getattr(self, key)) != self.in_chans:
                problems.append(f"{key} has {len(getattr(self, key))} values but in_chans={self.in_chans}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            problems.append(f"class_names has {len(self.class_names)} names but num_classes={self.num_classes}")
        if not problems and self.num_params > LIMITS["num_params"]:
            problems.append(f"this config has {self.num_params / 1e9:.1f}B parameters, more than "
                            f"{LIMITS['num_params'] / 1e9:.0f}B (see vitlab.config.LIMITS)")
        if problems:
            raise ConfigError("invalid ViTConfig: " + "; ".join(problems))

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("mean", "std", "class_names", "conv_stem"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a ViTConfig is a mapping of field names to values, got {type(d).__name__} "
                              f"{_short(d)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ViTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"a ViTConfig must be JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with some fields changed (validated; unknown names are an error)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown ViTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)


# ---- presets ------------------------------------------------------------------------------
# Paper sizes: (width, depth, heads). Ti and S come from DeiT, M from timm, B/L/H from the ViT paper.
SIZES: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "M": (512, 12, 8),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}
SIZE_WORDS = {"Ti": "tiny", "S": "small", "M": "medium", "B": "base", "L": "large", "H": "huge"}

# Sizes for small images (few-million-parameter models suit 50k-image datasets): (width, depth, heads).
SMALL_IMAGE_SIZES: dict[str, tuple[int, int, int]] = {
    "micro": (128, 6, 4),
    "tiny": (192, 6, 3),
    "small": (384, 6, 6),
}


def _paper_config(size: str, patch: int, img_size: int = 224, **kw: Any) -> ViTConfig:
    width, depth, heads = SIZES[size]
    return ViTConfig(img_size=img_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads, **kw)


def _build_presets() -> dict[str, ViTConfig]:
    presets: dict[str, ViTConfig] = {}
    for size, word in SIZE_WORDS.items():
        for patch in (8, 14, 16, 32):
            name = f"vit_{word}_patch{patch}_224"
            presets[name] = _paper_config(size, patch, name=name)
    for word, (width, depth, heads) in SMALL_IMAGE_SIZES.items():
        for patch in (4, 2):
            for img, chans in ((32, 3), (28, 1)):
                name = f"vit_{word}_patch{patch}_{img}"
                presets[name] = ViTConfig(
                    img_size=img, patch_size=patch, in_chans=chans, num_classes=10,
                    embed_dim=width, depth=depth, num_heads=heads,
                    class_token=False, pool="avg", pos_embed="sincos",
                    mean=(0.5,) * chans, std=(0.5,) * chans, name=name)
    # The original write-up's model: ViT-B/16 built from nn.MultiheadAttention blocks with
    # nn.LayerNorm's default eps, dropout 0.1, a class token and learned positions, 10 classes.
    presets["seed_b16"] = _paper_config("B", 16, num_classes=10, drop_rate=0.1, norm_eps=1e-5,
                                        name="seed_b16")
    return presets


PRESETS: dict[str, ViTConfig] = _build_presets()

_VARIANT = re.compile(r"^(Ti|S|M|B|L|H)/(\d+)(?:@(\d+))?$")


def parse_variant(variant: str, **overrides: Any) -> ViTConfig:
    """A paper-style variant string, e.g. "S/16" (224 px) or "Ti/4@32" (32-px input), as a config."""
    m = _VARIANT.match(variant.strip())
    if not m:
        raise UnknownModelError(
            f"cannot parse variant {variant!r}: expected SIZE/PATCH[@IMG] with SIZE in {list(SIZES)}, "
            f"e.g. 'S/16' or 'Ti/4@32'")
    size, patch, img = m.group(1), int(m.group(2)), int(m.group(3) or 224)
    cfg = _paper_config(size, patch, img_size=img, name=variant.strip())
    return cfg.replace(**overrides) if overrides else cfg


def get_config(name: str, **overrides: Any) -> ViTConfig:
    """A preset name (`vit_small_patch16_224`) or a variant string (`S/16`), with field overrides."""
    if name in PRESETS:
        cfg = PRESETS[name]
        return cfg.replace(**overrides) if overrides else cfg
    if "/" in name:
        return parse_variant(name, **overrides)
    close = [p for p in PRESETS if name.lower() in p]
    hint = f"; did you mean one of {close[:5]}?" if close else "; run `vitlab models` to list them"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def list_models() -> list[str]:
    return list(PRESETS)


__all__ = ["ViTConfig", "PRESETS", "LIMITS", "SIZES", "get_config", "parse_variant", "list_models"]
