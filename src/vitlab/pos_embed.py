"""Position embeddings: fixed 2-D sin-cos (MAE, arXiv 2111.06377; "Better plain ViT baselines",
arXiv 2205.01580) and resampling of learned embeddings to a new patch grid (ViT paper, section 3.2:
2-D interpolation of the pre-trained position embeddings)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError


def _pair(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def sincos_2d(grid: int | tuple[int, int], dim: int, temperature: float = 10000.0,
              span: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(gh*gw, dim) embedding of a gh x gw patch grid (an int is square), rows in the patch order
    (row-major); a quarter of the channels each for sin(y), cos(y), sin(x), cos(x).

    `span` (the model's full grid) places a coarser grid's patches at their centres in full-grid
    units: patch i of gh covers the image where full-size patches (i + 0.5) * Gh / gh - 0.5 lie,
    so an image shown smaller (progressive resizing) keeps the positions of its content."""
    if dim % 4:
        raise ConfigError(f"2-D sin-cos position embedding needs dim divisible by 4, got dim={dim}")
    gh, gw = _pair(grid)
    Gh, Gw = _pair(span) if span is not None else (gh, gw)

    def positions(g: int, G: int) -> torch.Tensor:
        return (torch.arange(g, dtype=torch.float64) + 0.5) * (G / g) - 0.5  # = arange(g) when G == g

    ys, xs = torch.meshgrid(positions(gh, Gh), positions(gw, Gw), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y = ys.flatten()[:, None] * omega[None, :]  # (gh*gw, dim/4)
    x = xs.flatten()[:, None] * omega[None, :]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).float()


def sincos_pos_embed(grid: int | tuple[int, int], dim: int, num_prefix_tokens: int,
                     span: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(1, prefix + gh*gw, dim) table as the model adds it: zero rows for the prefix tokens (the
    class token carries no position), then sincos_2d."""
    return torch.cat([torch.zeros(num_prefix_tokens, dim), sincos_2d(grid, dim, span=span)])[None]


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int | tuple[int, int],
                       num_prefix_tokens: int) -> torch.Tensor:
    """Resize a (1, prefix + g*g, D) learned embedding to (1, prefix + gh*gw, D), bicubic
    (antialiased when shrinking); `new_grid` (gh, gw), or an int for a square grid.

    Prefix tokens (the class token's position) are kept as they are; only the square patch grid
    is interpolated. Works in fp32 whatever the stored dtype, and returns the stored dtype.
    Differentiable, so a model trained at a smaller size (progressive resizing) still trains the
    full-size parameter; at the stored size the parameter itself is returned.
    """
    gh, gw = _pair(new_grid)
    _, n, dim = pos_embed.shape
    n_grid = n - num_prefix_tokens
    old_grid = int(round(n_grid**0.5))
    if old_grid * old_grid != n_grid:
        raise ConfigError(f"position embedding has {n_grid} grid positions, which is not a square grid")
    if (old_grid, old_grid) == (gh, gw):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1,g*g,D) -> (1,D,g,g)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False,
                         antialias=gh < old_grid or gw < old_grid)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)  # (1,D,gh,gw) -> (1,gh*gw,D)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)
