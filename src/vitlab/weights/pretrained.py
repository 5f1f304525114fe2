"""Pretrained weights for `model.pretrained`, from wherever the user has them (issue 12):
a vitlab model directory, a Hugging Face `save_pretrained` directory, or a timm or torchvision
state-dict file (.safetensors / .pth / .pt / .bin, or a folder holding exactly one). Foreign
formats are converted on the fly through the same key tables and shape checks as `vitlab convert`;
nothing is written next to the source.

What shapes cannot tell (the head count of a non-paper width) comes from the run's settings
(`--set model.num_heads=N`); without it the error names that setting.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import ConversionError, ModelFileError
from .hf import from_hf
from .modeldir import CONFIG_NAME, FORMAT, MAX_CONFIG_BYTES, WEIGHTS_NAME, read_model_dir, read_state_dict
from .timm import infer_config
from .torchvision import from_torchvision

SOURCES = ("vitlab", "hf", "timm", "torchvision")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

_CACHE: dict[tuple, tuple[str, ViTConfig, dict[str, torch.Tensor]]] = {}  # the last source read (one entry)


def detect(path: str | os.PathLike) -> tuple[str, Path]:
    """(format, the directory or weights file to read) for a `model.pretrained` path."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model.pretrained={path}: no such file or directory")
    if path.is_dir():
        config = path / CONFIG_NAME
        if config.is_file():
            if config.stat().st_size > MAX_CONFIG_BYTES:
                raise ModelFileError(f"{config} is {config.stat().st_size:,} bytes: not a model config")
            try:
                doc = json.loads(config.read_bytes())
            except (ValueError, RecursionError):
                raise ModelFileError(f"{config} is not valid JSON") from None
            if isinstance(doc, dict) and doc.get("format") == FORMAT:
                return "vitlab", path
            if isinstance(doc, dict) and "model_type" in doc:
                return "hf", path  # from_hf names any model_type other than 'vit'
            raise ModelFileError(f"{config} is neither a vitlab model config nor a Hugging Face config "
                                 f"(no 'format' {FORMAT!r}, no 'model_type')")
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        if len(files) != 1:
            raise ModelFileError(f"model.pretrained={path} is a folder with {len(files)} weight files and no "
                                 f"{CONFIG_NAME}; pass the weights file itself")
        path = files[0]
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelFileError(f"model.pretrained={path}: expected a model directory or a weights file "
                             f"({', '.join(WEIGHT_SUFFIXES)})")
    return "file", path


def layout_of(state: dict[str, torch.Tensor], source: str) -> str:
    """"timm" or "torchvision", from the key names of a state dict."""
    if any(k.startswith(("conv_proj.", "encoder.layers.")) for k in state):
        return "torchvision"
    if "patch_embed.proj.weight" in state:
        return "timm"
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings")) for k in state):
        raise ConversionError(f"{source} holds Hugging Face ViT weights: pass the save_pretrained directory "
                              f"(with its {CONFIG_NAME}), not the weights file")
    raise ConversionError(f"{source} has neither timm nor torchvision ViT key names (first keys: {list(state)[:4]})")


def read_pretrained(path: str | os.PathLike, num_heads: int | None = None
                    ) -> tuple[str, ViTConfig, dict[str, torch.Tensor]]:
    """(format, config, timm-named state) of a pretrained source, converted where needed.

    The last source read is kept in memory: a run asks once for the config (before the data is
    loaded) and once for the weights."""
    kind, target = detect(path)
    stat = target.stat() if target.is_file() else (target / (WEIGHTS_NAME if kind == "vitlab" else CONFIG_NAME)).stat()
    key = (str(Path(target).resolve()), stat.st_mtime_ns, stat.st_size, num_heads)
    if key in _CACHE:
        return _CACHE[key]
    known: dict[str, Any] = {"num_heads": num_heads} if num_heads is not None else {}
    try:
        if kind == "vitlab":
            cfg, _ = read_model_dir(target)  # the same checks as load_model: one save, a real safetensors file
            state = read_state_dict(target / WEIGHTS_NAME)
        elif kind == "hf":
            cfg, state = from_hf(target, **known)
        else:
            state = read_state_dict(target)
            kind = layout_of(state, str(target))
            if kind == "timm":
                cfg = infer_config(state, source=str(target), **known)
            else:
                cfg, state = from_torchvision(state, source=str(target), **known)
    except ConversionError as e:  # the converters name CLI flags of `vitlab convert`; here they are settings
        raise ConversionError(str(e).replace("(--num-heads) or a preset (--preset)", "with --set model.num_heads=N")
                              ) from None
    _CACHE.clear()
    _CACHE[key] = (kind, cfg, state)
    return kind, cfg, state


def forget() -> None:
    """Drop the kept source (its tensors can be hundreds of MB) once the model holds the weights."""
    _CACHE.clear()


__all__ = ["read_pretrained", "forget", "detect", "layout_of", "SOURCES"]
