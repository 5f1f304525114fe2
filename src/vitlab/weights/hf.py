"""Hugging Face interop: `ViTForImageClassification` / `ViTModel` directories as written by
`save_pretrained` (config.json + model.safetensors, or pytorch_model.bin, possibly sharded).

On disk, transformers keeps separate query/key/value projections under
`vit.encoder.layer.{i}.attention.attention.*` (also in transformers 5, whose in-memory names differ
but whose files keep this layout); vitlab packs them into timm's fused `qkv`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import ConversionError, ModelFileError
from .keymap import rename
from .modeldir import _atomic_write, read_state_dict
from .timm import infer_config
from .torchvision import classic_vit_problems

_L = "encoder.layer.{i}."
# (vitlab/timm key, Hugging Face key without the "vit." prefix); q/k/v are merged afterwards.
TABLE: list[tuple[str, str]] = [
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("blocks.{i}.norm1.weight", _L + "layernorm_before.weight"),
    ("blocks.{i}.norm1.bias", _L + "layernorm_before.bias"),
    ("blocks.{i}.attn.q.weight", _L + "attention.attention.query.weight"),
    ("blocks.{i}.attn.q.bias", _L + "attention.attention.query.bias"),
    ("blocks.{i}.attn.k.weight", _L + "attention.attention.key.weight"),
    ("blocks.{i}.attn.k.bias", _L + "attention.attention.key.bias"),
    ("blocks.{i}.attn.v.weight", _L + "attention.attention.value.weight"),
    ("blocks.{i}.attn.v.bias", _L + "attention.attention.value.bias"),
    ("blocks.{i}.attn.proj.weight", _L + "attention.output.dense.weight"),
    ("blocks.{i}.attn.proj.bias", _L + "attention.output.dense.bias"),
    ("blocks.{i}.norm2.weight", _L + "layernorm_after.weight"),
    ("blocks.{i}.norm2.bias", _L + "layernorm_after.bias"),
    ("blocks.{i}.mlp.fc1.weight", _L + "intermediate.dense.weight"),
    ("blocks.{i}.mlp.fc1.bias", _L + "intermediate.dense.bias"),
    ("blocks.{i}.mlp.fc2.weight", _L + "output.dense.weight"),
    ("blocks.{i}.mlp.fc2.bias", _L + "output.dense.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
    ("head.weight", "classifier.weight"),
    ("head.bias", "classifier.bias"),
]


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_state_dict(path / name)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(path / shard))
            return state
    raise ModelFileError(f"{path} has no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _size(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"non-square {field} {value} is not supported")
        value = value[0]
    return int(value)


def from_hf(path: str | os.PathLike, base: ViTConfig | None = None, **known: Any) -> tuple[ViTConfig, dict]:
    """(config, timm-named state) from a Hugging Face ViT directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFileError(f"{path / 'config.json'} is missing: not a Hugging Face save_pretrained directory")
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") != "vit":
        raise ConversionError(f"{path / 'config.json'} has model_type={hf.get('model_type')!r}, expected 'vit'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"hidden_act={hf['hidden_act']!r} is not supported (vitlab uses exact GELU)")
    raw = _read_hf_weights(path)
    raw = {k.removeprefix("vit."): v for k, v in raw.items()
           if not k.startswith(("pooler.", "vit.pooler.", "embeddings.mask_token", "vit.embeddings.mask_token"))}
    state = rename(raw, TABLE, str(path))
    for i in range(int(hf["num_hidden_layers"])):  # q, k, v -> timm's fused qkv, in that order
        for kind in ("weight", "bias"):
            parts = [state.pop(f"blocks.{i}.attn.{c}.{kind}", None) for c in "qkv"]
            if all(p is not None for p in parts):
                state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    id2label = hf.get("id2label") or {}
    names = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if names and all(n and not n.startswith("LABEL_") for n in names):
        known.setdefault("class_names", tuple(names))
    proc = path / "preprocessor_config.json"
    if proc.is_file():
        p = json.loads(proc.read_text())
        if "image_mean" in p and "image_std" in p:
            known.setdefault("mean", tuple(p["image_mean"]))
            known.setdefault("std", tuple(p["image_std"]))
    known.setdefault("num_heads", int(hf["num_attention_heads"]))
    known.setdefault("norm_eps", float(hf.get("layer_norm_eps", 1e-12)))
    known.setdefault("drop_rate", float(hf.get("hidden_dropout_prob", 0.0)))
    known.setdefault("attn_drop_rate", float(hf.get("attention_probs_dropout_prob", 0.0)))
    cfg = infer_config(state, base=base, source=str(path), **known)
    if cfg.img_size != _size(hf.get("image_size", cfg.img_size), "image_size"):
        raise ConversionError(f"{path}: config.json says image_size={hf['image_size']} but the position "
                              f"embedding is for {cfg.img_size} px")
    return cfg, state


def to_hf(model, out: str | os.PathLike) -> Path:
    """Write `model` as a Hugging Face ViTForImageClassification directory (legacy on-disk key
    names, which every transformers release reads)."""
    from safetensors.torch import save_file

    cfg: ViTConfig = model.config
    problems = classic_vit_problems(cfg)
    if problems:
        raise ConversionError("cannot express this model as a Hugging Face ViTForImageClassification: "
                              + "; ".join(problems))
    state = dict(model.state_dict())
    for i in range(cfg.depth):  # timm's fused qkv -> q, k, v
        for kind in ("weight", "bias"):
            fused = state.pop(f"blocks.{i}.attn.qkv.{kind}", None)
            if fused is not None:
                for c, part in zip("qkv", fused.chunk(3)):
                    state[f"blocks.{i}.attn.{c}.{kind}"] = part
    hf_state = {("" if k.startswith("classifier.") else "vit.") + k: v.contiguous()
                for k, v in rename(state, TABLE, "vitlab model", reverse=True).items()}
    names = cfg.class_names or tuple(f"LABEL_{i}" for i in range(cfg.num_classes))
    hf_config = {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_hidden_dim, "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.drop_rate, "attention_probs_dropout_prob": cfg.attn_drop_rate,
        "layer_norm_eps": cfg.norm_eps, "image_size": cfg.img_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans, "qkv_bias": cfg.qkv_bias, "encoder_stride": cfg.patch_size,
        "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
    }
    processor = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True,
        "do_normalize": True, "rescale_factor": 1 / 255, "resample": 2,
        "size": {"height": cfg.img_size, "width": cfg.img_size},
        "image_mean": list(cfg.mean), "image_std": list(cfg.std),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "model.safetensors", lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"}))
    for name, doc in (("config.json", hf_config), ("preprocessor_config.json", processor)):
        _atomic_write(out / name, lambda tmp, doc=doc: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    return out
