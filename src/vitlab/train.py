"""`vitlab train`: settings -> data -> model -> fit -> model directory, with exact resume.

A run directory holds `config.yaml` (the resolved settings), `env.json` (versions and hardware),
`metrics.jsonl`, `checkpoints/` (last K + best on validation), `tensorboard/`, PNG curves, and at
the end `model/` (the weights selected on validation) and `results.json` (validation and, once,
test metrics of that model).

Order matters for "nothing lost, nothing silent": every setting is checked (`resolve`), then the
data is loaded and the model built, and only then is anything written; one process at a time
writes a run directory (engine/rundir.py).
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from . import __version__
from .config import ViTConfig, get_config
from .data import ImageSet, load_dataset
from .data.augment import EvalTransform, TrainTransform
from .data.loader import BatchLoader
from .data.sources import DATASETS, fetch, get_source, locate
from .engine.args import RunConfig, merge_sets, read_settings_file
from .engine.checkpoint import (check_weights_fit, load_checkpoint, newest_checkpoint,
                                remove_stale_temporaries)
from .engine.log import RunLogger, plot_curves
from .engine.loop import Position, Trainer, fit
from .engine.rundir import RunLock, check_fresh_out, is_dead_start, reset_dead_start, saved_results
from .engine.runtime import (Runtime, barrier, describe_machine, dist_env, on_main, resolve_device,
                             resolve_precision, setup_runtime)
from .errors import ConfigError, DataError, DatasetNotFoundError, ModelFileError, RunDirError, VitlabError
from .evaluate import evaluate, save_confusion_png
from .model import VisionTransformer
from .util import atomic_write_text
from .weights.modeldir import check_shapes, load_state_into, save_model
from .weights.pretrained import forget as forget_pretrained, read_pretrained

# Settings a resumed run may change: how it runs and what it keeps, never what it computes. (A
# precision that resolves differently is refused when the checkpoint is restored; a moved dataset
# is md5-checked wherever it is found.)
RESUMABLE_SECTIONS = ("runtime",)
RESUMABLE_KEYS = ("data.data_dir", "data.download", "data.storage", "data.cache_dir", "data.workers", "train.log_every", "train.keep_last", "train.test_at_end",
                  "train.eval_batch_size")


def resumable(key: str) -> bool:
    """May `section.name` differ between a checkpoint and the run resuming it?"""
    key = key.strip()
    return key.split(".", 1)[0] in RESUMABLE_SECTIONS or key in RESUMABLE_KEYS


# ---- settings -------------------------------------------------------------------------------
def base_model_config(settings: RunConfig) -> ViTConfig:
    """The architecture before the data is known: the preset (or pretrained model) + overrides."""
    if settings.model.pretrained:
        _, source, _ = read_pretrained(settings.model.pretrained, settings.model.num_heads)
        overrides = settings.model.overrides()
        stem = overrides.get("conv_stem", source.conv_stem)
        if stem != source.conv_stem:  # e.g. a recipe with a stem, over a model without one
            raise ConfigError(f"model.conv_stem={list(stem)} differs from the pretrained model's conv_stem="
                              f"{list(source.conv_stem)} ({settings.model.pretrained}): its weights have no such "
                              f"layers; --set model.conv_stem={list(source.conv_stem)} keeps the pretrained one")
        cfg = source.replace(**overrides)
        if cfg.stem_strides != source.stem_strides:  # same shapes, but the convs would see another scale
            # Strides follow from patch_size and stem_full_res: name whichever of them the settings changed.
            changed = [k for k in ("stem_full_res", "patch_size") if getattr(cfg, k) != getattr(source, k)]
            raise ConfigError(" and ".join(f"model.{k}={getattr(cfg, k)}" for k in changed)
                              + f" would give the conv stem strides {list(cfg.stem_strides)}, not the pretrained "
                              f"model's {list(source.stem_strides)} ({settings.model.pretrained}): its stem learned "
                              f"at those strides; " + " ".join(f"--set model.{k}={getattr(source, k)}" for k in changed)
                              + " keeps them")
        return cfg
    return get_config(settings.model.preset, **settings.model.overrides())


def micro_batch(settings: RunConfig, world_size: int) -> int:
    per = settings.train.batch_size // (settings.train.accum_steps * world_size)
    if per * settings.train.accum_steps * world_size != settings.train.batch_size or per < 1:
        raise ConfigError(f"train.batch_size={settings.train.batch_size} must be divisible by train.accum_steps="
                          f"{settings.train.accum_steps} x world size {world_size}")
    return per


def resolve(settings: RunConfig) -> ViTConfig:
    """Check everything that can be checked before data is loaded or a file is written: the
    device and precision on this machine, the model (preset or pretrained + overrides), the
    augmentation against the image size, the batch split over ranks, and that the data can be
    reached. Returns the base model config; raises a VitlabError naming the setting."""
    _, world, local = dist_env()
    resolve_precision(settings.runtime.precision, resolve_device(settings.runtime.device, local))
    model_cfg = base_model_config(settings)  # ViTConfig bounds sizes (vitlab.config.LIMITS)
    if settings.augment.crop_pad > model_cfg.img_size:
        raise ConfigError(f"augment.crop_pad={settings.augment.crop_pad} must be at most the image side "
                          f"(model img_size={model_cfg.img_size})")
    check_resolution_schedule(settings, model_cfg)
    micro_batch(settings, world)
    name, data_dir = settings.data.name, settings.data.data_dir
    if name in DATASETS:
        if not settings.data.download:
            locate(get_source(name), data_dir)  # names the folders searched and the fetch command
    elif not Path(name).expanduser().exists():
        raise DatasetNotFoundError(f"unknown dataset {name!r}: not one of {sorted(DATASETS)} and no such folder "
                                   f"(data.name)")
    return model_cfg


def check_resolution_schedule(settings: RunConfig, model_cfg: ViTConfig) -> None:
    """train.resolution_schedule against the model: every side a multiple of the patch size, the
    last one the model's own (the run ends at the size it is evaluated and exported at). A schedule
    that does not fit is refused with the same schedule rescaled to this model as the way out."""
    if not settings.train.resolution_schedule:
        return
    stages = settings.train.resolution_stages
    sizes = [size for size, _ in stages]
    key = f"train.resolution_schedule={settings.train.resolution_schedule!r}"
    odd = [size for size in sizes if size % model_cfg.patch_size]
    big = [size for size in sizes if size > model_cfg.img_size]
    if odd:
        problem = (f"sizes {odd} are not multiples of the model's patch_size={model_cfg.patch_size} "
                   f"(model.patch_size)")
    elif big:
        problem = (f"sizes {big} exceed the model's img_size={model_cfg.img_size} (model.img_size); "
                   f"progressive resizing trains smaller first, then at full size")
    elif sizes[-1] != model_cfg.img_size:
        problem = f"the last stage must be the model's full size, img_size={model_cfg.img_size} (model.img_size), not {sizes[-1]}"
    else:
        return
    fitted = rescaled_schedule(stages, model_cfg.img_size, model_cfg.patch_size)
    way_out = f"e.g. --set train.resolution_schedule={fitted} (the same stages rescaled), or " if fitted else ""
    raise ConfigError(f"{key}: {problem}; {way_out}--set train.resolution_schedule=null for full size throughout")


def rescaled_schedule(stages: tuple[tuple[int, float], ...], img_size: int, patch_size: int) -> str | None:
    """The schedule's sides scaled so that its last stage is img_size, each rounded to a multiple of
    patch_size (halves up), as "SIZE:FRACTION,..."; None when rounding leaves a side of 0 or sides
    out of order."""
    scale = img_size / stages[-1][0]
    sides = [math.floor(size * scale / patch_size + 0.5) * patch_size for size, _ in stages[:-1]] + [img_size]
    if min(sides) < patch_size or sides != sorted(sides):
        return None
    return ",".join(f"{side}:{frac!r}" for side, (_, frac) in zip(sides, stages))  # repr: the fractions exactly


def resume_settings(run_dir: Path, sets: list[str] | None = None) -> RunConfig:
    """A run's saved settings (RUN/config.yaml) with `--set` overrides, which may change only how
    the run executes: runtime.* and RESUMABLE_KEYS."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"cannot resume {run_dir}: no config.yaml there (is it a vitlab run directory?)")
    bad = [s for s in sets or [] if not resumable(s.partition("=")[0])]
    if bad:
        raise ConfigError(f"a resumed run keeps its settings; cannot --set {bad} (only runtime.* and "
                          f"{', '.join(RESUMABLE_KEYS)}); to change them start a new run: --recipe {path} "
                          f"--out NEW_DIR")
    return merge_sets(read_settings_file(path), sets, str(path))


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, values in d.items() if isinstance(values, dict) for k, v in values.items()}


def check_same_settings(settings: RunConfig, state: dict[str, Any], ckpt: Path, run_dir: Path) -> None:
    """A checkpoint continues only the run that wrote it: every setting outside runtime.* must
    equal the one it was written with."""
    try:
        saved = RunConfig.from_dict(state["run_config"], f"{ckpt} run_config").to_dict()
    except ConfigError as e:
        raise ModelFileError(f"checkpoint {ckpt} holds settings this version cannot read ({e})") from None
    old, new = _flat(saved), _flat(settings.to_dict())
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if not resumable(k) and old.get(k) != new.get(k)]
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise RunDirError(f"cannot resume {run_dir}: {run_dir / 'config.yaml'} differs from the settings "
                          f"{ckpt.name} was written with ({shown}); undo the edit, or start a new run with "
                          f"--recipe {run_dir / 'config.yaml'} --out NEW_DIR")


# ---- data and model -------------------------------------------------------------------------
def load_split(settings: RunConfig, split: str, model_cfg: ViTConfig, rt: Runtime | None = None) -> ImageSet:
    """A split of the run's dataset; named datasets are fetched when missing and allowed. Image
    folders are decoded straight at the model's size and channels."""
    data = settings.data
    kw: dict[str, Any] = dict(data_dir=data.data_dir, val_size=data.val_size, val_fold=data.val_fold, image_size=model_cfg.img_size,
                              channels=model_cfg.in_chans, storage=data.storage, cache_dir=data.cache_dir,
                              workers=data.workers)
    if rt is not None and rt.distributed and data.storage == "cache" and data.name not in DATASETS:
        # rank 0 builds the decoded cache (once, not once per rank); the others then open it
        first = on_main(rt, lambda: load_dataset(data.name, split, **kw))
        barrier(rt)
        return first if rt.is_main else load_dataset(data.name, split, **kw)
    try:
        return load_dataset(data.name, split, **kw)
    except DatasetNotFoundError:
        if not (data.download and data.name in DATASETS):
            raise
        if rt is None or rt.is_main:  # one rank downloads; the others wait for it
            fetch(data.name, data.data_dir)
        if rt is not None:
            barrier(rt)
        return load_dataset(data.name, split, **kw)


def build_model(settings: RunConfig, train_set: ImageSet) -> VisionTransformer:
    """From scratch (the dataset's classes and statistics become the preprocessing record) or
    from pretrained weights: a vitlab model directory, or a timm / torchvision / Hugging Face
    checkpoint converted on the fly (weights.pretrained). Their statistics are kept; a new,
    zero-initialised head when the classes differ; learned positions resampled to a new size."""
    classes = tuple(train_set.classes)
    attn_impl = settings.runtime.attn_impl
    if settings.model.pretrained:
        cfg = base_model_config(settings)
        _, _, state = read_pretrained(settings.model.pretrained, settings.model.num_heads)
        check_shapes(cfg, {k: tuple(v.shape) for k, v in state.items()}, str(settings.model.pretrained),
                     resample_pos=True)  # before the model is allocated
        model = VisionTransformer(cfg, attn_impl=attn_impl)
        new_head = cfg.num_classes != len(classes) or cfg.class_names != classes
        if new_head:  # the checkpoint's head is dropped, so its values (NaN after a diverged run) do not matter
            state = {**state, **{k: v for k, v in model.state_dict().items() if k.startswith("head.")}}
        load_state_into(model, state, str(settings.model.pretrained))
        forget_pretrained()
        if new_head:
            model.reset_classifier(len(classes), class_names=classes)
        return model
    model_cfg = base_model_config(settings)
    C = model_cfg.in_chans
    mean = train_set.mean if len(train_set.mean) == C else (sum(train_set.mean) / len(train_set.mean),) * C
    std = train_set.std if len(train_set.std) == C else (sum(train_set.std) / len(train_set.std),) * C
    model_cfg = model_cfg.replace(num_classes=len(classes), class_names=classes, mean=mean, std=std)
    return VisionTransformer(model_cfg, attn_impl=attn_impl, weight_init=settings.model.weight_init)


# ---- the run directory ----------------------------------------------------------------------
def find_resume_point(run_dir: Path, settings: RunConfig) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from, checked against the run's settings; None for a run that
    stopped before its first checkpoint (it starts again from step 0)."""
    found, damaged = newest_checkpoint(run_dir)
    if found is None:
        if damaged:
            raise RunDirError(f"cannot resume {run_dir}: no usable checkpoint ({damaged[0]}"
                              + (f"; {len(damaged) - 1} more damaged" if len(damaged) > 1 else "")
                              + "); move the damaged files away to start over")
        if not is_dead_start(run_dir):
            raise RunDirError(f"cannot resume {run_dir}: no usable checkpoint in {run_dir / 'checkpoints'} "
                              f"and it holds {', '.join(saved_results(run_dir)) or 'files a run does not write'}")
        return None
    for problem in damaged:
        warnings.warn(f"skipping damaged checkpoint: {problem}", stacklevel=2)
    ckpt, state = found
    check_same_settings(settings, state, ckpt, run_dir)
    return found


def write_run_files(out: Path, settings: RunConfig, rt: Runtime) -> None:
    atomic_write_text(out / "config.yaml", yaml.safe_dump(settings.to_dict(), sort_keys=False))
    env = {**describe_machine(), "vitlab": __version__, "argv": sys.argv, "precision": rt.precision,
           "device": str(rt.device), "world_size": rt.world_size, "autotune": rt.choice}
    if rt.device.type == "cuda":
        env["cudnn_attention"] = torch.backends.cuda.cudnn_sdp_enabled()
    atomic_write_text(out / "env.json", json.dumps(env, indent=2) + "\n")


def claim_run_dir(out: Path, resume: bool, rank: int) -> RunLock | None:
    """Rank 0 takes the run directory's lock (creating the directory for a fresh run); returns it."""
    if rank != 0:
        return None
    if resume and not (out / "config.yaml").is_file():
        raise RunDirError(f"cannot resume {out}: no config.yaml there (is it a vitlab run directory?)")
    try:
        if not resume:
            out.mkdir(parents=True, exist_ok=True)
        return RunLock(out)
    except OSError as e:
        if isinstance(e, RunDirError):
            raise
        raise RunDirError(f"cannot create the run directory {out}: {e.strerror or e}; choose another --out") from None


def start_writing(out: Path, settings: RunConfig, rt: Runtime, resume: bool, resuming_from_checkpoint: bool,
                  lock: RunLock | None) -> RunLock | None:
    """Everything is checked: from here on the run directory is written (by rank 0, holding the
    lock). Returns the lock, which a fresh run takes only now."""
    def fresh() -> RunLock | None:
        new_lock = claim_run_dir(out, False, 0)
        try:
            if check_fresh_out(out):  # again, now under the lock
                reset_dead_start(out)
                print(f"taking over {out}: it holds a run that stopped before its first checkpoint "
                      f"(no checkpoint, no model); starting it afresh with the new settings", flush=True)
            write_run_files(out, settings, rt)
        except BaseException:  # the caller never sees this lock: let it go here
            if new_lock is not None:
                new_lock.release()
            raise
        return new_lock

    def resumed() -> None:
        stale = remove_stale_temporaries(out)
        if not resuming_from_checkpoint:
            reset_dead_start(out)
            write_run_files(out, settings, rt)  # this start's machine and autotune choice
            print(f"resuming {out}: it stopped before its first checkpoint; starting again from step 0 "
                  f"with its config.yaml", flush=True)
        elif stale:
            print(f"removed {len(stale)} unfinished checkpoint write(s) in {out / 'checkpoints'}", flush=True)

    if not resume:
        barrier(rt)  # every rank has checked before rank 0 creates anything
        lock = on_main(rt, fresh)  # an error on rank 0 stops every rank, none is left in a barrier
    else:
        on_main(rt, resumed)
    barrier(rt)
    return lock


# ---- the run --------------------------------------------------------------------------------
def run_training(settings: RunConfig, out: Path, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the results record. Only rank 0 writes, and only once
    the settings, the data, the model and the checkpoint to resume from have all been checked."""
    out = Path(out)
    base = resolve(settings)
    lock = None
    dist_ok = torch.distributed.is_available()
    group_was_ours = dist_ok and not torch.distributed.is_initialized()  # a caller's group is left alone
    trainer = None
    try:
        if not resume:
            check_fresh_out(out)  # reads only: a refusal leaves nothing behind, before any process group
        rt = setup_runtime(settings.runtime.device, settings.runtime.precision, settings.runtime.threads,
                           settings.runtime.cudnn_attention)
        if resume:
            lock = on_main(rt, lambda: claim_run_dir(out, True, 0))  # every rank stops if rank 0 cannot
            found = find_resume_point(out, settings)
        else:
            found = None
        torch.manual_seed(settings.train.seed)
        started = time.time()
        train_set = load_split(settings, "train", base, rt)
        model = build_model(settings, train_set)
        val_set = load_split(settings, "val", base, rt)
        model.to(rt.device)
        num_classes = model.config.num_classes
        micro = micro_batch(settings, rt.world_size)
        train_tf = TrainTransform(settings.augment, model.config)
        train_loader = BatchLoader(train_set, micro, True, train_tf, seed=settings.train.seed, rank=rt.rank,
                                   world_size=rt.world_size)
        eval_tf = EvalTransform(model.config)
        val_loader = BatchLoader(val_set, settings.train.eval_batch_size, False, eval_tf, rank=rt.rank,
                                 world_size=rt.world_size)
        if len(train_loader) < settings.train.accum_steps:
            raise ConfigError(f"an epoch has {len(train_loader)} micro-batches, fewer than train.accum_steps="
                              f"{settings.train.accum_steps}")
        from .engine.autotune import busy_note, tune_run  # auto kernel/precision timed here; a resumed run keeps its own
        rt = tune_run(model, settings.runtime, rt, micro, out, found[1] if found else None)
        trainer = Trainer(model, settings, rt, len(train_loader) // settings.train.accum_steps)
        trainer.train_images = len(train_set)
        saved_n = found[1].get("train_images") if found else None
        if saved_n is not None and saved_n != len(train_set):
            raise RunDirError(f"cannot resume {out}: its checkpoint was trained on {saved_n} images but "
                              f"{settings.data.name} now gives {len(train_set)} (files added, removed or no longer "
                              f"readable), so its batches would differ; restore the folder, or start a new run")
        pos = restore(trainer, found) if found else Position()
        lock = start_writing(out, settings, rt, resume, found is not None, lock)  # ends in a barrier
        logger = RunLogger(out, rt.is_main, settings.runtime.progress, resume_step=pos.step if resume else None)
        n_params = sum(p.numel() for p in model.parameters())
        length = length_of(settings, len(train_loader) // settings.train.accum_steps)
        logger.info(f"{'resuming' if found else 'training'} {model.config.name or settings.model.preset} "
                    f"({n_params / 1e6:.2f}M params) on {train_set.name}: {len(train_set)} train / {len(val_set)} "
                    f"val images, {length}, batch {settings.train.batch_size}, {rt.device} {rt.precision}"
                    + (f", {rt.world_size} ranks" if rt.distributed else "")
                    + (f", from step {pos.step}" if found else ""))
        if note := busy_note(rt.choice):
            logger.info(note)
        try:
            pos = fit(trainer, train_loader, val_loader, num_classes, out, logger, model.config.to_dict(), pos)
        finally:
            logger.close()
        return finish(out, settings, rt, pos, time.time() - started, n_params, trainer.train_s, len(train_set))
    finally:
        if lock is not None:
            lock.release()
        if group_was_ours and torch.distributed.is_initialized():
            # gloo's threads outliving the process group abort the interpreter at exit
            # ("terminate called without an active exception") and turn exit 2 into a crash. The
            # DDP wrapper must go first: an exception's traceback keeps this frame (and it) alive.
            trainer = None  # noqa: F841
            import gc
            gc.collect()
            torch.distributed.destroy_process_group()


def restore(trainer: Trainer, found: tuple[Path, dict[str, Any]]) -> Position:
    """Restore a checkpoint into the trainer; a checkpoint that does not fit is one error naming it."""
    ckpt, state = found
    check_weights_fit(state["model"], trainer.model, ckpt)
    if trainer.ema is not None and state["ema"] is not None:
        check_weights_fit(state["ema"]["module"], trainer.ema.module, ckpt, "EMA")
    try:
        return trainer.restore(state)
    except VitlabError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:  # optimizer/scheduler internals
        raise ModelFileError(f"checkpoint {ckpt} does not fit this run ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None


train = run_training  # the name used before 0.2; prefer run_training


def length_of(settings: RunConfig, steps_per_epoch: int) -> str:
    t = settings.train
    if t.time_budget is not None:
        return f"{steps_per_epoch}-step epochs for {t.time_budget:g} min of training"
    return f"{t.epochs} epochs x {steps_per_epoch} steps"


def finish(out: Path, settings: RunConfig, rt: Runtime, pos: Position, wall_s: float, n_params: int,
           train_s: float = 0.0, train_images: int = 0) -> dict[str, Any]:
    """Export the validation-selected weights to out/model, evaluate them once on the test split.
    `train_s`: seconds spent in training steps (all sessions); `train_images`: the train split's size."""
    best_path = out / "checkpoints" / "best.pt"
    best = load_checkpoint(best_path)
    if best["best"] is None:
        raise ModelFileError(f"checkpoint {best_path} records no best validation result")
    try:
        model_cfg = ViTConfig.from_dict(best["model_config"])
    except (ConfigError, TypeError) as e:
        raise ModelFileError(f"checkpoint {best_path} holds an invalid model config ({e})") from None
    from .engine.autotune import apply_choice
    model = apply_choice(VisionTransformer(model_cfg), rt.choice, settings.runtime.attn_impl)  # as it trained
    use_ema = best["best"]["weights"] == "ema" and best["ema"] is not None
    weights = best["ema"]["module"] if use_ema else best["model"]
    check_weights_fit(weights, model, best_path)
    model.load_state_dict(weights)
    model.to(rt.device)
    eval_tf = EvalTransform(model_cfg)
    images_seen = pos.step * settings.train.batch_size
    results: dict[str, Any] = {"best": best["best"], "steps": pos.step,
                               "epochs": settings.train.epochs if settings.train.time_budget is None else None,
                               "time_budget_min": settings.train.time_budget, "train_s": round(train_s, 1),
                               "images_seen": images_seen,
                               "epochs_equivalent": round(images_seen / train_images, 3) if train_images else None,
                               "wall_s_this_session": round(wall_s, 1), "params": n_params}
    test_set = None
    if not settings.train.test_at_end:
        results["test_skipped"] = "train.test_at_end is false"
    else:
        try:
            test_set = load_split(settings, "test", model_cfg, rt)
        except DataError as e:  # an image folder with train/ and val/ but no test/, say
            results["test_skipped"] = str(e)
    if test_set is not None:
        loader = BatchLoader(test_set, settings.train.eval_batch_size, False, eval_tf, rank=rt.rank, world_size=rt.world_size)
        test = evaluate(model, loader, model_cfg.num_classes, rt)
        results["test"] = {k: v for k, v in test.items() if k not in ("confusion", "per_class")}
        results["test_per_class"] = test["per_class"]
    def write_outputs() -> None:
        save_model(model, out / "model", extra={
            "dataset": {"name": settings.data.name, "data_dir": settings.data.data_dir,
                        "val_size": settings.data.val_size, "val_fold": settings.data.val_fold},
            "val_top1": best["best"]["val_top1"], "test_top1": results.get("test", {}).get("top1"),
            "selected": best["best"], "vitlab": __version__})
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
        plot_curves(out)
        if test_set is not None:
            save_confusion_png(test["confusion"], model_cfg.class_names or [], out / "confusion_test.png")
        line = f"done: val top-1 {best['best']['val_top1']:.4f} ({best['best']['weights']} weights, epoch {best['best']['epoch']})"
        if "test" in results:
            line += f", test top-1 {results['test']['top1']:.4f}"
        print(line + f"; model saved to {out / 'model'}", flush=True)

    on_main(rt, write_outputs)  # a full disk on rank 0 stops every rank, none waits in a barrier
    barrier(rt)
    return results


def default_out(recipe: str | None) -> Path:
    name = Path(recipe).stem if recipe else "run"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = ["run_training", "resolve", "resume_settings", "load_split", "build_model", "default_out"]
