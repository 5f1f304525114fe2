"""Training images/s under a container's CPU quota, at each thread count, side by side in one process:
what vitlab.limits.usable_cpus (and so the torch thread count vitlab picks) is measured against.

    sudo python benchmarks/cpu_quota.py --quotas 1.0,1.2,1.5 --out benchmarks/results/cpu_quota.json

Needs root and a writable cgroup cpu controller (v1 /sys/fs/cgroup/cpu, or v2 with cpu enabled). For
each quota it makes a child cgroup with that quota (period 100 ms), starts a probe process in it, and
removes the cgroup after. The probe trains vit_tiny_patch4_32 (batch 128, bf16 where the CPU has bf16
units, else fp32) on random data; thread counts 1..N (N = the CPUs it may run on) take turns, round
after round, so that the machine's noise hits them alike; each figure is a median over rounds. It
also records what usable_cpus() reads inside the cgroup and the threads fit_threads() would pick.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

GROUP = "vitlab-cpu-quota-bench"
PERIOD_US = 100_000


def probe(rounds: int, steps: int) -> dict:
    """Inside the cgroup: images/s per thread count, and vitlab's own reading of the quota."""
    from vitlab import create_model
    from vitlab.bench import make_train_step
    from vitlab.engine.runtime import describe_machine, fast_bf16_available, fit_threads
    from vitlab.limits import affinity_cpus, cpu_quota, usable_cpus
    picked = fit_threads()
    precision = "bf16" if fast_bf16_available("cpu") else "fp32"
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch4_32", num_classes=10)
    step = make_train_step(model, precision, torch.device("cpu"))
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    counts = list(range(1, affinity_cpus() + 1))
    rates: dict[int, list[float]] = {n: [] for n in counts}
    for n in counts:  # warm-up at each count
        torch.set_num_threads(n)
        step(x, y)
    for _ in range(rounds):
        for n in counts:
            torch.set_num_threads(n)
            t = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            rates[n].append(steps * len(x) / (time.perf_counter() - t))
    return {"quota_read": cpu_quota(), "usable_cpus": usable_cpus(), "threads_vitlab_picks": picked,
            "precision": precision, "images_per_s": {str(n): round(statistics.median(r), 1) for n, r in rates.items()},
            "rounds": {str(n): [round(v, 1) for v in r] for n, r in rates.items()},
            "machine": describe_machine()}


def cgroup_root() -> tuple[Path, str]:
    """(the folder to make the child cgroup in, "v1" or "v2"), or an error naming what is missing."""
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        return v1, "v1"
    control = Path("/sys/fs/cgroup/cgroup.subtree_control")
    if control.exists() and "cpu" in control.read_text().split():
        return control.parent, "v2"
    raise SystemExit("no writable cgroup cpu controller here (v1 /sys/fs/cgroup/cpu or v2 with cpu enabled)")


def run_in_quota(quota: float, rounds: int, steps: int) -> dict:
    root, version = cgroup_root()
    group = root / GROUP
    group.mkdir(exist_ok=True)
    try:
        if version == "v1":
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(int(quota * PERIOD_US)))
            procs = group / "tasks"
        else:
            (group / "cpu.max").write_text(f"{int(quota * PERIOD_US)} {PERIOD_US}")
            procs = group / "cgroup.procs"
        out = subprocess.run([sys.executable, __file__, "--probe", "--rounds", str(rounds), "--steps", str(steps)],
                             preexec_fn=lambda: procs.write_text(str(os.getpid())), capture_output=True, text=True,
                             check=True)
        return {"quota_cpus": quota, "cgroup": version, **json.loads(out.stdout.strip().splitlines()[-1])}
    finally:
        group.rmdir()  # empty once the probe has ended


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quotas", default="1.0,1.2,1.5", help="CPUs' worth of time per period, comma list")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per thread count per round")
    ap.add_argument("--out", type=Path, help="append the results (a list of runs) to this JSON file")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.rounds, args.steps)))
        return
    rows = []
    for quota in (float(q) for q in args.quotas.split(",")):
        row = run_in_quota(quota, args.rounds, args.steps)
        rates = row["images_per_s"]
        best = max(rates, key=rates.get)
        print(f"quota {quota:g} CPUs: " + ", ".join(f"{n} thread(s) {v:.1f} img/s" for n, v in rates.items())
              + f"; fastest {best}, vitlab picks {row['threads_vitlab_picks']}", flush=True)
        rows.append(row)
    if args.out:
        runs = json.loads(args.out.read_text()) if args.out.exists() else []
        runs.append({"measured": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv), "rows": rows})
        args.out.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
