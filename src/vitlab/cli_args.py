"""The command line's arguments: one builder per `vitlab` subcommand (cli.py maps each to its function)."""
from __future__ import annotations

import argparse

from .evaluate import TTA_MODES


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("filter", nargs="?", help="only names containing this text")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="state-dict file (.pth/.safetensors) for timm/torchvision; "
                   "save_pretrained directory for hf")
    p.add_argument("--from", dest="source", required=True, choices=["timm", "torchvision", "hf"],
                   help="layout of SRC")
    p.add_argument("--out", required=True, help="model directory to write (config.json + model.safetensors); "
                   "must not exist or be empty")
    p.add_argument("--force", action="store_true", help="replace --out if it is a vitlab model directory "
                   "(never the source)")
    p.add_argument("--preset", help="preset whose head count, eps and mean/std apply (e.g. vit_base_patch16_224)")
    p.add_argument("--num-heads", type=int, help="attention heads, if not width/64 and no preset")
    p.add_argument("--img-size", type=int, help="input size, for checkpoints with fixed position embeddings")
    p.add_argument("--pool", choices=["token", "avg"], help="how the head reads the tokens, where the weights "
                   "cannot tell (a class-token model trained with average pooling and no fc_norm)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "fetch", "verify"])
    p.add_argument("name", nargs="?", help="dataset name (mnist, cifar10, cifar100)")
    p.add_argument("--data-dir", help="data root searched first (then $VITLAB_DATA, then ~/.cache/vitlab); "
                   "fetch writes here")
    p.add_argument("--force", action="store_true", help="fetch: download again even if a copy exists")
    p.add_argument("--quiet", action="store_true", help="fetch: no progress bar")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="shipped recipe name (mnist, cifar10, ...) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.epochs=3 --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--out", help="run directory (default runs/RECIPE-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped "
                   "(its config.yaml must match its checkpoint; --set may change only runtime.*, data.data_dir, "
                   "data.download, data.storage, data.cache_dir, data.workers, train.log_every, train.keep_last, "
                   "train.test_at_end and train.eval_batch_size)")
    p.add_argument("--help-recipe", action="store_true", help="list every setting with its default and meaning")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory (uses its model/) or model directory")
    p.add_argument("--data", help="dataset name or folder (default: the one the model was trained on)")
    p.add_argument("--data-dir", help="data root searched first")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--tta", action="store_const", const="flip", help="average predictions over the image and "
                   "its mirror (test-time augmentation; --tta-mode flip-shift: ten views, shift: for digits)")
    p.add_argument("--tta-mode", choices=sorted(TTA_MODES), dest="tta",
                   help="test-time augmentation by name: " + "; ".join(f"{k}: {v}" for k, v in TTA_MODES.items()))
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--limit", type=int, help="evaluate a stratified, seeded subset of this many images")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: as training picks it on this device (bf16 where the hardware runs it natively)")
    p.add_argument("--out", help="folder for metrics.json and confusion.png")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (or run directory), or an exported .onnx file")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--format", default="table", choices=["table", "json", "csv"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"],
                   help="auto: onnxruntime where installed (for a model directory through an export made once "
                   "and cached), else PyTorch; PyTorch with --precision bf16")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32: the model's own answers; bf16: PyTorch under autocast, for large models or batches "
                   "~1.5x faster than the default on a CPU with bf16 units (README), probabilities differ in the "
                   "2nd-3rd digit")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (or run directory)")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    p.add_argument("--out", help="the model file to write (default: MODEL/model.onnx, model.int8.onnx or "
                   "model.torchscript.pt); FILE.json beside it holds the preprocessing and class names")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the ONNX graph")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="images (files or folders; the first 32 readable ones) to check parity on, instead of "
                   "random inputs")


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (or run directory), or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only; 0.0.0.0 "
                   "exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="images per forward pass at most")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long the first request of a batch waits "
                   "for others (0: no waiting; with --max-batch 1, one at a time)")
    p.add_argument("--max-queue", type=int, default=64, help="images waiting at most; past it: 503 + Retry-After")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (413 past it)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait for its answer (504)")
    p.add_argument("--cors", nargs="+", default=[], metavar="ORIGIN", help="origins allowed to call the API from "
                   "a browser page (default: none)")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's choice, at most the "
                   "CPUs a container's quota allows)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="predictions in fp32 (the model's own answers) or under bf16 autocast (PyTorch models; "
                   "faster on a CPU with bf16 units); attention maps stay fp32")


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (or run directory)")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the maps (created; existing files are never replaced)")
    p.add_argument("--method", default="rollout", choices=["raw", "rollout", "gradient"],
                   help="raw: one layer's attention; rollout: attention flow through all layers (Abnar & "
                   "Zuidema); gradient: class-specific relevance (Chefer et al. 2021)")
    p.add_argument("--layer", type=int, default=-1, help="raw: which layer (0 first, -1 last)")
    p.add_argument("--head", type=int, help="raw: which head (default: the mean over heads)")
    p.add_argument("--head-fusion", default="mean", choices=["mean", "max", "min"], help="rollout: how heads combine")
    p.add_argument("--discard-ratio", type=float, default=0.0,
                   help="rollout: drop this fraction of each layer's weakest attention weights (e.g. 0.9)")
    p.add_argument("--class", dest="cls", help="gradient: the class to explain, by name or index (default: top-1)")
    p.add_argument("--format", default="png", choices=["png", "npy"],
                   help="png: image + overlay with the prediction; npy: the raw (h, w) map over the patch grid")
    p.add_argument("--alpha", type=float, default=0.5, help="png: opacity of the heat map")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (or run directory); a fresh `vitlab convert` or random model works too")
    p.add_argument("--out", required=True, help="folder for the three PNGs and inspect.json")
    p.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders for the attention "
                   "distances (default: the test split of the model's dataset, else noise)")
    p.add_argument("--num-images", dest="images_count", type=int, default=64, help="images to average over")
    p.add_argument("--data-dir", help="data root searched first for the model's dataset")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (vitlab train --out)")
    p.add_argument("--out", help="HTML file to write (default RUN/report.html; only an earlier report is replaced)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate")
    p.add_argument("--data-dir", help="data root searched first for the run's dataset")
    p.add_argument("--limit", type=int, help="evaluate a stratified, seeded subset of this many images")
    p.add_argument("--mistakes", type=int, default=12, help="how many of the most confident mistakes to show")
    p.add_argument("--device", default="auto")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", nargs="?", help="preset name or variant (default vit_tiny_patch4_32; `vitlab models`)")
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override one model setting, e.g. --set model.depth=6 (repeatable)")
    p.add_argument("--batch", type=int, help="images per step (default 128 up to 64 px, else 8)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: timed by autotune, as `vitlab train` does")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "math"], help="vitlab's attention kernel")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, at most the CPUs "
                   "a container's quota allows)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of turns; each figure is the median")
    p.add_argument("--steps", type=int, default=3, help="steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--seed-vit", metavar="PATH", help="the write-up's model file (default ../shared/baselines/"
                   "seed_vit.py beside the repository; skipped if absent), or 'none' to leave it out")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
