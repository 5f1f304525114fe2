"""Small building blocks shared by the model: stochastic depth, LayerScale, weight init."""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., arXiv 1603.09382): drop a residual branch per sample."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # one draw per sample
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT, arXiv 2103.17239); key `gamma` as timm."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


WEIGHT_INITS = ("trunc_normal", "xavier")


def init_weights(module: nn.Module, mode: str = "trunc_normal") -> None:
    """Linear weights: truncated normal, std 0.02 (timm's default), or Xavier-uniform (big_vision's
    plain ViT, timm's "jax" mode), which scales with the layer's width; zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        if mode == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
