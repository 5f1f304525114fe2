"""Model directories: `config.json` (the ViTConfig) + `model.safetensors` (timm-named weights).

Both files are written to temporary names and renamed into place, so an interrupted save never
leaves a half-written file where a good one was. Each save also writes one random id into both
files (config.json "save", the safetensors metadata "vitlab_save"), so a pair that does not belong
together (a save stopped between its two renames, or a file copied in from another model) is
refused on loading instead of running the weights under the wrong classes or preprocessing.
Loading never unpickles: safetensors for our own files, `torch.load(weights_only=True)` for
foreign `.pth` files. Loading trusts no size in config.json: the config is checked against the
weights file's header (shapes only, no data) before the model is built, so a config that says
depth=10**9 fails at once.
"""
from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import ViTConfig
from ..errors import ConfigError, ModelFileError
from ..model import VisionTransformer
from ..pos_embed import resample_pos_embed
from ..util import atomic_write, atomic_write_text, printable, unwrap_model, why_unloadable

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "vitlab.model/1"
MAX_CONFIG_BYTES = 64 << 20  # a config with a million class names is ~20 MB
FLOAT_DTYPES = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}


def save_model(model: VisionTransformer, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write `model` to directory `path` (created if needed); returns the directory.

    `extra` (JSON-serialisable, e.g. measured metrics) is stored beside the config in config.json.
    Accepts DDP- or torch.compile-wrapped models and saves the module underneath. Files get the
    mode a plain `open()` would give them (the umask applies).
    """
    model = unwrap_model(model)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"save_model expects a vitlab VisionTransformer, got {type(model).__name__}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ModelFileError(f"{out} exists and is not a directory; a model is saved as a directory")
    # Serialise everything before writing anything: a bad `extra` must not leave new weights
    # beside the old config.
    save_id = uuid.uuid4().hex
    doc = {"format": FORMAT, "save": save_id, "config": model.config.to_dict(),
           **({"extra": extra} if extra else {})}
    try:
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ConfigError(f"save_model: extra={extra!r} is not plain JSON ({e})") from None
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    # Weights first: a config.json only ever sits beside weights that were fully written.
    atomic_write(out / WEIGHTS_NAME,
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt", "vitlab_save": save_id}))
    atomic_write_text(out / CONFIG_NAME, text)
    return out


def _regular_file(file: Path, what: str) -> Path:
    """`file` if it is a regular file (after symlinks); a clear error for missing files, folders,
    devices (a link to /dev/zero) and FIFOs, which would otherwise be read forever."""
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise ModelFileError(f"{file} is missing; {what}") from None
    except OSError as e:
        raise ModelFileError(f"{file} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise ModelFileError(f"{file} is {kind}; {what}")
    return file


def read_config(path: str | os.PathLike) -> tuple[ViTConfig, dict[str, Any]]:
    """The ViTConfig and the `extra` record stored in a model directory."""
    cfg, extra, _ = read_model_config(path)
    return cfg, extra


NO_ID = object()  # config.json without a "save" key: written before save ids existed


def read_model_config(path: str | os.PathLike) -> tuple[ViTConfig, dict[str, Any], Any]:
    """(ViTConfig, `extra` record, save id) of a model directory, from one read of config.json. The
    save id is a string, None (`"save": null`: the pairing check is turned off by hand) or NO_ID."""
    file = Path(path) / CONFIG_NAME
    if not Path(path).is_dir():
        raise ModelFileError(f"{path} is not a model directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    _regular_file(file, f"a model directory holds {CONFIG_NAME} + {WEIGHTS_NAME}")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{file} is {file.stat().st_size:,} bytes, more than a model config can be "
                             f"({MAX_CONFIG_BYTES:,}); it is not a vitlab config")
    try:
        doc = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelFileError(f"{file} is not valid JSON ({str(e)[:120]}); the file is truncated or "
                             f"corrupted") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "config" not in doc:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ModelFileError(f"{file} is not a vitlab model config (format {found!r}, expected {FORMAT!r})")
    extra = doc.get("extra", {})
    if not isinstance(extra, dict):
        raise ModelFileError(f"{file}: 'extra' must be a mapping, got {type(extra).__name__}")
    save_id = doc.get("save", NO_ID)
    if not (save_id is NO_ID or save_id is None or _is_save_id(save_id)):
        raise ModelFileError(f"{file}: 'save' must be a save id (32 hex digits) or null, got "
                             f"{printable(repr(save_id)[:60])}")
    try:
        return ViTConfig.from_dict(doc["config"]), extra, save_id
    except (ConfigError, TypeError) as e:
        raise ModelFileError(f"{file} holds an invalid config: {e}") from None


def _is_save_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def check_same_save(config_id: Any, weights_id: str | None, config: Path, weights: Path) -> None:
    """ModelFileError unless config.json (save id `config_id`, from read_model_config) and the weights
    (`weights_id`, from read_header) were written by the same save. A directory from before the ids
    has neither; `"save": null` in config.json turns the check off by hand."""
    if config_id is None or (config_id is NO_ID and weights_id is None):
        return
    if weights_id == config_id:
        return
    raise ModelFileError(f"{weights} ({_shown(weights_id)}) and {config} ({_shown(config_id)}) were not written by "
                         f"the same save: a save was interrupted between the two files, or one was copied from "
                         f"another model. Save the model again from its source, or, if you know the two belong "
                         f'together, set "save": null in {CONFIG_NAME}')


def read_model_dir(path: str | os.PathLike) -> tuple[ViTConfig, dict[str, tuple[int, ...]]]:
    """(ViTConfig, {key: shape} of its weights) of model directory `path`, from config.json and the
    weights' header alone, once the two are known to come from the same save (check_same_save)."""
    cfg, _, config_id = read_model_config(path)
    weights = Path(path) / WEIGHTS_NAME
    shapes, weights_id = read_header(weights)
    check_same_save(config_id, weights_id, Path(path) / CONFIG_NAME, weights)
    return cfg, shapes


def _shown(save_id: Any) -> str:
    return "no save id" if save_id is None or save_id is NO_ID else f"save {printable(str(save_id)[:40])}"


def read_shapes(file: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a .safetensors file from its header alone (no tensor data is read)."""
    return read_header(file)[0]


def read_header(file: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """({key: shape}, vitlab save id or None) of a .safetensors file, from its header alone."""
    file = _regular_file(Path(file), "the weights file is needed")
    if file.stat().st_size == 0:
        raise ModelFileError(f"{file} is empty (0 bytes)")
    try:
        with safe_open(file, "pt") as f:
            shapes, dtypes = {}, {}
            for key in f.keys():
                piece = f.get_slice(key)
                shapes[key], dtypes[key] = tuple(piece.get_shape()), piece.get_dtype()
            save_id = (f.metadata() or {}).get("vitlab_save")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{file} cannot be read as safetensors ({e}); the file is truncated "
                             f"or corrupted") from None
    odd = {k: d for k, d in dtypes.items() if d not in FLOAT_DTYPES}
    if odd:
        raise ModelFileError(f"{file} holds non-float tensors {dict(list(odd.items())[:3])}; model weights "
                             f"are float")
    return shapes, save_id


def check_shapes(cfg: ViTConfig, shapes: dict[str, tuple[int, ...]], source: str,
                 resample_pos: bool = False) -> None:
    """Raise ModelFileError unless `shapes` (a weights file's {key: shape}) are exactly the tensors
    of a model built from `cfg`. Cheap, so it runs before the model is built: a config that lies
    about its sizes fails here instead of allocating. With `resample_pos`, a learned position
    embedding may be for another patch grid (load_state_into resamples it)."""
    want = cfg.state_shapes()
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want]
    wrong = []
    for k in want:
        if k not in shapes or shapes[k] == want[k]:
            continue
        if k == "pos_embed" and resample_pos and len(shapes[k]) == 3 and shapes[k][0] == 1 \
                and shapes[k][2] == want[k][2] and shapes[k][1] > cfg.num_prefix_tokens:
            continue
        wrong.append(f"{k}: file {shapes[k]} vs config {want[k]}")
    if missing or unexpected or wrong:
        raise ModelFileError(f"{source} does not match the config: {_mismatch(missing, unexpected, wrong)} "
                             f"(config: depth={cfg.depth}, embed_dim={cfg.embed_dim}, img_size={cfg.img_size})")


def _mismatch(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}")
    if wrong:
        parts.append(f"shape mismatch {wrong[:3]}")
    return "; ".join(parts)


def read_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a .pth/.pt/.bin state dict, without running pickled code."""
    file = _regular_file(Path(file), "pass a weights file (.safetensors, .pth, .pt or .bin)")
    if file.stat().st_size == 0:
        raise ModelFileError(f"{file} is empty (0 bytes)")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{file} cannot be read as safetensors ({e}); the file is truncated "
                                 f"or corrupted") from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; all mean the same here
        raise ModelFileError(f"{file} cannot be read as a weights-only PyTorch checkpoint ({why_unloadable(e)})") from None
    for key in ("state_dict", "model", "model_state"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise ModelFileError(f"{file} does not hold a state dict of tensors (names -> tensors)")
    odd = {k: str(v.dtype) for k, v in obj.items() if not v.is_floating_point()}
    if odd:
        raise ModelFileError(f"{file} holds non-float tensors {dict(list(odd.items())[:3])}; model weights "
                             f"are float")
    return obj


def load_state_into(model: VisionTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Load timm-named `state` into `model` strictly, resampling the position embedding to the
    model's patch grid when the checkpoint was trained at another resolution."""
    cfg = model.config
    pos = state.get("pos_embed")
    if pos is not None and isinstance(model.pos_embed, torch.nn.Parameter) and pos.shape != model.pos_embed.shape:
        state = {**state, "pos_embed": resample_pos_embed(pos, cfg.grid_size, cfg.num_prefix_tokens)}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ModelFileError(f"{source} does not match the config: {_mismatch(missing, unexpected, wrong)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a run that diverged, or a damaged file: it would predict NaN for every image
        raise ModelFileError(f"{source} has NaN or infinite values in {len(bad)} tensor(s): "
                             f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")
    model.load_state_dict(state, strict=True)


def load_model(path: str | os.PathLike, img_size: int | None = None, attn_impl: str = "auto",
               **overrides: Any) -> VisionTransformer:
    """Rebuild the exact model saved in directory `path`, in eval mode (call `.train()` to train it).

    `img_size` runs the weights at another resolution (learned position embeddings are resampled
    to the new patch grid); other keyword arguments override config fields that do not change
    the weights' shapes (e.g. `drop_path_rate`).
    """
    cfg, shapes = read_model_dir(path)
    weights = Path(path) / WEIGHTS_NAME
    check_shapes(cfg, shapes, str(weights))  # before anything is built: sizes come from the file
    if img_size is not None:
        overrides["img_size"] = img_size
    if overrides:
        cfg = cfg.replace(**overrides)
        check_shapes(cfg, shapes, f"{weights} (with overrides {overrides})", resample_pos=True)
    model = VisionTransformer(cfg, attn_impl=attn_impl)
    load_state_into(model, read_state_dict(weights), str(weights))
    return model.eval()


def dataset_record(extra: dict[str, Any] | None, source: str = "config.json") -> dict[str, Any]:
    """What a model directory's config.json `extra` says it was trained on (name, data_dir,
    val_size, val_fold); values of the wrong type are dropped (the file is untrusted), but a bad
    val_fold is a ConfigError."""
    record = extra.get("dataset") if isinstance(extra, dict) else None
    record = record if isinstance(record, dict) else {}
    fold = record.get("val_fold", 0)
    if not (isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0):
        # not dropped: fold 0 in its place would count images the model trained on as validation
        raise ConfigError(f"{source} records the validation fold as {fold!r:.40}, not a whole number >= 0; give "
                          f"--data NAME_OR_FOLDER to evaluate on a dataset's default split")
    return {k: v for k, v in record.items()
            if (k in ("name", "data_dir") and isinstance(v, str))
            or (k == "val_size" and isinstance(v, (int, float)) and not isinstance(v, bool)) or k == "val_fold"}


def recorded_dataset(model_dir: str | os.PathLike, model: VisionTransformer, split: str = "test",
                     data_dir: str | os.PathLike | None = None, name: str | None = None):
    """The `split` of the dataset a model directory records, decoded for `model` (an ImageSet), or
    of dataset `name` when given (then the recorded data_dir, val_size and val_fold do not apply). `data_dir`
    is searched first. Raises ConfigError (no record; classes that do not match the model's) and
    the data errors of vitlab.data.load_dataset."""
    from ..data import load_dataset
    _, extra = read_config(model_dir)
    record = {} if name else dataset_record(extra, f"{Path(model_dir) / 'config.json'}")
    name = name or record.get("name")
    if not name:
        raise ConfigError(f"{model_dir} does not record its dataset; give --data NAME_OR_FOLDER")
    cfg = model.config
    data = load_dataset(name, split, data_dir=data_dir or record.get("data_dir"), val_size=record.get("val_size"),
                        val_fold=record.get("val_fold", 0), image_size=cfg.img_size, channels=cfg.in_chans)
    if cfg.class_names and list(cfg.class_names) != data.classes:
        raise ConfigError(f"{name} has classes {data.classes[:5]}... but the model predicts "
                          f"{list(cfg.class_names)[:5]}...")
    if len(data.classes) != cfg.num_classes:
        raise ConfigError(f"{name} has {len(data.classes)} classes but the model has {cfg.num_classes} outputs")
    return data
