"""Accuracy at a fixed wall-clock budget (issue 9): CIFAR-10 test top-1 of the validation-selected
weights after `vitlab train --set train.time_budget=MIN`, for several setups on this machine.

    python benchmarks/budget.py --minutes 15,30 --variants plain,fast --data-dir ../shared/datasets
    python benchmarks/budget.py --minutes 30 --variants fast-no-patch-drop,fast-no-progressive
    python benchmarks/budget.py --render          # README table (+ results/budget.png) from every row

Variants (VARIANTS below): `plain` is the `cifar10` recipe as it was for issue 9, every speedup off, frozen in
benchmarks/recipes/cifar10-plain.yaml; `cifar10` is the shipped `cifar10` recipe as it is now (tuned for 15
epochs; its schedule laid over the budget instead); `fast` is the `cifar10-fast` recipe (issue 9's fastest
settings); `fast-no-X` switches one speedup off (the ablation; `fast-fp32` and `fast-sdpa` override
autotune's precision and attention kernel);
`seed` is the original write-up's ViT-B/16 (`seed` recipe), tested on a stratified subset of
--seed-test-limit images because it evaluates at a few images per second on a CPU.

The budget counts training steps only (`train.time_budget`); evaluation comes on top and is
reported separately. Before each run a ~15-s probe (`probe()`) times a fixed training step and a
matmul, recorded with the row: two instances of one CPU type can differ by >10% in speed, and the
probe tells a slow instance's row from a slow recipe's. Each row also records its settings (the column
`settings`: accuracy.py's short hash of them, the budget aside), so the rows of a shipped recipe changed
in place are told apart. Every finished run is appended to
benchmarks/results/budget.json with the machine it ran on, so rows from different sessions
accumulate; `--render` groups them per machine.
Run one measurement at a time: two runs side by side would share the cores and halve each budget.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from accuracy import append, fingerprint, fresh_dir, model_config, settings_of, write_readme  # benchmarks/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "results" / "budget.json"
BEGIN, END = "<!-- budget:begin -->", "<!-- budget:end -->"

PLAIN = Path(__file__).resolve().parent / "recipes" / "cifar10-plain.yaml"

# name: (recipe, extra --set values)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    # the `cifar10` recipe as issue 9 measured it, frozen in a file: the shipped one has changed since
    "plain": (str(PLAIN), []),
    "cifar10": ("cifar10", []),  # vitlab's best at 15 epochs, as it ships now
    "fast": ("cifar10-fast", []),
    "fast-no-stem": ("cifar10-fast", ["model.conv_stem=[]"]),
    "fast-no-patch-drop": ("cifar10-fast", ["model.patch_drop_rate=0"]),
    "fast-no-progressive": ("cifar10-fast", ["train.resolution_schedule=null"]),
    "fast-fp32": ("cifar10-fast", ["runtime.precision=fp32"]),
    "fast-sdpa": ("cifar10-fast", ["runtime.attn_impl=sdpa"]),  # the fused kernel instead of autotune's pick
    "seed": ("seed", ["data.val_size=500", "train.eval_batch_size=50"]),
}


PROBE_PRESET, PROBE_BATCH = "vit_tiny_patch4_32", 128  # a fixed shape: rows stay comparable as recipes change


def probe(rounds: int = 5, steps: int = 2) -> dict:
    """This machine's speed right now: training images/s of PROBE_PRESET at PROBE_BATCH in fp32 and,
    where the CPU has bf16 units, bf16 (median of `rounds` rounds, the dtypes interleaved), and the
    matmul GFLOP/s of each dtype."""
    import torch
    from vitlab.bench import bench_config, make_train_step, matmul_peak_gflops, train_rates_in_turns
    from vitlab.engine.runtime import fast_bf16_available
    from vitlab.model import VisionTransformer

    torch.manual_seed(0)
    cfg = bench_config(PROBE_PRESET)
    precisions = ["fp32", "bf16"] if fast_bf16_available("cpu") else ["fp32"]
    x = torch.rand(PROBE_BATCH, *cfg.input_size)
    y = torch.randint(0, cfg.num_classes, (PROBE_BATCH,))
    train = {p: (make_train_step(VisionTransformer(cfg), p, torch.device("cpu")), x, y) for p in precisions}
    rates = train_rates_in_turns(train, rounds, steps, warmup=1)
    return {"preset": PROBE_PRESET, "batch": PROBE_BATCH,
            "train_img_s": {p: round(r, 1) for p, r in rates.items()},
            "matmul_gflops": {p: round(matmul_peak_gflops(p, torch.device("cpu")), 1) for p in precisions}}


def cli(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitlab", *args], check=True, text=True,
                          capture_output=capture)


def measure(variant: str, minutes: float, seed: int, data_dir: str | None, out_root: Path,
            seed_test_limit: int) -> dict:
    recipe, extra = VARIANTS[variant]
    out = fresh_dir(out_root, f"{variant}-{minutes:g}min-s{seed}")
    sets = [f"train.time_budget={minutes}", f"train.seed={seed}", "runtime.progress=false",
            "train.test_at_end=false", *extra]
    if data_dir:
        sets.append(f"data.data_dir={data_dir}")
    speed = probe()
    t = time.time()
    cli("train", "--recipe", recipe, "--out", str(out), *[a for s in sets for a in ("--set", s)])
    wall_s = time.time() - t
    limit = ["--limit", str(seed_test_limit)] if variant == "seed" else []
    test = json.loads(cli("eval", str(out), "--json", *limit, capture=True).stdout)
    results = json.loads((out / "results.json").read_text())
    env = json.loads((out / "env.json").read_text())
    return {
        "variant": variant, "recipe": Path(recipe).name, "sets": extra, "budget_min": minutes, "seed": seed,
        "settings": budget_settings(yaml.safe_load((out / "config.yaml").read_text())),
        "train_s": results.get("train_s"), "wall_s": round(wall_s, 1),
        "images_seen": results.get("images_seen"), "epochs_equivalent": results.get("epochs_equivalent"),
        "steps": results.get("steps"), "params": results.get("params"),
        "val_top1": results["best"]["val_top1"], "test_top1": test["top1"], "test_images": test["n"],
        "machine": {k: env.get(k) for k in ("cpu", "cpu_capability", "fast_bf16_cpu", "threads", "torch")},
        "precision": env.get("precision"), "autotune": env.get("autotune"), "run_dir": str(out),
        "probe": speed,  # this instance's speed, timed just before the run
        "model": model_config(out),  # what the recipe was then
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),  # rows accumulate over sessions and machines
    }


def budget_settings(cfg: dict) -> dict:
    """accuracy.settings_of() less the budget: rows of one recipe at 15, 30 and 60 minutes share it."""
    settings = settings_of(cfg)
    settings.get("train", {}).pop("time_budget", None)
    return settings


def machine_key(row: dict) -> str:
    m = row["machine"]
    return f"{m['cpu']} ({m['cpu_capability']}{', bf16' if m.get('fast_bf16_cpu') else ''}), torch {m['torch']}"


def probe_cell(row: dict) -> str:
    """The probe's training images/s in the row's precision (fp32 where it has no such figure)."""
    rates = (row.get("probe") or {}).get("train_img_s") or {}
    rate = rates.get(row.get("precision")) or rates.get("fp32")
    return f"{rate:g}" if rate else "-"


def render() -> str:
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    lines = []
    for machine in sorted({machine_key(r) for r in rows}):
        lines += [f"Machine: {machine}", "",
                  "| variant | settings | budget (min) | test top-1 % | val top-1 % | images seen | epochs-equivalent | "
                  "precision | test images | probe img/s | when |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if machine_key(r) == machine), key=lambda r: (r["budget_min"], r["variant"], fingerprint(r))):
            ep = r.get("epochs_equivalent")
            lines.append(f"| {r['variant']} | {fingerprint(r)} | {r['budget_min']:g} | {100 * r['test_top1']:.1f} | "
                         f"{100 * r['val_top1']:.1f} | {r.get('images_seen') or '-'} | "
                         f"{f'{ep:.1f}' if ep is not None else '-'} | {r.get('precision')} | {r['test_images']} | "
                         f"{probe_cell(r)} | {(r.get('when') or '-')[:10]} |")
        lines.append("")
    return "\n".join(lines)


def plot(png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    fig, ax = plt.subplots(figsize=(6, 4))
    for machine in sorted({machine_key(r) for r in rows}):
        for variant, settings in sorted({(r["variant"], fingerprint(r)) for r in rows if machine_key(r) == machine}):
            pts = sorted((r["budget_min"], 100 * r["test_top1"]) for r in rows if machine_key(r) == machine
                         and (r["variant"], fingerprint(r)) == (variant, settings))
            which = variant if settings == "-" else f"{variant} {settings}"
            ax.plot(*zip(*pts), marker="o", label=f"{which} ({machine.split(',')[0]})")
    ax.set_xlabel("training budget (minutes)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", default="15,30", help="comma-separated budgets")
    ap.add_argument("--variants", default="plain,fast", help=f"comma-separated, from {sorted(VARIANTS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data-dir")
    ap.add_argument("--out-root", default="runs/budget")
    ap.add_argument("--seed-test-limit", type=int, default=1000)
    ap.add_argument("--render", action="store_true",
                    help="print the table, write it into README.md and plot results/budget.png")
    args = ap.parse_args()
    if args.render:
        table = render()
        print(table)
        write_readme(table, BEGIN, END)
        plot(RESULTS.with_suffix(".png"))
        return
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {sorted(VARIANTS)}")
    for minutes in (float(m) for m in args.minutes.split(",")):
        for variant in args.variants.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = measure(variant, minutes, seed, args.data_dir, Path(args.out_root), args.seed_test_limit)
                append(row, RESULTS, "rows")
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
