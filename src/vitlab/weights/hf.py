"""Hugging Face interop: `ViTForImageClassification` / `ViTModel` directories as written by
`save_pretrained` (config.json + model.safetensors, or pytorch_model.bin, possibly sharded).

On disk, transformers keeps separate query/key/value projections under
`vit.encoder.layer.{i}.attention.attention.*` (also in transformers 5, whose in-memory names differ
but whose files keep this layout); vitlab packs them into timm's fused `qkv`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ViTConfig
from ..errors import ConversionError, ModelFileError
from ..util import atomic_write, atomic_write_text
from .keymap import block_count, rename
from .modeldir import MAX_CONFIG_BYTES, _regular_file, read_state_dict
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


def _read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from `file`, or one clear error naming the file."""
    _regular_file(file, what)
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{file} is {file.stat().st_size:,} bytes; too large for {what}")
    try:
        doc = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as e:
        raise ModelFileError(f"{file} is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict):
        raise ModelFileError(f"{file} must hold a JSON object, not a {type(doc).__name__}")
    return doc


def _shard_path(folder: Path, index: Path, shard: Any) -> Path:
    """A shard named by an index file, refused unless it is a plain file name inside `folder`."""
    if not isinstance(shard, str) or not shard:
        raise ModelFileError(f"{index}: shard name {shard!r} is not a file name")
    if os.path.isabs(shard) or ".." in Path(shard).parts:
        raise ModelFileError(f"{index} names shard {shard!r} outside {folder}; refusing to read it")
    file = folder / shard
    if not file.resolve().is_relative_to(folder.resolve()):  # e.g. a symlinked subfolder
        raise ModelFileError(f"{index} names shard {shard!r}, which resolves outside {folder}; refusing to read it")
    return file


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return read_state_dict(path / name)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / name
        if not index.exists():
            continue
        weight_map = _read_json(index, "a sharded-weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
        files = {shard: _shard_path(path, index, shard) for shard in set(weight_map.values())}
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(files):
            part = read_state_dict(files[shard])
            twice = sorted(set(part) & set(state))
            if twice:
                raise ModelFileError(f"{index}: tensor(s) {twice[:3]} appear in more than one shard")
            state.update(part)
        absent = [k for k in weight_map if k not in state]
        if absent:
            raise ModelFileError(f"{index} lists {len(absent)} tensor(s) that no shard holds, e.g. {absent[:3]}")
        return state
    raise ModelFileError(f"{path} has no model.safetensors or pytorch_model.bin (nor a sharded index)")


def _hf_int(hf: dict[str, Any], field: str, file: Path, default: Any = None) -> int:
    """An integer field of a Hugging Face config (a square [n, n] pair counts as n)."""
    value = hf.get(field, default)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if value[0] != value[1]:
            raise ConversionError(f"{file}: non-square {field} {value} is not supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        shown = "missing" if field not in hf else f"{value!r}"
        raise ConversionError(f"{file}: {field} is {shown}; expected a positive integer")
    return value


def _hf_float(hf: dict[str, Any], field: str, file: Path, default: float) -> float:
    value = hf.get(field, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConversionError(f"{file}: {field}={value!r} must be a finite number")
    return float(value)


def _class_names(hf: dict[str, Any], file: Path) -> tuple[str, ...] | None:
    """Class names from id2label ({"0": "cat", ...}), or None for transformers' LABEL_i defaults."""
    id2label = hf.get("id2label") or {}
    if not isinstance(id2label, dict):
        raise ConversionError(f"{file}: id2label must be an object {{\"0\": \"name\", ...}}, "
                              f"not a {type(id2label).__name__}")
    bad = {k: v for k, v in id2label.items() if not isinstance(v, str)}
    if bad:
        raise ConversionError(f"{file}: id2label values must be strings, got {dict(list(bad.items())[:3])}")
    names = [id2label.get(str(i)) for i in range(len(id2label))]  # keys other than 0..n-1: no names
    return tuple(names) if names and all(n and not n.startswith("LABEL_") for n in names) else None


def _preprocessing(path: Path, channels: int) -> dict[str, tuple[float, ...]]:
    """mean/std from preprocessor_config.json, if present (a single number applies to every channel)."""
    file = path / "preprocessor_config.json"
    if not file.exists():
        return {}
    p = _read_json(file, "the image preprocessing settings")
    if "image_mean" not in p or "image_std" not in p:
        return {}
    out = {}
    for field, key in (("image_mean", "mean"), ("image_std", "std")):
        value = p[field]
        value = [value] * channels if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if (not isinstance(value, list) or len(value) != channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in value)):
            raise ConversionError(f"{file}: {field}={value!r} must be {channels} finite numbers "
                                  f"(one per input channel)")
        out[key] = tuple(float(v) for v in value)
    return out


def _fuse_qkv(state: dict[str, torch.Tensor], depth: int, source: str) -> None:
    """q, k, v -> timm's fused qkv, in that order (in place)."""
    for i in range(depth):
        for kind in ("weight", "bias"):
            names = [f"blocks.{i}.attn.{c}.{kind}" for c in "qkv"]
            present = [n for n in names if n in state]
            if not present:
                continue
            if len(present) != 3:
                raise ConversionError(f"{source}: layer {i} has attention {kind}(s) "
                                      f"{[n.split('.')[-2] for n in present]} but not all of query, key, value")
            shapes = {tuple(state[n].shape) for n in names}
            if len(shapes) != 1 or len(next(iter(shapes))) not in (1, 2):
                raise ConversionError(f"{source}: layer {i} query/key/value {kind}s have shapes {sorted(shapes)}; "
                                      f"expected three equal matrices (or vectors)")
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([state.pop(n) for n in names])


def from_hf(path: str | os.PathLike, base: ViTConfig | None = None, **known: Any) -> tuple[ViTConfig, dict]:
    """(config, timm-named state) from a Hugging Face ViT directory.

    Every size in config.json is checked against the weights before it is used."""
    path = Path(path)
    file = path / "config.json"
    if not file.exists():
        raise ModelFileError(f"{file} is missing: not a Hugging Face save_pretrained directory")
    hf = _read_json(file, "a Hugging Face save_pretrained directory holds config.json")
    if hf.get("model_type") != "vit":
        raise ConversionError(f"{file} has model_type={hf.get('model_type')!r}, expected 'vit'")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{file}: hidden_act={hf['hidden_act']!r} is not supported (vitlab uses exact GELU)")
    layers = _hf_int(hf, "num_hidden_layers", file)
    heads = _hf_int(hf, "num_attention_heads", file)
    raw = _read_hf_weights(path)
    raw = {k.removeprefix("vit."): v for k, v in raw.items()
           if not k.startswith(("pooler.", "vit.pooler.", "embeddings.mask_token", "vit.embeddings.mask_token"))}
    state = rename(raw, TABLE, str(path))
    depth = block_count(state)
    if depth != layers:
        raise ConversionError(f"{file} says num_hidden_layers={layers} but the weights hold {depth} layers")
    _fuse_qkv(state, depth, str(path))
    names = _class_names(hf, file)
    if names is not None:
        known.setdefault("class_names", names)
    channels = state["patch_embed.proj.weight"].shape[1] if state.get("patch_embed.proj.weight") is not None \
        and state["patch_embed.proj.weight"].ndim == 4 else _hf_int(hf, "num_channels", file, 3)
    for key, value in _preprocessing(path, channels).items():
        known.setdefault(key, value)
    known.setdefault("num_heads", heads)
    known.setdefault("norm_eps", _hf_float(hf, "layer_norm_eps", file, 1e-12))
    known.setdefault("drop_rate", _hf_float(hf, "hidden_dropout_prob", file, 0.0))
    known.setdefault("attn_drop_rate", _hf_float(hf, "attention_probs_dropout_prob", file, 0.0))
    cfg = infer_config(state, base=base, source=str(path), **known)
    for field, ours in (("hidden_size", cfg.embed_dim), ("patch_size", cfg.patch_size),
                        ("num_channels", cfg.in_chans), ("intermediate_size", cfg.mlp_hidden_dim)):
        if field in hf and _hf_int(hf, field, file) != ours:
            raise ConversionError(f"{file} says {field}={hf[field]} but the weights have {ours}")
    image_size = _hf_int(hf, "image_size", file, cfg.img_size)
    if cfg.img_size != image_size:
        raise ConversionError(f"{path}: config.json says image_size={image_size} but the position "
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
    atomic_write(out / "model.safetensors", lambda tmp: save_file(hf_state, tmp, metadata={"format": "pt"}))
    for name, doc in (("config.json", hf_config), ("preprocessor_config.json", processor)):
        atomic_write_text(out / name, json.dumps(doc, indent=2) + "\n")
    return out
