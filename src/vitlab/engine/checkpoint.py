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
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError

FORMAT = "vitlab.ckpt/1"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ... all mean "not a safe checkpoint"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelFileError(f"checkpoint {path} cannot be loaded safely ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a vitlab training checkpoint (format "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    return state


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's periodic checkpoints, oldest first."""
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads; a damaged newest one is skipped with a warning."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except ModelFileError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
    return None


def save_checkpoint(state: dict[str, Any], run_dir: Path, keep_last: int, best: bool) -> Path:
    """Write ckpt-<step>.pt (and best.pt when `best`), then prune to the newest `keep_last`."""
    state = {"format": FORMAT, **state}
    path = run_dir / "checkpoints" / f"ckpt-{state['step']:08d}.pt"
    atomic_save(state, path)
    if best:
        atomic_save(state, run_dir / "checkpoints" / "best.pt")
    for _, old in list_checkpoints(run_dir)[:-max(1, keep_last)]:
        old.unlink(missing_ok=True)
    return path
