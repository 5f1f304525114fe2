"""Users' own images: `root/<class>/*.png|jpg|...`, optionally under `train/ val/ test/`.

Files are decoded with Pillow in worker processes, converted to the requested channels, resized
(shorter side) and centre-cropped to a square, and stacked into one uint8 tensor: after that,
folders go through the same batched in-memory path as MNIST and CIFAR.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import DataError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
MAX_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)


def has_split_dirs(root: Path) -> bool:
    return (root / "train").is_dir()


def scan(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of a `root/<class>/<file>` tree; classes in sorted order."""
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders; expected {root}/<class name>/<images>")
    if len(classes) == 1:
        raise DataError(f"{root} has a single class folder ({classes[0]!r}); a classifier needs at least two")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not found:
            raise DataError(f"class folder {root / name} is empty")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def decode_one(args: tuple[str, int, int]) -> np.ndarray | str:
    """One file -> (C, S, S) uint8, or an error string (exceptions do not cross processes well)."""
    path, size, channels = args
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                return f"BOMB:{w}x{h} = {w * h:,} pixels exceeds the {MAX_PIXELS:,}-pixel limit"
            im = im.convert("L" if channels == 1 else "RGB")
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises many types for bad files
        return f"{type(e).__name__}: {e}"
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)


def decode_files(files: list[Path], size: int, channels: int, strict: bool = False,
                 workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, size, size) uint8 for the readable files, and the indices of those files.

    Unreadable files are skipped with one warning listing them (an error when `strict`); an image
    over the pixel limit is always an error.
    """
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    jobs = [(str(f), size, channels) for f in files]
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(decode_one, jobs, chunksize=64))
    else:
        results = [decode_one(j) for j in jobs]
    bad = [(f, r) for f, r in zip(files, results) if isinstance(r, str)]
    bombs = [(f, r) for f, r in bad if r.startswith("BOMB:")]
    if bombs:
        raise DataError(f"{bombs[0][0]}: image of {bombs[0][1][5:]}; refusing to decode it")
    if bad:
        listing = "; ".join(f"{f} ({r})" for f, r in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        if strict:
            raise DataError(f"{len(bad)} unreadable file(s): {listing}")
        warnings.warn(f"skipped {len(bad)} unreadable file(s): {listing}", stacklevel=2)
    keep = np.array([i for i, r in enumerate(results) if not isinstance(r, str)], dtype=np.int64)
    if keep.size == 0:
        raise DataError(f"none of the {len(files)} files could be read as images")
    return np.stack([results[i] for i in keep]), keep
