"""Which attention kernel trains faster, by device and sequence length: fused SDPA vs explicit
matmul -> softmax -> matmul, over the same weights. Sets `CPU_MATH_MAX_TOKENS` in vitlab/model.py.

    python benchmarks/attention.py [--dtype auto|fp32|bf16] [--out benchmarks/results/attention.json]

Each row times forward + backward of a 4-block, width-192, 3-head ViT trunk on token tensors
(about 16k tokens per batch), both kernels interleaved in one run so that machine noise hits both.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vitlab.config import ViTConfig
from vitlab.engine.runtime import describe_machine, fast_bf16_available
from vitlab.model import Block


def time_step(blocks, x, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        y = x
        for b in blocks:
            y = b(y)
        y.float().square().mean().backward()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--lengths", default="17,50,65,101,197,257,401,577")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bf16 = fast_bf16_available("cpu") if args.dtype == "auto" else args.dtype == "bf16"
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3)
    blocks = torch.nn.ModuleList(Block(cfg, 0.0, "math") for _ in range(cfg.depth))
    rows = []
    for n in [int(s) for s in args.lengths.split(",")]:
        batch = max(1, 16384 // n)
        x = torch.randn(batch, n, cfg.embed_dim, requires_grad=True)
        times = {}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for impl in ("math", "sdpa", "math", "sdpa"):  # interleaved, best of both rounds
                for b in blocks:
                    b.attn.impl = impl
                t = time_step(blocks, x, args.reps)
                times[impl] = min(times.get(impl, t), t)
        row = {"tokens": n, "batch": batch, "math_ms": round(times["math"] * 1e3, 2),
               "sdpa_ms": round(times["sdpa"] * 1e3, 2),
               "sdpa_over_math": round(times["sdpa"] / times["math"], 3)}
        rows.append(row)
        print(row, flush=True)
    result = {"machine": describe_machine(), "bf16": bf16, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
