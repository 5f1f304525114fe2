"""Training checkpoints: complete, plain, atomic.

A checkpoint holds the unwrapped model, optimizer, scheduler and EMA state, the step / epoch /
batch position, the best validation result so far, RNG states and both configs, as tensors and
plain Python values only. It is written to a temporary file and renamed into place, so a kill at
any moment leaves the previous checkpoint intact, and read with `torch.load(weights_only=True)`,
so a checkpoint carrying a malicious pickle cannot run code.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError
from ..util import TMP_SUFFIX, atomic_write, why_unloadable

FORMAT = "vitlab.ckpt/1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")

# What a checkpoint must hold, and of what type, before anything is restored from it.
_DICTS = ("model", "optimizer", "scheduler", "scaler", "rng", "run_config", "model_config")
_COUNTS = ("step", "epoch", "batch")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _structure_problem(state: dict[str, Any]) -> str | None:
    """The first thing wrong with a loaded checkpoint's layout, or None."""
    missing = [k for k in (*_DICTS, *_COUNTS, "ema", "best", "history") if k not in state]
    if missing:
        return f"missing {missing}"
    for key in _DICTS:
        if not isinstance(state[key], dict):
            return f"{key} is a {type(state[key]).__name__}, not a mapping"
    for key in _COUNTS:
        value = state[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key}={value!r} is not a whole number >= 0"
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        return "model is not a mapping of names to tensors"
    if not isinstance(state["rng"].get("torch"), torch.Tensor) or state["rng"]["torch"].dtype != torch.uint8:
        return "rng has no torch generator state"
    ema = state["ema"]
    if ema is not None and not (isinstance(ema, dict) and isinstance(ema.get("module"), dict) and
                                all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                    for k, v in ema["module"].items())):
        return "ema is neither null nor an EMA state with a module of tensors"
    best = state["best"]
    if best is not None and not (isinstance(best, dict) and {"val_top1", "weights", "epoch"} <= set(best)
                                 and isinstance(best["val_top1"], (int, float)) and best["weights"] in ("raw", "ema")):
        return "best is neither null nor a record with a numeric val_top1, weights raw|ema, epoch"
    if not isinstance(state["history"], list):
        return "history is not a list"
    return None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's contents, loaded without unpickling code and checked for layout; any problem
    is a ModelFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ... all mean "not a safe checkpoint"
        raise ModelFileError(f"checkpoint {path} cannot be loaded safely ({why_unloadable(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a vitlab training checkpoint (format "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    problem = _structure_problem(state)
    if problem:
        raise ModelFileError(f"checkpoint {path} is malformed: {problem}")
    return state


def check_weights_fit(weights: dict[str, torch.Tensor], model: torch.nn.Module, path: Path, what: str = "model") -> None:
    """The checkpoint's weights have exactly the model's names and shapes (before load_state_dict,
    whose own errors are multi-line tracebacks)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    problems = [f"{k} is {got[k]}, expected {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        problems.append(f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if extra:
        problems.append(f"unexpected {extra[:3]}" + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    if problems:
        raise ModelFileError(f"checkpoint {path}: the {what} weights do not fit the run's model: "
                             + "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's periodic checkpoints, oldest first."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def newest_checkpoint(run_dir: Path) -> tuple[tuple[Path, dict[str, Any]] | None, list[str]]:
    """((path, state) of the newest checkpoint that loads, or None), and why each newer one did not."""
    damaged = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return (path, load_checkpoint(path)), damaged
        except ModelFileError as e:
            damaged.append(str(e))
    return None, damaged


def latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads (its state only), a damaged newer one skipped with a
    warning; None if there is none."""
    found, damaged = newest_checkpoint(run_dir)
    for problem in damaged:
        warnings.warn(f"skipping damaged checkpoint: {problem}", stacklevel=2)
    return found[1] if found else None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the hidden `.NAME.XXXX.tmp` files a kill in the middle of a checkpoint write leaves
    (atomic_write's temporaries; never a finished checkpoint). Call only while holding the run's lock."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    stale = [p for p in ckpt_dir.iterdir() if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict[str, Any], run_dir: Path, keep_last: int, best: bool) -> Path:
    """Write best.pt (when `best`), then ckpt-<step>.pt, then prune older checkpoints to `keep_last`.

    best.pt comes first: a kill between the two writes leaves the previous ckpt as the newest, so a
    resume repeats this epoch (bit for bit), improves again and rewrites best.pt. The other order
    could leave a resumable ckpt whose best.pt was never written. Pruning removes only checkpoints
    older than this one: a newer, damaged one that a resume skipped is overwritten when the run
    reaches its step, and never pushes the good one just written out of the kept set.
    """
    state = {"format": FORMAT, **state}
    step = state["step"]
    path = run_dir / "checkpoints" / f"ckpt-{step:08d}.pt"
    if best:
        atomic_write(run_dir / "checkpoints" / "best.pt", lambda tmp: torch.save(state, tmp))
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    older = [p for s, p in list_checkpoints(run_dir) if s < step]
    for old in older[:max(0, len(older) - (max(1, keep_last) - 1))]:
        old.unlink(missing_ok=True)
    return path
