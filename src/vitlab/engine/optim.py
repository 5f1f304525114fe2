"""AdamW with parameter groups and a warmup + cosine schedule, per optimizer step (the warmup
capped at a tenth of the run, so that short runs still reach their peak lr and decay).

No weight decay on 1-D parameters (norm weights, biases, LayerScale) nor on the position
embedding and class token (the model's `no_weight_decay()`), as in DeiT and timm. Optional
layer-wise lr decay for fine-tuning (BEiT, arXiv 2106.08254): deeper blocks learn faster.
"""
from __future__ import annotations

import math

import torch

from .args import OptimArgs


def _layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the final norm and head."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: torch.nn.Module, args: OptimArgs) -> list[dict]:
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    depth = len(getattr(model, "blocks", []))
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip
        layer = _layer_id(name, depth) if args.layer_decay else 0
        scale = args.layer_decay ** (depth + 1 - layer) if args.layer_decay else 1.0
        g = groups.setdefault((no_decay, layer), {"params": [], "names": [], "lr_scale": scale,
                                                  "weight_decay": 0.0 if no_decay else args.weight_decay})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, args: OptimArgs) -> torch.optim.AdamW:
    groups = param_groups(model, args)
    for g in groups:
        g["lr"] = args.lr * g["lr_scale"]
    kwargs = {"fused": True} if any(p.is_cuda for g in groups for p in g["params"]) else {}
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                             lr=args.lr, betas=(args.beta1, args.beta2), **kwargs)


MAX_WARMUP_FRACTION = 0.1
"""Warmup takes at most this fraction of the run's optimizer steps, whatever `optim.warmup_epochs`
says: a run shorter than its warmup (`--set train.epochs=1` on a recipe with one warmup epoch)
would otherwise never leave it nor decay (issue 8 item 12). The recipes' full runs sit below it."""


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """`warmup_epochs` in optimizer steps, capped at MAX_WARMUP_FRACTION of the run."""
    return min(int(round(warmup_epochs * steps_per_epoch)), int(MAX_WARMUP_FRACTION * total_steps))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over steps 0..warmup-1 from 1/warmup to 1, then a cosine from 1 (at step
    `warmup`) towards min_ratio, which it would reach at step `total`, one past the last."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class WarmupCosine:
    """Sets each group's lr for optimizer step `step` (stateless apart from the step counter)."""

    def __init__(self, optimizer: torch.optim.Optimizer, args: OptimArgs, steps_per_epoch: int, epochs: int,
                 max_steps: int | None = None):
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.total = min(steps_per_epoch * epochs, max_steps or steps_per_epoch * epochs)
        self.warmup = warmup_steps(args.warmup_epochs, steps_per_epoch, self.total)
        self.min_ratio = args.min_lr / args.lr if args.lr > 0 else 0.0
        self.step_count = 0
        self.apply()

    def apply(self) -> None:
        f = lr_factor(self.step_count, self.warmup, self.total, self.min_ratio)
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.apply()
