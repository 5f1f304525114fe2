r"""Cross-validated comparison of a sweep's candidates: their runs on validation folds, paired by fold.

    python benchmarks/folds.py benchmarks/sweeps/mnist-15ep-r4.yaml --only base,p4fr_d4

One validation split of a few thousand images cannot rank settings whose accuracies differ by a few
of its images, however many seeds run on it: every run is judged on the same images. Runs on other
folds (`--set data.val_fold=F`, vitlab.data.stratified_split) are judged on other held-out images.
This script finds every finished run of the named candidates in benchmarks/results/sweep.json, on
any fold, recorded by this spec (or one named with --also: its candidates of the same names, with
the same settings), and prints one row per spec, fold and seed: each
candidate's val top-1 and its difference from the first candidate's (the reference), then the mean
and sample std over the rows that every candidate ran (a paired comparison). Test top-1 is printed
beside, never part of the comparison.

    python benchmarks/folds.py benchmarks/sweeps/mnist-15ep-r4.yaml --only base,p4fr_d4 \
        --also benchmarks/sweeps/mnist-15ep-r3.yaml      # round 3's pair on fold 0 counts too

A recipe's runs from an earlier round can be the reference, so that a new candidate need not run it
again: with --ref-from SPEC, the reference (the first of --only) is every finished run SPEC recorded
with the settings the reference has now, whatever its candidate name there, paired with this spec's
runs of the same fold and seed. "Settings" are those a record keeps (benchmarks/accuracy.py
settings_of: not the fold, the seed, runtime.* such as the precision, or the machine); the table's
rows do not say where each run ran, so compare runs of one machine and precision.

    python benchmarks/folds.py benchmarks/sweeps/mnist-15ep-r5.yaml --only p4fr_d4,d5 \
        --ref-from benchmarks/sweeps/mnist-15ep-r4.yaml --seed-is-fold  # the recipe ran there as p4fr_d4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import recipe_settings  # noqa: E402
from sweep import RESULTS, load_spec  # noqa: E402


def strip_fold(settings: dict) -> dict:
    data = {k: v for k, v in (settings.get("data") or {}).items() if k != "val_fold"}
    return {**{k: v for k, v in settings.items() if k != "data"}, **({"data": data} if data else {})}


def fold_of(settings: dict) -> int:
    return int((settings.get("data") or {}).get("val_fold", 0))


def spec_rows(runs: list[dict], keep, as_spec: str | None = None) -> dict[tuple[str, int, int], list[dict]]:
    """{(spec, fold, seed): [runs]} of the finished runs that `keep(run)` accepts; the spec is the one
    that recorded each run, or `as_spec` for all."""
    out: dict[tuple[str, int, int], list[dict]] = {}
    for r in runs:
        if r.get("status") == "done" and keep(r):
            key = (as_spec or spec_name(r), fold_of(r.get("settings") or {}), r["seed"])
            out.setdefault(key, []).append(r)
    return out


def spec_name(run: dict) -> str:
    return Path(run.get("spec", "")).name


def by_fold(runs: list[dict], name: str, specs: set[str]) -> dict[tuple[str, int, int], list[dict]]:
    """{(spec, fold, seed): [runs]} of candidate `name`'s finished runs recorded by `specs`. They must
    share their settings but the fold: a recipe changed between them would make the name mean two things."""
    out = spec_rows(runs, lambda r: r.get("candidate") == name and spec_name(r) in specs)
    kinds: list[dict] = []
    for r in (r for rows in out.values() for r in rows):
        if (settings := strip_fold(r.get("settings") or {})) not in kinds:
            kinds.append(settings)
    if len(kinds) > 1:
        raise SystemExit(f"candidate {name!r}'s runs in {sorted(specs)} have {len(kinds)} different settings "
                         f"(did the recipe change between them?); compare them with one spec at a time")
    return out


def resolved(spec: dict, name: str) -> dict:
    """The settings a run of the spec's candidate `name` records (fold and seed aside), as vitlab
    resolves them now."""
    sets = list(spec.get("common") or []) + list(spec["candidates"][name] or [])
    return strip_fold(recipe_settings(spec["recipe"], sets))


def runs_like(runs: list[dict], settings: dict, spec: str, as_spec: str) -> dict[tuple[str, int, int], list[dict]]:
    """{(as_spec, fold, seed): [runs]} of the finished runs `spec` recorded with `settings`
    (fold aside), whichever candidate they ran as."""
    return spec_rows(runs, lambda r: spec_name(r) == spec and strip_fold(r.get("settings") or {}) == settings,
                     as_spec)


def signed(x: float, digits: int) -> str:
    """x with its sign, "+0.00" rather than "-0.00" for a float-noise zero."""
    return f"{round(x, 9) + 0.0:+.{digits}f}"


def table(names: list[str], found: dict[str, dict[tuple[str, int, int], list[dict]]]) -> str:
    """One row per (spec, fold, seed): runs pair only with runs of the same spec (a later spec's extra
    seeds of one candidate do not join an earlier round's pair); the mean and sample std over the rows
    that every candidate ran."""
    mean = lambda rs, k: statistics.fmean(100 * r[k] for r in rs)  # noqa: E731
    ref = names[0]
    head = ["spec", "fold", "seed"] + [f"{n} val %" for n in names] + [f"{n} - {ref}" for n in names[1:]] + \
           [f"{n} test %" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    vals: dict[str, list[float]] = {n: [] for n in names}
    for key in sorted(set().union(*(found[n] for n in names))):
        have = {n: found[n].get(key, []) for n in names}
        cells = [key[0], str(key[1]), str(key[2])] + [f"{mean(have[n], 'val_top1'):.2f}" if have[n] else "-" for n in names]
        complete = all(have.values())
        cells += [signed(mean(have[n], 'val_top1') - mean(have[ref], 'val_top1'), 2) if complete else "-"
                  for n in names[1:]]
        cells += [f"{mean(have[n], 'test_top1'):.2f}" if have[n] else "-" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
        for n in names if complete else ():
            vals[n].append(mean(have[n], "val_top1"))
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")  # noqa: E731
    k = len(vals[ref])
    if not k:
        return "\n".join(lines + ["(no fold that every candidate ran)"])
    diffs = {n: [a - b for a, b in zip(vals[n], vals[ref])] for n in names[1:]}
    cells = [f"mean of {k}", "", ""] + [f"{statistics.fmean(vals[n]):.3f} ± {sd(vals[n]):.3f}" for n in names]
    cells += [f"{signed(statistics.fmean(diffs[n]), 3)} ± {sd(diffs[n]):.3f}" for n in names[1:]] + [""] * len(names)
    return "\n".join(lines + ["| " + " | ".join(cells) + " |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", type=Path)
    ap.add_argument("--only", required=True, help="comma-separated candidates; the first is the reference")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--also", action="append", default=[], metavar="SPEC",
                    help="count runs that another spec recorded with the same settings too (e.g. an earlier round's fold 0)")
    ap.add_argument("--ref-from", type=Path, metavar="SPEC",
                    help="the reference's runs are those SPEC recorded with its settings (under any name), "
                         "paired with this spec's by fold and seed")
    ap.add_argument("--seed-is-fold", action="store_true",
                    help="only the rows whose seed is their fold (the rounds' one run per fold), leaving out "
                         "extra seeds on a fold, which are judged on the same val images")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(spec["candidates"]))
    if unknown or len(names) < 2:
        raise SystemExit(f"--only {args.only!r}: give two or more of the spec's candidates {sorted(spec['candidates'])}")
    runs = json.loads(args.results.read_text())["runs"]
    specs = {args.spec.name} | {Path(a).name for a in args.also}
    if args.ref_from and args.also:
        raise SystemExit("--ref-from and --also: give one (the reference's runs come from --ref-from's spec alone)")
    found = {n: by_fold(runs, n, specs) for n in (names[1:] if args.ref_from else names)}
    if args.ref_from:
        want = resolved(spec, names[0])
        found[names[0]] = runs_like(runs, want, args.ref_from.name, args.spec.name)
        if not found[names[0]]:
            raise SystemExit(f"--ref-from {args.ref_from}: no finished run has {names[0]!r}'s settings "
                             f"{json.dumps(want)}")
    if args.seed_is_fold:
        found = {n: {k: v for k, v in rows.items() if k[1] == k[2]} for n, rows in found.items()}
    print(table(names, found))


if __name__ == "__main__":
    main()
