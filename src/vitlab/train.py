"""`vitlab train`: recipe -> data -> model -> fit -> model directory, with exact resume.

A run directory holds `config.yaml` (the resolved settings), `env.json` (versions and hardware),
`metrics.jsonl`, `checkpoints/` (last K + best on validation), `tensorboard/`, PNG curves, and at
the end `model/` (the weights selected on validation) and `results.json` (validation and, once,
test metrics of that model).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import __version__
from .config import ViTConfig, get_config
from .data import ImageSet, load_dataset
from .data.augment import EvalTransform, TrainTransform
from .data.loader import BatchLoader
from .data.sources import DATASETS, fetch
from .engine.args import RunConfig
from .engine.checkpoint import latest_checkpoint, load_checkpoint
from .engine.log import RunLogger, plot_curves
from .engine.loop import Position, Trainer, fit
from .engine.runtime import Runtime, barrier, describe_machine, setup_runtime
from .errors import ConfigError, DataError, DatasetNotFoundError, RunDirError
from .evaluate import evaluate, save_confusion_png
from .model import VisionTransformer
from .weights.modeldir import load_model, read_config, save_model


def load_split(cfg: RunConfig, split: str, model_cfg: ViTConfig, rt: Runtime | None = None) -> ImageSet:
    """A split of the run's dataset; named datasets are fetched when missing and allowed. Image
    folders are decoded straight at the model's size and channels."""
    kw: dict[str, Any] = dict(data_dir=cfg.data.data_dir, val_size=cfg.data.val_size,
                              image_size=model_cfg.img_size, channels=model_cfg.in_chans)
    try:
        return load_dataset(cfg.data.name, split, **kw)
    except DatasetNotFoundError:
        if not (cfg.data.download and cfg.data.name in DATASETS):
            raise
        if rt is None or rt.is_main:  # one rank downloads; the others wait for it
            fetch(cfg.data.name, cfg.data.data_dir)
        if rt is not None:
            barrier(rt)
        return load_dataset(cfg.data.name, split, **kw)


def base_model_config(cfg: RunConfig) -> ViTConfig:
    """The architecture before the data is known: the preset (or pretrained model) + overrides."""
    if cfg.model.pretrained:
        return read_config(cfg.model.pretrained)[0].replace(**cfg.model.overrides())
    return get_config(cfg.model.preset, **cfg.model.overrides())


def build_model(cfg: RunConfig, train: ImageSet) -> VisionTransformer:
    """From scratch (the dataset's classes and statistics become the preprocessing record) or
    from a pretrained model directory (its statistics kept; a new head when classes differ)."""
    overrides = cfg.model.overrides()
    classes = tuple(train.classes)
    if cfg.model.pretrained:
        model = load_model(cfg.model.pretrained, attn_impl=cfg.runtime.attn_impl, **overrides)
        if model.config.num_classes != len(classes) or model.config.class_names != classes:
            model.reset_classifier(len(classes), class_names=classes)
        return model
    model_cfg = base_model_config(cfg)
    C = model_cfg.in_chans
    mean = train.mean if len(train.mean) == C else (sum(train.mean) / len(train.mean),) * C
    std = train.std if len(train.std) == C else (sum(train.std) / len(train.std),) * C
    model_cfg = model_cfg.replace(num_classes=len(classes), class_names=classes, mean=mean, std=std)
    return VisionTransformer(model_cfg, attn_impl=cfg.runtime.attn_impl)


def _micro_batch(cfg: RunConfig, rt: Runtime) -> int:
    per = cfg.train.batch_size // (cfg.train.accum_steps * rt.world_size)
    if per * cfg.train.accum_steps * rt.world_size != cfg.train.batch_size or per < 1:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by train.accum_steps="
                          f"{cfg.train.accum_steps} x world size {rt.world_size}")
    return per


def prepare_run_dir(out: Path, cfg: RunConfig, resume: bool, rt: Runtime) -> dict | None:
    """Check the run directory; return the checkpoint to resume from (None for a fresh run)."""
    if resume:
        if not (out / "config.yaml").is_file():
            raise RunDirError(f"cannot resume {out}: no config.yaml there (is it a vitlab run directory?)")
        state = latest_checkpoint(out)
        if state is None:
            raise RunDirError(f"cannot resume {out}: no usable checkpoint in {out / 'checkpoints'}")
        return state
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a run directory")
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} already holds a run; resume it with `vitlab train --resume {out}` "
                          f"or choose another --out")
    barrier(rt)  # every rank has checked before rank 0 creates anything
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        env = {**describe_machine(), "vitlab": __version__, "argv": sys.argv, "precision": rt.precision,
               "device": str(rt.device), "world_size": rt.world_size}
        (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    return None


def run_config_of(run_dir: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir / "config.yaml"))
    except FileNotFoundError:
        raise RunDirError(f"{run_dir / 'config.yaml'} is missing") from None


def train(cfg: RunConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the results record. Only rank 0 writes."""
    rt = setup_runtime(cfg.runtime.device, cfg.runtime.precision, cfg.runtime.threads)
    state = prepare_run_dir(out, cfg, resume, rt)
    torch.manual_seed(cfg.train.seed)
    started = time.time()
    base = base_model_config(cfg)
    train_set = load_split(cfg, "train", base, rt)
    model = build_model(cfg, train_set)
    val_set = load_split(cfg, "val", base, rt)
    model.to(rt.device)
    num_classes = model.config.num_classes
    micro = _micro_batch(cfg, rt)
    train_tf = TrainTransform(cfg.augment, model.config.mean, model.config.std, num_classes, model.config)
    train_loader = BatchLoader(train_set, micro, True, train_tf, seed=cfg.train.seed, rank=rt.rank,
                               world_size=rt.world_size)
    eval_tf = EvalTransform(model.config)
    val_loader = BatchLoader(val_set, cfg.train.eval_batch_size, False, eval_tf, rank=rt.rank, world_size=rt.world_size)
    if len(train_loader) < cfg.train.accum_steps:
        raise ConfigError(f"an epoch has {len(train_loader)} micro-batches, fewer than train.accum_steps="
                          f"{cfg.train.accum_steps}")
    trainer = Trainer(model, cfg, rt, len(train_loader) // cfg.train.accum_steps)
    pos = trainer.restore(state) if state else Position()
    logger = RunLogger(out, rt.is_main, cfg.runtime.progress, resume_step=pos.step if state else None)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{'resuming' if state else 'training'} {model.config.name or cfg.model.preset} ({n_params / 1e6:.2f}M "
                f"params) on {train_set.name}: {len(train_set)} train / {len(val_set)} val images, "
                f"{cfg.train.epochs} epochs x {len(train_loader) // cfg.train.accum_steps} steps, batch "
                f"{cfg.train.batch_size}, {rt.device} {rt.precision}"
                + (f", {rt.world_size} ranks" if rt.distributed else "")
                + (f", from step {pos.step}" if state else ""))
    try:
        pos = fit(trainer, train_loader, val_loader, num_classes, out, logger, model.config.to_dict(), pos)
    finally:
        logger.close()
    return finish(out, cfg, rt, pos, time.time() - started, n_params)


def finish(out: Path, cfg: RunConfig, rt: Runtime, pos: Position, wall_s: float, n_params: int) -> dict[str, Any]:
    """Export the validation-selected weights to out/model, evaluate them once on the test split."""
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    model_cfg = ViTConfig.from_dict(best["model_config"])
    model = VisionTransformer(model_cfg, attn_impl=cfg.runtime.attn_impl)
    weights = best["ema"]["module"] if best["best"]["weights"] == "ema" else best["model"]
    model.load_state_dict(weights)
    model.to(rt.device)
    eval_tf = EvalTransform(model_cfg)
    results: dict[str, Any] = {"best": best["best"], "steps": pos.step, "epochs": cfg.train.epochs,
                               "wall_s_this_session": round(wall_s, 1), "params": n_params}
    test_set = None
    if not cfg.train.test_at_end:
        results["test_skipped"] = "train.test_at_end is false"
    else:
        try:
            test_set = load_split(cfg, "test", model_cfg, rt)
        except DataError as e:  # an image folder with train/ and val/ but no test/, say
            results["test_skipped"] = str(e)
    if test_set is not None:
        loader = BatchLoader(test_set, cfg.train.eval_batch_size, False, eval_tf, rank=rt.rank, world_size=rt.world_size)
        test = evaluate(model, loader, model_cfg.num_classes, rt)
        results["test"] = {k: v for k, v in test.items() if k not in ("confusion", "per_class")}
        results["test_per_class"] = test["per_class"]
    if rt.is_main:
        save_model(model, out / "model", extra={
            "dataset": {"name": cfg.data.name, "data_dir": cfg.data.data_dir, "val_size": cfg.data.val_size},
            "val_top1": best["best"]["val_top1"], "test_top1": results.get("test", {}).get("top1"),
            "selected": best["best"], "vitlab": __version__})
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_curves(out)
        if test_set is not None:
            save_confusion_png(test["confusion"], model_cfg.class_names or [], out / "confusion_test.png")
        line = f"done: val top-1 {best['best']['val_top1']:.4f} ({best['best']['weights']} weights, epoch {best['best']['epoch']})"
        if "test" in results:
            line += f", test top-1 {results['test']['top1']:.4f}"
        print(line + f"; model saved to {out / 'model'}", flush=True)
    if rt.distributed:
        import torch.distributed as dist
        dist.barrier()
    return results


def default_out(recipe: str | None) -> Path:
    name = Path(recipe).stem if recipe else "run"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = ["train", "run_config_of", "load_split", "build_model", "default_out"]
