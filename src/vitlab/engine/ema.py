"""Exponential moving average of model weights (Polyak averaging; used by DeiT and timm)."""
from __future__ import annotations

import copy

import torch

MAX_HORIZON_FRACTION = 0.1
"""The EMA averages over at most this fraction of the run's optimizer steps: its horizon
1 / (1 - decay) is capped at `MAX_HORIZON_FRACTION * total_steps`, so that the average of a short
run is not weighted towards its early, worse weights (issue 8 item 12). It rarely binds for long:
the warmup in `ModelEMA.update` already keeps the horizon near n / 9 after n steps, so the mnist
recipe's 15 epochs (0.999 over 6435 steps) feel the cap, 0.99845, only in their last ~600 steps."""


def decay_for_run(decay: float, total_steps: float) -> float:
    """`decay`, lowered where needed so that 1 / (1 - decay) <= MAX_HORIZON_FRACTION * total_steps.

    A run of 10 or fewer steps gets 0: its "average" is the latest weights."""
    horizon = MAX_HORIZON_FRACTION * total_steps
    return min(decay, 1 - 1 / horizon) if horizon > 1 else 0.0


def decay_for_budget(decay: float, steps: int, p: float) -> float:
    """`decay_for_run` for a time-budgeted run, whose total steps are not known in advance: after
    `steps` steps at progress `p` the run is estimated at steps / p steps (the measured steps per
    unit of budget), re-estimated at every update. Early estimates are rough, but the cap does not
    bind early: the warmup in `ModelEMA.update` keeps the horizon near steps / 9 < 0.1 * steps / p
    for p < 0.9, so the cap acts only in the last tenth of the budget, where the estimate is good."""
    return decay_for_run(decay, steps / p) if p > 0 else decay


class ModelEMA:
    """A frozen copy whose weights track `decay * ema + (1 - decay) * model` after each step.

    The decay warms up as min(decay, (1 + n) / (10 + n)) at the n-th update, so early averages are
    not dominated by the random initialisation (this alone keeps the horizon near n / 9 steps until
    `decay` is reached). Float buffers are averaged too (a conv stem's BatchNorm statistics then
    match the averaged weights, as in timm's ModelEmaV2; fixed position tables are the same on both
    sides), other buffers copied.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """Fold `model`'s weights in; returns the decay used for this update."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for eb, b in zip(self.module.buffers(), model.buffers()):
            if eb.is_floating_point():  # BatchNorm statistics: averaged like the weights they belong to
                eb.lerp_(b, 1.0 - d)
            else:
                eb.copy_(b)
        return d

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
