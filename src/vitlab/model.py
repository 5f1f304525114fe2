"""The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv 2010.11929).

An image is cut into patches, each patch is linearly embedded, a class token and position
embeddings are added, pre-norm transformer blocks (self-attention + MLP, each residual) mix the
tokens, and a linear head classifies the class token (or the mean of the patch tokens).

Module and parameter names are timm's (`blocks.3.attn.qkv.weight`), so a timm
`VisionTransformer` state dict loads with `strict=True` and no mapping. The file holds the
network only: configs live in config.py, file I/O in weights/.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig
from .errors import ConfigError, InputShapeError
from .layers import WEIGHT_INITS, DropPath, LayerScale, PatchDropout, drop_add_residual, init_weights
from .pos_embed import resample_pos_embed, sincos_pos_embed

ATTN_IMPLS = ("auto", "sdpa", "math")
# The memory layout the conv stem's input is given: channels-last trains the cifar10 recipe's model
# faster (AMX Xeon: 1.20-1.23x bf16, 1.08-1.09x capped-AVX2 fp32; benchmarks/stem_layout.py); other
# machines may differ, so training runs time both (engine/autotune.py). A 1-channel image is both
# layouts at once, so for greyscale models the choice changes nothing.
STEM_LAYOUTS = ("channels_last", "contiguous")

# Which kernel 'auto' picks, from `python benchmarks/attention.py` (results/attention*.json):
# - CUDA: fused SDPA (flash / memory-efficient kernels).
# - CPU, bf16 autocast (AMX / AVX-512-BF16 CPUs): SDPA's bf16 backward dominates a training step
#   at short sequences, where plain matmul -> softmax -> matmul trains about 2x faster (reported at
#   65 tokens on an AMX CPU); from a few hundred tokens on, SDPA's memory savings win.
# - CPU, fp32 (e.g. AVX2-only CPUs): SDPA is as fast or faster at every length we measured.
CPU_BF16_MATH_MAX_TOKENS = 256


def pick_attn_impl(device_type: str, seq_len: int, dtype: torch.dtype) -> str:
    """The attention kernel that 'auto' resolves to for this device, sequence length and dtype."""
    if device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and seq_len <= CPU_BF16_MATH_MAX_TOKENS:
        return "math"
    return "sdpa"


class StemNorm(nn.Module):
    """BatchNorm2d with float state only (weight, bias, running_mean, running_var): no integer
    batch counter, so the weights file holds floats alone like every other vitlab model."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)


class StemLayer(nn.Module):
    """3x3 conv (no bias) -> BatchNorm -> ReLU, one layer of a convolutional stem."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm = StemNorm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches, each linearly projected: a conv with kernel = stride = patch size.

    With a convolutional stem (`ViTConfig.conv_stem`), 3x3 conv layers first turn the image into
    feature maps (halving the resolution while the rest of the patch side is even) and the
    projection covers the rest of each patch: the same token grid, from overlapping, local features."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, conv_stem: tuple[int, ...] = (),
                 strides: tuple[int, ...] = ()):
        super().__init__()
        layers, channels = [], in_chans
        for width, stride in zip(conv_stem, strides, strict=True):
            layers.append(StemLayer(channels, width, stride))
            channels = width
        self.stem = nn.Sequential(*layers) if layers else None
        rest = patch_size // math.prod(strides)
        self.proj = nn.Conv2d(channels, embed_dim, kernel_size=rest, stride=rest)
        self.channels_last = True  # the input layout (STEM_LAYOUTS): speed, and values only by rounding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            if self.channels_last:  # see STEM_LAYOUTS
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.stem(x)  # (B, C, H, W) -> (B, C', H/s, W/s)
        x = self.proj(x)  # -> (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class AttentionProbe(nn.Identity):
    """Pass-through for the attention probabilities (B, heads, N, N).

    A forward hook registered on it (see vitlab.attention) sees every layer's attention map and
    switches that layer to the explicit kernel, over the same weights. Nothing is kept on `self`.
    """


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: `qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
                 attn_impl: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.probe = AttentionProbe()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, H, hd) -> 3 x (B, H, N, hd)
        impl = pick_attn_impl(x.device.type, N, q.dtype) if self.impl == "auto" else self.impl
        if impl == "math" or self.probe._forward_hooks:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            attn = attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype)  # fp32 softmax under autocast
            attn = self.attn_drop(self.probe(attn))
            x = attn @ v  # (B, H, N, N) @ (B, H, N, hd) -> (B, H, N, hd)
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, hd) -> (B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Two linear layers with GELU between (timm layout: `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `cfg.drop_path_skip`, stochastic depth in training runs each branch on the kept samples
    only (layers.drop_add_residual) instead of computing it for the whole batch and masking.
    """

    def __init__(self, cfg: ViTConfig, drop_path: float, attn_impl: str):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate, attn_impl)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, cfg.mlp_hidden_dim, cfg.drop_rate)
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)
        self.drop_path_skip = cfg.drop_path_skip

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.drop_path1.drop_prob
        if self.drop_path_skip and self.training and p > 0:
            x = drop_add_residual(x, self.attn_branch, p)
            return drop_add_residual(x, self.mlp_branch, p)
        x = x + self.drop_path1(self.attn_branch(x))
        return x + self.drop_path2(self.mlp_branch(x))


class VisionTransformer(nn.Module):
    """ViT classifier with timm's API: forward_features / forward_head / reset_classifier."""

    def __init__(self, config: ViTConfig | None = None, attn_impl: str = "auto", dynamic_img_size: bool = False,
                 weight_init: str = "trunc_normal"):
        super().__init__()
        cfg = config or ViTConfig()
        self.config = cfg
        # Accept other input sizes (multiples of the patch size), e.g. for progressive resizing;
        # a run setting, not part of the architecture, so not in the config.
        self.dynamic_img_size = dynamic_img_size
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.conv_stem, cfg.stem_strides)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        if cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, cfg.embed_dim))
        else:  # fixed: recomputed from the config, so not saved; the class token's row is zero
            table = sincos_pos_embed(cfg.grid_size, cfg.embed_dim, cfg.num_prefix_tokens)
            self.register_buffer("pos_embed", table, persistent=False)
        # Sin-cos tables of other grids for dynamic_img_size, by (grid, device): neither a buffer nor
        # saved. Cached rather than rebuilt each step, which on a GPU is a host-to-device copy.
        self._sincos_cache: dict[tuple[tuple[int, int], torch.device], torch.Tensor] = {}
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.patch_drop = PatchDropout(cfg.patch_drop_rate, cfg.num_prefix_tokens)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear rule
        self.blocks = nn.ModuleList(Block(cfg, rate, attn_impl) for rate in rates)
        self.norm = nn.Identity() if cfg.use_fc_norm else nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.use_fc_norm else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.set_attn_impl(attn_impl)
        self.init_weights(weight_init)

    def init_weights(self, mode: str = "trunc_normal") -> None:
        """Fresh weights. `mode` picks the linear layers' init (layers.WEIGHT_INITS); the patch
        projection is LeCun normal, the head zero, and conv-stem layers keep PyTorch's conv init
        (each is followed by BatchNorm, so their scale does not matter at the start)."""
        if mode not in WEIGHT_INITS:
            raise ConfigError(f"weight init {mode!r} must be one of {WEIGHT_INITS}")
        self.apply(lambda module: init_weights(module, mode))
        for layer in self.patch_embed.stem or ():
            layer.conv.reset_parameters()
            for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                getattr(layer.norm, name).data.fill_(value)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        fan_in = self.patch_embed.proj.in_channels * self.patch_embed.proj.kernel_size[0] ** 2
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1.0 / fan_in))  # LeCun normal
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):  # a zero head starts every class at equal probability
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ---- timm API ----------------------------------------------------------------------------
    def set_attn_impl(self, impl: str) -> None:
        """'auto' (by device and sequence length), 'sdpa' (fused) or 'math' (explicit softmax)."""
        if impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl={impl!r} must be one of {ATTN_IMPLS}")
        for block in self.blocks:
            block.attn.impl = impl

    def set_stem_layout(self, layout: str) -> None:
        """The conv stem's input layout, one of STEM_LAYOUTS (no effect without a stem)."""
        if layout not in STEM_LAYOUTS:
            raise ConfigError(f"stem_layout={layout!r} must be one of {STEM_LAYOUTS}")
        self.patch_embed.channels_last = layout == "channels_last"

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, class_names: tuple[str, ...] | None = None) -> None:
        """A new zero-initialised head for `num_classes` outputs (0 removes it); updates the config."""
        self.config = self.config.replace(num_classes=num_classes, class_names=class_names)
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()
        if num_classes:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """The (h, w) patch grid of a valid input; InputShapeError with the numbers otherwise."""
        C, H, W = self.config.input_size
        p = self.config.patch_size
        if self.dynamic_img_size:
            if x.ndim != 4 or x.shape[1] != C or not all(s > 0 and s % p == 0 for s in x.shape[2:]):
                raise InputShapeError(
                    f"input has shape {tuple(x.shape)} but the model expects (batch, {C}, H, W) with H "
                    f"and W positive multiples of patch_size={p}")
        elif x.ndim != 4 or tuple(x.shape[1:]) != (C, H, W):
            raise InputShapeError(
                f"input has shape {tuple(x.shape)} but the model expects (batch, {C}, {H}, {W}); "
                f"resize images to {H}x{W} with {C} channel(s), or load the model with img_size=")
        return x.shape[2] // p, x.shape[3] // p

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, prefix + h*w, D) position embedding for an h x w patch grid; the stored one itself
        at the config's grid, so full-size training and evaluation add the very same table."""
        if grid == (self.config.grid_size,) * 2:
            return self.pos_embed
        if isinstance(self.pos_embed, nn.Parameter):  # resampled each step: gradients reach the parameter
            return resample_pos_embed(self.pos_embed, grid, self.num_prefix_tokens)
        # Sin-cos of another grid, at the positions its patches cover in the full-size grid (as
        # resampling a learned table does), so a downscaled image keeps its content's positions.
        key = (grid, self.pos_embed.device)
        if key not in self._sincos_cache:
            table = sincos_pos_embed(grid, self.embed_dim, self.num_prefix_tokens, span=self.config.grid_size)
            self._sincos_cache[key] = table.to(self.pos_embed.device)
        return self._sincos_cache[key]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, D) normalised tokens (fewer in training with patch dropout)."""
        grid = self._check_input(x)
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, h*w, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # -> (B, 1+h*w, D)
        x = self.pos_drop(x + self._pos_embed_for(grid).to(x.dtype))
        x = self.patch_drop(x)  # training only: (B, 1+h*w, D) -> (B, 1+keep, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, D) tokens -> (B, num_classes) logits, or the (B, D) pooled features."""
        if self.config.pool == "token":
            x = x[:, 0]
        else:  # with patch dropout, the mean of the kept tokens
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
