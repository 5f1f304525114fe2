"""`vitlab predict`: image files or folders -> top-k labels with probabilities.

Preprocessing comes from the model's record: decode with the image-folder decoder (centre square,
resized to the model's size and channels, bit depth and transparency handled, size limits checked
before decoding: see vitlab.data.folders), normalise with its mean/std. Files that cannot be read
are reported with the reason, not fatal; FIFOs and devices are never opened.

Precision: fp32 by default, so the answers are the model's own. `precision="bf16"` runs a PyTorch
model under bf16 autocast: on a CPU with bf16 units a ViT-B/16 answers 1.9x faster than in fp32
PyTorch and 1.5x faster than on onnxruntime (README, "Inference latency"), with probabilities that
differ in the second or third digit.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .data.augment import EvalTransform
from .data.folders import IMAGE_EXTENSIONS, decode_image, file_kind, walk
from .errors import ConfigError, DataError, ImageError
from .util import printable
from .model import VisionTransformer

if TYPE_CHECKING:
    from .weights.export import OnnxModel


def collect_files(paths: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to predict (folders searched for images, linked folders not followed) and [(path, problem)]
    for paths that do not exist, are not regular files (a FIFO is never opened: it would block), or are
    folders without images."""
    files, failed = [], []
    for p in map(Path, paths):
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            failed.append((p, "a broken link" if p.is_symlink() else "no such file or folder"))
            continue
        except OSError as e:
            failed.append((p, e.strerror or str(e)))
            continue
        if stat.S_ISDIR(mode):
            found, skipped = walk(p)
            images = [f for f in found if f.suffix.lower() in IMAGE_EXTENSIONS]
            files += images
            failed += skipped
            if not images:
                failed.append((p, f"a folder without image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"))
        elif stat.S_ISREG(mode):
            files.append(p)
        else:
            failed.append((p, f"not a regular file ({file_kind(mode)})"))
    return files, failed


def decode_files(files: list[Path], cfg, limit: int | None = None
                 ) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[Path, str]]]:
    """([(file, uint8 image decoded for a model of config `cfg`)], [(file, why it is unreadable)]),
    stopping once `limit` images are decoded."""
    ok, failed = [], []
    for f in files:
        if limit is not None and len(ok) == limit:
            break
        try:
            ok.append((f, decode_image(f, cfg.img_size, cfg.in_chans)))
        except ImageError as e:
            failed.append((f, e.reason))
    return ok, failed


INFERENCE_PRECISIONS = ("fp32", "bf16")


def onnx_precision_message(precision: str, path) -> str:
    return (f"--precision {precision} runs a PyTorch model; {printable(str(path))} is an ONNX export, which runs in "
            f"the precision it was exported in")


def check_precision(model, precision: str) -> None:
    """ConfigError for a precision other than INFERENCE_PRECISIONS, or bf16 for a model that is not a
    PyTorch module (an exported ONNX model runs in the precision it was exported in)."""
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision {precision!r} must be one of {INFERENCE_PRECISIONS}")
    if precision == "bf16" and not isinstance(model, torch.nn.Module):
        raise ConfigError(f"precision bf16 runs a PyTorch model; an exported {type(model).__name__} runs in "
                          f"the precision it was exported in")


def inference_precision(model, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context each forward pass of `model` runs in for `precision` ("fp32": none;
    "bf16": autocast on the model's device), after check_precision. Checked, and warned about where
    bf16 has no hardware support (emulated, slower than fp32), once, not per batch."""
    check_precision(model, precision)
    if precision == "fp32":
        return contextlib.nullcontext
    from .engine.runtime import Runtime, fast_bf16_available
    device = next(model.parameters()).device
    if not fast_bf16_available(device.type):
        warnings.warn(f"this {device.type} has no bf16 units: bf16 is emulated and slower than fp32", stacklevel=2)
    return Runtime(device, precision).autocast  # training's autocast, a fresh context per call


@torch.no_grad()
def predict(model: VisionTransformer | OnnxModel, paths: list[str | Path], topk: int = 5, batch_size: int = 64,
            precision: str = "fp32") -> tuple[list[dict], list[tuple[Path, str]]]:
    """([{"file", "top": [{"label", "index", "prob"}...]}], [(file, problem)]). `model` is a vitlab model or
    an exported ONNX model (vitlab.weights.export.OnnxModel): same preprocessing, same output.
    `precision`: "fp32", or "bf16" (autocast; PyTorch models only)."""
    check_precision(model, precision)  # before any file is read
    files, failed = collect_files(paths)
    ok, unreadable = decode_files(files, model.config)
    return predict_decoded(model, ok, topk, batch_size, precision), failed + unreadable


@torch.no_grad()
def predict_decoded(model: VisionTransformer | OnnxModel, ok: list[tuple[Path, np.ndarray]], topk: int = 5,
                    batch_size: int = 64, precision: str = "fp32") -> list[dict]:
    """Rows as `predict` gives them, for images already decoded by `decode_files` for this model."""
    cfg = model.config
    names = cfg.label_names
    k = min(topk, cfg.num_classes)
    transform = EvalTransform(cfg)
    device = torch.device("cpu")  # an exported model (weights.export.OnnxModel) takes CPU tensors
    if isinstance(model, torch.nn.Module):
        model.eval()
        device = next(model.parameters()).device
    autocast = inference_precision(model, precision)
    rows = []
    for start in range(0, len(ok), batch_size):
        chunk = ok[start:start + batch_size]
        x, _ = transform(torch.from_numpy(np.stack([a for _, a in chunk])))
        x = x.to(device)
        with autocast():
            logits = model(x)
        probs = logits.float().softmax(-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for (f, _), v, i in zip(chunk, values.tolist(), indices.tolist()):
            rows.append({"file": str(f), "top": [{"label": names[j], "index": j, "prob": p} for j, p in zip(i, v)]})
    return rows


def _utf8(text: str) -> str:
    """`text` as it can be written as UTF-8: undecodable bytes of a file name (surrogates) as `\\udcff`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def format_rows(rows: list[dict], fmt: str) -> str:
    """A table (one line per file: names with newlines or control characters are escaped, `\\n`),
    JSON (ASCII, escaped by JSON's rules) or CSV (quoted by CSV's rules)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "rank", "label", "index", "prob"])
        for r in rows:
            for rank, t in enumerate(r["top"], 1):
                w.writerow([_utf8(r["file"]), rank, _utf8(t["label"]), t["index"], f"{t['prob']:.6f}"])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise DataError(f"unknown format {fmt!r}: table, json or csv")
    names = [printable(r["file"]) for r in rows]
    width = max([len(n) for n in names] + [4])
    lines = [f"{'file':{width}}  top predictions"]
    for name, r in zip(names, rows):
        lines.append(f"{name:{width}}  " + "  ".join(f"{printable(t['label'])} {t['prob']:.3f}" for t in r["top"]))
    return "\n".join(lines)
