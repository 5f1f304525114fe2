"""Training-step throughput, side by side in one run: vitlab vs timm's VisionTransformer (its
defaults) vs the original write-up's model (../shared/baselines/seed_vit.py).

    python benchmarks/throughput.py                       # both configs, results to stdout
    python benchmarks/throughput.py --configs small32 --compile --out benchmarks/results/throughput.json

A step is forward + cross-entropy + backward + AdamW update on random data of the real shape, under
bf16 autocast where the hardware runs bf16 natively (vitlab.engine.runtime.fast_bf16_available)
and fp32 elsewhere. The models take turns, round after round, so that noise from other work on the
machine hits all of them alike; each model's figure is its median over rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitlab
from vitlab.engine.runtime import describe_machine, fast_bf16_available

SEED_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "baselines" / "seed_vit.py"

# name: (vitlab preset + overrides, timm kwargs, seed kwargs, batch size)
CONFIGS = {
    "small32": (("vit_tiny_patch4_32", {}),  # 32 px, patch 4, depth 6, width 192, 3 heads: 2.7M params
                dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10),
                dict(img_size=32, patch_size=4, num_transformer_layers=6, embedding_dim=192,
                     mlp_size=768, num_heads=3, num_classes=10),
                128),
    "seed_b16": (("seed_b16", {}),  # the write-up's ViT-B/16 at 224 px: 86M params
                 dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=10),
                 dict(num_classes=10),
                 8),
}


def load_seed_module():
    if not SEED_PATH.is_file():
        return None
    spec = importlib.util.spec_from_file_location("seed_vit", SEED_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_models(name: str, compile_vitlab: bool) -> dict[str, torch.nn.Module]:
    (preset, overrides), timm_kw, seed_kw, _ = CONFIGS[name]
    models = {"vitlab": vitlab.create_model(preset, **overrides)}
    if compile_vitlab:
        models["vitlab+compile"] = torch.compile(vitlab.create_model(preset, **overrides))
    try:
        from timm.models.vision_transformer import VisionTransformer as TimmViT
        models["timm"] = TimmViT(**timm_kw)
    except ImportError:
        print("timm is not installed: skipping it (pip install timm)", file=sys.stderr)
    seed = load_seed_module()
    if seed is not None:
        models["seed"] = seed.ViT(**seed_kw)
    else:
        print(f"{SEED_PATH} not found: skipping the seed model", file=sys.stderr)
    return models


def make_step(model: torch.nn.Module, bf16: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_config(name: str, rounds: int, steps: int, warmup: int, compile_vitlab: bool, bf16: bool) -> dict:
    torch.manual_seed(0)
    (preset, overrides), _, _, batch = CONFIGS[name]
    cfg = vitlab.get_config(preset, **overrides)
    x = torch.rand(batch, *cfg.input_size)
    y = torch.randint(0, 10, (batch,))
    models = build_models(name, compile_vitlab)
    steps_fn = {k: make_step(m.train(), bf16) for k, m in models.items()}
    warm_s = {}
    for k, step in steps_fn.items():  # warm-up (and compilation) outside the timed rounds
        t = time.perf_counter()
        for _ in range(warmup):
            step(x, y)
        warm_s[k] = time.perf_counter() - t
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, step in steps_fn.items():
            t = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            rates[k].append(batch * steps / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "config": name, "batch": batch, "bf16": bf16, "rounds": rounds, "steps_per_round": steps,
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()},
        "images_per_s": {k: round(v, 1) for k, v in med.items()},
        "warmup_s": {k: round(v, 1) for k, v in warm_s.items()},
    }
    for ref in ("timm", "seed"):
        if ref in med:
            result[f"ratio_vs_{ref}"] = {k: round(v / med[ref], 2) for k, v in med.items() if k != ref}
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
    bf16 = fast_bf16_available("cpu") if args.dtype == "auto" else args.dtype == "bf16"
    results = {"machine": describe_machine(), "command": " ".join(sys.argv), "results": []}
    for name in args.configs.split(","):
        r = bench_config(name, args.rounds, args.steps, args.warmup, args.compile, bf16)
        results["results"].append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
