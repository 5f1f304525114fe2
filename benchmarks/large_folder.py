"""A folder larger than it is comfortable to hold decoded: streaming, the decoded cache, and the peak
memory of a fine-tuning run at 224 px (issue 12).

    python benchmarks/large_folder.py --make runs/large-folder        # 20,480 JPEGs, once (~2 min)
    python benchmarks/large_folder.py --folder runs/large-folder      # measure; appends to the results

Measured, one after the other on the same machine:
1. images/s of the loader alone (decode + the finetune recipe's augmentation at 224 px, batch 32):
   streamed with `data.workers` processes, and from the decoded cache (built first, timed too);
2. images/s of vit_tiny_patch16_224's training step alone (the same batch, bf16 where native);
3. `vitlab train --recipe finetune` on the folder for STEPS steps, once per storage (stream, cache,
   memory), from a vit_tiny_patch16_224 model directory (random weights: no network here; the
   memory and speed do not depend on the values). The peak memory of the whole process tree
   (the run and its decoding workers) is sampled from /proc every 0.2 s as the sum of each
   process's proportional set size (PSS: shared pages split between the processes sharing them,
   so forked workers are not counted twice), and as the main process's peak RSS (VmHWM).

The generated images are 400x300 JPEGs (quality 90) of smooth random colour fields with a class-
dependent pattern: decoding works as on photos (a 2x JPEG draft, then a bicubic resize of the centre
square). Results: benchmarks/results/large_folder.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "large_folder.json"
CLASSES, PER_CLASS = 10, 2048
STEPS = 40


def _write_class(args: tuple[Path, int, int]) -> int:
    from PIL import Image
    root, c, n = args
    rng = np.random.default_rng(c)
    folder = root / f"class{c:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((400, 300), Image.BILINEAR)
        arr = np.asarray(img).copy()
        arr[(c * 7) % 300::40, :, c % 3] = 255  # a class-dependent stripe pattern
        Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)
    return n


def make(root: Path, per_class: int = PER_CLASS) -> None:
    tmp = root.with_name(root.name + ".partial")
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        total = sum(pool.map(_write_class, [(tmp, c, per_class) for c in range(CLASSES)]))
    tmp.rename(root)
    print(f"wrote {total} JPEGs under {root}")


def tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS over pid and its descendants now, pid's peak RSS so far) in bytes; 0s for what has gone."""
    def children(p: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                out += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
        return out
    total, todo, rss = 0, [pid], 0
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            if p == pid:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):  # the main process's peak RSS so far
                        rss = int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += children(p)
    return total, rss


def run_with_peak(cmd: list[str], log: Path) -> dict:
    peak = {"pss": 0, "rss": 0}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.time()

        def sample() -> None:
            while proc.poll() is None:
                pss, rss = tree_memory(proc.pid)
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
                time.sleep(0.2)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        code = proc.wait()
        th.join()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {log}")
    return {"wall_s": round(time.time() - t0, 1), "peak_tree_pss_mib": round(peak["pss"] / 2**20),
            "peak_main_rss_mib": round(peak["rss"] / 2**20)}


def loader_rate(data, cfg, batches: int) -> float:
    from vitlab.data.augment import AugmentArgs, TrainTransform
    from vitlab.data.loader import BatchLoader
    loader = BatchLoader(data, 32, True, TrainTransform(AugmentArgs(crop_pad=4, flip=True), cfg), seed=0)
    it = iter(loader)
    next(it)  # workers started, first batches in flight
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * 32 / (time.perf_counter() - t)
    del it
    return rate


def measure(folder: Path, work: Path, batches: int, steps: int) -> dict:
    import torch

    import vitlab
    from vitlab.data import load_dataset
    from vitlab.engine.runtime import describe_machine, fast_bf16_available
    from vitlab.weights.modeldir import save_model
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import make_step
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "decoded"
    out: dict = {"machine": describe_machine(), "command": " ".join(sys.argv), "folder": str(folder),
                 "images": sum(1 for _ in folder.rglob("*.jpg")), "img_size": 224, "batch_size": 32,
                 "workers": min(4, os.cpu_count() or 1)}
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=CLASSES).train()
    stream = load_dataset(folder, "train", image_size=224, storage="stream")
    out["loader_stream_images_per_s"] = round(loader_rate(stream, model.config, batches), 1)
    t = time.perf_counter()
    cached = load_dataset(folder, "train", image_size=224, storage="cache", cache_dir=cache_dir)
    out["cache_build_s"] = round(time.perf_counter() - t, 1)
    out["cache_build_images_per_s"] = round(len(cached) / out["cache_build_s"], 1)
    out["loader_cache_images_per_s"] = round(loader_rate(cached, model.config, batches), 1)
    bf16 = fast_bf16_available("cpu")
    step = make_step(model, bf16)
    x, y = torch.randn(32, 3, 224, 224), torch.randint(0, CLASSES, (32,))
    step(x, y)
    t = time.perf_counter()
    for _ in range(5):
        step(x, y)
    out["train_step_images_per_s"] = round(5 * 32 / (time.perf_counter() - t), 1)
    out["precision"] = "bf16" if bf16 else "fp32"
    src = work / "tiny224"
    if not src.exists():
        save_model(vitlab.create_model("vit_tiny_patch16_224"), src)
    out["runs"] = {}
    for storage in ("stream", "cache", "memory"):
        run = work / f"run-{storage}-{int(time.time())}"
        cmd = [sys.executable, "-m", "vitlab", "train", "--recipe", "finetune", "--set", f"model.pretrained={src}",
               "--set", f"data.name={folder}", "--set", f"data.storage={storage}", "--set",
               f"data.cache_dir={cache_dir}", "--set", f"train.max_steps={steps}", "--set", "train.epochs=100",
               "--set", "runtime.progress=false", "--set", "train.log_every=10", "--out", str(run)]
        r = run_with_peak(cmd, run.with_suffix(".log"))
        steps_log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                     if '"kind": "step"' in line]
        r["train_images_per_s"] = round(steps_log[-1]["images_per_s"], 1) if steps_log else None
        out["runs"][storage] = r
        print(storage, r, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make", help="write the generated folder here")
    ap.add_argument("--folder", help="measure on this folder")
    ap.add_argument("--work", default=None, help="run directories and the cache (default: a temporary folder)")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args()
    if args.make:
        make(Path(args.make))
    if args.folder:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(Path(args.folder), Path(args.work or tmp), args.batches, args.steps)
        print(json.dumps(result, indent=2))
        doc = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
        doc["runs"].append(result)
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
