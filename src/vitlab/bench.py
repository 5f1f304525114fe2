"""`vitlab bench`: training and inference speed of a ViT on this machine, side by side with timm's
`VisionTransformer` and the original write-up's model (../shared/baselines/seed_vit.py).

A training step is forward + cross-entropy + backward + AdamW update on random data of the real
shape; inference is a forward pass of the same batch; latency is a forward pass of one image. The
models take turns, round after round in one process, so that load from elsewhere on the machine
hits them alike; each figure is the median over rounds. FLOPs per image are counted once per model
(torch.utils.flop_counter), which turns images/s into GFLOP/s and a % of this machine's matmul
peak (a large matmul timed in the same dtype). All models run in the precision that vitlab's
autotune picks (engine/autotune.py), which is reported with the attention kernel it picked.

timm and the seed model are built with vitlab's width, depth, heads, MLP and patch size; timm gets
learned position embeddings where vitlab's are fixed sin-cos (the same compute), and the seed model
keeps its own choices (class token, dropout 0.1, the linear patch embedding), as the write-up
trained it. A model with a conv stem (`conv_stem`) has no timm counterpart: timm is left out.
"""
from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig
from .engine import autotune
from .engine.runtime import Runtime, describe_machine
from .errors import ConfigError, ConversionError
from .model import VisionTransformer

FLOP_BATCH = 16  # images per FLOP count: enough for skip-depth's share of the batch to average out
SEED_PATH = Path(__file__).resolve().parents[3] / "shared" / "baselines" / "seed_vit.py"
PEAK_SIDE = {"cpu": 1024, "cuda": 8192}  # square matmul timed for the peak: ~2 GFLOP on CPU


def bench_config(preset: str | None, sets: list[str] | None = None) -> ViTConfig:
    """A preset (default: the settings' default preset) with `--set model.KEY=VALUE` overrides."""
    from .engine.args import merge_sets, parse_set
    from .train import base_model_config
    other = sorted(section for section in parse_set(sets or []) if section != "model")
    if other:
        raise ConfigError(f"vitlab bench takes model.* settings only, not {other} (--set model.depth=6, ...)")
    return base_model_config(merge_sets({"model": {"preset": preset}} if preset else {}, sets, "vitlab bench"))


def default_batch(cfg: ViTConfig) -> int:
    """The batch sizes of the throughput benchmark: 128 for small images, 8 at ImageNet sizes."""
    return 128 if cfg.img_size <= 64 else 8


# ---- the models ------------------------------------------------------------------------------
def load_seed_module(path: Path | None) -> tuple[ModuleType | None, str | None]:
    """(the write-up's model module, None) or (None, why it is skipped)."""
    if path is None:
        return None, "turned off (--seed-vit none)"
    if not Path(path).is_file():
        return None, f"{path} not found"
    spec = importlib.util.spec_from_file_location("seed_vit", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # someone else's file: any failure only drops it from the comparison
        return None, f"{path} did not load ({type(e).__name__}: {e})"
    return module, None


def reference_models(cfg: ViTConfig, seed_path: Path | None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """timm's and the seed model for `cfg`'s shape, and the reasons for any left out."""
    models, skipped = {}, {}
    try:
        from .weights.timm import timm_kwargs
        kwargs = timm_kwargs(cfg.replace(pos_embed="learn"))
        from timm.models.vision_transformer import VisionTransformer as TimmViT
        models["timm"] = TimmViT(**kwargs)
    except ConversionError as e:  # e.g. a conv stem: no timm model does the same work
        skipped["timm"] = str(e)
    except ImportError:
        skipped["timm"] = "timm is not installed (pip install timm)"
    seed, why = load_seed_module(seed_path)
    if seed is None:
        skipped["seed"] = why
    else:
        models["seed"] = seed.ViT(img_size=cfg.img_size, in_channels=cfg.in_chans, patch_size=cfg.patch_size,
                                  num_transformer_layers=cfg.depth, embedding_dim=cfg.embed_dim,
                                  mlp_size=cfg.mlp_hidden_dim, num_heads=cfg.num_heads, num_classes=cfg.num_classes)
    return models, skipped


# ---- what is timed ---------------------------------------------------------------------------
def make_train_step(model: nn.Module, precision: str, device: torch.device) -> Callable:
    """One optimizer step on (x, y): forward, cross-entropy, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rt = Runtime(torch.device(device), precision)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.train()
        with rt.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def train_rates_in_turns(runs: dict[str, tuple[Callable, torch.Tensor, torch.Tensor]], rounds: int, steps: int,
                         warmup: int) -> dict[str, float]:
    """Median training images/s of each named (step, x, y) from make_train_step: `warmup` untimed
    steps each, then `rounds` rounds in which each takes its turn of `steps` timed steps, so that noise
    from the machine hits all of them alike (benchmarks/budget.py, benchmarks/candidate_speed.py)."""
    for step, x, y in runs.values():
        for _ in range(warmup):
            step(x, y)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, (step, x, y) in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            rates[k].append(steps * x.shape[0] / (time.perf_counter() - t))
    return {k: statistics.median(r) for k, r in rates.items()}


def make_infer(model: nn.Module, precision: str, device: torch.device) -> Callable:
    rt = Runtime(torch.device(device), precision)

    def infer(x: torch.Tensor) -> None:
        model.eval()
        with torch.inference_mode(), rt.autocast():
            model(x)
    return infer


def _flash_cpu_flops() -> dict:
    """FlopCounterMode counts SDPA's CUDA kernels but not the CPU flash kernel: same formulas."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None:
        return {}
    return {fwd: lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v),
            bwd: lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)}


def count_flops(model: nn.Module, cfg: ViTConfig, precision: str, device: torch.device,
                batch: int = 1) -> tuple[float, float]:
    """(training, inference) FLOPs per image: forward + backward, and forward, of a batch, divided by
    its size. Counted on a real batch because training work can depend on it: stochastic depth
    that skips computation runs a block's branches on a random share of the batch."""
    from torch.utils.flop_counter import FlopCounterMode
    rt = Runtime(torch.device(device), precision)
    x = torch.rand(batch, *cfg.input_size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    model.train()
    with FlopCounterMode(display=False, custom_mapping=_flash_cpu_flops()) as train:
        with rt.autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    with FlopCounterMode(display=False, custom_mapping=_flash_cpu_flops()) as infer:
        with torch.inference_mode(), rt.autocast():
            model(x)
    return train.get_total_flops() / batch, infer.get_total_flops() / batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(precision: str, device: torch.device, seconds: float = 0.3) -> float:
    """This machine's matmul rate in `precision`'s dtype: the best of a few square products."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = PEAK_SIDE.get(device.type, 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best, spent = float("inf"), 0.0
    for _ in range(20):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
        if spent > seconds:
            break
    return 2 * n**3 / best / 1e9


# ---- the benchmark ---------------------------------------------------------------------------
def tuned_model(cfg: ViTConfig, choice: autotune.Choice) -> VisionTransformer:
    """vitlab's model with the attention kernel and stem layout that autotune chose."""
    return autotune.apply_choice(VisionTransformer(cfg), choice.to_dict())


def run_bench(cfg: ViTConfig, batch: int, device: torch.device | str = "cpu", precision: str = "auto",
              attn_impl: str = "auto", rounds: int = 5, steps: int = 3, warmup: int = 2, latency_reps: int = 5,
              seed_path: Path | None = SEED_PATH, compile_vitlab: bool = False) -> dict[str, Any]:
    """Images/s (training and inference), GFLOP/s, % of matmul peak and batch-1 latency of vitlab,
    timm and the seed model on `cfg`'s shape, interleaved round-robin; see the module docstring."""
    for name, value in (("batch", batch), ("rounds", rounds), ("steps", steps), ("latency_reps", latency_reps)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")
    if warmup < 0:
        raise ConfigError(f"--warmup {warmup} must be >= 0")
    if not cfg.num_classes:
        raise ConfigError("the benchmark trains a classifier: give the model num_classes >= 1")
    device = torch.device(device)
    torch.manual_seed(0)
    choice = autotune.choose(cfg, batch, device, precision, attn_impl)
    prec = choice.precision
    models: dict[str, nn.Module] = {"vitlab": tuned_model(cfg, choice)}
    refs, skipped = reference_models(cfg, seed_path)
    models.update(refs)
    models = {k: m.to(device) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    flops = {k: count_flops(m, cfg, prec, device, min(batch, FLOP_BATCH)) for k, m in models.items()}
    if compile_vitlab:  # counted through the plain module: compilation does not change the work
        models["vitlab+compile"] = torch.compile(tuned_model(cfg, choice).to(device))
        params["vitlab+compile"], flops["vitlab+compile"] = params["vitlab"], flops["vitlab"]
    train = {k: make_train_step(m, prec, device) for k, m in models.items()}
    infer = {k: make_infer(m, prec, device) for k, m in models.items()}
    x = torch.rand(batch, *cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    x1 = x[:1].clone()

    warm_s = {}
    for k in models:  # warm-up (and compilation) outside the timed rounds
        t = time.perf_counter()
        for _ in range(warmup):
            train[k](x, y)
            infer[k](x)
        infer[k](x1)
        _sync(device)
        warm_s[k] = time.perf_counter() - t

    def timed(fn: Callable, *args, reps: int) -> float:
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        _sync(device)
        return (time.perf_counter() - t) / reps

    rates: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": [], "latency": []} for k in models}
    for _ in range(rounds):
        for k in models:
            rates[k]["train"].append(batch / timed(train[k], x, y, reps=steps))
            rates[k]["infer"].append(batch / timed(infer[k], x, reps=steps))
            rates[k]["latency"].append(statistics.median([timed(infer[k], x1, reps=1) for _ in range(latency_reps)]))

    peak = matmul_peak_gflops(prec, device)
    out: dict[str, Any] = {}
    for k in models:
        tr, inf = statistics.median(rates[k]["train"]), statistics.median(rates[k]["infer"])
        train_gflops, infer_gflops = tr * flops[k][0] / 1e9, inf * flops[k][1] / 1e9
        out[k] = {"params": params[k], "train_images_per_s": _sig(tr), "infer_images_per_s": _sig(inf),
                  "latency_ms": _sig(statistics.median(rates[k]["latency"]) * 1e3),
                  "train_gflop_per_image": _sig(flops[k][0] / 1e9), "infer_gflop_per_image": _sig(flops[k][1] / 1e9),
                  "train_gflops": _sig(train_gflops), "infer_gflops": _sig(infer_gflops),
                  "train_pct_of_peak": _sig(100 * train_gflops / peak, 3),
                  "infer_pct_of_peak": _sig(100 * infer_gflops / peak, 3), "warmup_s": round(warm_s[k], 2)}
    result = {"model": cfg.name or "custom", "shape": {"img_size": cfg.img_size, "patch_size": cfg.patch_size,
              "depth": cfg.depth, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads,
              "mlp_hidden": cfg.mlp_hidden_dim, "tokens": cfg.seq_len,
              **({"conv_stem": list(cfg.conv_stem)} if cfg.conv_stem else {})},
              "batch": batch, "device": str(device), "precision": prec, "autotune": choice.to_dict(),
              "peak_gflops": round(peak, 1), "rounds": rounds, "steps_per_round": steps, "models": out,
              "skipped": skipped, "machine": describe_machine()}
    if "timm" in out:
        result["ratio_vs_timm"] = {k: _sig(v["train_images_per_s"] / out["timm"]["train_images_per_s"], 3)
                                   for k, v in out.items() if k != "timm"}
    return result


def _sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits: a tiny model's GFLOP and a big one's images/s both keep theirs."""
    return float(f"{x:.{digits}g}")


def format_table(r: dict[str, Any]) -> str:
    s, c = r["shape"], r["autotune"]
    timings = ", ".join(f"{k} {v:.1f} ms" for k, v in c.get("timings", {}).items())
    lines = [f"{r['model']}: {s['img_size']} px, patch {s['patch_size']}, {s['tokens']} tokens, depth {s['depth']} "
             f"x width {s['embed_dim']}, {s['num_heads']} heads"
             + (f", conv stem {s['conv_stem']}" if s.get("conv_stem") else "") + f"; batch {r['batch']} on {r['device']} "
             f"({r['machine']['cpu']}, {r['machine']['threads']} threads)",
             f"autotune ({c['source']}): {c['precision']}, attention {c['attn_impl']}"
             + (f", stem input {c['stem_layout']}" if s.get("conv_stem") and c.get("stem_layout") else "")
             + (f"  [{timings}]" if timings else "")
             + (f"\n  {note}" if (note := autotune.busy_note(c)) else ""),
             f"matmul peak: {r['peak_gflops']:.1f} GFLOP/s in {r['precision']}", "",
             f"{'':16}{'params':>8}{'train':>10}{'GFLOP/s':>9}{'% peak':>8}{'infer':>10}{'GFLOP/s':>9}"
             f"{'% peak':>8}{'batch-1':>10}",
             f"{'':16}{'(M)':>8}{'img/s':>10}{'':>9}{'':>8}{'img/s':>10}{'':>9}{'':>8}{'ms':>10}"]
    for k, m in r["models"].items():
        lines.append(f"{k:16}{m['params'] / 1e6:8.2f}{m['train_images_per_s']:10.1f}{m['train_gflops']:9.1f}"
                     f"{m['train_pct_of_peak']:8.1f}{m['infer_images_per_s']:10.1f}{m['infer_gflops']:9.1f}"
                     f"{m['infer_pct_of_peak']:8.1f}{m['latency_ms']:10.2f}")
    for k, why in r["skipped"].items():
        lines.append(f"({k} skipped: {why})")
    return "\n".join(lines)


__all__ = ["bench_config", "run_bench", "format_table", "default_batch", "make_train_step", "make_infer", "count_flops",
           "matmul_peak_gflops", "reference_models", "load_seed_module", "SEED_PATH"]
