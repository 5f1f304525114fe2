"""The training loop as plain functions: `loss_fn`, `train_step`, `train_one_epoch`, `fit`.

Layout (torchvision's references; big_vision's update step that returns its measurements):
`train_step` is one optimizer step over `train.accum_steps` micro-batches and returns a dict;
`train_one_epoch` runs steps, moves the `Position` (only `Position.advance` does) and asks the
`CheckpointPolicy` when to save; `fit` runs epochs, evaluates, and keeps the best. A new per-step
feature belongs in `train_step`, a new "when" in the policy, neither in the epoch loop.

One progress p in [0, 1] drives the lr schedule, the resolution stages and the end of the run
(`Trainer.progress`): optimizer steps done / total steps, or under `train.time_budget` training
seconds / budget seconds, where training seconds are the time spent in `train_step` (rank 0's,
agreed through the all-reduce each step already does, so ranks stop together).

Progressive resolution (`train.resolution_schedule`; FixRes, arXiv 1906.06423, and the progressive
resizing of fast ImageNet training): the augmented batch is resized to the stage's side in
`train_step`, and the model resamples its position embeddings (`dynamic_img_size`). Evaluation is
always at full size.

Exact resume: everything random is either derived from (seed, epoch, batch) by the loader or
drawn from torch's global generator, reseeded per micro-batch from the same numbers, and the
generator's state is checkpointed too. Restoring model, optimizer, scheduler, EMA, scaler, RNG and
the loader position makes the rest of the run repeat the uninterrupted one operation for operation.
A time-budgeted run cannot be repeated exactly (its lr follows measured seconds); resumed, it
continues the budget from the training seconds in the checkpoint and ends on time.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.loader import batch_seed
from ..errors import TrainingError
from ..evaluate import evaluate
from .args import RunConfig
from .checkpoint import list_checkpoints, rng_state, save_checkpoint, set_rng_state
from .ema import MAX_HORIZON_FRACTION, ModelEMA, decay_for_budget, decay_for_run
from .log import RunLogger, mmss
from .optim import MAX_WARMUP_FRACTION, WarmupCosine, build_optimizer
from .runtime import Runtime, all_reduce_sum, barrier


def loss_fn(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against class indices, or against soft targets (mixup / cutmix)."""
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    K = logits.shape[-1]
    target = target * (1 - label_smoothing) + label_smoothing / K
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


@dataclass
class Position:
    """Where training stands: optimizer steps done, and the next (epoch, micro-batch)."""
    step: int = 0
    epoch: int = 0
    batch: int = 0
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def advance(self, epoch: int, next_batch: int, usable: int) -> None:
        """One optimizer step done in `epoch`; the next micro-batch is `next_batch`, or the next
        epoch's first once the epoch's `usable` micro-batches are used up."""
        self.step += 1
        self.epoch, self.batch = (epoch + 1, 0) if next_batch >= usable else (epoch, next_batch)


class Trainer:
    """Holds the objects one run's functions share; the loop itself is `fit` below. `clock` (seconds)
    times the training steps; tests inject a fake one."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, rt: Runtime, steps_per_epoch: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.model, self.cfg, self.rt, self.steps_per_epoch = model, cfg, rt, steps_per_epoch
        budget = cfg.train.time_budget
        self.budget_s = budget * 60 if budget is not None else None
        self.clock, self.train_s, self.untold_s = clock, 0.0, 0.0  # untold: timed, not yet in an all-reduce
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = WarmupCosine(self.optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs, cfg.train.max_steps,
                                      budgeted=budget is not None)
        self.total_steps = self.scheduler.total  # None under a time budget
        self.ema_decay = cfg.train.ema_decay
        if self.ema_decay and budget is None:  # under a budget, train_step caps it as the run goes
            self.ema_decay = decay_for_run(self.ema_decay, self.total_steps)
        self.ema = ModelEMA(model, self.ema_decay) if cfg.train.ema_decay else None
        self.stages = cfg.train.resolution_stages
        if self.stages:
            model.dynamic_img_size = True  # the unwrapped model: DDP and compile wrap the same module
        self.shown_size: int | None = None  # the stage last announced
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
        self.frozen = False  # optim.freeze: set per epoch by `freeze_for`
        self.train_images: int | None = None  # the training split's size, checked when resuming
        self.net = self._wrap()

    def _wrap(self) -> torch.nn.Module:
        """The module the steps call: the model, compiled and/or under DDP. DDP registers the
        parameters that need gradients when it wraps, so it wraps again when that set changes."""
        net = self.model
        if self.cfg.runtime.compile:
            net = torch.compile(net)
        if self.rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(net, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda" else None)
        return net

    def frozen_at(self, epoch: int) -> bool:
        """Whether the backbone is frozen during `epoch` (optim.freeze, optim.unfreeze_epoch)."""
        o = self.cfg.optim
        return o.freeze == "backbone" and (o.unfreeze_epoch is None or epoch < o.unfreeze_epoch)

    def freeze_for(self, epoch: int) -> bool:
        """Freeze or unfreeze every weight outside the head (`head.*`) for `epoch`; True when that
        changed anything. A function of the epoch alone, so a resumed run freezes the same way.
        The optimizer holds every parameter throughout: AdamW skips those without a gradient (no
        update, no weight decay), and a parameter's moments start when it first learns."""
        frozen = self.frozen_at(epoch)
        if frozen == self.frozen:
            return False
        for name, p in self.model.named_parameters():
            if not name.startswith("head."):
                p.requires_grad_(not frozen)
        self.frozen = frozen
        if self.rt.distributed:
            self.net = self._wrap()
        return True

    def progress(self) -> float:
        """p in [0, 1]: optimizer steps done / total steps, or training seconds / budget seconds
        (the scheduler counts the steps; `train_step` adds the seconds)."""
        if self.budget_s is None:
            return min(1.0, self.scheduler.step_count / self.total_steps)
        return min(1.0, self.train_s / self.budget_s)

    def done(self) -> bool:
        return self.progress() >= 1.0

    def left_s(self) -> float | None:
        """Budget seconds left; None without a budget."""
        return None if self.budget_s is None else max(0.0, self.budget_s - self.train_s)

    def img_size_at(self, p: float) -> int | None:
        """The training input side at progress p (the stage whose share of the run holds p); None
        without a resolution schedule."""
        end = 0.0
        for size, fraction in self.stages:
            end += fraction
            if p < end:
                return size
        return self.stages[-1][0] if self.stages else None

    def length_notes(self) -> list[str]:
        """What the run's length changed in the settings (nothing silent): capped warmup, EMA decay."""
        notes = []
        asked = int(round(self.cfg.optim.warmup_epochs * self.steps_per_epoch))
        if self.budget_s is not None:
            notes.append(f"time budget {self.cfg.train.time_budget:g} min of training steps (evaluation and "
                         f"checkpoints not counted); train.epochs={self.cfg.train.epochs} is ignored")
            if asked:
                notes.append(f"warmup ends after {asked} steps (optim.warmup_epochs={self.cfg.optim.warmup_epochs}) "
                             f"or {MAX_WARMUP_FRACTION:.0%} of the budget, whichever comes first")
            if self.ema is not None:
                notes.append(f"EMA decay {self.ema_decay} (train.ema_decay) is lowered where its horizon 1/(1-decay) "
                             f"exceeds {MAX_HORIZON_FRACTION:.0%} of the steps estimated for the budget")
            return notes
        if self.scheduler.warmup < asked:
            notes.append(f"warmup {self.scheduler.warmup} steps, not {asked} (optim.warmup_epochs="
                         f"{self.cfg.optim.warmup_epochs}): at most {MAX_WARMUP_FRACTION:.0%} of this "
                         f"{self.total_steps}-step run")
        if self.ema_decay is not None and self.ema_decay < self.cfg.train.ema_decay:
            notes.append(f"EMA decay {self.ema_decay:.5g}, not {self.cfg.train.ema_decay} (train.ema_decay): "
                         f"its horizon 1/(1-decay) is at most {MAX_HORIZON_FRACTION:.0%} of this run")
        return notes

    def state(self, pos: Position, model_config: dict) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "best": pos.best, "history": pos.history,
            "train_s": self.train_s,
            "rng": rng_state(), "run_config": self.cfg.to_dict(), "model_config": model_config,
            "precision": self.rt.precision, "world_size": self.rt.world_size, "train_images": self.train_images,
        }

    def restore(self, state: dict[str, Any]) -> Position:
        for key, now in (("precision", self.rt.precision), ("world_size", self.rt.world_size)):
            if state.get(key, now) != now:
                raise TrainingError(f"the checkpoint was written with {key}={state[key]!r} but this process runs "
                                    f"with {key}={now!r}; resume with the same setting for an exact continuation")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.train_s, self.untold_s = float(state.get("train_s", 0.0)), 0.0  # a time budget goes on from here
        return Position(state["step"], state["epoch"], state["batch"], state.get("best"), list(state.get("history", [])))


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a checkpoint is written and where: `fit` saves at every epoch end (with the validation
    result, so it can be the best); inside an epoch, every `every` optimizer steps (0: never),
    except where the epoch or the run ends anyway. The recorded Position is the one after the step.
    `total_steps` is None under a time budget (the epoch loop stops at its end before asking)."""
    run_dir: Path
    every: int
    keep_last: int
    total_steps: int | None
    model_config: dict

    def due_mid_epoch(self, pos: Position) -> bool:
        return (self.every > 0 and pos.step % self.every == 0 and pos.batch > 0
                and (self.total_steps is None or pos.step < self.total_steps))

    def save(self, trainer: Trainer, pos: Position, best: bool = False) -> None:
        if trainer.rt.is_main:
            save_checkpoint(trainer.state(pos, self.model_config), self.run_dir, self.keep_last, best=best)

    def last_good(self) -> str:
        done = list_checkpoints(self.run_dir)
        return str(done[-1][1]) if done else "none written yet"


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr (before any layer-decay scale)."""
    g = optimizer.param_groups[0]
    return g["lr"] / g.get("lr_scale", 1.0)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), for a progressive-resolution stage. Antialiased: a
    smaller stage sees the image as a smaller camera would, not a subsampled, aliased one."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def train_step(trainer: Trainer, micro_batches: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
               epoch: int) -> dict[str, Any]:
    """One optimizer step over `train.accum_steps` micro-batches `(index in the epoch, inputs, targets)`.

    Forward and backward each micro-batch (under DDP the gradients are averaged on the last one
    only), clip the gradient norm, then update weights, schedule and EMA. Non-finite values are
    checked once per step, with one all-reduce and one host sync: on the loss summed over the
    step's micro-batches and ranks, and on the gradient norm (a NaN loss shows in both; a finite
    loss can still have a NaN gradient). If either is not finite nothing is updated, and the
    result says `finite: False` for the caller to stop the run (under fp16 the loss scaler skips
    a step with non-finite gradients itself).

    The step's seconds (from its start to the all-reduce, plus the rest of the previous step) travel
    in the same all-reduce, rank 0's only, so every rank adds the same seconds to `trainer.train_s`
    and agrees on the progress p and on when the run ends. The inputs are resized to the resolution
    stage of the progress before the step.

    Returns loss (mean over the step's images, all ranks), correct, n, grad_norm, lr (this step's
    schedule lr), ema_decay (this update's, or None), batches (the micro-batch indices), finite,
    img_size (the stage's side, or None), step_s (its seconds) and p (the progress after it).
    """
    cfg, rt, net, opt = trainer.cfg, trainer.rt, trainer.net, trainer.optimizer
    started = trainer.clock()
    accum = cfg.train.accum_steps
    size = trainer.img_size_at(trainer.progress())
    opt.zero_grad(set_to_none=True)
    sums = torch.zeros(3, device=rt.device)  # loss * n, correct, n
    batches = []
    for i, x, y in micro_batches:
        # Dropout and stochastic depth draw from a generator seeded by the batch's position: the
        # same masks after a resume, and different masks on each rank.
        torch.manual_seed(batch_seed(cfg.train.seed, epoch, i, rt.rank, 1))  # 1: not the augmentation stream
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        if size is not None:
            x = resize_batch(x, size)
        batches.append(i)
        last = len(batches) == accum
        with net.no_sync() if rt.distributed and not last else contextlib.nullcontext():
            with rt.autocast():
                logits = net(x)
                loss = loss_fn(logits.float(), y, cfg.optim.label_smoothing)
            trainer.scaler.scale(loss / accum).backward()
        labels = y if y.ndim == 1 else y.argmax(-1)
        sums[0] += loss.detach() * len(labels)
        sums[1] += (logits.argmax(-1) == labels).sum()
        sums[2] += len(labels)
    if len(batches) != accum:
        raise ValueError(f"train_step got {len(batches)} micro-batches, train.accum_steps={accum}")
    trainer.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.optim.clip_grad or float("inf"))
    # The norm is the same on every rank (DDP has averaged the gradients): / world_size keeps it after the sum.
    # The seconds are rank 0's alone (the others send 0): one clock for all.
    timed = trainer.clock()
    step_s = trainer.untold_s + timed - started
    measured = torch.cat([sums, norm.detach().float().reshape(1).to(rt.device) / rt.world_size,
                          torch.tensor([step_s if rt.is_main else 0.0], device=rt.device)])
    loss_sum, correct, n, grad_norm, step_s = all_reduce_sum(measured, rt).tolist()
    trainer.train_s += step_s
    out = {"loss": loss_sum / n, "correct": correct, "n": n, "grad_norm": grad_norm, "lr": _base_lr(opt),
           "ema_decay": None, "batches": batches, "img_size": size, "step_s": step_s, "p": trainer.progress()}
    out["finite"] = math.isfinite(loss_sum) and (math.isfinite(grad_norm) or trainer.scaler.is_enabled())
    if not out["finite"]:
        return out
    trainer.scaler.step(opt)
    trainer.scaler.update()
    opt.zero_grad(set_to_none=True)
    if trainer.budget_s is None:
        trainer.scheduler.step()
        out["p"] = trainer.progress()
    else:
        trainer.scheduler.step(out["p"], ahead=step_s / trainer.budget_s)
    if trainer.ema is not None:
        if trainer.budget_s is not None:
            trainer.ema.decay = decay_for_budget(cfg.train.ema_decay, trainer.scheduler.step_count, out["p"])
        out["ema_decay"] = trainer.ema.update(trainer.model)
    # From `timed` on (on a GPU the wait for the queued forward and backward, then the update):
    # counted with the next step.
    trainer.untold_s = trainer.clock() - timed
    return out


def _nonfinite_error(m: dict[str, Any], pos: Position, epoch: int, last_good: str) -> TrainingError:
    what = f"loss is {m['loss']}" if not math.isfinite(m["loss"]) else f"gradient norm is {m['grad_norm']}"
    first, last = m["batches"][0] + 1, m["batches"][-1] + 1
    where = f"batch {last}" if first == last else f"batches {first}-{last}"
    return TrainingError(f"{what} at step {pos.step + 1} (epoch {epoch + 1}, {where}); stopped before updating "
                         f"the weights. Last good checkpoint: {last_good}. Try a lower optim.lr, optim.clip_grad, "
                         f"or runtime.precision=fp32")


def train_one_epoch(trainer: Trainer, loader, epoch: int, pos: Position, logger: RunLogger,
                    policy: CheckpointPolicy) -> dict[str, float]:
    """Optimizer steps from `pos` to the end of `epoch` (or of the run); `loader` is set to start at
    `pos.batch`. Returns the epoch's training measurements."""
    cfg = trainer.cfg
    accum = cfg.train.accum_steps
    if trainer.freeze_for(epoch):
        logger.info(f"epoch {epoch + 1}: " + ("backbone frozen, only the head learns (optim.freeze=backbone)"
                                              if trainer.frozen else "backbone unfrozen: every weight learns "
                                              f"(optim.unfreeze_epoch={cfg.optim.unfreeze_epoch})"))
    trainer.net.train(not trainer.frozen)  # a frozen backbone runs as evaluated: no dropout, BatchNorm kept
    usable = (len(loader) // accum) * accum  # micro-batches that complete an optimizer step
    batches = enumerate(loader, start=loader.start_batch)
    loss_sum = correct = seen = 0.0
    t0 = time.perf_counter()
    m: dict[str, Any] = {"lr": _base_lr(trainer.optimizer)}
    for first in range(loader.start_batch, usable, accum):
        size = trainer.img_size_at(p := trainer.progress())
        if size is not None and size != trainer.shown_size:
            logger.info(f"resolution {size}x{size} px from step {pos.step + 1} (progress {p:.3f})")
            trainer.shown_size = size
        micro = ((i, x, y) for i, (x, y) in itertools.islice(batches, accum))  # lazy: one in memory at a time
        m = train_step(trainer, micro, epoch)
        if not m["finite"]:
            raise _nonfinite_error(m, pos, epoch, policy.last_good())
        pos.advance(epoch, first + accum, usable)
        loss_sum, correct, seen = loss_sum + m["loss"] * m["n"], correct + m["correct"], seen + m["n"]
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        logger.update(left_s=trainer.left_s(), loss=f"{m['loss']:.3f}", acc=f"{correct / seen:.3f}",
                      img_s=f"{rate:.0f}")
        if pos.step % cfg.train.log_every == 0:
            # "loss" and "batch_acc" are this step's batch; "acc" the mean over this epoch's steps so far (the bar's;
            # after a mid-epoch resume, since the resume).
            logger.write({"kind": "step", "epoch": epoch + 1, "step": pos.step, "loss": m["loss"],
                          "batch_acc": m["correct"] / m["n"], "acc": correct / seen, "lr": m["lr"],
                          "grad_norm": m["grad_norm"], "images_per_s": rate,
                          "p": m["p"], **({"train_s": trainer.train_s} if trainer.budget_s is not None else {}),
                          **({"img_size": m["img_size"]} if m["img_size"] is not None else {}),
                          **({"ema_decay": m["ema_decay"]} if m["ema_decay"] is not None else {})})
        if trainer.done():  # the end of the schedule: train.max_steps or the time budget, mid-epoch if so
            break
        if policy.due_mid_epoch(pos):
            policy.save(trainer, pos)
    elapsed = time.perf_counter() - t0
    seen = max(seen, 1)
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "images_per_s": seen / max(elapsed, 1e-9),
            "epoch_s": elapsed, "lr": m["lr"]}


def fit(trainer: Trainer, train_loader, val_loader, num_classes: int, run_dir: Path, logger: RunLogger,
        model_config: dict, pos: Position | None = None) -> Position:
    """Train to `train.epochs` (or to the end of `train.time_budget`, epochs uncounted), evaluating on
    validation and checkpointing; returns the final position."""
    cfg, rt = trainer.cfg, trainer.rt
    accum = cfg.train.accum_steps
    pos = pos or Position()
    steps_per_epoch = len(train_loader) // accum
    budgeted = trainer.budget_s is not None
    epochs = None if budgeted else cfg.train.epochs
    policy = CheckpointPolicy(run_dir, cfg.train.ckpt_every, cfg.train.keep_last, trainer.total_steps, model_config)
    for note in trainer.length_notes():
        logger.info(note)
    for epoch in itertools.count(pos.epoch) if budgeted else range(pos.epoch, cfg.train.epochs):
        if trainer.done():  # train.max_steps or the time budget reached
            break
        train_loader.set_epoch(epoch, start_batch=pos.batch)
        logger.start_epoch(epoch, epochs, steps_per_epoch, initial=pos.batch // accum, left_s=trainer.left_s())
        stats = train_one_epoch(trainer, train_loader, epoch, pos, logger, policy)
        last = epoch + 1 == epochs or trainer.done()
        record = {"kind": "epoch", "epoch": epoch + 1, "step": pos.step, **stats, "p": trainer.progress(),
                  **({"train_s": trainer.train_s} if budgeted else {})}
        improved = False
        if last or (epoch + 1) % cfg.train.eval_every == 0:
            val = evaluate(trainer.model, val_loader, num_classes, rt, details=False)
            record.update(val_loss=val["loss"], val_top1=val["top1"], val_ece=val["ece"])
            candidates = [("raw", val["top1"])]
            if trainer.ema is not None:
                ema_val = evaluate(trainer.ema.module, val_loader, num_classes, rt, details=False)
                record.update(val_ema_loss=ema_val["loss"], val_ema_top1=ema_val["top1"])
                candidates.append(("ema", ema_val["top1"]))
            which, top1 = max(candidates, key=lambda c: c[1])
            if pos.best is None or top1 > pos.best["val_top1"]:
                pos.best = {"val_top1": top1, "weights": which, "epoch": epoch + 1, "step": pos.step}
                improved = True
        pos.history.append(record)
        logger.write(record)
        policy.save(trainer, pos, best=improved)
        barrier(rt)  # no rank reads best.pt (or moves on) before rank 0 has written it
        done_of = f" ({mmss(trainer.train_s)} of {mmss(trainer.budget_s)})" if budgeted else f"/{epochs}"
        line = (f"epoch {epoch + 1}{done_of}  loss {stats['train_loss']:.4f}  "
                f"train acc {stats['train_acc']:.4f}  {stats['images_per_s']:.0f} img/s  {stats['epoch_s']:.0f}s")
        if "val_top1" in record:
            line += f"  val top-1 {record['val_top1']:.4f}"
            if "val_ema_top1" in record:
                line += f" (EMA {record['val_ema_top1']:.4f})"
            line += "  *" if improved else ""
        logger.end_epoch(line)
    return pos


__all__ = ["fit", "train_one_epoch", "train_step", "resize_batch", "loss_fn", "Trainer", "Position",
           "CheckpointPolicy"]
