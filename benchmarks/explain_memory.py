"""Memory and time of `vitlab attention`'s methods on a big model (issue 11: "captures only the layers
a method needs, so a ViT-B/16 at 224 px fits in memory on a laptop").

    python benchmarks/explain_memory.py --preset vit_base_patch16_224 --batch 8 \
        --out benchmarks/results/explain_memory.json

Each measurement runs in a fresh process (so the peak RSS is its own): the model is built with
random weights, one untimed call warms up, then one timed call. `all-layers` is the naive way for
comparison: every layer's (B, heads, N, N) maps captured in one forward pass, as most tools do.
Peak RSS is the process's high-water mark (`ru_maxrss`) minus the RSS after building the model.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("forward", "raw", "rollout", "gradient", "all-layers")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(preset: str, method: str, batch: int) -> dict:
    import torch

    import vitlab
    from vitlab.attention import capture_attention, explain
    torch.manual_seed(0)
    model = vitlab.create_model(preset).eval()
    x = torch.randn(batch, *model.config.input_size)
    base = rss_mb()

    def call():
        if method == "forward":
            with torch.no_grad():
                model(x)
        elif method == "all-layers":
            with capture_attention(model) as maps, torch.no_grad():
                model(x)
            return maps
        else:
            explain(model, x, method)
    call()
    t = time.perf_counter()
    call()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {"method": method, "batch": batch, "seconds": round(seconds, 3),
            "peak_over_model_mb": round(peak - base, 1), "model_rss_mb": round(base, 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", help="append the rows to this JSON file")
    ap.add_argument("--child", nargs=3, metavar=("PRESET", "METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return
    from vitlab.engine.runtime import describe_machine
    rows = []
    for method in args.methods.split(","):
        r = subprocess.run([sys.executable, __file__, "--child", args.preset, method, str(args.batch)],
                           check=True, capture_output=True, text=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{method:11} batch {args.batch}: {rows[-1]['seconds']:7.2f} s  "
              f"peak +{rows[-1]['peak_over_model_mb']:8.1f} MB over the model", flush=True)
    if args.out:
        path = Path(args.out)
        doc = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        doc["runs"].append({"preset": args.preset, "machine": describe_machine(), "command": " ".join(sys.argv),
                            "rows": rows})
        path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
