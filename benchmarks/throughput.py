"""Training-step throughput, side by side in one run: vitlab vs timm's VisionTransformer vs the
original write-up's model (../shared/baselines/seed_vit.py). A thin wrapper over `vitlab bench`
(vitlab.bench) for the two configurations the README reports.

    python benchmarks/throughput.py                       # both configs, results to stdout
    python benchmarks/throughput.py --configs small32 --compile --out benchmarks/results/throughput.json

A step is forward + cross-entropy + backward + AdamW update on random data of the real shape, in
the precision `vitlab train` would pick here (`--dtype auto`: timed by vitlab.engine.autotune), or
the one given. The models take turns, round after round, so that noise from other work on the
machine hits all of them alike; each model's figure is its median over rounds. Each record also
holds inference images/s, GFLOP/s, % of the matmul peak and batch-1 latency (see vitlab.bench).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import vitlab
from vitlab.bench import make_train_step, run_bench
from vitlab.engine.runtime import describe_machine

SEED_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "baselines" / "seed_vit.py"

# name: (vitlab preset, batch size)
CONFIGS = {
    "small32": ("vit_tiny_patch4_32", 128),  # 32 px, patch 4, depth 6, width 192, 3 heads: 2.7M params
    "seed_b16": ("seed_b16", 8),  # the write-up's ViT-B/16 at 224 px: 86M params
}


def make_step(model: torch.nn.Module, bf16: bool):
    """A CPU training step in bf16 autocast or fp32 (benchmarks/loader.py and equal_time.py time it)."""
    return make_train_step(model, "bf16" if bf16 else "fp32", torch.device("cpu"))


def bench_config(name: str, rounds: int, steps: int, warmup: int, compile_vitlab: bool, precision: str) -> dict:
    preset, batch = CONFIGS[name]
    r = run_bench(vitlab.get_config(preset), batch, "cpu", precision, rounds=rounds, steps=steps, warmup=warmup,
                  seed_path=SEED_PATH, compile_vitlab=compile_vitlab)
    for k, why in r["skipped"].items():
        print(f"{k} skipped: {why}", file=sys.stderr)
    r.pop("machine")  # once, at the top of the file
    images = {k: m["train_images_per_s"] for k, m in r["models"].items()}
    result = {"config": name, "bf16": r["precision"] == "bf16", "images_per_s": images, **r}
    if "seed" in images:
        result["ratio_vs_seed"] = {k: round(v / images["seed"], 2) for k, v in images.items() if k != "seed"}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description="training-step images/s: vitlab vs timm vs the seed model")
    ap.add_argument("--configs", default="small32,seed_b16", help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(vitlab)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    results = {"machine": describe_machine(), "command": " ".join(sys.argv), "results": []}
    for name in args.configs.split(","):
        r = bench_config(name, args.rounds, args.steps, args.warmup, args.compile, args.dtype)
        results["results"].append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
