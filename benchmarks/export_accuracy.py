"""Test accuracy of a model after export (issue 12, item 4): eager PyTorch, onnxruntime fp32 and
onnxruntime int8 on the same test split, with file sizes and batch-1 latency.

    python benchmarks/export_accuracy.py runs/budget/fast-30min-s0/model --data-dir ../shared/datasets \
        --out benchmarks/results/export_cpu.json

The model directory's recorded dataset (or --data) is evaluated whole; the ONNX files come from
vitlab.weights.export (parity-checked as `vitlab export` does) in a temporary folder. The int8 model's
accuracy delta is the number the issue bounds (<= 1 point).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vitlab.data.augment import EvalTransform
from vitlab.engine.runtime import describe_machine
from vitlab.weights.export import OnnxModel, export_model
from vitlab.weights.modeldir import load_model, read_config, recorded_dataset


def top1(run, images: torch.Tensor, labels: torch.Tensor, transform, batch: int = 500) -> float:
    correct = 0
    for s in range(0, len(images), batch):
        x, _ = transform(images[s:s + batch])
        with torch.inference_mode():
            correct += int((torch.as_tensor(run(x)).argmax(-1) == labels[s:s + batch]).sum())
    return correct / len(images)


def latency_ms(run, x: torch.Tensor, reps: int = 20) -> float:
    run(x)
    t = time.perf_counter()
    for _ in range(reps):
        run(x)
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", help="dataset name or folder (default: the one the model directory records)")
    ap.add_argument("--data-dir")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model = load_model(args.model).eval()
    data = recorded_dataset(args.model, model, args.split, data_dir=args.data_dir, name=args.data)
    transform = EvalTransform(model.config)
    labels = torch.as_tensor(data.labels)
    rows = {}
    x1, _ = transform(data.images[:1])
    with tempfile.TemporaryDirectory() as tmp:
        for name, int8 in (("onnxruntime fp32", False), ("onnxruntime int8", True)):
            path = Path(tmp) / f"m{'-int8' if int8 else ''}.onnx"
            rec = export_model(model, path, "onnx", dynamic_batch=True, int8=int8, source=str(args.model))
            ort = OnnxModel(path)
            rows[name] = {"top1": top1(ort, data.images, labels, transform), "bytes": rec["bytes"],
                          "batch1_ms": round(latency_ms(ort, x1), 3),
                          "parity": rec.get("parity_int8") or rec["parity_fp32"]}
        rows["pytorch"] = {"top1": top1(model, data.images, labels, transform),
                           "bytes": sum(p.numel() * 4 for p in model.state_dict().values()),
                           "batch1_ms": round(latency_ms(lambda x: model(x), x1), 3)}
    for k, r in rows.items():
        r["delta_vs_pytorch_points"] = round(100 * (r["top1"] - rows["pytorch"]["top1"]), 2)
        print(f"{k:18s} top-1 {100 * r['top1']:.2f}%  ({r['delta_vs_pytorch_points']:+.2f})  "
              f"{r['bytes'] / 1e6:.2f} MB  batch-1 {r['batch1_ms']:.2f} ms")
    doc = {"model": str(args.model), "config": read_config(args.model)[0].to_dict(), "split": args.split,
           "images": len(labels), "rows": rows, "machine": describe_machine(), "threads": torch.get_num_threads(),
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out:
        runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
        args.out.write_text(json.dumps({"runs": runs + [doc]}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
