"""Training-step throughput of a recipe's model with its conv stem fed a channels-last image against
the plain contiguous (NCHW) image, and which of the two vitlab's autotune picks at run start.

    python benchmarks/stem_layout.py                                   # cifar10 recipe, bf16
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/stem_layout.py --precision fp32

Both models hold the same weights and take turns, round after round, in one process (as
benchmarks/candidate_speed.py), so noise from the machine hits both alike; read the ratio. The NCHW
model runs the same layers with PatchEmbed's layout change left out (`set_stem_layout("contiguous")`). Then
engine/autotune.py chooses as a training run would (no disk cache; it times the patch embedding
alone, on a small batch): the record says whether it picked the layout that trained faster here. Each
result is appended, with the machine, to benchmarks/results/stem_layout.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from accuracy import append
from candidate_speed import kernel_caps
from vitlab.bench import make_train_step, train_rates_in_turns
from vitlab.engine import autotune
from vitlab.engine.args import load_run_config
from vitlab.engine.runtime import describe_machine
from vitlab.model import VisionTransformer
from vitlab.train import base_model_config

RESULTS = Path(__file__).resolve().parent / "results" / "stem_layout.json"


def measure(recipe: str, precision: str, rounds: int, steps: int) -> dict:
    settings = load_run_config(recipe)
    cfg = base_model_config(settings)
    if not cfg.conv_stem:
        raise SystemExit(f"the {recipe} recipe's model has no conv stem: nothing to compare")
    torch.manual_seed(0)
    channels_last = VisionTransformer(cfg)
    plain = VisionTransformer(cfg)
    plain.load_state_dict(channels_last.state_dict())
    channels_last.set_stem_layout("channels_last")
    plain.set_stem_layout("contiguous")
    batch = settings.train.batch_size
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (batch,))
    cpu = torch.device("cpu")
    rates = train_rates_in_turns({"nchw": (make_train_step(plain, precision, cpu), x, y),
                                  "channels_last": (make_train_step(channels_last, precision, cpu), x, y)},
                                 rounds, steps, warmup=2)
    choice = autotune.choose(cfg, batch, cpu, precision, "auto", cache_file=None)
    if not autotune.layout_matters(cfg):
        print(f"{recipe}: {cfg.in_chans}-channel images are both layouts at once; the ratio below is noise")
    faster = "channels_last" if rates["channels_last"] >= rates["nchw"] else "contiguous"
    return {"recipe": recipe, "precision": precision, "batch": batch, "rounds": rounds, "steps": steps,
            "machine": describe_machine(), "command": " ".join(sys.argv),
            "kernel_caps": kernel_caps(),
            "train_img_s": {k: round(v, 1) for k, v in rates.items()},
            "channels_last_vs_nchw": round(rates["channels_last"] / rates["nchw"], 3),
            "autotune": {"stem_layout": choice.stem_layout, "picked_the_faster": choice.stem_layout == faster,
                         "stem_ms": {k.removeprefix("stem/"): v for k, v in choice.timings.items() if k.startswith("stem/")},
                         "stem_trial_batch": choice.shape.get("stem_trial_batch")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="cifar10")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per model per round")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    record = measure(args.recipe, args.precision, args.rounds, args.steps)
    print(f"{args.recipe} {args.precision}: {record['train_img_s']} -> channels-last "
          f"{record['channels_last_vs_nchw']:.3f}x; autotune picks {record['autotune']['stem_layout']} "
          f"(stem alone, batch {record['autotune']['stem_trial_batch']}: {record['autotune']['stem_ms']} ms)")
    append(record, args.out)


if __name__ == "__main__":
    main()
