"""Is data ever the bottleneck? Augmented batches/s of the in-memory loader vs training steps/s of
a model, measured in one run on the same machine.

    python benchmarks/loader.py --data-dir ../shared/datasets --out benchmarks/results/loader_cpu.json

The loader runs the heaviest augmentation vitlab offers (pad-crop, flip, RandAugment 2 ops at
magnitude 9, random erasing, mixup/cutmix) on CIFAR-10's training split; the model is the 32-px
small-image ViT (`vit_tiny_patch4_32`, the CIFAR recipe's size class) at the same batch size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import vitlab
from vitlab.data import load_dataset
from vitlab.data.augment import AugmentArgs, TrainTransform
from vitlab.data.loader import BatchLoader
from vitlab.engine.runtime import describe_machine, fast_bf16_available

from throughput import make_step  # the same timed step as the throughput benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--model", default="vit_tiny_patch4_32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=60, help="loader batches timed")
    ap.add_argument("--steps", type=int, default=8, help="training steps timed")
    ap.add_argument("--out")
    args = ap.parse_args()

    data = load_dataset(args.dataset, "train", data_dir=args.data_dir)
    aug = AugmentArgs(crop_pad=4, flip=True, randaug_ops=2, randaug_magnitude=9, erase_prob=0.25,
                        mixup_alpha=0.8, cutmix_alpha=1.0)
    # The model takes the data's channels (MNIST is 1, CIFAR 3) and its statistics.
    model = vitlab.create_model(args.model, num_classes=len(data.classes), in_chans=data.images.shape[1],
                                mean=data.mean, std=data.std).train()
    loader = BatchLoader(data, args.batch_size, True, TrainTransform(aug, model.config))
    it = iter(loader)
    next(it)  # warm-up
    t = time.perf_counter()
    for _ in range(args.batches):
        x, y = next(it)
    loader_rate = args.batches / (time.perf_counter() - t)

    step = make_step(model, fast_bf16_available("cpu"))
    step(x, y)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    step_rate = args.steps / (time.perf_counter() - t)
    result = {"machine": describe_machine(), "command": " ".join(sys.argv), "batch_size": args.batch_size,
              "augment": aug.__dict__, "loader_batches_per_s": round(loader_rate, 2),
              "train_steps_per_s": round(step_rate, 3), "ratio": round(loader_rate / step_rate, 1)}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
