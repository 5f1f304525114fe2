"""`vitlab convert`: a timm, torchvision or Hugging Face checkpoint the user already has -> a
vitlab model directory, checked by a strict load into the rebuilt model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import get_config
from ..errors import ConversionError, ModelFileError
from ..model import VisionTransformer
from .hf import from_hf
from .modeldir import load_state_into, read_state_dict, save_model
from .timm import infer_config
from .torchvision import from_torchvision

FORMATS = ("timm", "torchvision", "hf")


def convert(src: str | os.PathLike, source: str, out: str | os.PathLike, preset: str | None = None,
            **known: Any) -> VisionTransformer:
    """Convert `src` (a state-dict file for timm/torchvision, a save_pretrained directory for hf)
    and save it to `out`; returns the loaded model.

    `preset` supplies what shapes cannot tell (head count, eps, mean/std); keyword arguments
    (e.g. num_heads=12) override single fields.
    """
    if source not in FORMATS:
        raise ConversionError(f"unknown source format {source!r}; choose one of {FORMATS}")
    src = Path(src)
    if not src.exists():
        raise ModelFileError(f"{src} does not exist")
    base = get_config(preset) if preset else None
    if source == "hf":
        if not src.is_dir():
            raise ModelFileError(f"{src} is not a directory; --from hf expects a save_pretrained directory")
        cfg, state = from_hf(src, base=base, **known)
    else:
        if src.is_dir():
            candidates = sorted(p for p in src.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin"))
            if len(candidates) != 1:
                raise ModelFileError(f"{src} holds {len(candidates)} weight files; pass the file itself")
            src = candidates[0]
        state = read_state_dict(src)
        if source == "timm":
            cfg = infer_config(state, base=base, source=str(src), **known)
        else:
            cfg, state = from_torchvision(state, base=base, source=str(src), **known)
    model = VisionTransformer(cfg)
    load_state_into(model, state, str(src))
    save_model(model, out, extra={"converted_from": {"format": source, "path": str(src)}})
    return model
