import os
from pathlib import Path

import pytest
import torch

from vitlab import ViTConfig

# Tests share 2 cores with everything else: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tiny_config(**kw) -> ViTConfig:
    """A few-thousand-parameter ViT on 16-px images; fields overridable."""
    base = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    base.update(kw)
    chans = base["in_chans"]
    base.setdefault("mean", (0.5,) * chans)
    base.setdefault("std", (0.5,) * chans)
    return ViTConfig(**base)


# The layouts every interop test runs over: timm's defaults and vitlab's small-image flavour.
LAYOUTS = {
    "token-learn": {},
    "avg-fcnorm-nocls": dict(class_token=False, pool="avg"),
    "avg-cls": dict(pool="avg"),
    "layerscale-noqkvbias": dict(init_values=0.1, qkv_bias=False, mlp_ratio=2.0),
}


@pytest.fixture
def rng_input():
    def make(cfg: ViTConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, *cfg.input_size, generator=torch.Generator().manual_seed(seed))
    return make


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (zero-init heads would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model
