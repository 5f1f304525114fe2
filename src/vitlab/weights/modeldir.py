"""Model directories: `config.json` (the ViTConfig) + `model.safetensors` (timm-named weights).

Both files are written to temporary names and renamed into place, so an interrupted save never
leaves a half-written model where a good one was. Loading never unpickles: safetensors for our
own files, `torch.load(weights_only=True)` for foreign `.pth` files.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ViTConfig
from ..errors import ConfigError, ModelFileError
from ..model import VisionTransformer
from ..pos_embed import resample_pos_embed

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "vitlab.model/1"


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp over path (same directory, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: VisionTransformer, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write `model` to directory `path` (created if needed); returns the directory.

    `extra` (JSON-serialisable, e.g. measured metrics) is stored beside the config in config.json.
    Accepts DDP- or torch.compile-wrapped models and saves the module underneath.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"save_model expects a vitlab VisionTransformer, got {type(model).__name__}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    doc = {"format": FORMAT, "config": model.config.to_dict(), **({"extra": extra} if extra else {})}
    # Weights first: a config.json only ever sits beside weights that were fully written.
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    return out


def read_config(path: str | os.PathLike) -> tuple[ViTConfig, dict[str, Any]]:
    """The ViTConfig and the `extra` record stored in a model directory."""
    file = Path(path) / CONFIG_NAME
    if not Path(path).is_dir():
        raise ModelFileError(f"{path} is not a model directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    if not file.is_file():
        raise ModelFileError(f"{file} is missing; a model directory holds {CONFIG_NAME} + {WEIGHTS_NAME}")
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{file} is not valid JSON ({e}); the file is truncated or corrupted") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "config" not in doc:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ModelFileError(f"{file} is not a vitlab model config (format {found!r}, expected {FORMAT!r})")
    try:
        return ViTConfig.from_dict(doc["config"]), doc.get("extra", {})
    except (ConfigError, TypeError) as e:
        raise ModelFileError(f"{file} holds an invalid config: {e}") from None


def read_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a .pth/.pt/.bin state dict, without running pickled code."""
    file = Path(file)
    if not file.is_file():
        raise ModelFileError(f"{file} is missing")
    if file.stat().st_size == 0:
        raise ModelFileError(f"{file} is empty (0 bytes)")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{file} cannot be read as safetensors ({e}); the file is truncated "
                                 f"or corrupted") from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; all mean the same here
        raise ModelFileError(f"{file} cannot be read as a weights-only PyTorch checkpoint "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("state_dict", "model", "model_state"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{file} does not hold a state dict of tensors")
    return obj


def load_state_into(model: VisionTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Load timm-named `state` into `model` strictly, resampling the position embedding to the
    model's patch grid when the checkpoint was trained at another resolution."""
    cfg = model.config
    pos = state.get("pos_embed")
    if pos is not None and isinstance(model.pos_embed, torch.nn.Parameter) and pos.shape != model.pos_embed.shape:
        state = {**state, "pos_embed": resample_pos_embed(pos, cfg.grid_size, cfg.num_prefix_tokens)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:3]}")
        raise ModelFileError(f"{source} does not match the config: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(path: str | os.PathLike, img_size: int | None = None, attn_impl: str = "auto",
               **overrides: Any) -> VisionTransformer:
    """Rebuild the exact model saved in directory `path`.

    `img_size` runs the weights at another resolution (learned position embeddings are resampled
    to the new patch grid); other keyword arguments override config fields that do not change
    the weights' shapes (e.g. `drop_path_rate`).
    """
    cfg, _ = read_config(path)
    if img_size is not None:
        overrides["img_size"] = img_size
    if overrides:
        cfg = cfg.replace(**overrides)
    model = VisionTransformer(cfg, attn_impl=attn_impl)
    load_state_into(model, read_state_dict(Path(path) / WEIGHTS_NAME), str(Path(path) / WEIGHTS_NAME))
    return model
