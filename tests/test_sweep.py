"""benchmarks/sweep.py: which candidate phase 2 re-runs (the best on validation, never on test), the
fixed jobs, the deadline, and what each record holds. The training command is replaced by a tiny
script that writes a run directory whose numbers come from its arguments, so the orchestration is
tested in seconds without training anything."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

FAKE_TRAIN = r"""
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
args = dict(a.split("=", 1) for a in sys.argv[2:])
out.mkdir(parents=True)
(out / "started").write_text(repr(time.time()))
(out / "config.yaml").write_text(f"data: {{name: fake}}\ntrain: {{seed: {args['seed']}, epochs: 2}}\n")
(out / "env.json").write_text(json.dumps({"device": "cuda:0", "gpu": "Fake GPU", "cpu": "x", "torch": "2",
                                          "threads": 1, "precision": "bf16"}))
val, test = float(args.get("fake.val", 0.5)), float(args.get("fake.test", 0.1))
with open(out / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"kind": "epoch", "val_top1": val / 2}) + "\n")
    f.flush()
    time.sleep(float(args.get("fake.sleep", 0)))
    f.write(json.dumps({"kind": "epoch", "val_top1": val}) + "\n")
(out / "results.json").write_text(json.dumps({"best": {"val_top1": val}, "test": {"top1": test}, "params": 7}))
(out / "ended").write_text(repr(time.time()))
"""


@pytest.fixture
def sweep(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sweep
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)

    def command(recipe, seed, data_dir, out, extra, threads=None):
        return [sys.executable, str(fake), str(out), f"seed={seed}", f"recipe={recipe}", *extra]
    monkeypatch.setattr(sweep, "train_command", command)
    return sweep


def run_sweep(sweep, monkeypatch, tmp_path, spec: dict, *args: str) -> list[dict]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["sweep.py", str(path), "--out-root", str(tmp_path / "runs"),
                                      "--results", str(results), *args])
    sweep.main()
    return json.loads(results.read_text())["runs"]


def test_phase_two_reruns_the_best_validation_candidate_not_the_best_test_one(sweep, monkeypatch, tmp_path):
    spec = {"recipe": "cifar10", "common": ["train.epochs=2"],
            "candidates": {"a": ["fake.val=0.5", "fake.test=0.9"],   # best on test: must not matter
                           "b": ["fake.val=0.8", "fake.test=0.2"],
                           "c": ["fake.val=0.95"]},                 # best on val, but not selectable
            "select": {"from": ["a", "b"], "seeds": [1, 2]},
            "jobs": [{"recipe": "mnist", "seeds": [0, 1]}]}
    runs = run_sweep(sweep, monkeypatch, tmp_path, spec, "--parallel", "2", "--set", "k=s{seed}")
    assert len(runs) == 3 + 2 + 2 and all(r["status"] == "done" for r in runs)
    phase2 = [r for r in runs if r["phase"] == 2]
    assert {(r["candidate"], r["seed"]) for r in phase2} == {("b", 1), ("b", 2)}
    assert all(r["sets"] == ["train.epochs=2", "fake.val=0.8", "fake.test=0.2", f"k=s{r['seed']}"] for r in phase2)
    fixed = [r for r in runs if r["phase"] == 0]
    assert {(r["recipe"], r["seed"]) for r in fixed} == {("mnist", 0), ("mnist", 1)}
    assert all(r["sets"] == [f"k=s{r['seed']}"] for r in fixed)  # {seed}: each run's own
    assert all("train.epochs=2" not in r["sets"] for r in fixed)  # `common` is for candidates only
    b0 = next(r for r in runs if r["candidate"] == "b" and r["seed"] == 0)
    assert (b0["val_top1"], b0["test_top1"], b0["curve"], b0["gpu"]) == (0.8, 0.2, [0.4, 0.8], "Fake GPU")
    assert len({r["sweep"] for r in runs}) == 1 and len({r["run_dir"] for r in runs}) == 7


def test_top_n_rerun_and_candidates_outside_the_pool_wait_for_the_choice(sweep, monkeypatch, tmp_path):
    spec = {"recipe": "cifar10",
            "candidates": {"a": ["fake.val=0.5", "fake.sleep=0.5"], "b": ["fake.val=0.8"], "d": ["fake.val=0.7"],
                           "later": ["fake.val=0.99"]},  # best of all, but outside the pool: never chosen
            "select": {"from": ["a", "b", "d"], "top": 2, "seeds": [1, 2]}}
    runs = run_sweep(sweep, monkeypatch, tmp_path, spec, "--parallel", "4")
    assert all(r["status"] == "done" for r in runs)
    assert sorted((r["candidate"], r["seed"]) for r in runs if r["phase"] == 2) == [("b", 1), ("b", 2), ("d", 1), ("d", 2)]

    def when(r, what):
        return float((Path(r["run_dir"]) / what).read_text())
    pool_done = max(when(r, "ended") for r in runs if r["phase"] == 1 and r["candidate"] != "later")
    waited = [r for r in runs if r["phase"] == 2 or r["candidate"] == "later"]
    assert len(waited) == 5 and all(when(r, "started") >= pool_done for r in waited)  # a free slot did not start them
    later = next(r for r in runs if r["candidate"] == "later")
    assert when(later, "started") >= min(when(r, "ended") for r in runs if r["phase"] == 2)  # the seeds went first
    with pytest.raises(SystemExit, match=re.escape("select.top must be a whole number >= 1, got 0")):
        run_sweep(sweep, monkeypatch, tmp_path, {**spec, "select": {"seeds": [1], "top": 0}})


def test_the_deadline_stops_what_runs_and_keeps_its_curve(sweep, monkeypatch, tmp_path):
    spec = {"recipe": "cifar10",
            "candidates": {"slow": ["fake.val=0.9", "fake.sleep=60"], "quick": ["fake.val=0.6"]},
            "select": {"seeds": [1], "by_min": 0.02}}  # phase 2 from what has finished after ~1 s
    t = time.time()
    runs = run_sweep(sweep, monkeypatch, tmp_path, spec, "--parallel", "2", "--deadline-min", "0.1")
    assert time.time() - t < 30  # not the 60 s the slow run asked for
    by = {(r["candidate"], r["seed"]): r for r in runs}
    assert by[("quick", 0)]["status"] == "done" and by[("quick", 1)]["status"] == "done"  # chosen at by_min
    slow = by[("slow", 0)]
    assert slow["status"] == "stopped at the deadline" and slow["curve"] == [0.45] and "val_top1" not in slow
    assert ("slow", 1) not in by


def test_candidates_outside_the_pool_still_run_when_the_whole_pool_fails(sweep, monkeypatch, tmp_path, capsys):
    spec = {"recipe": "cifar10", "candidates": {"bad": ["fake.val=oops"], "ok": ["fake.val=0.7"]},
            "select": {"from": ["bad"], "seeds": [1]}}
    runs = run_sweep(sweep, monkeypatch, tmp_path, spec, "--parallel", "2", "--deadline-min", "0.3")  # no hang if held
    assert sorted((r["candidate"], r["seed"], r["status"][:6]) for r in runs) == [("bad", 0, "failed"), ("ok", 0, "done")]
    assert "selected nothing" in capsys.readouterr().out


def test_a_deadline_that_stops_the_pool_queues_no_phase_two(sweep, monkeypatch, tmp_path, capsys):
    spec = {"recipe": "cifar10", "candidates": {"slow": ["fake.val=0.9", "fake.sleep=60"]}, "select": {"seeds": [1]}}
    runs = run_sweep(sweep, monkeypatch, tmp_path, spec, "--deadline-min", "0.02")
    out = capsys.readouterr().out
    assert [r["status"] for r in runs] == ["stopped at the deadline"]
    assert "selected" not in out and "not started" not in out


def test_a_failed_run_is_recorded_and_the_rest_go_on(sweep, monkeypatch, tmp_path):
    spec = {"recipe": "cifar10", "candidates": {"bad": ["fake.val=oops"], "good": ["fake.val=0.7"]},
            "select": {"seeds": [1]}}
    runs = run_sweep(sweep, monkeypatch, tmp_path, spec, "--parallel", "1")
    by = {(r["candidate"], r["seed"]): r["status"] for r in runs}
    assert by[("bad", 0)].startswith("failed rc=") and by[("good", 0)] == "done" and by[("good", 1)] == "done"


def test_only_runs_part_of_a_round_without_fixed_jobs_or_phase_two(sweep, monkeypatch, tmp_path):
    spec = {"recipe": "cifar10", "candidates": {"a": ["fake.val=0.5"], "b": ["fake.val=0.8"], "c": ["fake.val=0.9"]},
            "select": {"seeds": [1]}, "jobs": [{"recipe": "mnist", "seeds": [0]}]}
    runs = run_sweep(sweep, monkeypatch, tmp_path, spec, "--only", "b,a")
    assert sorted((r["candidate"], r["seed"], r["phase"]) for r in runs) == [("a", 0, 1), ("b", 0, 1)]
    with pytest.raises(SystemExit, match=re.escape("unknown candidates ['z']")):
        run_sweep(sweep, monkeypatch, tmp_path, spec, "--only", "a,z")
    more = run_sweep(sweep, monkeypatch, tmp_path, spec, "--only", "c", "--seeds", "2,1")[2:]
    assert sorted((r["candidate"], r["seed"], r["phase"]) for r in more) == [("c", 1, 2), ("c", 2, 2)]
    folds = run_sweep(sweep, monkeypatch, tmp_path, spec, "--only", "a", "--seeds", "3,4", "--set", "k=f{seed}")[4:]
    assert sorted((r["seed"], r["sets"]) for r in folds) == [(3, ["fake.val=0.5", "k=f3"]), (4, ["fake.val=0.5", "k=f4"])]
    for bad, message in ((["--seeds", "1"], "--seeds needs --only"), (["--only", "a", "--seeds", "x"], "'x'")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            run_sweep(sweep, monkeypatch, tmp_path, spec, *bad)


@pytest.mark.parametrize("spec, message", [
    ({"candidates": {"a": []}}, "needs `recipe:`"),
    ({"recipe": "cifar10", "candidates": {"a": []}, "select": {"from": ["zz"]}}, "unknown candidates ['zz']"),
])
def test_bad_specs_are_refused_before_anything_runs(sweep, monkeypatch, tmp_path, spec, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_sweep(sweep, monkeypatch, tmp_path, spec)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweep.json").exists()


def test_the_shipped_specs_name_real_settings(sweep):
    """Every candidate of the shipped specs resolves to valid settings (a typo would cost a GPU lease)."""
    from vitlab.engine.args import load_run_config
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps"
    specs = sorted(root.glob("*.yaml"))
    assert specs
    for path in specs:
        spec = sweep.load_spec(path)
        for sets in spec["candidates"].values():
            load_run_config(spec["recipe"], list(spec.get("common") or []) + list(sets or []))
        for job in spec.get("jobs") or []:
            load_run_config(job["recipe"], list(job.get("sets") or []))
    run = subprocess.run([sys.executable, str(root.parent / "sweep.py"), str(specs[0]), "--dry-run"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.count(" -m vitlab train ") >= len(sweep.load_spec(specs[0])["candidates"])


def test_folds_pairs_runs_by_fold_and_seed_and_leaves_test_out(monkeypatch, tmp_path):
    """benchmarks/folds.py: a candidate's runs on any fold, paired with the reference's on the same
    fold and seed; other specs' runs only with --also; unfinished runs, other candidates and test
    top-1 play no part in the means; a name whose runs differ in settings is refused."""
    spec = tmp_path / "cv.yaml"
    spec.write_text("recipe: mnist\ncandidates:\n  a: []\n  b: [model.depth=4]\n")

    def run(name, fold, seed, val, test=0.5, spec_name="cv.yaml", status="done", lr=0.001):
        settings = {"model": {"depth": 4} if name == "b" else {}, "optim": {"lr": lr},
                    **({"data": {"val_fold": fold}} if fold else {})}
        return {"spec": f"benchmarks/sweeps/{spec_name}", "candidate": name, "seed": seed, "status": status,
                "val_top1": val, "test_top1": test, "settings": settings}
    runs = [run("a", 1, 1, 0.990), run("b", 1, 1, 0.993, test=0.1),
            run("a", 2, 2, 0.992), run("b", 2, 2, 0.993),
            run("a", 3, 3, 0.990),  # b has no fold-3 run: not paired
            run("b", 2, 2, 0.999, status="stopped"), run("c", 2, 2, 0.999),
            run("a", 0, 0, 0.994, spec_name="old.yaml"), run("b", 0, 0, 0.990, spec_name="old.yaml"),
            run("b", 0, 0, 0.950),  # fold 0 again in this spec: its own row, not averaged into old.yaml's pair
            run("b", 0, 0, 0.999, spec_name="older.yaml", lr=0.5)]  # the same name, other settings
    results = tmp_path / "sweep.json"
    results.write_text(json.dumps({"runs": runs}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "folds.py"
    folds = lambda *extra: subprocess.run([sys.executable, str(script), str(spec), "--only", "a,b", "--results",  # noqa: E731
                                           str(results), *extra], capture_output=True, text=True)
    out = folds()
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[1:3] for r in rows[:-1]] == [["0", "0"], ["1", "1"], ["2", "2"], ["3", "3"]]
    assert "| mean of 2 |  |  | 99.100 ± 0.141 | 99.300 ± 0.000 | +0.200 ± 0.141 |" in out.stdout  # +0.3, +0.1
    again = folds("--also", "old.yaml")
    assert "| old.yaml | 0 | 0 | 99.40 | 99.00 | -0.40 |" in again.stdout and "mean of 3 |" in again.stdout
    assert "| cv.yaml | 0 | 0 | - | 95.00 | - |" in again.stdout
    mixed = folds("--also", "old.yaml", "--also", "older.yaml")
    assert mixed.returncode != 0 and "'b'" in mixed.stderr and "2 different settings" in mixed.stderr


def test_folds_ref_from_takes_the_recipes_runs_of_another_spec_by_settings_not_name(monkeypatch, tmp_path):
    """--ref-from: the reference is every run the other spec recorded with the reference's settings
    as they resolve now, under any name; runs with other settings there are not."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from accuracy import recipe_settings
    spec = tmp_path / "r5.yaml"
    spec.write_text("recipe: mnist\ncandidates:\n  base: []\n  d5: [model.depth=5]\n")
    recipe = recipe_settings("mnist")

    def run(name, fold, val, spec_name, settings=recipe):
        data = {**settings.get("data", {}), **({"val_fold": fold} if fold else {})}
        return {"spec": f"benchmarks/sweeps/{spec_name}", "candidate": name, "seed": fold, "status": "done",
                "val_top1": val, "test_top1": 0.5, "settings": {**settings, "data": data}}
    deeper = {**recipe, "model": {**recipe["model"], "depth": 5}}
    runs = [run("old_name", 1, 0.990, "r4.yaml"), run("old_name", 2, 0.994, "r4.yaml"),
            run("other", 1, 0.900, "r4.yaml", settings={**recipe, "optim": {"lr": 0.5}}),  # not the recipe
            run("old_name", 1, 0.900, "r3.yaml"),                                            # not the named spec
            run("d5", 1, 0.993, "r5.yaml", deeper), run("d5", 2, 0.993, "r5.yaml", deeper)]
    results = tmp_path / "sweep.json"
    results.write_text(json.dumps({"runs": runs}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "folds.py"
    out = subprocess.run([sys.executable, str(script), str(spec), "--only", "base,d5", "--results", str(results),
                          "--ref-from", "r4.yaml"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| r5.yaml | 1 | 1 | 99.00 | 99.30 | +0.30 |" in out.stdout
    assert "| r5.yaml | 2 | 2 | 99.40 | 99.30 | -0.10 |" in out.stdout
    assert "| mean of 2 |  |  | 99.200 ± 0.283 | 99.300 ± 0.000 | +0.100 ± 0.283 |" in out.stdout
    runs.append(run("old_name", 0, 0.990, "r4.yaml") | {"seed": 1})  # a second seed on fold 0 ...
    runs.append(run("d5", 0, 0.999, "r5.yaml", deeper) | {"seed": 1})
    results.write_text(json.dumps({"runs": runs}))
    folds = lambda *extra: subprocess.run([sys.executable, str(script), str(spec), "--only", "base,d5",  # noqa: E731
                                           "--results", str(results), "--ref-from", "r4.yaml", *extra],
                                          capture_output=True, text=True)
    assert "| r5.yaml | 0 | 1 | 99.00 | 99.90 | +0.90 |" in folds().stdout and "mean of 3" in folds().stdout
    both = folds("--also", "r3.yaml")  # the reference would come from two places: refused, not half-paired
    assert both.returncode != 0 and "--ref-from and --also" in both.stderr
    only = folds("--seed-is-fold").stdout  # ... is left out with --seed-is-fold
    assert "| r5.yaml | 0 | 1 |" not in only and "| mean of 2 |  |  | 99.200 ± 0.283 |" in only
    none = subprocess.run([sys.executable, str(script), str(spec), "--only", "base,d5", "--results", str(results),
                           "--ref-from", "r9.yaml"], capture_output=True, text=True)
    assert none.returncode != 0 and "no finished run has 'base'" in none.stderr
