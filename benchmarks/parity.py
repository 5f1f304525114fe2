"""Max |logit difference| between vitlab and timm / torchvision / Hugging Face, both directions,
on random small models built locally (fp32, CPU, no network).

    python benchmarks/parity.py --out benchmarks/results/parity.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import vitlab
from vitlab.engine.runtime import describe_machine
from vitlab.weights.hf import from_hf, to_hf
from vitlab.weights.timm import infer_config, timm_kwargs
from vitlab.weights.torchvision import from_torchvision, to_torchvision


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def measure(cfg: vitlab.ViTConfig, seed: int = 0) -> dict[str, float]:
    import transformers
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from torchvision.models.vision_transformer import VisionTransformer as TvViT
    x = torch.randn(4, *cfg.input_size, generator=torch.Generator().manual_seed(seed))
    ours = randomize(vitlab.create_model(cfg), seed)
    out = {}
    timm_model = TimmViT(**timm_kwargs(cfg)).eval()
    timm_model.load_state_dict(ours.state_dict(), strict=True)
    out["vitlab->timm"] = diff(ours(x), timm_model(x))
    randomize(timm_model, seed + 1)
    back = vitlab.VisionTransformer(infer_config(timm_model.state_dict(), num_heads=cfg.num_heads)).eval()
    back.load_state_dict(timm_model.state_dict(), strict=True)
    out["timm->vitlab"] = diff(back(x), timm_model(x))
    kwargs, state = to_torchvision(ours)
    tv = TvViT(**kwargs).eval()
    tv.load_state_dict(state, strict=True)
    out["vitlab->torchvision"] = diff(ours(x), tv(x))
    randomize(tv, seed + 2)
    c, s = from_torchvision(tv.state_dict(), num_heads=cfg.num_heads)
    back = vitlab.VisionTransformer(c).eval()
    back.load_state_dict(s, strict=True)
    out["torchvision->vitlab"] = diff(back(x), tv(x))
    with tempfile.TemporaryDirectory() as tmp:
        to_hf(ours, Path(tmp) / "a")
        hf = transformers.ViTForImageClassification.from_pretrained(Path(tmp) / "a").eval()
        out["vitlab->hf"] = diff(ours(x), hf(x).logits)
        randomize(hf, seed + 3).save_pretrained(Path(tmp) / "b")
        c, s = from_hf(Path(tmp) / "b")
        back = vitlab.VisionTransformer(c).eval()
        back.load_state_dict(s, strict=True)
        out["hf->vitlab"] = diff(back(x), hf(x).logits)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args()
    configs = {  # a tiny model and the ViT-Ti/16 shape at 224 px, 4 blocks
        "tiny-16px": vitlab.ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5),
        "Ti/16-224-depth4": vitlab.get_config("vit_tiny_patch16_224", depth=4, num_classes=10),
    }
    results = {"machine": describe_machine(), "max_abs_logit_diff": {}}
    for name, cfg in configs.items():
        results["max_abs_logit_diff"][name] = measure(cfg)
        print(name, json.dumps(results["max_abs_logit_diff"][name]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
