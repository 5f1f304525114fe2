"""Run settings as typed dataclass groups: data, model, augment, optim, train, runtime.

A recipe YAML file has one mapping per group; `--set group.key=value` overrides single fields,
parsed by the field's type. Unknown groups or keys, values of the wrong type and values out of
range (NaN and infinity included) are errors that name the key. Field docstrings are the
documentation of each setting (`vitlab train --help-recipe`; a test checks that every field has one).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# AugmentArgs is the sixth group; it is defined beside the batch ops it configures, so that data/
# never imports from engine/.
from ..data.augment import AugmentArgs
from ..errors import ConfigError
from ..layers import WEIGHT_INITS

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"


MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits; the loader mixes seeds as unsigned integers


def _finite_floats(obj: Any, group: str) -> list[str]:
    """Every float field of a settings group must be a finite number (NaN passes most `<` checks)."""
    return [f"{group}.{f.name}={getattr(obj, f.name)} must be a finite number" for f in dataclasses.fields(obj)
            if isinstance(getattr(obj, f.name), float) and not math.isfinite(getattr(obj, f.name))]


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class DataArgs:
    """Which images to train on, and how the validation split is carved."""
    name: str = "cifar10"
    """Dataset name (mnist, cifar10, cifar100) or the path of an image folder / IDX folder."""
    data_dir: str | None = None
    """Data root searched first (then $VITLAB_DATA, then ~/.cache/vitlab)."""
    val_size: float | None = None
    """Validation images carved from train: a count, or a fraction < 1 (default: 5000 for MNIST, CIFAR and IDX
    folders of over 25,000 training images, else 10%)."""
    val_fold: int = 0
    """Which validation split of that size to hold out: fold f takes the f-th disjoint share of each
    class (0, the default split, through the number of whole folds minus 1). Runs on folds 0, 1, 2...
    compare settings on several splits where one cannot resolve them (k-fold cross-validation)."""
    download: bool = True
    """Fetch a named dataset that is not on disk (official archives, checksum-verified)."""
    storage: str = "auto"
    """How an image folder is held: memory (decoded once, whole), stream (decoded batch by batch in
    worker processes, bounded memory), cache (decoded once into a file under data.cache_dir, reused
    by later runs), or auto (memory if it takes under a quarter of the available memory, else
    stream). Named datasets are always in memory. The batches, and so the results, are the same."""
    cache_dir: str | None = None
    """Where data.storage=cache keeps decoded images (default ~/.cache/vitlab/decoded)."""
    workers: int | None = None
    """Processes decoding image files (default: min(4, CPU count))."""

    def __post_init__(self) -> None:
        problems = _finite_floats(self, "data")
        if not self.name.strip():
            problems.append("data.name is empty: give a dataset name (mnist, cifar10, cifar100) or a folder")
        from ..data.stored import STORAGES
        if self.storage not in STORAGES:
            problems.append(f"data.storage={self.storage!r} must be one of {STORAGES}")
        if self.val_fold < 0:
            problems.append(f"data.val_fold={self.val_fold} must be >= 0")
        if self.workers is not None and self.workers < 1:
            problems.append(f"data.workers={self.workers} must be >= 1 or null")
        if self.cache_dir is not None and not self.cache_dir.strip():
            problems.append("data.cache_dir is empty: give a folder, or null for ~/.cache/vitlab/decoded")
        v = self.val_size
        if v is not None and not problems and not (v >= 0 and (v < 1 or v == int(v))):
            problems.append(f"data.val_size={v} must be a fraction in [0, 1) or a whole number of images")
        _raise_if(problems)


@dataclass(frozen=True)
class ModelArgs:
    """The architecture: a preset (or a pretrained model directory) and field overrides. Each field
    left at null keeps the preset's (or pretrained model's) value; see `vitlab models`."""
    preset: str = "vit_tiny_patch4_32"
    """Preset name (`vitlab models`) or variant ("S/16", "Ti/4@32")."""
    pretrained: str | None = None
    """Weights to start from (fine-tuning): a vitlab model directory, a Hugging Face ViT directory, or a timm
    or torchvision weights file; its head is replaced when classes differ."""
    img_size: int | None = None
    """Input side in pixels (image folders are decoded at this size; position embeddings resampled)."""
    patch_size: int | None = None
    """Patch side in pixels; must divide img_size."""
    embed_dim: int | None = None
    """Token width."""
    depth: int | None = None
    """Number of transformer blocks."""
    num_heads: int | None = None
    """Attention heads; must divide embed_dim."""
    mlp_ratio: float | None = None
    """MLP hidden width as a multiple of embed_dim."""
    pool: str | None = None
    """How the head reads the tokens: token (class token) or avg (mean of patch tokens)."""
    pos_embed: str | None = None
    """Position embedding: learn (a parameter) or sincos (fixed 2-D sin-cos)."""
    class_token: bool | None = None
    """Prepend a learnable class token."""
    drop_rate: float | None = None
    """Dropout after the position embedding, in the MLP and after the attention projection."""
    attn_drop_rate: float | None = None
    """Dropout on the attention probabilities."""
    drop_path_rate: float | None = None
    """Stochastic depth, rising linearly to this rate at the last block."""
    init_values: float | None = None
    """LayerScale initial value (e.g. 1e-4); null in the preset disables LayerScale."""
    patch_drop_rate: float | None = None
    """Training only: the fraction of each image's patch tokens dropped at random (PatchDropout,
    arXiv 2208.07220); the class token is kept and evaluation sees every token. 0 disables."""
    drop_path_skip: bool | None = None
    """Stochastic depth skips the computation for the samples it drops (DINOv2), with the same
    expectation as masking; true is faster at the same model.drop_path_rate."""
    conv_stem: list[int] | None = None
    """Channels of 3x3 conv + BatchNorm + ReLU layers before the patch projection, e.g. [32, 64]: a
    convolutional stem (arXiv 2106.14881) that learns far faster from scratch on small images; []
    is the plain linear patch embedding."""
    stem_full_res: int | None = None
    """How many of the first conv-stem layers keep the full input resolution (stride 1) before the
    halving ones, e.g. 1 with conv_stem [32, 64, 128]: 32x32 -> 32x32 -> 16x16 -> 8x8 on 32-px images."""
    weight_init: str = "trunc_normal"
    """Init of a from-scratch model's linear layers: trunc_normal (std 0.02, timm's default) or
    xavier (uniform, scaled by each layer's width; big_vision's plain ViT)."""

    def __post_init__(self) -> None:
        _raise_if(_finite_floats(self, "model"))
        stem = self.conv_stem
        if stem is not None and (not isinstance(stem, (list, tuple)) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in stem)):
            raise ConfigError(f"model.conv_stem={stem!r} must be a list of channel counts, e.g. [32, 64] "
                              f"([] for none)")
        if isinstance(stem, tuple):  # config.yaml holds a list: a tuple would not compare equal on resume
            object.__setattr__(self, "conv_stem", list(stem))
        if self.weight_init not in WEIGHT_INITS:
            raise ConfigError(f"model.weight_init={self.weight_init!r} must be one of {WEIGHT_INITS}")
        if self.pretrained and self.weight_init != "trunc_normal":
            raise ConfigError(f"model.weight_init={self.weight_init!r} has no effect with model.pretrained="
                              f"{self.pretrained!r} (the weights are loaded; a new head starts at zero)")

    def overrides(self) -> dict[str, Any]:
        skip = {"preset", "pretrained", "weight_init"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in skip and getattr(self, f.name) is not None}
        if "conv_stem" in out:
            out["conv_stem"] = tuple(out["conv_stem"])
        return out


FREEZE_MODES = ("none", "backbone")


@dataclass(frozen=True)
class OptimArgs:
    """AdamW with a linear-warmup + cosine learning-rate schedule."""
    lr: float = 1e-3
    """Peak learning rate for a global batch of `train.batch_size` (no automatic scaling)."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay; never applied to norms, biases, position embedding, class token."""
    beta1: float = 0.9
    """AdamW first-moment decay, in [0, 1)."""
    beta2: float = 0.999
    """AdamW second-moment decay, in [0, 1)."""
    warmup_epochs: float = 1.0
    """Linear warmup from 0 to lr over this many epochs (fractions allowed), capped at 10% of the
    run's optimizer steps so that a short run still reaches lr and decays (the cap is printed).
    Under train.time_budget: this many epochs of steps or 10% of the budget, whichever ends first."""
    min_lr: float = 0.0
    """Cosine decay ends here at the last step."""
    layer_decay: float | None = None
    """Layer-wise lr decay for fine-tuning (e.g. 0.75): block i gets lr * decay^(depth - i)."""
    clip_grad: float | None = 1.0
    """Clip the global gradient norm to this (null disables)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing, in [0, 1)."""
    freeze: str = "none"
    """none: every weight learns. backbone: only the classifier head learns (a linear probe); the
    backbone runs as in evaluation (no dropout, patch dropout or stochastic depth; BatchNorm keeps
    its statistics) and its gradients are never computed."""
    unfreeze_epoch: int | None = None
    """With optim.freeze=backbone: the epoch (counted from 0) from which the whole model learns, e.g.
    2 = a linear probe for two epochs, then full fine-tuning. null: frozen for the whole run."""

    def __post_init__(self) -> None:
        # Every check is written so that NaN fails it (`not x >= 0`, never `x < 0`).
        bad = _finite_floats(self, "optim")
        for key in ("lr", "min_lr", "weight_decay", "warmup_epochs"):
            if not getattr(self, key) >= 0:
                bad.append(f"optim.{key}={getattr(self, key)} must be >= 0")
        for key in ("beta1", "beta2", "label_smoothing"):
            if not 0 <= getattr(self, key) < 1:
                bad.append(f"optim.{key}={getattr(self, key)} must be in [0, 1)")
        if self.min_lr > self.lr:
            bad.append(f"optim.min_lr={self.min_lr} must be <= optim.lr={self.lr}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            bad.append(f"optim.layer_decay={self.layer_decay} must be in (0, 1]")
        if self.clip_grad is not None and not self.clip_grad > 0:
            bad.append(f"optim.clip_grad={self.clip_grad} must be > 0 or null")
        if self.freeze not in FREEZE_MODES:
            bad.append(f"optim.freeze={self.freeze!r} must be one of {FREEZE_MODES}")
        if self.unfreeze_epoch is not None:
            if self.freeze == "none":
                bad.append(f"optim.unfreeze_epoch={self.unfreeze_epoch} needs optim.freeze=backbone (nothing is "
                           f"frozen to unfreeze)")
            if self.unfreeze_epoch < 1:
                bad.append(f"optim.unfreeze_epoch={self.unfreeze_epoch} must be >= 1 (0 is optim.freeze=none)")
        _raise_if(bad)


@dataclass(frozen=True)
class TrainArgs:
    """How long to train, in what batches, and how often to evaluate, log and checkpoint."""
    epochs: int = 15
    """Passes over the training split (ignored under train.time_budget)."""
    batch_size: int = 128
    """Global batch per optimizer step, over all ranks and accumulation steps."""
    accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation)."""
    seed: int = 0
    """Seeds initialisation, shuffling, augmentation and dropout (0 .. 2**63-1)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights (e.g. 0.999); evaluated beside the raw model.
    Capped so that its horizon 1/(1-decay) is at most 10% of the run's optimizer steps (printed);
    under train.time_budget, of the steps estimated from those taken so far."""
    eval_every: int = 1
    """Evaluate on the validation split every this many epochs (and always after the last)."""
    log_every: int = 50
    """Write step metrics every this many optimizer steps."""
    ckpt_every: int = 200
    """Also checkpoint every this many optimizer steps mid-epoch (0: only at epoch ends)."""
    keep_last: int = 2
    """Checkpoints kept besides the best-on-validation one."""
    eval_batch_size: int = 500
    """Images per batch when evaluating (memory only; results do not depend on it)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps, the schedule ending there (fixed-budget comparisons);
    null: train.epochs full epochs."""
    test_at_end: bool = True
    """Evaluate the selected weights on the test split once at the end."""
    time_budget: float | None = None
    """Minutes of training: only the optimizer steps count, with their batches' augmentation (not
    evaluation, checkpoints, loading the dataset or the final test). The schedule (warmup, cosine decay, resolution stages) and the end of the run
    follow the fraction of the budget used; train.epochs is then ignored (passes over the data go on
    until the budget ends, mid-epoch if so; eval_every still counts passes) and train.max_steps must
    be null. A resumed run continues the budget from the checkpoint's training seconds (on time, but
    not bit-identical: step times differ). null: train.epochs."""
    resolution_schedule: str | None = None
    """Progressive resolution: "SIZE:FRACTION,..." in order, e.g. "16:0.4,24:0.3,32:0.3" trains the
    first 40% of the run at 16 px; fractions sum to 1 and the last size is the model's img_size.
    Evaluation is always at full size. null: full size throughout."""

    def __post_init__(self) -> None:
        bad = [f"train.{k}={getattr(self, k)} must be >= {low}" for k, low in
               (("epochs", 1), ("batch_size", 1), ("accum_steps", 1), ("eval_every", 1), ("log_every", 1),
                ("ckpt_every", 0), ("keep_last", 1), ("eval_batch_size", 1)) if getattr(self, k) < low]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"train.max_steps={self.max_steps} must be >= 1 or null")
        if not 0 <= self.seed <= MAX_SEED:
            bad.append(f"train.seed={self.seed} must be in [0, 2**63-1]")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            bad.append(f"train.ema_decay={self.ema_decay} must be in (0, 1) or null")
        if self.time_budget is not None:
            if not (math.isfinite(self.time_budget) and self.time_budget > 0):
                bad.append(f"train.time_budget={self.time_budget} must be a finite number of minutes > 0 or null")
            if self.max_steps is not None:
                bad.append(f"train.time_budget={self.time_budget} and train.max_steps={self.max_steps} both set "
                           f"the run's length; keep one")
        if self.resolution_schedule is not None:
            try:
                parse_resolution_schedule(self.resolution_schedule)
            except ConfigError as e:
                bad.append(str(e))
        _raise_if(bad)

    @property
    def resolution_stages(self) -> tuple[tuple[int, float], ...]:
        """train.resolution_schedule parsed: ((side, fraction), ...), or () without one."""
        return parse_resolution_schedule(self.resolution_schedule) if self.resolution_schedule else ()


def parse_resolution_schedule(text: str) -> tuple[tuple[int, float], ...]:
    """"16:0.4,24:0.3,32:0.3" -> ((16, 0.4), (24, 0.3), (32, 0.3)): (side in pixels, fraction of the
    run) in order. Sizes are positive integers, fractions > 0 summing to 1 (within 1e-6). Whether the
    sizes fit the model (multiples of patch_size, the last one img_size) is checked with the model."""
    key = f"train.resolution_schedule={text!r}"
    stages = []
    for part in text.split(","):
        size, sep, frac = part.strip().partition(":")
        try:
            stage = (int(size), float(frac))
        except ValueError:
            stage = None
        if not sep or stage is None:
            raise ConfigError(f"{key}: stage {part.strip()!r} is not SIZE:FRACTION (e.g. \"16:0.4,32:0.6\")")
        if not (stage[0] > 0 and math.isfinite(stage[1]) and stage[1] > 0):
            raise ConfigError(f"{key}: stage {part.strip()!r} needs a size > 0 and a fraction > 0")
        stages.append(stage)
    total = math.fsum(f for _, f in stages)
    if not abs(total - 1) <= 1e-6:
        raise ConfigError(f"{key}: the fractions sum to {total:.6g}, not 1")
    return tuple(stages)


@dataclass(frozen=True)
class RuntimeArgs:
    """Where and how the run executes; a resumed run may change these (precision must resolve the same)."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu, cuda, cuda:N."""
    precision: str = "auto"
    """auto (bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32), fp32, bf16, fp16."""
    compile: bool = False
    """torch.compile the model (pays off on long GPU runs; costs a minute of warm-up on CPU)."""
    threads: int | None = None
    """CPU threads for torch. null: torch's choice, at most the CPUs a container's CPU quota allows, shared by
    torchrun's ranks on one machine (engine.runtime.fit_threads)."""
    attn_impl: str = "auto"
    """Attention kernel: auto, sdpa, math."""
    stem_layout: str = "auto"
    """Memory layout of the conv stem's input: auto (timed at run start: channels_last unless
    contiguous is 10% faster), channels_last, contiguous. No effect without a stem or on 1-channel images."""
    cudnn_attention: bool = False
    """Let SDPA use cuDNN's attention kernels on CUDA (off: flash / memory-efficient attention instead;
    cuDNN's bf16 backward gave NaN gradients in 6 of 15 CIFAR-10 runs on an H100, torch 2.11)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        from .runtime import check_runtime_settings  # the device/precision names live with the runtime
        check_runtime_settings(self.device, self.precision, self.threads, self.attn_impl, self.stem_layout)


@dataclass(frozen=True)
class RunConfig:
    """All settings of a run; saved as RUN/config.yaml and inside every checkpoint."""
    data: DataArgs = field(default_factory=DataArgs)
    model: ModelArgs = field(default_factory=ModelArgs)
    augment: AugmentArgs = field(default_factory=AugmentArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)

    def __post_init__(self) -> None:
        o, t = self.optim, self.train
        if o.unfreeze_epoch is not None and t.time_budget is None and o.unfreeze_epoch >= t.epochs:
            raise ConfigError(f"optim.unfreeze_epoch={o.unfreeze_epoch} is not before the end of the run "
                              f"(train.epochs={t.epochs}): the backbone would never learn; use optim.unfreeze_epoch"
                              f"=null for a linear probe")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
        groups = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(groups))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; sections are {sorted(groups)}")
        built = {}
        for name, f in groups.items():
            group_cls = f.default_factory
            values = d.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping")
            known = {g.name: g for g in dataclasses.fields(group_cls)}
            bad = sorted(set(values) - set(known))
            if bad:
                raise ConfigError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in bad]}; "
                                  f"{name} has {sorted(known)}")
            hints = typing.get_type_hints(group_cls)
            kwargs = {k: _coerce(v, hints[k], f"{name}.{k}", source) for k, v in values.items()}
            built[name] = group_cls(**kwargs)
        return cls(**built)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and gently convert: int -> float, "1e-3" -> float) a value against a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key} cannot be {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # range checks (NaN and infinity included) are the setting group's
                return float(value)
            except (ValueError, OverflowError):
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    if value is None:  # a recipe that leaves a required setting to the user (e.g. finetune's data.name)
        raise ConfigError(f"{source}: {key} is not set; give it with --set {key}=...")
    raise ConfigError(f"{source}: {key} must be {name}, got {value!r} ({type(value).__name__})")


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """["optim.lr=1e-3", "train.epochs=3"] -> {"optim": {"lr": 0.001}, "train": {"epochs": 3}}.
    Values are read as YAML scalars (numbers, true/false, null, strings)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. optim.lr=1e-3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: an int of > 4300 digits
            value = raw
        if isinstance(value, str):
            try:  # YAML reads 1e-3 as a string; Python's literal parser reads it as a float
                value = ast.literal_eval(value)
            except Exception:  # SyntaxError, ValueError, TypeError ({[]: 1}), RecursionError, ...
                pass  # left a string: the setting's type check names it
        out.setdefault(section, {})[name] = value
    return out


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise ConfigError(f"unknown recipe {name_or_path!r}: not a .yaml file and not one of {names}")


def read_settings_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a recipe or RUN/config.yaml (not yet checked against the setting groups)."""
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an int of > 4300 digits
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(d).__name__}")
    return d


def merge_sets(d: dict[str, Any], sets: list[str] | None, source: str) -> RunConfig:
    """Settings mapping `d` (from `source`) with `--set` overrides applied, checked and typed.
    The one place where --set meets a file: fresh runs and resumed runs both come through here."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for section, values in parse_set(sets or []).items():
        if d.get(section) is None:
            d[section] = {}
        if not isinstance(d[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        d[section].update(values)
    return RunConfig.from_dict(d, f"{source} + --set" if sets else source)


def load_run_config(recipe: str | None, sets: list[str] | None = None) -> RunConfig:
    """A recipe (name or path; None for the defaults) with `--set` overrides applied.

    A recipe may list settings the user must give (`required: [model.pretrained, data.name]`, e.g.
    the finetune recipe): a run without them is refused, naming the --set to add."""
    if not recipe:
        return merge_sets({}, sets, "defaults")
    path = recipe_path(recipe)
    d = read_settings_file(path)
    required = d.pop("required", None) or []
    if not isinstance(required, list) or not all(isinstance(k, str) and k.count(".") == 1 for k in required):
        raise ConfigError(f"{path}: required must be a list of SECTION.KEY names, got {required!r}")
    given = {f"{section}.{key}" for section, values in parse_set(sets or []).items() for key in values}
    def in_recipe(key: str) -> Any:
        section, name = key.split(".")
        values = d.get(section)
        return values.get(name) if isinstance(values, dict) else None  # a bad section: merge_sets names it
    missing = [k for k in required if k not in given and in_recipe(k) is None]
    if missing:
        raise ConfigError(f"{path.stem} needs " + " and ".join(f"--set {k}=..." for k in missing))
    return merge_sets(d, sets, str(path))


def describe_settings() -> str:
    """Every setting with its type, default and docstring (for `vitlab train --help-recipe`)."""
    lines = []
    for group in dataclasses.fields(RunConfig):
        cls = group.default_factory
        lines.append(f"{group.name}:  # {' '.join((cls.__doc__ or '').split())}")
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            lines.append(f"  {f.name}: {default!r}" + (f"  # {docs[f.name]}" if f.name in docs else ""))
    return "\n".join(lines)


def _field_docs(cls) -> dict[str, str]:
    """Field docstrings: the string literal right after each annotated assignment."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
