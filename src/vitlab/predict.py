"""`vitlab predict`: image files or folders -> top-k labels with probabilities.

Preprocessing comes from the model's record: decode with Pillow, convert to the model's channels
(greyscale <-> RGB), resize the shorter side and centre-crop to the model's size, normalise with
its mean/std. Files that cannot be read are reported, not fatal.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from .data.augment import EvalTransform
from .data.folders import IMAGE_EXTENSIONS, decode_one
from .errors import DataError
from .model import VisionTransformer


def collect_files(paths: list[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to predict (folders searched recursively for images) and paths that do not exist."""
    files, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            missing.append((p, "no such file or folder"))
    return files, missing


@torch.no_grad()
def predict(model: VisionTransformer, paths: list[str | Path], topk: int = 5, batch_size: int = 64
            ) -> tuple[list[dict], list[tuple[Path, str]]]:
    """([{"file", "top": [{"label", "index", "prob"}...]}], [(file, problem)])."""
    cfg = model.config
    files, failed = collect_files(paths)
    decoded = [(f, decode_one((str(f), cfg.img_size, cfg.in_chans))) for f in files]
    ok = [(f, a) for f, a in decoded if not isinstance(a, str)]
    failed += [(f, a.replace("BOMB:", "image too large: ")) for f, a in decoded if isinstance(a, str)]
    names = list(cfg.class_names or [str(i) for i in range(cfg.num_classes)])
    k = min(topk, cfg.num_classes)
    transform = EvalTransform(cfg)
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(ok), batch_size):
        chunk = ok[start:start + batch_size]
        x = transform(torch.from_numpy(np.stack([a for _, a in chunk]))).to(device)
        probs = model(x).float().softmax(-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for (f, _), v, i in zip(chunk, values.tolist(), indices.tolist()):
            rows.append({"file": str(f), "top": [{"label": names[j], "index": j, "prob": p} for j, p in zip(i, v)]})
    return rows, failed


def format_rows(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "rank", "label", "index", "prob"])
        for r in rows:
            for rank, t in enumerate(r["top"], 1):
                w.writerow([r["file"], rank, t["label"], t["index"], f"{t['prob']:.6f}"])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise DataError(f"unknown format {fmt!r}: table, json or csv")
    width = max([len(r["file"]) for r in rows] + [4])
    lines = [f"{'file':{width}}  top predictions"]
    for r in rows:
        lines.append(f"{r['file']:{width}}  " + "  ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"]))
    return "\n".join(lines)
