"""Recipe search on the validation split: candidates side by side, the best one re-run over seeds.

    python benchmarks/sweep.py benchmarks/sweeps/cifar10-15ep.yaml --data-dir ../shared/datasets \
        --parallel 8 --deadline-min 8

A spec (YAML) names a base recipe, the settings every run shares, the candidates (each a list of
`--set` overrides on top), which candidates may be selected, and fixed extra jobs:

    recipe: cifar10
    common: [train.epochs=15]
    candidates:
      stem64: [model.conv_stem=[64,128]]
    select: {from: [stem64], seeds: [1, 2]}     # the best seed-0 val top-1 among these, seeds 1, 2
    jobs: [{recipe: mnist, seeds: [0, 1, 2]}]    # plus whole recipes as they ship

`select.top: N` re-runs the N best instead of one. Candidates left out of `select.from` wait until
the choice is made, so that the chosen seeds start at once rather than behind them: list the main
bets in `from` (one wave of --parallel runs) and the rest run beside the seeds in the next wave.
Slots that the pool leaves free stay empty until then.

`--only a,b` runs just those candidates (part of a round, e.g. what fits one CPU session), with no
fixed jobs and no phase 2; `--only a --seeds 1,2` runs more seeds of one by hand. Phase 1 runs every
candidate with seed 0 (and the fixed jobs, first); as soon as the last selectable candidate has
finished (or at `select.by_min` minutes, among those finished by then), phase 2 queues the chosen
candidates' other seeds ahead of anything still waiting.
Selection looks at the validation split only (each run's best val top-1); a run's test top-1 is
that of its val-selected weights, measured once at its end, and plays no part in any choice.

Every finished run is appended to the results file (default benchmarks/results/sweep.json) with
its candidate, its settings, its per-epoch validation curve and the machine (GPU name included).
A run still going at the deadline is stopped and recorded as "stopped" with its curve so far, so
that a lease that ends at a fixed time still returns everything it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import append, cores, fresh_dir, record_of, threads_per_run, train_command  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sweep.json"


def load_spec(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "recipe" not in spec or not isinstance(spec.get("candidates"), dict):
        raise SystemExit(f"{path}: a spec needs `recipe:` and a `candidates:` mapping")
    select = spec.get("select") or {}
    unknown = set(select.get("from") or []) - set(spec["candidates"])
    if unknown:
        raise SystemExit(f"{path}: select.from names unknown candidates {sorted(unknown)}")
    top = select.get("top", 1)
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise SystemExit(f"{path}: select.top must be a whole number >= 1, got {top!r}")
    return spec


def curve(run_dir: Path) -> list[float]:
    """Validation top-1 per evaluation, from the run's metrics log."""
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("val_top1") is not None:
            out.append(round(rec["val_top1"], 4))
    return out


class Job:
    def __init__(self, name: str, recipe: str, seed: int, sets: list[str], phase: int):
        self.name, self.recipe, self.seed, self.sets, self.phase = name, recipe, seed, sets, phase
        self.proc: subprocess.Popen | None = None
        self.log = None  # the run's stdout + stderr file, open while it runs
        self.out: Path | None = None
        self.started = 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--data-dir")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--deadline-min", type=float, default=None, help="stop whatever still runs after this long")
    ap.add_argument("--out-root", default="runs/sweep")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--set", action="append", default=[],
                    help="extra --set for every run (after the spec's); {seed} in it becomes the run's seed, "
                         "e.g. data.val_fold={seed} runs each seed on its own validation fold")
    ap.add_argument("--dry-run", action="store_true", help="print the commands of phase 1 and stop")
    ap.add_argument("--only", help="comma-separated candidates: part of a round (e.g. what fits one CPU session); "
                                   "no fixed jobs and no phase 2, which needs the whole round's seed-0 results")
    ap.add_argument("--seeds", default="0", help="with --only: comma-separated seeds of each named candidate, "
                                                 "e.g. 1,2 for more seeds of a close one (recorded as phase 2)")
    args = ap.parse_args()
    try:
        seeds = sorted({int(x) for x in args.seeds.split(",")})
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: give comma-separated whole numbers, e.g. 1,2") from None
    if seeds != [0] and not args.only:
        raise SystemExit("--seeds needs --only: a whole round runs seed 0, then phase 2 picks the seeds")
    spec = load_spec(args.spec)
    common = list(spec.get("common") or [])
    select = spec.get("select") or {}
    candidates = spec["candidates"]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(candidates))
        if unknown or not names:
            raise SystemExit(f"--only {args.only!r}: unknown candidates {unknown}; the spec has {sorted(candidates)}")
        candidates, select = {n: candidates[n] for n in names}, {}

    def extra(seed: int) -> list[str]:
        """--set for a run of `seed`: {seed} in a value becomes the seed."""
        return [s.replace("{seed}", str(seed)) for s in args.set]

    queue = [Job(k, spec["recipe"], seed, common + list(v or []) + extra(seed), 1 if seed == 0 else 2)
             for seed in seeds for k, v in candidates.items()]
    for j in ([] if args.only else spec.get("jobs") or []):
        queue += [Job(j["recipe"], j["recipe"], int(s), list(j.get("sets") or []) + extra(int(s)), 0)
                  for s in j.get("seeds", [0])]
    queue.sort(key=lambda j: j.phase == 1)  # fixed jobs (the longest, whole recipes) start first
    threads = threads_per_run(args.parallel, cores())
    out_root = Path(args.out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        for j in queue:
            print(" ".join(train_command(j.recipe, j.seed, args.data_dir, out_root / j.name, j.sets, threads)))
        return
    t0 = time.time()
    deadline = t0 + 60 * args.deadline_min if args.deadline_min else None
    running: list[Job] = []
    pool_names = set(select.get("from") or candidates)  # the candidates phase 2 chooses among
    pool_left = sum(j.phase == 1 and j.name in pool_names for j in queue)
    seed0: dict[str, float] = {}
    decided = not select.get("seeds")  # until then, candidates outside the pool wait
    sweep_id = time.strftime("%Y-%m-%dT%H:%M:%S")

    def finish(j: Job, status: str) -> None:
        nonlocal pool_left
        j.log.close()
        rec = {"sweep": sweep_id, "spec": str(args.spec), "candidate": j.name, "phase": j.phase, "sets": j.sets,
               "status": status, "seed": j.seed, "recipe": j.recipe, "run_dir": str(j.out),
               "wall_s": round(time.time() - j.started, 1), "parallel": args.parallel, "curve": curve(j.out)}
        if status == "done":
            try:
                rec = {**rec, **record_of(j.out, j.recipe, time.time() - j.started)}
            except (OSError, ValueError, KeyError) as e:
                rec["status"] = f"unreadable: {e}"
        append(rec, args.results)
        print(json.dumps({k: rec.get(k) for k in ("candidate", "seed", "status", "val_top1", "test_top1", "wall_s")}),
              flush=True)
        if j.phase == 1:
            if rec.get("val_top1") is not None:
                seed0[j.name] = rec["val_top1"]
            if j.name in pool_names:
                pool_left -= 1
                if pool_left == 0:
                    choose(final=True)

    def choose(final: bool = False) -> None:
        """Queue phase 2 (once): the seeds of the `select.top` best seed-0 val top-1 among the
        selectable candidates finished so far. With none finished, it waits, unless `final`."""
        nonlocal decided
        pool = [k for k in candidates if k in pool_names and k in seed0]
        if decided or not (pool or final):
            return
        decided = True
        best = sorted(pool, key=lambda k: -seed0[k])[:select.get("top", 1)]
        print(f"selected {best} (val top-1 {[round(seed0[k], 4) for k in best]}, of {len(pool)} finished)"
              if best else "selected nothing: no selectable candidate gave a val top-1", flush=True)
        queue[:0] = [Job(k, spec["recipe"], int(s), common + list(spec["candidates"][k] or []) + extra(int(s)), 2)
                     for k in best for s in select["seeds"]]

    while queue or running:
        while len(running) < args.parallel:
            j = next((j for j in queue if decided or j.phase != 1 or j.name in pool_names), None)
            if j is None:
                break
            queue.remove(j)
            j.out = fresh_dir(out_root, f"{j.name}-s{j.seed}")
            j.log = open(j.out.parent / f"{j.out.name}.log", "w")
            cmd = train_command(j.recipe, j.seed, args.data_dir, j.out, j.sets, threads)
            j.proc = subprocess.Popen(cmd, stdout=j.log, stderr=subprocess.STDOUT, start_new_session=True)
            j.started = time.time()
            running.append(j)
        time.sleep(1)
        if select.get("by_min") and time.time() > t0 + 60 * select["by_min"]:
            choose()
        for j in list(running):
            rc = j.proc.poll()
            if rc is not None:
                running.remove(j)
                finish(j, "done" if rc == 0 else f"failed rc={rc}")
        if deadline and time.time() > deadline:
            decided = True  # what the deadline stops chooses nothing: no phase 2 to list as not started
            for j in running:
                os.killpg(j.proc.pid, signal.SIGTERM)
            for j in running:
                try:
                    j.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(j.proc.pid, signal.SIGKILL)
                finish(j, "stopped at the deadline")
            for j in queue:
                print(f"not started: {j.name} seed {j.seed}", flush=True)
            break
    print(f"sweep took {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
