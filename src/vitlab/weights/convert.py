"""`vitlab convert`: a timm, torchvision or Hugging Face checkpoint the user already has -> a
vitlab model directory, checked by a strict load into the rebuilt model.

Nothing the user has is lost: the output directory is written whole under a temporary sibling
name and renamed into place; a non-empty output is replaced only with `force`, only if it is a
vitlab model directory, and never when it is (or holds, or lies inside) the source.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from ..config import get_config
from ..errors import ConversionError, ModelFileError
from ..model import VisionTransformer
from ..util import TMP_SUFFIX
from .hf import from_hf
from .modeldir import CONFIG_NAME, WEIGHTS_NAME, check_shapes, load_state_into, read_config, read_state_dict, \
    save_model
from .timm import infer_config
from .torchvision import from_torchvision

FORMATS = ("timm", "torchvision", "hf")


def check_out(src: Path, out: Path, force: bool = False) -> None:
    """Raise ModelFileError unless writing a model directory at `out` is safe: `out` is not the
    source, inside it or around it (even with `force`), and is absent or an empty directory, or
    (with `force`) a vitlab model directory."""
    s, o = src.resolve(), out.resolve()
    if o == s or o.is_relative_to(s) or s.is_relative_to(o):
        where = "is" if o == s else "is inside" if o.is_relative_to(s) else "contains"
        raise ModelFileError(f"--out {out} {where} the source {src}; the source is never overwritten: "
                             f"choose another output folder")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ModelFileError(f"--out {out} exists and is not a directory; remove it or choose another folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not force:
        raise ModelFileError(f"--out {out} is not empty ({len(entries)} entries, e.g. {entries[:3]}); pass "
                             f"--force to replace a vitlab model directory, or choose another folder")
    others = [e for e in entries if e not in (CONFIG_NAME, WEIGHTS_NAME)
              and not (e.startswith(".") and e.endswith(TMP_SUFFIX))]
    if others or CONFIG_NAME not in entries:
        raise ModelFileError(f"--out {out} is not a vitlab model directory (it holds {(others or entries)[:3]}); "
                             f"--force replaces only a model directory: choose another folder")
    try:
        read_config(out)
    except ModelFileError as e:
        raise ModelFileError(f"--force replaces only a vitlab model directory, and {e}") from None


def _write_dir(model: VisionTransformer, out: Path, extra: dict[str, Any], replace: bool) -> None:
    """save_model into a temporary sibling, then rename it to `out`. With `replace`, an existing
    `out` is moved aside first and deleted last, so at every moment either the old or the new
    directory is there; without it, the rename itself refuses an `out` that is not empty (one that
    another process filled since check_out looked)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    os.mkdir(tmp)  # a plain mkdir, so the directory gets the umask's mode (mkdtemp would give 0700)
    try:
        save_model(model, tmp, extra=extra)
        if not (replace and os.path.lexists(out)):
            try:
                os.rename(tmp, out)  # atomic; replaces nothing but an empty directory
            except OSError as e:
                raise ModelFileError(f"--out {out} cannot be written ({e.strerror}); was it created or "
                                     f"filled while converting? Nothing was replaced") from None
            return
        aside = out.parent / f".{out.name}.old-{secrets.token_hex(6)}{TMP_SUFFIX}"
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
        if aside.is_symlink() or not aside.is_dir():
            aside.unlink()  # --out was a link: the link goes, the folder it pointed to stays
        else:
            shutil.rmtree(aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(src: str | os.PathLike, source: str, out: str | os.PathLike, preset: str | None = None,
            force: bool = False, **known: Any) -> VisionTransformer:
    """Convert `src` (a state-dict file for timm/torchvision, a save_pretrained directory for hf)
    and save it to `out`; returns the loaded model.

    `preset` supplies what shapes cannot tell (head count, eps, mean/std); keyword arguments
    (e.g. num_heads=12) override single fields. `force` replaces an existing model directory.
    """
    if source not in FORMATS:
        raise ConversionError(f"unknown source format {source!r}; choose one of {FORMATS}")
    src, out = Path(src), Path(out)
    if not src.exists():
        raise ModelFileError(f"{src} does not exist")
    check_out(src, out, force)  # before any work: a refused --out should fail at once
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
    # Every tensor's shape against the config before the model is allocated.
    check_shapes(cfg, {k: tuple(v.shape) for k, v in state.items()}, str(src), resample_pos=True)
    model = VisionTransformer(cfg)
    load_state_into(model, state, str(src))
    _write_dir(model, out, extra={"converted_from": {"format": source, "path": str(src)}}, replace=force)
    return model
