"""Does pretraining cure small data? The write-up's claim, measured offline on CIFAR-10 (issue 12).

    python benchmarks/transfer.py --data-dir ../shared/datasets            # everything, then the table
    python benchmarks/transfer.py --render                                 # the README table only

1. Pretrain: the `cifar10` recipe, unchanged, on CIFAR-10 classes 0-4 (airplane, automobile, bird,
   cat, deer): all their 25,000 training images (vitlab carves its usual 10% for validation).
2. Target: classes 5-9 (dog, frog, horse, ship, truck) with N training images per class (N = 100 and
   500). Each subset is drawn per seed, stratified: from a seeded permutation of each class's training
   images, the first N are `train/`, the next VAL_PER_CLASS are `val/` (model selection), and `test/`
   holds all 5,000 test images of classes 5-9, used once per run.
3. On each subset and seed, three methods, each with its recipe's own settings (nothing tuned here):
   - scratch: the `cifar10` recipe, at batch 32 with its lr scaled by sqrt(32 / 256);
   - probe:   the `finetune` recipe from the pretrained model with `optim.freeze=backbone` and the
              lr a linear head is usually given (1e-3);
   - full:    the `finetune` recipe from the pretrained model (lr 1e-4, layer decay 0.75).
   Every run takes the same STEPS optimizer steps of batch 32 (the schedule ends there), so the
   methods are compared at equal steps whatever N is.

Everything goes through the command line as a user's run does: the subsets are written as PNG image
folders (`root/{train,val,test}/<class>/*.png`) and trained with `--set data.name=FOLDER`. Records
are appended to benchmarks/results/transfer.json; the README table shows mean +- std over seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import append, fresh_dir, record_of  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "transfer.json"
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- transfer:begin -->", "<!-- transfer:end -->"
PRETRAIN_CLASSES, TARGET_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
VAL_PER_CLASS = 50
STEPS, BATCH = 500, 32
METHODS = ("scratch", "probe", "full")


# ---- the image folders ----------------------------------------------------------------------
def write_pngs(images: np.ndarray, labels: np.ndarray, names: list[str], folder: Path, ids: np.ndarray,
               pool: Path | None = None) -> None:
    """images[ids] as folder/<class name>/<id>.png. With `pool` (a folder already written the same
    way), files are hard-linked from it instead of encoded again (a copy where links fail)."""
    from PIL import Image
    for i in ids:
        name = names[int(labels[i])]
        dest = folder / name / f"{int(i):05d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if pool is not None:
            try:
                os.link(pool / name / dest.name, dest)
            except OSError:
                shutil.copyfile(pool / name / dest.name, dest)
            continue
        img = images[i]  # (C, H, W)
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(dest)


def subset(labels: np.ndarray, classes: tuple[int, ...], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids): per class, a seeded permutation of its images; the first n train, the
    next VAL_PER_CLASS validate. Disjoint, stratified, and the same for the same (n, seed)."""
    train, val = [], []
    for c in classes:
        ids = np.flatnonzero(labels == c)
        if len(ids) < n + VAL_PER_CLASS:
            raise ValueError(f"class {c} has {len(ids)} images, fewer than {n} + {VAL_PER_CLASS}")
        perm = np.random.default_rng([seed, n, c]).permutation(ids)
        train.append(perm[:n])
        val.append(perm[n:n + VAL_PER_CLASS])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _once(folder: Path, write) -> Path:
    """Build `folder` through a temporary sibling renamed at the end: a stopped script leaves no
    half-written folder that a later run would take as complete."""
    if folder.is_dir():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    tmp.rename(folder)
    return folder


def write_folders(work: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  names: list[str], sizes: list[int], seeds: list[int]) -> dict:
    """The pretraining folder and one target folder per (size, seed) under `work`; their paths."""
    (x, y), (xt, yt) = train, test
    pre_ids = np.flatnonzero(np.isin(y, PRETRAIN_CLASSES))
    pre_test = np.flatnonzero(np.isin(yt, PRETRAIN_CLASSES))
    target_test = np.flatnonzero(np.isin(yt, TARGET_CLASSES))

    def pretrain(root: Path) -> None:
        write_pngs(x, y, names, root / "train", pre_ids)
        write_pngs(xt, yt, names, root / "test", pre_test)
    out = {"pretrain": _once(work / "pretrain", pretrain)}
    pool = _once(work / "test-5-9", lambda root: write_pngs(xt, yt, names, root, target_test))
    for n in sizes:
        for seed in seeds:
            tr, va = subset(y, TARGET_CLASSES, n, seed)

            def target(root: Path, tr=tr, va=va) -> None:
                write_pngs(x, y, names, root / "train", tr)
                write_pngs(x, y, names, root / "val", va)
                write_pngs(xt, yt, names, root / "test", target_test, pool=pool)
            out[(n, seed)] = _once(work / f"target-n{n}-s{seed}", target)
    return out


# ---- the runs -------------------------------------------------------------------------------
def method_sets(method: str, pretrained: Path | None, steps: int = STEPS) -> tuple[str, list[str]]:
    """(recipe, --set items) of a method; `steps` optimizer steps of BATCH images for all."""
    common = [f"train.batch_size={BATCH}", f"train.max_steps={steps}", "train.epochs=100000"]
    if method == "scratch":
        return "cifar10", common + [f"optim.lr={0.002 * math.sqrt(BATCH / 256):.6g}"]
    if method == "probe":
        return "finetune", common + [f"model.pretrained={pretrained}", "optim.freeze=backbone", "optim.lr=0.001"]
    if method == "full":
        return "finetune", common + [f"model.pretrained={pretrained}"]
    raise ValueError(f"unknown method {method!r}; methods are {METHODS}")


def vitlab_train(recipe: str, sets: list[str], out: Path, log: Path) -> float:
    cmd = [sys.executable, "-m", "vitlab", "train", "--recipe", recipe, "--set", "runtime.progress=false",
           "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"run failed ({code}); see {log}")
    return time.time() - t0


def load_cifar10(data_dir: str | None) -> tuple[tuple, tuple, list[str]]:
    """((train images, labels), (test images, labels), class names) of the official CIFAR-10 files."""
    from vitlab.data.sources import get_source, verify
    source = get_source("cifar10")
    folder, layout = verify(source, data_dir)
    return layout.read(folder, "train"), layout.read(folder, "test"), list(source.classes)


def run_all(args, steps: int = STEPS) -> None:
    work = Path(args.work)
    train, test, names = load_cifar10(args.data_dir)
    folders = write_folders(work, train, test, names, args.sizes, args.seeds)
    pre_run = work / "pretrain-run"
    if not (pre_run / "results.json").is_file():
        shutil.rmtree(pre_run, ignore_errors=True)  # a stopped pretraining starts over
        wall = vitlab_train("cifar10", [f"data.name={folders['pretrain']}", "train.seed=0", *args.sets, *args.pretrain_set],
                            pre_run, work / "pretrain-run.log")
        append({**record_of(pre_run, "cifar10", wall), "method": "pretrain", "classes": list(PRETRAIN_CLASSES)},
               RESULTS)
    for n in args.sizes:
        for seed in args.seeds:
            for method in args.methods:
                recipe, sets = method_sets(method, pre_run / "model", steps)
                out = fresh_dir(work / "runs", f"{method}-n{n}-s{seed}")
                out.parent.mkdir(parents=True, exist_ok=True)
                wall = vitlab_train(recipe, sets + [f"data.name={folders[(n, seed)]}", f"train.seed={seed}", *args.sets], out,
                                    out.with_suffix(".log"))
                append({**record_of(out, recipe, wall), "method": method, "per_class": n,
                        "pretrained": str(pre_run / "model") if method != "scratch" else None,
                        "steps": steps, "batch_size": BATCH}, RESULTS)


# ---- the table ------------------------------------------------------------------------------
def table(records: list[dict]) -> str:
    runs = [r for r in records if r.get("method") in METHODS]
    pre = [r for r in records if r.get("method") == "pretrain"]
    lines = ["| images per class | method | test top-1 % (mean ± std) | seeds | val top-1 % | steps | wall per run | machine |",
             "|---|---|---|---|---|---|---|---|"]
    latest: dict[tuple, dict] = {}  # a seed run again (same steps and machine) replaces its earlier record
    for r in runs:
        latest[(r["per_class"], METHODS.index(r["method"]), r.get("steps"), machine(r), r["seed"])] = r
    groups: dict[tuple, list[dict]] = {}
    for (n, m, steps, where, _), r in latest.items():
        groups.setdefault((n, m, steps, where), []).append(r)
    for (n, m, steps, where), rs in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        test = [100 * r["test_top1"] for r in rs]
        val = [100 * r["val_top1"] for r in rs]
        sd = statistics.stdev(test) if len(test) > 1 else 0.0
        lines.append(f"| {n} | {METHODS[m]} | {statistics.mean(test):.1f} ± {sd:.1f} | "
                     f"{len(rs)} ({', '.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))}) | "
                     f"{statistics.mean(val):.1f} | {steps} | {statistics.mean(r['wall_s'] for r in rs) / 60:.1f} min | "
                     f"{where} |")
    for r in pre:
        lines.append("")
        lines.append(f"Pretrained model: `cifar10` recipe on classes 0-4, seed {r['seed']}: test top-1 "
                     f"{100 * r['test_top1']:.1f}% on their 5,000 test images (val {100 * r['val_top1']:.1f}%), "
                     f"{r['wall_s'] / 60:.1f} min, {machine(r)}.")
    return "\n".join(lines)


def machine(r: dict) -> str:
    return f"{r.get('cpu')} ({r.get('cpu_capability')}, {r.get('precision')})"


def render() -> str:
    doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    text = table(doc["runs"])
    readme = README.read_text()
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        README.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="where CIFAR-10 is (as for vitlab train)")
    p.add_argument("--work", default="runs/transfer", help="image folders and run directories")
    p.add_argument("--sizes", default="100,500", help="training images per class")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--set", action="append", default=[], dest="sets", help="extra --set for every run")
    p.add_argument("--pretrain-set", action="append", default=[], help="extra --set for the pretraining run")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps of every target run")
    p.add_argument("--render", action="store_true", help="only write the README table from the results")
    args = p.parse_args(argv)
    if not args.render:
        args.sizes = [int(s) for s in args.sizes.split(",")]
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.methods = [m for m in args.methods.split(",")]
        bad = [m for m in args.methods if m not in METHODS]
        if bad:
            p.error(f"unknown method(s) {bad}; methods are {list(METHODS)}")
        run_all(args, args.steps)
    print(render())


if __name__ == "__main__":
    main()
