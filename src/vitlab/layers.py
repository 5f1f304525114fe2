"""Small building blocks shared by the model: stochastic depth (masking, or skipping the dropped
samples' computation as DINOv2 does, arXiv 2304.07193), patch dropout, LayerScale, weight init."""
from __future__ import annotations

from collections.abc import Callable

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


def drop_add_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor],
                      drop_prob: float) -> torch.Tensor:
    """x + branch(x) under stochastic depth that skips the work: the branch sees only a random
    subset of the B samples, and its output is added back to those rows scaled by B / subset. Each
    sample is in a subset of size k with probability k / B, so the expectation is x + branch(x), as
    with DropPath, whatever k is; the branch must treat samples independently.

    k is B * (1 - drop_prob) rounded at random (up with the probability of its fractional part,
    at least 1), so that on average drop_prob of the samples are dropped, as with DropPath, even
    for small batches (truncating would drop 12.5% at B=8, p=0.05, and nothing at B=1)."""
    B = x.shape[0]
    keep = max(1, min(B, int(B * (1 - drop_prob) + torch.rand(()).item())))
    rows = torch.randperm(B, device=x.device)[:keep]  # torch's global RNG: exact resume reseeds it
    out = branch(x[rows])  # (keep, N, D)
    return torch.index_add(x, 0, rows, out.to(x.dtype), alpha=B / keep)


class PatchDropout(nn.Module):
    """Training on a random subset of each image's patch tokens (Liu et al., "PatchDropout",
    arXiv 2208.07220; timm's patch_drop_rate). Prefix tokens (the class token) are always kept.

    Kept tokens stay in random order (not re-sorted): their positions are already added, and
    attention and average pooling do not depend on token order, so a sort would be wasted work.
    """

    def __init__(self, prob: float, num_prefix_tokens: int):
        super().__init__()
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        B, N, D = x.shape
        n = N - self.num_prefix_tokens
        keep = max(1, round(n * (1 - self.prob)))
        if keep == n:
            return x
        idx = torch.rand(B, n, device=x.device).topk(keep, dim=1).indices  # (B, keep), per image
        patches = x[:, self.num_prefix_tokens:].gather(1, idx[..., None].expand(-1, -1, D))  # -> (B, keep, D)
        return torch.cat([x[:, :self.num_prefix_tokens], patches], dim=1)  # (B, prefix + keep, D)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}"


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
