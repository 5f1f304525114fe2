"""Training-step throughput of a sweep's candidates against its recipe, side by side in one process.

    python benchmarks/candidate_speed.py benchmarks/sweeps/cifar10-15ep-r3.yaml --only fullres
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/candidate_speed.py SPEC \
        --only fullres --precision fp32       # an estimate of an AVX2-only CPU's ratio

Each model is the recipe's (with the spec's common settings) plus a candidate's overrides; the batch
is the run's train.batch_size. A step is forward + cross-entropy + backward + AdamW on random data of
the real shape (vitlab.bench.make_train_step). The models take turns, round after round, so that
noise from the machine hits all of them alike; each figure is the median over rounds, and the ratio
to the recipe is what to read. Only the model is timed: augmentation and evaluation are not, so a
candidate that changes those (or the epochs) needs a real run. Each result is appended, with the
machine, to benchmarks/results/candidate_speed.json.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from accuracy import append
from vitlab.bench import make_train_step, train_rates_in_turns
from vitlab.engine.args import load_run_config
from vitlab.engine.runtime import describe_machine
from vitlab.model import VisionTransformer
from vitlab.train import base_model_config

RESULTS = Path(__file__).resolve().parent / "results" / "candidate_speed.json"


def kernel_caps() -> dict[str, str]:
    """The environment variables that cap ATen's and oneDNN's kernels (an AVX2 estimate), as set."""
    return {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}


def measure(spec_path: Path, names: list[str], precision: str, rounds: int, steps: int) -> dict:
    spec = yaml.safe_load(spec_path.read_text())
    unknown = [n for n in names if n not in spec["candidates"]]
    if unknown:
        raise SystemExit(f"{spec_path}: no candidate(s) {unknown}; it has {sorted(spec['candidates'])}")
    torch.manual_seed(0)
    common = list(spec.get("common", []))
    runs, sets_of = {}, {}
    for name, sets in [("recipe", [])] + [(n, list(spec["candidates"][n])) for n in names]:
        settings = load_run_config(spec["recipe"], common + sets)
        cfg = base_model_config(settings)
        batch = settings.train.batch_size
        x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
        y = torch.randint(0, cfg.num_classes, (batch,))
        runs[name] = (make_train_step(VisionTransformer(cfg), precision, torch.device("cpu")), x, y)
        sets_of[name] = sets
    # 2 warm-up steps each: first-call allocation and kernel choice
    rates = train_rates_in_turns(runs, rounds, steps, warmup=2)
    return {"spec": str(spec_path), "recipe": spec["recipe"], "precision": precision, "rounds": rounds,
            "steps": steps, "machine": describe_machine(), "command": " ".join(sys.argv),
            "kernel_caps": kernel_caps(),
            "candidates": {n: {"sets": sets_of[n], "batch": x.shape[0], "train_img_s": round(rates[n], 1),
                               "vs_recipe": round(rates[n] / rates["recipe"], 3)}
                           for n, (_, x, _) in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--only", required=True, help="comma-separated candidates to time against the recipe")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per model per round")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    record = measure(args.spec, [n for n in args.only.split(",") if n], args.precision, args.rounds, args.steps)
    for name, c in record["candidates"].items():
        print(f"{name:12s} {c['train_img_s']:8.1f} img/s  {c['vs_recipe']:.3f}x the recipe")
    append(record, args.out)


if __name__ == "__main__":
    main()
