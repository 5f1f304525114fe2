"""Accuracy of the shipped recipes, over seeds, through the real command line.

    python benchmarks/accuracy.py --recipes mnist,cifar10 --seeds 0,1,2 --data-dir ../shared/datasets
    python benchmarks/accuracy.py --add-run runs/mnist-seed0          # record a run made by hand
    python benchmarks/accuracy.py --render                            # the README's results table
    python benchmarks/accuracy.py --recipes cifar10 --seeds 0,1 --parallel 2   # two seeds side by side
    python benchmarks/accuracy.py --from-sweep cifar10    # sweep runs (a GPU lease) of the recipe as it ships

Each run is `vitlab train --recipe R --set train.seed=S --set data.data_dir=D --out runs/bench/R-sS`;
its record is appended to benchmarks/results/accuracy.json as
{"recipe", "dataset", "seed", "epochs", "val_top1", "test_top1", "wall_s", "params", "device", "cpu",
"cpu_capability", "precision", "torch", "parallel", "threads", "model", "settings"} ("model": the
resolved architecture; "settings": the resolved settings that differ from vitlab's defaults, but the
seed and what a resumed run may change, so that a row still says what it measured after its recipe
changes). The table groups runs by recipe, settings (a short hash: a recipe changed in place starts
a new row) and hardware. A repeat of a run directory name gets a -2, -3, ... suffix. Test accuracy is that of the weights selected on the validation split,
measured once. With --parallel N, N runs go side by side, each with runtime.threads = cores // N
(issue 9: on a 2-core CPU two 1-thread processes did more images/s than one 2-thread process); each
record says how many ran at once and with how many threads, since its wall time depends on both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results" / "accuracy.json"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def record_of(run_dir: Path, recipe: str, wall_s: float | None = None) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    if wall_s is None:  # from the run's own log: first to last metrics record
        times = [json.loads(line)["time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        started = (run_dir / "env.json").stat().st_mtime
        wall_s = max(times) - started if times else results.get("wall_s_this_session")
    return {
        "recipe": recipe, "dataset": cfg["data"]["name"], "seed": cfg["train"]["seed"],
        "epochs": cfg["train"]["epochs"], "val_top1": results["best"]["val_top1"],
        "test_top1": results.get("test", {}).get("top1"), "wall_s": round(wall_s, 1), "params": results["params"],
        "device": env.get("device"), "cpu": env.get("cpu"), "torch": env.get("torch"), "run_dir": str(run_dir),
        **({"gpu": env["gpu"]} if str(env.get("device", "")).startswith("cuda") and env.get("gpu") else {}),
        "threads": env.get("threads"), "cpu_capability": env.get("cpu_capability"), "precision": env.get("precision"),
        "model": model_config(run_dir, cfg), "settings": settings_of(cfg),
    }


def settings_of(cfg: dict) -> dict:
    """The run's resolved settings that make it what it is: those that differ from vitlab's defaults,
    less the seed (rows of one recipe differ in it) and what a resumed run may change (where the data
    lives, logging, the runtime: train.resumable). Rows with equal settings measured the same recipe,
    so a recipe changed in place starts a new row, and a new setting added to vitlab with a default
    does not."""
    from vitlab.engine.args import RunConfig
    from vitlab.train import resumable
    defaults = json.loads(json.dumps(RunConfig().to_dict()))  # tuples -> lists, as in config.yaml
    out: dict = {}
    for section, values in cfg.items():
        for k, v in (values or {}).items():
            key = f"{section}.{k}"
            if key == "train.seed" or resumable(key) or defaults.get(section, {}).get(k, object()) == v:
                continue
            out.setdefault(section, {})[k] = v
    return out


def recipe_settings(recipe: str, sets: list[str] | None = None) -> dict:
    """settings_of() for the recipe as it ships now (with `sets`, --set overrides, on top), seed aside:
    what a run must have had to count as one."""
    from vitlab.engine.args import load_run_config
    return settings_of(json.loads(json.dumps(load_run_config(recipe, list(sets or [])).to_dict())))


def from_sweep(recipe: str, sweep_results: Path) -> list[dict]:
    """Records for the finished sweep runs (benchmarks/sweep.py) whose settings are exactly the
    recipe's as it ships now, seed aside, that accuracy.json does not hold yet. A candidate that a
    recipe adopted thus brings its seeds into the results table, each marked with its sweep; a run
    that differs from the recipe in any setting (the recipe before, another candidate) is left out."""
    want = recipe_settings(recipe)
    have = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else []
    seen = {(r.get("sweep"), r.get("run_dir")) for r in have}
    out = []
    for r in json.loads(sweep_results.read_text())["runs"]:
        if r.get("status") != "done" or r.get("settings") != want or (r.get("sweep"), r.get("run_dir")) in seen:
            continue
        rec = {k: v for k, v in r.items() if k not in ("spec", "candidate", "phase", "sets", "status", "curve")}
        out.append({**rec, "recipe": recipe,
                    "note": f"from {sweep_results.name}: {r['spec']}, candidate {r['candidate']}, sweep {r['sweep']}; "
                            f"{r['parallel']} runs shared the machine"})
    return out


def fingerprint(r: dict) -> str:
    """A short hash of a record's settings; "-" for records from before settings were kept (the table
    still tells those apart by their architecture)."""
    if not r.get("settings"):
        return "-"
    import hashlib
    return hashlib.sha1(json.dumps(r["settings"], sort_keys=True).encode()).hexdigest()[:7]


def model_config(run_dir: Path, settings: dict | None = None) -> dict | None:
    """The resolved architecture (the saved model's config), else the run's model settings: which
    recipe a row measured, after the recipe changes."""
    saved = run_dir / "model" / "config.json"
    if saved.is_file():
        return {k: v for k, v in json.loads(saved.read_text())["config"].items() if k != "class_names"}
    return (settings or {}).get("model")


def fresh_dir(root: Path, name: str) -> Path:
    """root/name, or root/name-2, -3, ... when taken: a repeat (another session, a changed recipe)
    never lands in an earlier run's directory."""
    out = root / name
    n = 2
    while out.exists():
        out, n = root / f"{name}-{n}", n + 1
    return out


def append(record: dict, path: Path | None = None, key: str = "runs") -> None:
    """Add one record to the JSON results file (runs accumulate; nothing is overwritten)."""
    path = path or RESULTS  # looked up at call time: tests point RESULTS elsewhere
    doc = json.loads(path.read_text()) if path.is_file() else {key: []}
    doc[key].append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def cores() -> int:
    """CPUs this process can keep busy: its affinity, and a container's CPU quota (vitlab.limits)."""
    from vitlab.limits import usable_cpus
    return usable_cpus()


def threads_per_run(parallel: int, n_cores: int) -> int | None:
    """runtime.threads for each of `parallel` runs sharing `n_cores`; None (torch's choice) for one run."""
    return None if parallel == 1 else max(1, n_cores // parallel)


def train_command(recipe: str, seed: int, data_dir: str | None, out: Path, extra: list[str],
                  threads: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "vitlab", "train", "--recipe", recipe, "--set", f"train.seed={seed}",
           "--set", "runtime.progress=false", "--out", str(out)]
    if data_dir:
        cmd += ["--set", f"data.data_dir={data_dir}"]
    if threads is not None:
        cmd += ["--set", f"runtime.threads={threads}"]
    for s in extra:  # last: an explicit --set runtime.threads=... wins
        cmd += ["--set", s]
    return cmd


def run(recipe: str, seed: int, data_dir: str | None, out_root: Path, extra: list[str], parallel: int = 1,
        threads: int | None = None) -> dict:
    out = fresh_dir(out_root, f"{recipe}-s{seed}")
    cmd = train_command(recipe, seed, data_dir, out, extra, threads)
    t = time.time()
    if parallel == 1:
        subprocess.run(cmd, check=True)
    else:  # side by side: each run's output to its own log, not interleaved on the terminal
        out_root.mkdir(parents=True, exist_ok=True)
        log = out_root / f"{recipe}-s{seed}.log"
        with open(log, "w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"{recipe} seed {seed} failed; see {log}")
    return {**record_of(out, recipe, time.time() - t), "parallel": parallel}  # threads: from its env.json


def run_all(jobs: list[tuple[str, int]], parallel: int, data_dir: str | None, out_root: Path,
            extra: list[str]) -> list[dict]:
    """Every (recipe, seed), `parallel` at a time; records are appended as runs finish."""
    threads = threads_per_run(parallel, cores())
    records = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(run, recipe, seed, data_dir, out_root, extra, parallel, threads)
                   for recipe, seed in jobs]
        try:
            for future in as_completed(futures):
                rec = future.result()
                append(rec)
                print(json.dumps(rec), flush=True)
                records.append(rec)
        except BaseException:  # a failed run stops the queue (the ones running finish)
            for future in futures:
                future.cancel()
            raise
    return records


def _hardware(r: dict) -> str:
    """"AMD EPYC (AVX512, bf16), cpu, torch 2.14.1": what a row ran on (older rows lack the middle);
    on a GPU its name comes first: "NVIDIA H100 80GB HBM3 (bf16), cuda:0, torch 2.11.0+cu130"."""
    if r.get("gpu"):
        precision = f" ({r['precision']})" if r.get("precision") else ""
        return f"{r['gpu']}{precision}, {r['device']}, torch {r['torch']}"
    detail = ", ".join(str(r[k]) for k in ("cpu_capability", "precision") if r.get(k))
    return f"{r['cpu']}{f' ({detail})' if detail else ''}, {r['device']}, torch {r['torch']}"


def render() -> str:
    """The README's results table: one row per recipe, epochs and machine (mean ± std over its seeds)."""
    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.is_file() else []
    by: dict[tuple[str, str, str, str], list[dict]] = {}  # name, settings, hardware, legacy architecture
    for r in runs:
        name = f"{r['recipe']} ({r['epochs']} epoch{'s' if r['epochs'] != 1 else ''})"
        legacy = json.dumps(r.get("model"), sort_keys=True) if fingerprint(r) == "-" else ""
        by.setdefault((name, fingerprint(r), _hardware(r), legacy), []).append(r)

    def ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
        values = [v * scale for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    lines = ["| recipe | settings | runs (seeds) | test top-1 % | val top-1 % | wall time / run | params | hardware |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, settings, hardware, _), rs in by.items():
        seeds = ",".join(str(r["seed"]) for r in rs)
        walls: dict[int, list[float]] = {}  # runs side by side take longer each: never averaged with lone runs
        for r in rs:
            walls.setdefault(r.get("parallel") or 1, []).append(r["wall_s"])
        wall = "; ".join(f"{statistics.mean(w) / 60:.1f} min" + (f" ({side} runs side by side)" if side > 1 else "")
                         for side, w in sorted(walls.items()))
        lines.append(f"| {name} | {settings} | {len(rs)} ({seeds}) | {ms([r['test_top1'] for r in rs])} | "
                     f"{ms([r['val_top1'] for r in rs])} | {wall} | {rs[0]['params'] / 1e6:.2f}M | "
                     f"{hardware} |")
    return "\n".join(lines)


def write_readme(table: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the README's block between the `begin` and `end` markers with `table`."""
    text = README.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"README.md has no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description="recipe x seed accuracy through the vitlab CLI")
    ap.add_argument("--recipes", default="")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--data-dir")
    ap.add_argument("--out-root", default="runs/bench")
    ap.add_argument("--set", action="append", default=[], help="extra --set passed to every run")
    ap.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="run N seeds side by side, each with runtime.threads = cores // N")
    ap.add_argument("--add-run", action="append", default=[], metavar="RUN_DIR", help="record an existing run")
    ap.add_argument("--recipe-name", help="recipe name for --add-run (default: from the run's argv)")
    ap.add_argument("--from-sweep", action="append", default=[], metavar="RECIPE",
                    help="record the sweep runs (--sweep-results) whose settings are RECIPE's as it ships")
    ap.add_argument("--sweep-results", type=Path, default=RESULTS.parent / "sweep.json")
    ap.add_argument("--render", action="store_true", help="print the table and write it into README.md")
    args = ap.parse_args()
    for recipe in args.from_sweep:
        found = from_sweep(recipe, args.sweep_results)
        for rec in found:
            append(rec)
        print(f"{recipe}: {len(found)} sweep run(s) recorded: "
              + ", ".join(f"seed {r['seed']} (test {r['test_top1']})" for r in found))
    for run_dir in map(Path, args.add_run):
        env = json.loads((run_dir / "env.json").read_text())
        argv = env.get("argv", [])
        recipe = args.recipe_name or (argv[argv.index("--recipe") + 1] if "--recipe" in argv else run_dir.name)
        rec = record_of(run_dir, recipe)
        append(rec)
        print(json.dumps(rec))
    if args.parallel < 1:
        ap.error(f"--parallel {args.parallel} must be >= 1")
    jobs = [(recipe, int(seed)) for recipe in filter(None, args.recipes.split(",")) for seed in args.seeds.split(",")]
    run_all(jobs, args.parallel, args.data_dir, Path(args.out_root), args.set)
    if args.render:
        table = render()
        print(table)
        write_readme(table)


if __name__ == "__main__":
    main()
