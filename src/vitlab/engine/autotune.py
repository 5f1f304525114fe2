"""Attention kernel, precision and the conv stem's input layout, timed on the machine at hand
(issue 9, item 1).

`auto` used to mean fixed rules: bf16 wherever the hardware has bf16 units, and the explicit
attention kernel under bf16 on CPU up to a token count measured on one machine
(model.pick_attn_impl). Machines differ too much for that (the same step runs 2x apart between
CPUs of one class), so here the candidates are timed instead, on the run's real shapes: one
transformer block built from the model's config, forward + backward on a (b, N, D) input, for
attention in {sdpa, math} x the precisions this device can run. The fastest median wins. A model
with a conv stem then has its patch embedding timed under the chosen precision with the input in
each of model.STEM_LAYOUTS (channels-last trains the cifar10 recipe's model 1.2x faster in bf16 on
an AMX Xeon; benchmarks/stem_layout.py). A 1-channel image is both layouts at once: not timed.

An explicit setting always wins (runtime.precision / runtime.attn_impl / runtime.stem_layout other than auto); only
what is auto is measured. The answer is cached per process and on disk (a JSON file in the user
cache dir), keyed by the machine (CPU model and capability, GPU, torch, threads) and the shape. A
measurement taken while other processes kept this one's threads waiting for a CPU (BUSY_WAIT_SHARE) serves
its run but is not cached, so the next run times again.
Under torchrun rank 0 measures (or reads the cache) and broadcasts, so every rank computes alike.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ViTConfig
from ..limits import affinity_cpus, cpu_quota
from ..model import ATTN_IMPLS, STEM_LAYOUTS, PatchEmbed, VisionTransformer, pick_attn_impl
from ..util import atomic_write_text
from ..util import cache_root as cache_dir  # one rule for every vitlab cache
from .runtime import (PRECISIONS, Runtime, broadcast_ints, check_runtime_settings, cpu_model, fast_bf16_available,
                      on_main, resolve_precision)

SOURCES = ("measured", "cache", "explicit", "resumed")
CACHE_FILE = "autotune.json"
# One timed trial's work (forward + backward FLOPs): ~10-20 ms on a 2-core CPU, well above timer
# noise; the trial batch b is derived from it and capped by the run's micro-batch.
TRIAL_FLOPS = {"cpu": 1e9, "cuda": 1e12}
# The stem's trial is larger: the layouts' gap shrinks at tiny batches (the cifar10 recipe's stem, bf16, AMX
# Xeon: contiguous takes 1.14x channels-last's time at 4 images, 1.32x at 32, 1.38x at 64); ~27 images there.
STEM_TRIAL_FLOPS = {"cpu": 1e10, "cuda": 1e12}
BUDGET_S = 0.3  # timed rounds after the warm-up, all candidates together (at least one round)
MAX_ROUNDS = 5
# The stem's trials are short and noisy: the mnist recipe's stem (1 channel, so both "layouts" ran the same
# computation; bf16, AMX Xeon) gave time ratios of 0.87-1.22 from 5-round medians and 0.97-1.07 from 12-round
# ones, so it gets more rounds.
STEM_BUDGET_S, STEM_MAX_ROUNDS = 1.0, 12

BUSY_WAIT_SHARE = 0.2
"""A measurement during which this process's threads spent more than this share of their time runnable
but waiting for a CPU (taken by other processes) is not cached. Timed beside two training runs
(session 23, 2-core EPYC), the cifar10 recipe's block ran 4x slower in bf16 than in fp32, where it runs 2x
faster on the idle machine; that cached entry sent the next runs to fp32, at ~0.4x their speed."""

_MEMO: dict[str, dict[str, Any]] = {}  # this process's answers, by cache key, as written to disk (none timed busy)


def recorded_share(value: Any) -> float | None:
    """A wait share (wait_share()) as read back from a record: a number (not a boolean), else None (unknown)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_busy(share: Any) -> bool:
    """Whether a recorded wait share says the timing ran on a busy CPU: above BUSY_WAIT_SHARE. Unknown
    (recorded_share() None) is trusted, as before the load was recorded."""
    share = recorded_share(share)
    return share is not None and share > BUSY_WAIT_SHARE


@dataclass(frozen=True)
class Choice:
    """The precision, attention kernel and stem input layout a run uses, and how they were chosen."""
    precision: str
    attn_impl: str
    source: str  # measured | cache | explicit | resumed
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # "fp32/sdpa" -> median ms
    shape: dict[str, int] = field(default_factory=dict, compare=False)  # what was timed
    stem_layout: str = STEM_LAYOUTS[0]  # timings "stem/channels_last" etc. where it was measured
    wait_share: float | None = field(default=None, compare=False)  # while timing (wait_share()); None: not known

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def busy(self) -> bool:
        """Timed while its threads waited for a CPU (BUSY_WAIT_SHARE): not cached, in this process or on disk."""
        return is_busy(self.wait_share)



def precision_candidates(device: torch.device) -> list[str]:
    """fp32 first (the tie-breaker), then the low precision this device runs natively.

    On CPU bf16 is a candidate only where fast_bf16_available: elsewhere autocast emulates it and
    it trains 2-4x slower than fp32, so timing it would spend most of the budget on a sure loser
    and would never pick it. fp16 stays CUDA-only (GPUs without bf16)."""
    if device.type == "cuda":
        return ["fp32", "bf16" if fast_bf16_available("cuda") else "fp16"]
    return ["fp32", "bf16"] if fast_bf16_available(device.type) else ["fp32"]


def train_tokens(cfg: ViTConfig) -> int:
    """Tokens per image during training: patch dropout (when the config has it) keeps
    max(1, round(patches * (1 - rate))) patch tokens and every prefix token (layers.PatchDropout)."""
    rate = getattr(cfg, "patch_drop_rate", 0.0) or 0.0
    kept = max(1, round(cfg.num_patches * (1 - rate))) if rate else cfg.num_patches
    return cfg.num_prefix_tokens + kept


def block_flops(N: int, D: int, hidden: int) -> float:
    """Forward + backward FLOPs of one block per sample: qkv + proj (4 D^2), MLP (2 D hidden) and the
    two attention matmuls (2 N D each) per token, x2 for multiply-add, x3 for the backward."""
    return 3 * 2 * N * (4 * D * D + 2 * D * hidden + 2 * N * D)


def layout_matters(cfg: ViTConfig) -> bool:
    """Whether the stem's input layout changes any computation: a conv stem on more than one channel
    (a (B, 1, H, W) image is channels-last and contiguous at once)."""
    return bool(cfg.conv_stem) and cfg.in_chans > 1


def stem_flops(cfg: ViTConfig) -> float:
    """Forward + backward FLOPs of the patch embedding (conv stem + projection) per image."""
    total, channels, side = 0.0, cfg.in_chans, cfg.img_size
    for width, stride in zip(cfg.conv_stem, cfg.stem_strides):
        side = -(-side // stride)  # 3x3 conv, padding 1
        total += 2 * channels * width * 9 * side * side
        channels = width
    total += 2 * channels * cfg.embed_dim * cfg.proj_size**2 * cfg.num_patches
    return 3 * total


def cache_key(cfg: ViTConfig, batch: int, device: torch.device, precisions: list[str],
              attns: list[str], stem_auto: bool = False) -> tuple[str, dict[str, int]]:
    """(the key, the timed shape). The batch enters as its power-of-two bucket. With `stem_auto`
    the stem's shapes enter the key too, and its trial batch the shape."""
    N, D, hidden = train_tokens(cfg), cfg.embed_dim, cfg.mlp_hidden_dim
    bucket = 1 << (max(1, batch).bit_length() - 1)
    b = int(max(1, min(bucket, TRIAL_FLOPS.get(device.type, 1e9) // block_flops(N, D, hidden))))
    stem = ""
    shape = {"tokens": N, "width": D, "heads": cfg.num_heads, "mlp": hidden, "trial_batch": b}
    if stem_auto:
        stem = (f"|stem {','.join(map(str, cfg.conv_stem))} strides {','.join(map(str, cfg.stem_strides))} "
                f"proj {cfg.proj_size} img {cfg.in_chans}x{cfg.img_size} layout {','.join(STEM_LAYOUTS)}")
        shape["stem_trial_batch"] = int(max(1, min(bucket, STEM_TRIAL_FLOPS.get(device.type, 1e10) // stem_flops(cfg))))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    key = "|".join([cpu_model(), torch.backends.cpu.get_cpu_capability(), gpu, f"torch {torch.__version__}",
                    f"threads {torch.get_num_threads()}", device.type,
                    f"N{N} D{D} H{cfg.num_heads} mlp{hidden} batch{bucket}",
                    # what else changes a block's kernels: SDPA with dropout_p > 0 is another kernel
                    f"attn_drop {cfg.attn_drop_rate:g} drop {cfg.drop_rate:g} qkv_bias {int(cfg.qkv_bias)} "
                    f"layerscale {int(bool(cfg.init_values))}",
                    f"precision {','.join(precisions)} attn {','.join(attns)}"]) + stem
    return key, shape


# ---- measuring ------------------------------------------------------------------------------
def runqueue_waits() -> dict[str, int] | None:
    """Nanoseconds each of this process's threads has spent runnable but waiting for a CPU, by thread
    id (Linux: /proc/self/task/TID/schedstat, second field). It also counts time held back by a CPU quota.
    None where the kernel does not report it."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    waits = {}
    for tid in tasks:
        try:
            waits[tid] = int((Path("/proc/self/task") / tid / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just ended; no schedstat in this kernel
            continue
    return waits or None


def wait_share(start: dict[str, int] | None, wall_start: float, device: torch.device) -> float | None:
    """The share of the time since `wall_start` that this process's torch threads spent waiting for a
    CPU, from runqueue_waits() then (`start`) and now: ~0 on an idle machine (0.005 measured on the 2-core
    EPYC), ~0.5 with one competitor per core. None where it cannot say: not a CPU device, no schedstat,
    a thread that ended meanwhile (its wait left the sum), or more torch threads than CPUs to run them
    (its affinity) or than a CPU quota allows (1.5 CPUs for 2 threads): they would wait for each
    other, or for the quota's next period, and read as busy on an idle machine."""
    end, wall = runqueue_waits(), time.perf_counter() - wall_start
    threads = torch.get_num_threads()
    quota = cpu_quota()  # unrounded: it also covers usable_cpus()' rounded quota
    if device.type != "cpu" or start is None or end is None or wall <= 0 or threads > affinity_cpus() \
            or (quota is not None and threads > quota) or any(tid not in end for tid in start):
        return None
    waited_ns = sum(ns - start.get(tid, 0) for tid, ns in end.items())  # a thread started meanwhile: all of it
    return round(max(0, waited_ns) / 1e9 / (wall * threads), 3)


def trial_seconds(block: nn.Module, x: torch.Tensor, precision: str) -> float:
    """One forward + backward of `block` on `x` under `precision`, in seconds."""
    device = x.device
    block.zero_grad(set_to_none=True)
    x.grad = None  # (no-op for an input without gradient)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    with Runtime(device, precision).autocast():
        out = block(x)
    out.backward(torch.ones_like(out))
    sync()
    return time.perf_counter() - t


def forked_rng(device: torch.device):
    """The global RNG state (and the GPU's, for a CUDA device), put back on exit: whether a run
    measured or read the cache must not change what it computes."""
    return torch.random.fork_rng(devices=[device.index if device.index is not None else torch.cuda.current_device()]
                                 if device.type == "cuda" else [])


def in_turns(trials: dict[str, Any], device: torch.device, budget_s: float = BUDGET_S,
             max_rounds: int = MAX_ROUNDS) -> dict[str, float]:
    """Median seconds of each trial (a function that runs once and returns its seconds), by name.

    The trials take turns, round after round, so that load from elsewhere hits them alike. One
    warm-up round (oneDNN / cuBLAS set-up; a process's first LayerNorm backward alone takes ~0.4 s on
    CPU, which its first training step would pay anyway), then rounds until `budget_s` is spent (1 to
    `max_rounds`), under forked_rng (a trial with dropout draws random numbers)."""
    with forked_rng(device):
        times: dict[str, list[float]] = {name: [] for name in trials}

        def one_round() -> float:
            for name, trial in trials.items():
                times[name].append(trial())
            return sum(v[-1] for v in times.values())

        one_round()  # warm-up
        for v in times.values():
            v.clear()
        rounds = max(1, min(max_rounds, int(budget_s / max(one_round(), 1e-9))))
        for _ in range(rounds - 1):
            one_round()
    return {k: statistics.median(v) for k, v in times.items()}


def measure(cfg: ViTConfig, shape: dict[str, int], device: torch.device, precisions: list[str],
            attns: list[str]) -> dict[str, float]:
    """Median seconds per trial of each (precision, attention) candidate, keyed "precision/attn", on
    one block of the model (in_turns): about 0.3 s for vit_tiny_patch4_32, one round of b=1 for
    vit_base_patch16_224."""
    with forked_rng(device):  # the weights' and the input's draws
        model = VisionTransformer(cfg.replace(depth=1, drop_path_rate=0.0)).to(device).train()
        x = torch.randn(shape["trial_batch"], shape["tokens"], shape["width"], device=device, requires_grad=True)

    def trial(p: str, a: str):
        def run() -> float:
            model.set_attn_impl(a)
            return trial_seconds(model.blocks[0], x, p)
        return run
    return in_turns({f"{p}/{a}": trial(p, a) for p in precisions for a in attns}, device)


def measure_stem(cfg: ViTConfig, batch: int, device: torch.device, precision: str) -> dict[str, float]:
    """Median seconds of a forward + backward of the patch embedding on a (batch, C, H, W) image batch
    with the input in each of STEM_LAYOUTS, keyed by layout (in_turns). The image needs no gradient
    (training never asks for it), so the first conv's input gradient is not computed here either."""
    with forked_rng(device):
        embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.conv_stem, cfg.stem_strides)
        embed = embed.to(device).train()
        x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)

    def trial(layout: str):
        def run() -> float:
            embed.channels_last = layout == "channels_last"
            return trial_seconds(embed, x, precision)
        return run
    return in_turns({layout: trial(layout) for layout in STEM_LAYOUTS}, device, STEM_BUDGET_S, STEM_MAX_ROUNDS)


# ---- the disk cache -------------------------------------------------------------------------
def read_cache(path: Path | None) -> dict[str, Any]:
    """The cache file's entries; an absent, unreadable or damaged file reads as empty (measure again)."""
    if path is None:
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}


def save_cache(path: Path | None, key: str, entry: dict[str, Any]) -> None:
    """Add an entry; an unwritable cache dir only means the next process measures again."""
    if path is None:
        return
    d = read_cache(path)
    d[key] = entry
    try:
        atomic_write_text(path, json.dumps(d, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass


def cached_choice(entry: Any, precisions: list[str], attns: list[str], shape: dict[str, int],
                  layouts: list[str]) -> Choice | None:
    """The entry as a Choice; None unless it holds a candidate of each kind (a layout only where one
    was timed: with a single layout that one is given)."""
    if not isinstance(entry, dict) or "wait_share" not in entry:  # from before the load was recorded: time again
        return None
    share = recorded_share(entry["wait_share"])
    if is_busy(share):  # timed on a busy CPU (not written so by vitlab): time again
        return None
    p, a, t = entry.get("precision"), entry.get("attn_impl"), entry.get("timings")
    layout = entry.get("stem_layout") if len(layouts) > 1 else layouts[0]
    if p not in precisions or a not in attns or layout not in layouts:
        return None
    timings = {k: v for k, v in t.items() if isinstance(v, (int, float))} if isinstance(t, dict) else {}
    return Choice(p, a, "cache", timings, shape, layout, share)


# ---- the choice -----------------------------------------------------------------------------
MARGIN = 0.05
"""Another candidate replaces the default only when it is this much faster: the same run on the
same machine should not flip between kernels (and their float rounding) on timing noise."""
STEM_MARGIN = 0.10  # identical stems' 12-round medians still differed by up to 7% (STEM_BUDGET_S)


def default_candidate(device: torch.device, tokens: int, precisions: list[str], attns: list[str]) -> str:
    """What `auto` meant before measuring (runtime.resolve_precision, model.pick_attn_impl), where
    it is a candidate: the choice kept unless another is clearly faster."""
    p = resolve_precision("auto", device)
    p = p if p in precisions else precisions[0]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p, torch.float32)
    a = pick_attn_impl(device.type, tokens, dtype)
    return f"{p}/{a if a in attns else attns[0]}"


def fastest(seconds: dict[str, float], default: str, margin: float = MARGIN) -> str:
    """The fastest candidate, or `default` unless that is `margin` slower."""
    best = min(seconds, key=seconds.get)
    if default in seconds and seconds[best] > (1 - margin) * seconds[default]:
        best = default
    return best


def pick(seconds: dict[str, float], default: str) -> tuple[str, str]:
    """(precision, attn) of the fastest candidate, or of `default` unless that is MARGIN slower."""
    p, a = fastest(seconds, default).split("/")
    return p, a


_DEFAULT = object()


def choose(model: VisionTransformer | ViTConfig, batch: int, device: torch.device | str,
           precision: str = "auto", attn_impl: str = "auto", rt: Runtime | None = None,
           cache_file: Path | None | object = _DEFAULT, stem_layout: str = "auto") -> Choice:
    """The precision, attention kernel and stem input layout for training `model` with micro-batches
    of `batch` on `device`. Settings other than "auto" are kept as given; an auto layout is timed only
    where it matters (layout_matters), else "channels_last". With `rt` distributed,
    rank 0 decides and every rank gets its answer. `cache_file` None: no disk cache (default:
    cache_dir())."""
    cfg = model.config if isinstance(model, VisionTransformer) else model
    device = torch.device(device)
    check_runtime_settings("auto", "auto", None, attn_impl, stem_layout)  # a ConfigError naming the bad value
    precisions = precision_candidates(device) if precision == "auto" else [resolve_precision(precision, device)]
    attns = ["sdpa", "math"] if attn_impl == "auto" else [attn_impl]
    layouts = list(STEM_LAYOUTS) if stem_layout == "auto" and layout_matters(cfg) else \
        [STEM_LAYOUTS[0] if stem_layout == "auto" else stem_layout]
    if len(precisions) * len(attns) * len(layouts) == 1:  # nothing to choose: set explicitly, or one candidate here
        return Choice(precisions[0], attns[0], "explicit", stem_layout=layouts[0])
    path = (cache_dir() / CACHE_FILE) if cache_file is _DEFAULT else cache_file
    key, shape = cache_key(cfg, batch, device, precisions, attns, stem_auto=len(layouts) > 1)

    def decide() -> Choice:
        # This process's answer, else the disk's; either is read by the same rule (cached_choice).
        entry = _MEMO[key] if key in _MEMO else read_cache(path).get(key)
        found = cached_choice(entry, precisions, attns, shape, layouts)
        if found is None:
            waits_start, wall_start = runqueue_waits(), time.perf_counter()
            p, a, timings = precisions[0], attns[0], {}
            if len(precisions) * len(attns) > 1:
                seconds = measure(cfg, shape, device, precisions, attns)
                p, a = pick(seconds, default_candidate(device, shape["tokens"], precisions, attns))
                timings = {k: round(v * 1e3, 3) for k, v in seconds.items()}
            layout = layouts[0]
            if len(layouts) > 1:  # under the precision the run will use
                stem_seconds = measure_stem(cfg, shape["stem_trial_batch"], device, p)
                layout = fastest(stem_seconds, STEM_LAYOUTS[0], STEM_MARGIN)
                timings.update({f"stem/{k}": round(v * 1e3, 3) for k, v in stem_seconds.items()})
            found = Choice(p, a, "measured", timings, shape, layout, wait_share(waits_start, wall_start, device))
            entry = {"precision": p, "attn_impl": a, "timings": found.timings,
                     "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "wait_share": found.wait_share}
            if len(layouts) > 1:
                entry["stem_layout"] = layout
            if found.busy:  # serves this run only: kept nowhere, so the next choose() times again
                return found
            save_cache(path, key, entry)
        _MEMO[key] = entry
        return found

    if rt is None or not rt.distributed:
        return decide()
    mine = on_main(rt, decide)  # an error on rank 0 stops every rank
    codes = [PRECISIONS.index(mine.precision), ATTN_IMPLS.index(mine.attn_impl), SOURCES.index(mine.source),
             STEM_LAYOUTS.index(mine.stem_layout)] if mine is not None else [0, 0, 0, 0]
    p, a, s, lay = broadcast_ints(codes, rt)
    return mine if mine is not None else Choice(PRECISIONS[p], ATTN_IMPLS[a], SOURCES[s], {}, shape, STEM_LAYOUTS[lay])


def recorded(run_dir: Path, name: str, allowed: tuple[str, ...]) -> str | None:
    """What a run started with (its env.json's autotune record), so that a resumed run computes the
    same floats: `name` is "attn_impl" or "stem_layout"; None when absent or not one of `allowed`."""
    try:
        rec = json.loads((Path(run_dir) / "env.json").read_text()).get("autotune") or {}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return None
    value = rec.get(name) if isinstance(rec, dict) else None
    return value if value in allowed else None


def busy_note(choice: dict[str, Any] | None) -> str | None:
    """A line for a run's log when its choice (Choice.to_dict()) was timed on a busy CPU; else None."""
    share = (choice or {}).get("wait_share")
    if not is_busy(share):
        return None
    return (f"autotune timed its candidates while other processes held the CPU (or a CPU quota held it back: "
            f"its threads waited for a CPU {100 * share:.0f}% of the time), so its pick "
            f"({choice.get('precision')}, attention {choice.get('attn_impl')}) may not be this machine's fastest; "
            f"it is not cached, and the next run times again. runtime.precision / runtime.attn_impl / "
            f"runtime.stem_layout choose without timing")


def apply_choice(model: VisionTransformer, choice: dict[str, Any] | None,
                 attn_impl: str = "auto") -> VisionTransformer:
    """Give `model` the attention kernel and stem input layout that `choice` (Choice.to_dict(), as a
    Runtime and a run's env.json hold it) names: the one place they are applied, for training, the final
    evaluation and `vitlab bench`. `attn_impl` where the choice names no kernel. Returns `model`."""
    choice = choice or {}
    model.set_attn_impl(choice.get("attn_impl", attn_impl))
    model.set_stem_layout(choice.get("stem_layout", STEM_LAYOUTS[0]))
    return model


def tune_run(model: VisionTransformer, runtime_args: Any, rt: Runtime, batch: int, run_dir: Path,
             state: dict[str, Any] | None = None) -> Runtime:
    """Choose for a training run: the model gets the kernel and stem layout, the returned Runtime the
    precision and the record for env.json. A resumed run (`state` is its checkpoint) keeps the
    precision it was written with (Trainer.restore refuses another) and the kernel and stem layout
    its env.json records."""
    precision, attn, layout = runtime_args.precision, runtime_args.attn_impl, runtime_args.stem_layout
    resumed = fixed_rule = False
    if state is not None:
        if precision == "auto" and state.get("precision") in PRECISIONS[1:]:
            precision, resumed = state["precision"], True
        if attn == "auto":
            impl = recorded(run_dir, "attn_impl", ("sdpa", "math"))
            # A run from before autotune records no kernel: it ran the fixed rule, attn_impl "auto".
            attn, fixed_rule, resumed = impl or "sdpa", impl is None, True
        if layout == "auto" and layout_matters(model.config):
            # A run from before the layout was timed records none: it gave its stem a channels-last
            # input (or, older still, a contiguous one; the values differ by rounding only).
            layout, resumed = recorded(run_dir, "stem_layout", STEM_LAYOUTS) or STEM_LAYOUTS[0], True
    choice = choose(model, batch, rt.device, precision, attn, rt, stem_layout=layout)
    if fixed_rule:
        choice = dataclasses.replace(choice, attn_impl="auto")
    if resumed and choice.source == "explicit":
        choice = dataclasses.replace(choice, source="resumed")
    record = choice.to_dict()
    apply_choice(model, record)
    return dataclasses.replace(rt, precision=choice.precision, choice=record)


__all__ = ["Choice", "choose", "tune_run", "apply_choice", "busy_note", "cache_dir", "measure", "measure_stem",
           "trial_seconds", "precision_candidates"]
