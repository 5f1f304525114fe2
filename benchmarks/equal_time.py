"""Equal wall-clock comparison: the original write-up's model (`seed` recipe) and vitlab's `cifar10`
recipe, each trained for the same minutes on this machine, then tested on the same images.

    python benchmarks/equal_time.py --minutes 15 --data-dir ../shared/datasets --test-limit 2000 \
        --out benchmarks/results/equal_time_cpu.json

For each recipe: time a few training steps of its model, turn the budget into a step count
(`train.max_steps`, so the learning-rate schedule ends at the budget), train through the real CLI,
then `vitlab eval --limit N` on a stratified, seeded subset of the test split (the seed model
evaluates at ~2 images/s on a CPU; the same subset is used for both). Validation is a
`--val-size` hold-out, the same for both.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import vitlab
from vitlab.engine.args import load_run_config
from vitlab.engine.runtime import describe_machine, fast_bf16_available
from vitlab.train import base_model_config

from throughput import make_step  # the same timed step as the throughput benchmark


def steps_per_second(recipe: str, warmup: int = 1, steps: int = 3) -> tuple[float, int]:
    cfg = load_run_config(recipe)
    model = vitlab.VisionTransformer(base_model_config(cfg).replace(num_classes=10)).train()
    B = cfg.train.batch_size
    x = torch.rand(B, *model.config.input_size)
    y = torch.randint(0, 10, (B,))
    step = make_step(model, fast_bf16_available("cpu"))  # the precision `vitlab train` picks here
    for _ in range(warmup):
        step(x, y)
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return steps / (time.perf_counter() - t), B


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--recipes", default="seed,cifar10")
    ap.add_argument("--data-dir")
    ap.add_argument("--val-size", type=int, default=500)
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--out-root", default="runs/equal_time")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for recipe in args.recipes.split(","):
        rate, batch = steps_per_second(recipe)
        steps = max(1, int(args.minutes * 60 * rate))
        out = Path(args.out_root) / f"{recipe}-{args.minutes:g}min"
        sets = [f"train.max_steps={steps}", "train.test_at_end=false", f"data.val_size={args.val_size}",
                "runtime.progress=false", "train.ckpt_every=0"]
        if args.data_dir:
            sets.append(f"data.data_dir={args.data_dir}")
        t = time.time()
        cli("train", "--recipe", recipe, "--out", str(out), *[a for s in sets for a in ("--set", s)])
        train_s = time.time() - t
        metrics = json.loads(cli("eval", str(out), "--json", "--limit", str(args.test_limit)).stdout)
        results = json.loads((out / "results.json").read_text())
        row = {"recipe": recipe, "budget_min": args.minutes, "steps": steps, "batch": batch,
               "images_seen": steps * batch, "train_wall_s": round(train_s, 1), "params": results["params"],
               "val_top1": results["best"]["val_top1"], "test_top1": metrics["top1"], "test_images": metrics["n"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_results(rows, args.test_limit, args.out)


def write_results(rows: list[dict], test_limit: int, out: str | None) -> None:
    doc = {"machine": describe_machine(), "command": " ".join(sys.argv), "rows": rows}
    lines = [f"| model (recipe) | params | `vitlab train` wall minutes | steps x batch | test top-1 % (same {test_limit} images) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['params'] / 1e6:.1f}M | {r['train_wall_s'] / 60:.1f} | "
                     f"{r['steps']} x {r['batch']} | {100 * r['test_top1']:.1f} |")
    doc["table"] = "\n".join(lines)
    print(doc["table"])
    if out:
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
