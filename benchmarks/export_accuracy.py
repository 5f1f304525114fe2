"""Test accuracy of a model after export (issue 12, item 4): eager PyTorch (fp32, and under the bf16
autocast of `vitlab predict/serve --precision bf16`), onnxruntime fp32 and onnxruntime int8 on the
same test split, with file sizes, batch-1 latency, and how far each moves PyTorch fp32's answers
(top-1 agreement, largest probability change).

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

import torch

from vitlab.data.augment import EvalTransform
from vitlab.engine.runtime import describe_machine
from vitlab.predict import inference_precision
from vitlab.weights.export import OnnxModel, export_model
from vitlab.weights.modeldir import load_model, read_config, recorded_dataset


def probabilities(run, images: torch.Tensor, transform, batch: int = 500) -> torch.Tensor:
    """(N, classes) softmax of `run`'s logits over `images`, in fp32."""
    out = []
    for s in range(0, len(images), batch):
        x, _ = transform(images[s:s + batch])
        with torch.inference_mode():
            out.append(torch.as_tensor(run(x)).float().softmax(-1))
    return torch.cat(out)


@torch.inference_mode()
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
    rows, probs = {}, {}
    x1, _ = transform(data.images[:1])
    fp32_bytes = sum(p.numel() * 4 for p in model.state_dict().values())
    autocast = inference_precision(model, "bf16")

    def bf16(x):
        with autocast():
            return model(x)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"pytorch": (model, fp32_bytes, {}), "pytorch bf16": (bf16, fp32_bytes, {})}
        for name, int8 in (("onnxruntime fp32", False), ("onnxruntime int8", True)):
            path = Path(tmp) / f"m{'-int8' if int8 else ''}.onnx"
            rec = export_model(model, path, "onnx", dynamic_batch=True, int8=int8, source=str(args.model))
            runs[name] = (OnnxModel(path), rec["bytes"], {"parity": rec.get("parity_int8") or rec["parity_fp32"]})
        for name, (run, size, extra) in runs.items():
            probs[name] = probabilities(run, data.images, transform)
            rows[name] = {"top1": float((probs[name].argmax(-1) == labels).float().mean()), "bytes": size,
                          "batch1_ms": round(latency_ms(run, x1), 3), **extra}
    ref = probs["pytorch"]
    for k, r in rows.items():
        r["delta_vs_pytorch_points"] = round(100 * (r["top1"] - rows["pytorch"]["top1"]), 2)
        r["top1_agreement"] = float((probs[k].argmax(-1) == ref.argmax(-1)).float().mean())
        r["max_abs_dprob"] = float((probs[k] - ref).abs().max())
        print(f"{k:18s} top-1 {100 * r['top1']:.2f}%  ({r['delta_vs_pytorch_points']:+.2f})  "
              f"agrees {100 * r['top1_agreement']:.2f}%  max |dp| {r['max_abs_dprob']:.4f}  "
              f"{r['bytes'] / 1e6:.2f} MB  batch-1 {r['batch1_ms']:.2f} ms")
    doc = {"model": str(args.model), "config": read_config(args.model)[0].to_dict(), "split": args.split,
           "images": len(labels), "rows": rows, "machine": describe_machine(), "threads": torch.get_num_threads(),
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out:
        runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
        args.out.write_text(json.dumps({"runs": runs + [doc]}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
