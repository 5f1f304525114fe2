"""Exponential moving average of model weights (Polyak averaging; used by DeiT and timm)."""
from __future__ import annotations

import copy

import torch


class ModelEMA:
    """A frozen copy whose weights track `decay * ema + (1 - decay) * model` after each step.

    The decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by
    the random initialisation. Buffers (e.g. fixed position tables) are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
