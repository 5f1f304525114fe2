"""The training loop as plain functions: `loss_fn`, `train_one_epoch`, `fit`.

Exact resume: everything random is either derived from (seed, epoch, batch) by the loader or
drawn from torch's global generator, whose state is checkpointed after every optimizer step that
is saved. Restoring model, optimizer, scheduler, EMA, scaler, RNG and the loader position makes
the rest of the run repeat the uninterrupted one operation for operation.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import TrainingError
from ..evaluate import evaluate
from .args import RunConfig
from .checkpoint import list_checkpoints, rng_state, save_checkpoint, set_rng_state
from .ema import ModelEMA
from .log import RunLogger
from .optim import WarmupCosine, build_optimizer
from ..data.loader import batch_seed
from .runtime import Runtime, all_reduce_sum, barrier


def _last_ckpt(run_dir: Path) -> str:
    done = list_checkpoints(run_dir)
    return str(done[-1][1]) if done else "none written yet"


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


class Trainer:
    """Holds the objects one run's functions share; the loop itself is `fit` below."""

    def __init__(self, model: torch.nn.Module, cfg: RunConfig, rt: Runtime, steps_per_epoch: int):
        self.model, self.cfg, self.rt = model, cfg, rt
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = WarmupCosine(self.optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs, cfg.train.max_steps)
        self.total_steps = self.scheduler.total
        self.ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.precision == "fp16")
        self.net = model
        if cfg.runtime.compile:
            self.net = torch.compile(self.net)
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.net = DDP(self.net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    def state(self, pos: Position, model_config: dict) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "step": pos.step, "epoch": pos.epoch, "batch": pos.batch, "best": pos.best, "history": pos.history,
            "rng": rng_state(), "run_config": self.cfg.to_dict(), "model_config": model_config,
            "precision": self.rt.precision, "world_size": self.rt.world_size,
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
        return Position(state["step"], state["epoch"], state["batch"], state.get("best"), list(state.get("history", [])))


def fit(trainer: Trainer, train_loader, val_loader, num_classes: int, run_dir: Path, logger: RunLogger,
        model_config: dict, pos: Position | None = None) -> Position:
    """Train to `train.epochs`, evaluating on validation and checkpointing; returns the final position."""
    cfg, rt = trainer.cfg, trainer.rt
    accum = cfg.train.accum_steps
    pos = pos or Position()
    steps_per_epoch = len(train_loader) // accum
    for epoch in range(pos.epoch, cfg.train.epochs):
        if pos.step >= trainer.total_steps:  # train.max_steps reached
            break
        train_loader.set_epoch(epoch, start_batch=pos.batch if epoch == pos.epoch else 0)
        logger.start_epoch(epoch, cfg.train.epochs, steps_per_epoch, initial=pos.batch // accum if epoch == pos.epoch else 0)
        stats = train_one_epoch(trainer, train_loader, epoch, pos, logger, run_dir, model_config)
        last = epoch + 1 == cfg.train.epochs or pos.step >= trainer.total_steps
        if pos.step >= trainer.total_steps and pos.batch:  # stopped inside the epoch
            pos.epoch = epoch
        else:
            pos.epoch, pos.batch = epoch + 1, 0
        record = {"kind": "epoch", "epoch": epoch + 1, "step": pos.step, **stats}
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
        if rt.is_main:
            save_checkpoint(trainer.state(pos, model_config), run_dir, cfg.train.keep_last, best=improved)
        barrier(rt)  # no rank reads best.pt (or moves on) before rank 0 has written it
        line = (f"epoch {epoch + 1}/{cfg.train.epochs}  loss {stats['train_loss']:.4f}  "
                f"train acc {stats['train_acc']:.4f}  {stats['images_per_s']:.0f} img/s  {stats['epoch_s']:.0f}s")
        if "val_top1" in record:
            line += f"  val top-1 {record['val_top1']:.4f}"
            if "val_ema_top1" in record:
                line += f" (EMA {record['val_ema_top1']:.4f})"
            line += "  *" if improved else ""
        logger.end_epoch(line)
    return pos


def train_one_epoch(trainer: Trainer, loader, epoch: int, pos: Position, logger: RunLogger, run_dir: Path,
                    model_config: dict) -> dict[str, float]:
    cfg, rt, net = trainer.cfg, trainer.rt, trainer.net
    accum = cfg.train.accum_steps
    net.train()
    totals = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    t0, images = time.perf_counter(), 0
    usable = (len(loader) // accum) * accum  # micro-batches that complete an optimizer step
    trainer.optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader, start=loader.start_batch):
        if i >= usable:
            break
        # Dropout and stochastic depth draw from a generator seeded by the batch's position: the
        # same masks after a resume, and different masks on each rank.
        torch.manual_seed(batch_seed(cfg.train.seed, epoch, i, rt.rank, 1))  # 1: not the augmentation stream
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        sync = (i + 1) % accum == 0
        no_sync = net.no_sync() if rt.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with rt.autocast():
                logits = net(x)
                loss = loss_fn(logits.float(), y, cfg.optim.label_smoothing)
            bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0, device=rt.device)
            if all_reduce_sum(bad, rt).item() > 0:
                raise TrainingError(
                    f"loss is {loss.item()} at step {pos.step + 1} (epoch {epoch + 1}, batch {i + 1}); stopped "
                    f"before updating the weights. Last good checkpoint: {_last_ckpt(run_dir)}. Try a lower "
                    f"optim.lr, optim.clip_grad, or runtime.precision=fp32")
            trainer.scaler.scale(loss / accum).backward()
        labels = y if y.ndim == 1 else y.argmax(-1)
        n = len(labels)
        totals += torch.tensor([loss.item() * n, (logits.argmax(-1) == labels).sum().item(), n], dtype=torch.float64)
        images += n * rt.world_size
        if not sync:
            continue
        trainer.scaler.unscale_(trainer.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.optim.clip_grad or float("inf"))
        if not trainer.scaler.is_enabled() and not torch.isfinite(norm):  # fp16's scaler skips such steps itself
            raise TrainingError(
                f"gradient norm is {norm.item()} at step {pos.step + 1} (epoch {epoch + 1}, batch {i + 1}); stopped "
                f"before updating the weights. Last good checkpoint: {_last_ckpt(run_dir)}. Try a lower optim.lr, "
                f"optim.clip_grad, or runtime.precision=fp32")
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update(trainer.model)
        pos.step += 1
        rate = images / max(time.perf_counter() - t0, 1e-9)
        logger.update(loss=f"{loss.item():.3f}", acc=f"{totals[1] / totals[2]:.3f}", img_s=f"{rate:.0f}")
        if pos.step % cfg.train.log_every == 0:
            logger.write({"kind": "step", "epoch": epoch + 1, "step": pos.step, "loss": loss.item(),
                          "acc": (totals[1] / totals[2]).item(), "lr": trainer.optimizer.param_groups[0]["lr"]
                          / trainer.optimizer.param_groups[0].get("lr_scale", 1.0), "images_per_s": rate})
        if pos.step >= trainer.total_steps:  # train.max_steps: the schedule ends here
            pos.epoch, pos.batch = epoch, i + 1
            break
        if cfg.train.ckpt_every and pos.step % cfg.train.ckpt_every == 0 and i + 1 < usable:
            pos.epoch, pos.batch = epoch, i + 1
            if rt.is_main:
                save_checkpoint(trainer.state(pos, model_config), run_dir, cfg.train.keep_last, best=False)
    totals = all_reduce_sum(totals.to(rt.device), rt).cpu()
    elapsed = time.perf_counter() - t0
    seen = max(totals[2].item(), 1)
    return {"train_loss": totals[0].item() / seen, "train_acc": totals[1].item() / seen,
            "images_per_s": images / max(elapsed, 1e-9), "epoch_s": elapsed,
            "lr": trainer.optimizer.param_groups[0]["lr"] / trainer.optimizer.param_groups[0].get("lr_scale", 1.0)}


__all__ = ["fit", "train_one_epoch", "loss_fn", "Trainer", "Position"]
