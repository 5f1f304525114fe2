"""AdamW with parameter groups and a warmup + cosine schedule over the run's progress p in [0, 1]
(the warmup capped at a tenth of the run, so that short runs still reach their peak lr and decay).

Progress is steps done / total steps, or, under `train.time_budget`, training seconds / budget.
Step-based runs compute it in whole steps (`lr_factor` depends on step / total only, and integer
steps keep the values exact across versions); budgeted runs use `budget_lr_factor`.

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
    return cosine((step - warmup) / max(1, total - warmup), min_ratio)


def cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def budget_lr_factor(step: int, p: float, ahead: float, warmup: int, warmup_end: float | None,
                     min_ratio: float) -> tuple[float, float | None]:
    """The lr factor of optimizer step `step` (0-based) of a time-budgeted run at progress `p`
    (budget used before the step); `ahead` is the last step's share of the budget, so that the
    ramp, like the step-based one, gives a step the lr of its end and the first step is not wasted.

    The warmup ends after `warmup` steps (optim.warmup_epochs) or at p = MAX_WARMUP_FRACTION,
    whichever comes first, ramping linearly in whichever is further along: the step-based rule,
    with the run's length in steps measured as it goes (counting steps is the conversion of
    warmup_epochs through the measured step time, and stays right when steps get slower, as they
    do at a later resolution stage). The cosine then runs from `warmup_end`, the p at which the
    warmup ended (None while it has not), to p = 1. Returns (factor, warmup_end)."""
    if warmup_end is None:
        ramp = max((step + 1) / warmup if warmup else math.inf, (p + ahead) / MAX_WARMUP_FRACTION)
        if ramp < 1:
            return ramp, None
        warmup_end = p
    return cosine((p - warmup_end) / max(1e-12, 1 - warmup_end), min_ratio), warmup_end


class WarmupCosine:
    """Sets each group's lr for the next optimizer step. Step-based (`total` steps) unless
    `budgeted`: then `total` is None and `step` is given the progress p after each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, args: OptimArgs, steps_per_epoch: int, epochs: int,
                 max_steps: int | None = None, budgeted: bool = False):
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.min_ratio = args.min_lr / args.lr if args.lr > 0 else 0.0
        self.budgeted = budgeted
        if budgeted:
            self.total = None
            self.warmup = int(round(args.warmup_epochs * steps_per_epoch))  # or 10% of p: budget_lr_factor
            self.p, self.ahead, self.warmup_end = 0.0, 0.0, None
        else:
            self.total = min(steps_per_epoch * epochs, max_steps or steps_per_epoch * epochs)
            self.warmup = warmup_steps(args.warmup_epochs, steps_per_epoch, self.total)
        self.step_count = 0
        self.apply()

    def apply(self) -> None:
        if self.budgeted:
            f, self.warmup_end = budget_lr_factor(self.step_count, self.p, self.ahead, self.warmup, self.warmup_end,
                                                  self.min_ratio)
        else:
            f = lr_factor(self.step_count, self.warmup, self.total, self.min_ratio)
        for g, base in zip(self.optimizer.param_groups, self.base):
            g["lr"] = base * f

    def step(self, p: float | None = None, ahead: float = 0.0) -> None:
        """One optimizer step done; a budgeted run passes the progress after it and that step's share
        of the budget."""
        self.step_count += 1
        if self.budgeted:
            if p is None:
                raise ValueError("a budgeted schedule steps with the progress p")
            self.p, self.ahead = p, ahead
        self.apply()

    def state_dict(self) -> dict:
        if self.budgeted:
            return {"step_count": self.step_count, "p": self.p, "ahead": self.ahead, "warmup_end": self.warmup_end}
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        if self.budgeted:
            self.p, self.ahead, self.warmup_end = float(state["p"]), float(state["ahead"]), state["warmup_end"]
        self.apply()
