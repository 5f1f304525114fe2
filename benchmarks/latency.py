"""Inference latency by backend (issue 12, item 5): eager PyTorch in fp32 and under bf16 autocast (what
`vitlab predict/serve --precision bf16` run), torch.compile, onnxruntime fp32 and onnxruntime int8, at
batch 1 and 32, for the given presets, interleaved in one run.

    python benchmarks/latency.py --out benchmarks/results/latency_cpu.json
    python benchmarks/latency.py --presets vit_tiny_patch4_32 --batches 1,32 --rounds 5
    python benchmarks/latency.py --backends eager,eager-bf16,onnxruntime

Random weights (latency does not depend on their values); fp32 inputs. Each backend is warmed up
first (onnxruntime's session set-up is reported as `setup_s`, each backend's first call at a batch
size, which for torch.compile includes compiling, as `first_call_s`), then the backends take turns, round after round, so that machine noise hits them alike;
a cell is the median over rounds of the mean of `--reps` calls. The ONNX files come from
vitlab.weights.export (the same path as `vitlab export`, parity-checked), in a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vitlab.config import get_config
from vitlab.engine.runtime import describe_machine
from vitlab.model import VisionTransformer


def timed(fn, x, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t) / reps


BACKENDS = ("eager", "eager-bf16", "compile", "onnxruntime", "onnxruntime-int8")


def backends(model: VisionTransformer, folder: Path, threads: int, wanted: tuple[str, ...] = BACKENDS) -> dict:
    """name -> (callable on a float tensor, setup seconds), built once per model: eager PyTorch in
    fp32 and under bf16 autocast (vitlab.predict.inference_precision, as predict and serve run it),
    torch.compile with static shapes (it compiles again, timed as its warm-up, for each batch size),
    and onnxruntime sessions on dynamic-batch exports. A backend that cannot run here is left out,
    with the reason."""
    from vitlab.predict import inference_precision
    from vitlab.weights.export import export_model
    import onnxruntime as ort
    out = {}
    model.eval()

    def eager(x):
        with torch.inference_mode():
            return model(x)
    out["eager"] = (eager, 0.0)  # always: the reference the others are compared with
    if "eager-bf16" in wanted:
        autocast = inference_precision(model, "bf16")

        def eager_bf16(x):
            with torch.inference_mode(), autocast():
                return model(x)
        out["eager-bf16"] = (eager_bf16, 0.0)
    try:
        if "compile" in wanted:
            torch._dynamo.reset()
            compiled = torch.compile(model, dynamic=False)

            def run_compiled(x):
                with torch.inference_mode():
                    return compiled(x)
            out["compile"] = (run_compiled, 0.0)
    except Exception as e:  # no C++ compiler, an unsupported op: report and go on
        print(f"torch.compile unavailable: {(str(e).splitlines() or [type(e).__name__])[0][:200]}", file=sys.stderr)
    for name, int8 in (("onnxruntime", False), ("onnxruntime-int8", True)):
        if name not in wanted:
            continue
        try:
            path = folder / f"{model.config.name}{'-int8' if int8 else ''}.onnx"
            export_model(model, path, "onnx", dynamic_batch=True, int8=int8)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            # idle workers must not spin between calls: they would steal the cores from the other backends
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            t = time.perf_counter()
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            out[name] = (lambda x, s=sess: s.run(["logits"], {"pixels": x.numpy()})[0], time.perf_counter() - t)
        except Exception as e:
            print(f"{name} unavailable: {(str(e).splitlines() or [type(e).__name__])[0][:200]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="vit_tiny_patch4_32,vit_base_patch16_224")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=0, help="calls per timing (default: ~0.3 s worth, at least 1)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help=f"comma-separated, from {BACKENDS} (eager always runs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    wanted = tuple(args.backends.split(","))
    if not set(wanted) <= set(BACKENDS):
        ap.error(f"--backends {args.backends}: unknown {sorted(set(wanted) - set(BACKENDS))}; choose from {BACKENDS}")
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            torch.manual_seed(0)
            model = VisionTransformer(get_config(preset))
            fns = backends(model, Path(tmp), threads, wanted)
            for batch in map(int, args.batches.split(",")):
                x = torch.randn(batch, *model.config.input_size)
                warm = {}
                for k, (fn, _) in fns.items():  # warm-up (torch.compile compiles for this shape here)
                    t = time.perf_counter()
                    fn(x)
                    warm[k] = time.perf_counter() - t
                reps = args.reps or max(1, int(0.3 / max(timed(fns["eager"][0], x, 1), 1e-4)))
                times = {k: [] for k in fns}
                for _ in range(args.rounds):
                    for k, (fn, _) in fns.items():
                        times[k].append(timed(fn, x, reps))
                eager_ms = statistics.median(times["eager"]) * 1e3
                for k, v in times.items():
                    ms = statistics.median(v) * 1e3
                    rows.append({"preset": preset, "batch": batch, "backend": k, "ms": round(ms, 3),
                                 "images_per_s": round(batch / ms * 1e3, 1), "vs_eager": round(eager_ms / ms, 3),
                                 "setup_s": round(fns[k][1], 2), "first_call_s": round(warm[k], 2), "reps": reps,
                                 "rounds": args.rounds})
                    print(f"{preset:24s} batch {batch:3d}  {k:18s} {ms:10.2f} ms  {batch / ms * 1e3:9.1f} img/s  "
                          f"x{eager_ms / ms:.2f} vs eager", flush=True)
    doc = {"machine": describe_machine(), "threads": threads, "rows": rows,
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out:
        runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
        args.out.write_text(json.dumps({"runs": runs + [doc]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
