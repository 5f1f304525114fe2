"""The `vitlab` command: a table of subcommands, each a small function over the library.

Library code raises typed errors (vitlab.errors); here they become one line on stderr and a
non-zero exit status, never a traceback. Exit status: 0 done; 2 refused (a setting, file or input
named on stderr; nothing done); 3 done for some inputs but others were skipped (predict, attention:
each skipped file named on stderr); 1 a checksum mismatch in `vitlab data verify`, or an unexpected
error (Python's traceback: a bug to report); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable

import yaml

from .cli_args import (_attention_args, _bench_args, _convert_args, _data_args, _eval_args, _export_args,
                       _inspect_args, _models_args, _predict_args, _serve_args, _report_args, _train_args)
from .errors import ConfigError, VitlabError

PARTIAL = 3  # some inputs skipped, the rest answered: distinct from 1 (what Python exits with on a crash)


def cmd_models(args: argparse.Namespace) -> int:
    """List the presets with their size."""
    import torch

    from .config import PRESETS
    from .model import VisionTransformer
    rows = []
    for name, cfg in PRESETS.items():
        if args.filter and args.filter not in name:
            continue
        with torch.device("meta"):  # counts parameters without allocating them
            params = sum(p.numel() for p in VisionTransformer(cfg).parameters())
        rows.append((name, cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.depth,
                     cfg.num_heads, cfg.pool, cfg.pos_embed, params))
    if args.json:
        keys = ("name", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "pool",
                "pos_embed", "params")
        print(json.dumps([dict(zip(keys, r)) for r in rows], indent=2))
        return 0
    print(f"{'name':26} {'img':>4} {'patch':>5} {'ch':>3} {'width':>5} {'depth':>5} {'heads':>5} "
          f"{'pool':>5} {'pos':>6} {'params (M)':>11}")
    for r in rows:
        print(f"{r[0]:26} {r[1]:4d} {r[2]:5d} {r[3]:3d} {r[4]:5d} {r[5]:5d} {r[6]:5d} {r[7]:>5} {r[8]:>6} "
              f"{r[9] / 1e6:11.2f}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a timm / torchvision / Hugging Face checkpoint into a vitlab model directory."""
    from .weights.convert import convert
    known = {}
    if args.num_heads is not None:  # 0 is a value to reject, not "unset"
        known["num_heads"] = args.num_heads
    if args.img_size is not None:
        known["img_size"] = args.img_size
    if args.pool:
        known["pool"] = args.pool
    model = convert(args.src, args.source, args.out, preset=args.preset, force=args.force, **known)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {cfg.img_size}px patch {cfg.patch_size}, {cfg.depth}x{cfg.embed_dim} "
          f"({cfg.num_heads} heads), {cfg.num_classes} classes, {n:,} parameters")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """List, fetch or verify datasets (MNIST, CIFAR-10, CIFAR-100)."""
    from .data import sources
    if args.action == "list":
        for name, source in sources.DATASETS.items():
            try:
                where = str(sources.locate(source, args.data_dir)[0])
            except sources.DatasetNotFoundError:
                where = f"not found (vitlab data fetch {name})"
            print(f"{name:10} {source.description}\n{'':10} {where}")
        print(f"searched: {', '.join(str(r) for r in sources.data_roots(args.data_dir))}")
        return 0
    if not args.name:
        raise sources.DataError(f"`vitlab data {args.action}` needs a dataset name: one of {sorted(sources.DATASETS)}")
    source = sources.get_source(args.name)
    if args.action == "fetch":
        folder = sources.fetch(args.name, args.data_dir, force=args.force, progress=not args.quiet)
        print(f"{args.name}: verified at {folder}")
        return 0
    folder, report = sources.check_files(source, args.data_dir)
    for path, problem in report:
        print(f"{'ok ' if problem is None else 'BAD'} {path.name}" + (f": {problem}" if problem else ""))
    bad = sum(problem is not None for _, problem in report)
    print(f"{args.name} at {folder}: {len(report) - bad} of {len(report)} files verified")
    return 1 if bad else 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a ViT from a recipe (or resume a run), with --set overrides."""
    from pathlib import Path

    from .engine.args import describe_settings, load_run_config
    from .train import default_out, resume_settings, run_training
    if args.help_recipe:
        print(describe_settings())
        return 0
    if args.resume:
        if args.recipe or args.out:
            raise ConfigError("--resume RUN_DIR continues a run with its saved settings; drop --recipe/--out")
        run_dir = Path(args.resume)
        run_training(resume_settings(run_dir, args.set), run_dir, resume=True)
        return 0
    if not args.recipe:
        raise ConfigError("give --recipe NAME|FILE (e.g. --recipe mnist) or --resume RUN_DIR")
    settings = load_run_config(args.recipe, args.set)
    run_training(settings, Path(args.out) if args.out else default_out(args.recipe))
    return 0


def _resolve_model_dir(path: str):
    from pathlib import Path
    p = Path(path)
    return (p / "model", p) if (p / "model" / "config.json").is_file() else (p, None)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run or model directory: top-1/top-5, loss, per-class accuracy, confusion, ECE."""
    import torch

    from .data.augment import EvalTransform
    from .data.loader import BatchLoader
    from .engine.runtime import resolve_device, resolve_precision, setup_runtime
    from .evaluate import evaluate, save_confusion_png
    from .util import atomic_write_text
    from .weights.modeldir import load_model, recorded_dataset
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit} must be >= 1 (or left out to evaluate every image)")
    resolve_precision(args.precision, resolve_device(args.device))  # settings first, before the data loads
    model_dir, run_dir = _resolve_model_dir(args.path)
    model = load_model(model_dir)
    data = recorded_dataset(model_dir, model, args.split, args.data_dir, name=args.data)
    if args.limit is not None and args.limit < len(data):  # a stratified, seeded subset
        from .data import stratified_split
        keep = torch.from_numpy(stratified_split(data.labels.numpy(), args.limit)[1])
        data = data.take(keep)
    rt = setup_runtime(args.device, args.precision)
    model.to(rt.device)
    loader = BatchLoader(data, args.batch_size, False, EvalTransform(model.config))
    metrics = evaluate(model, loader, model.config.num_classes, rt, tta=args.tta)
    metrics.update(dataset=data.name, split=args.split, model=str(model_dir), tta=args.tta, limit=args.limit,
                   device=str(rt.device), precision=rt.precision)
    from pathlib import Path
    out = Path(args.out) if args.out else (run_dir or model_dir) / (f"eval_{data.name}_{args.split}"
                                                                    + (f"_tta-{args.tta}" if args.tta else ""))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    save_confusion_png(metrics["confusion"], data.classes, out / "confusion.png")
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{data.name} {args.split}: {metrics['n']} images  top-1 {metrics['top1']:.4f}  "
          f"top-{metrics['top5_k']} {metrics['top5']:.4f}  "
          f"loss {metrics['loss']:.4f}  ECE {metrics['ece']:.4f}" + (f"  ({args.tta} TTA)" if args.tta else ""))
    for cls, acc in zip(data.classes, metrics["per_class"]):
        print(f"  {cls:>16}  {acc:.4f}")
    print(f"confusion matrix and metrics in {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k labels for image files or folders, as a table, JSON or CSV.

    fp32 (onnxruntime or PyTorch), or bf16 (PyTorch under autocast). Exit status 3 (not 0) when some
    files were skipped: each is named on stderr and the others are still predicted; 2 when none could
    be."""
    from .predict import collect_files, decode_files, format_rows, predict_decoded
    if args.topk < 1:
        raise ConfigError(f"--topk {args.topk} must be >= 1")
    if args.backend == "onnxruntime":  # settings first, before any work
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError("--backend onnxruntime needs onnxruntime: pip install 'vitlab[onnx]'") from None
    if args.precision == "bf16":
        from pathlib import Path

        from .predict import onnx_precision_message
        if Path(args.model).suffix == ".onnx":
            raise ConfigError(onnx_precision_message(args.precision, args.model))
        if args.backend == "onnxruntime":
            raise ConfigError("--precision bf16 runs the model on PyTorch, --backend onnxruntime on an fp32 "
                              "export: use --backend torch or auto with bf16")
    model, model_dir = _predict_model(args.model, args.backend)
    files, failed = collect_files(args.paths)
    ok, unreadable = decode_files(files, model.config)
    failed += unreadable
    if not ok:  # one line: what each path was (and no export made for nothing)
        raise _nothing_done("predict", failed)
    if model_dir is not None and args.backend != "torch" and args.precision == "fp32":
        model = _onnx_backend(model, model_dir, args.backend)
    rows = predict_decoded(model, ok, topk=args.topk, precision=args.precision)
    status = _report_skipped("predict", failed)  # before the answers, as ever: the others got theirs
    print(format_rows(rows, args.format))
    return status


def _predict_model(path: str, backend: str):
    """(model, its model directory): a vitlab model (directory, or run directory) loaded on PyTorch, or
    (an exported .onnx file on onnxruntime, None)."""
    from pathlib import Path
    if Path(path).suffix == ".onnx":
        if backend == "torch":
            raise ConfigError(f"{path} is an ONNX file: use --backend onnxruntime (or auto)")
        from .weights.export import OnnxModel
        return OnnxModel(path), None
    from .weights.modeldir import load_model
    model_dir = _resolve_model_dir(path)[0]
    return load_model(model_dir), model_dir


def _onnx_backend(model, model_dir, backend: str):
    """`model` on onnxruntime (backend onnxruntime or auto) or PyTorch. auto: onnxruntime where it is
    installed, the fastest backend measured (README, "Inference latency"), through an export made once
    and cached (weights.export.cached_onnx); else, or if the model cannot be exported, PyTorch. Called
    once there is an image to predict, so bad input costs no export."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return model  # auto (onnxruntime was checked for before)
    from .weights.export import ExportError, OnnxModel, cached_onnx
    try:
        return OnnxModel(cached_onnx(model_dir, model, log=lambda m: print(f"vitlab predict: {m}", file=sys.stderr)))
    except ExportError as e:
        if backend == "onnxruntime":
            raise
        warnings.warn(f"running on PyTorch: the model could not be exported for onnxruntime ({e})", stacklevel=2)
        return model


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model to ONNX (checked with onnx.checker and against PyTorch through onnxruntime) or TorchScript."""
    from pathlib import Path
    from .weights.export import check_settings, default_output, export_model
    from .weights.modeldir import load_model, read_config
    model_dir, _ = _resolve_model_dir(args.model)
    read_config(model_dir)  # a clear error for a path that is no model, before --out is derived from it
    out = Path(args.out) if args.out else default_output(Path(model_dir), args.format, args.int8)
    check_settings(args.format, args.opset, args.int8, out)  # before the weights are loaded
    model = load_model(model_dir)
    inputs = _export_images(model, args.images) if args.images else None
    rec = export_model(model, out, args.format, dynamic_batch=args.dynamic_batch, opset=args.opset, int8=args.int8,
                       inputs=inputs, source=str(model_dir))
    parity = rec.get("parity_int8") or rec["parity_fp32"]
    worst = max(p["max_abs_diff"] for p in parity.values())
    agree = min(p["top1_agreement"] for p in parity.values())
    n = max(p["images"] for p in parity.values())
    what = "int8 vs fp32 PyTorch" if args.int8 else "vs PyTorch"
    print(f"wrote {out} ({rec['bytes'] / 1e6:.2f} MB) and {out.name}.json; max |dlogits| {what} {worst:.2g}, "
          f"top-1 agreement {agree:.1%} on {n} {'images' if args.images else 'random inputs'}")
    return 0


def _export_images(model, paths: list[str]):
    """The first readable images under `paths`, preprocessed as predict does: the parity inputs."""
    import numpy as np
    import torch
    from .data.augment import EvalTransform
    from .errors import DataError
    from .predict import collect_files, decode_files
    from .weights.export import PARITY_IMAGES
    ok, _ = decode_files(collect_files(paths)[0], model.config, limit=PARITY_IMAGES)
    if not ok:
        raise DataError(f"--images {' '.join(paths)}: no readable image")
    x, _ = EvalTransform(model.config)(torch.from_numpy(np.stack([a for _, a in ok])))
    return x


def cmd_attention(args: argparse.Namespace) -> int:
    """Where the model looks: a PNG (or .npy map) per image, from raw attention, rollout or gradients.

    Exit status 3 (not 0) when some files were skipped, each named on stderr; 2 when none could be."""
    from pathlib import Path

    from .attention import class_index, write_explanations
    from .engine.runtime import resolve_device
    from .predict import collect_files
    from .util import atomic_write_text
    from .weights.modeldir import load_model
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    if not 0 <= args.alpha <= 1:
        raise ConfigError(f"--alpha {args.alpha} must be in [0, 1]")
    model_dir, _ = _resolve_model_dir(args.model)
    model = load_model(model_dir)
    cfg = model.config
    if cfg.num_classes == 0:
        raise ConfigError(f"{model_dir} has no classifier head (num_classes=0): nothing to explain")
    target = None
    if args.cls is not None:
        if args.method != "gradient":
            raise ConfigError(f"--class explains one class with --method gradient; {args.method} maps do not "
                              f"depend on the class")
        target = class_index(cfg, args.cls)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    model.to(resolve_device(args.device))
    options = dict(layer=args.layer, head=args.head, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio)
    files, failed = collect_files(args.paths)
    index, unreadable = write_explanations(model, files, out, args.method, target=target, batch_size=args.batch_size,
                                           fmt=args.format, alpha=args.alpha, **options)
    failed += unreadable
    if not index:
        raise _nothing_done("explain", failed)
    meta = {"model": str(model_dir), "method": args.method, **options, "pool": cfg.pool, "images": index}
    atomic_write_text(out / "attention.json", json.dumps(meta, indent=2) + "\n")
    status = _report_skipped("attention", failed)
    print(f"wrote {len(index)} {args.format.upper()} file(s) and attention.json to {out}")
    return status


def _nothing_done(verb: str, failed: list) -> VitlabError:
    """The one-line error when no input could be used: the first five paths and what each was."""
    from .errors import DataError
    from .util import printable
    return DataError(f"no image to {verb}: " + "; ".join(f"{printable(f)}: {p}" for f, p in failed[:5]) +
                     (f"; and {len(failed) - 5} more" if len(failed) > 5 else ""))


def _report_skipped(command: str, failed: list) -> int:
    """Name each skipped input on stderr; the exit status: PARTIAL if any was skipped, else 0."""
    from .util import printable
    for f, problem in failed:
        print(f"vitlab {command}: skipped {printable(f)}: {problem}", file=sys.stderr)
    return PARTIAL if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """The ViT paper's Figure 7 views: patch-embedding filters, position similarity, attention distance."""
    from .inspect import inspect_images, write_inspect
    from .weights.modeldir import load_model
    if args.images_count < 1:
        raise ConfigError(f"--num-images {args.images_count} must be >= 1")
    model_dir, _ = _resolve_model_dir(args.model)
    model = load_model(model_dir)
    images, note = inspect_images(model, model_dir, paths=args.images or None, data_dir=args.data_dir,
                                  n=args.images_count)
    paths = write_inspect(model, images, args.out, note=note)
    print(f"attention distance over {note}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """One self-contained HTML page for a run: config, curves, per-class, calibration, mistakes, views."""
    from .report import write_report
    path = write_report(args.run, args.out, split=args.split, data_dir=args.data_dir, limit=args.limit,
                        mistakes=args.mistakes, device=args.device)
    print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Training and inference images/s, GFLOP/s, share of matmul peak: vitlab vs timm vs the seed model."""
    from pathlib import Path

    from .bench import SEED_PATH, bench_config, default_batch, format_table, run_bench
    from .engine.runtime import MAX_THREADS, fit_threads, resolve_device
    cfg = bench_config(args.preset, args.set)
    off = args.seed_vit == "none"  # its ViT-B-sized shapes can take minutes a round on a CPU
    if args.seed_vit and not off and not Path(args.seed_vit).is_file():
        raise ConfigError(f"--seed-vit {args.seed_vit}: no such file (or 'none' to leave it out)")
    if args.threads is not None:
        if not 1 <= args.threads <= MAX_THREADS:
            raise ConfigError(f"--threads {args.threads} must be in [1, {MAX_THREADS}]")
        fit_threads(args.threads)
    batch = default_batch(cfg) if args.batch is None else args.batch
    result = run_bench(cfg, batch, resolve_device(args.device), args.precision, args.attn,
                       rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                       seed_path=None if off else Path(args.seed_vit) if args.seed_vit else SEED_PATH)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model over HTTP: a JSON API with dynamic batching, and a page to try it (vitlab[serve])."""
    from .serve import ServeSettings, serve
    settings = ServeSettings(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_upload_mb=args.max_upload_mb, timeout_s=args.timeout,
                             cors=tuple(args.cors), threads=args.threads, precision=args.precision)
    serve(args.model, settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitlab", description="Vision Transformers: train, fine-tune, "
                                     "evaluate, inspect and export.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands: dict[str, tuple[Callable, Callable[[argparse.ArgumentParser], None]]] = {
        "models": (cmd_models, _models_args),
        "convert": (cmd_convert, _convert_args),
        "data": (cmd_data, _data_args),
        "train": (cmd_train, _train_args),
        "eval": (cmd_eval, _eval_args),
        "predict": (cmd_predict, _predict_args),
        "attention": (cmd_attention, _attention_args),
        "inspect": (cmd_inspect, _inspect_args),
        "report": (cmd_report, _report_args),
        "bench": (cmd_bench, _bench_args),
        "export": (cmd_export, _export_args),
        "serve": (cmd_serve, _serve_args),
    }
    for name, (fn, add_args) in commands.items():
        p = sub.add_parser(name, help=fn.__doc__.strip().splitlines()[0], description=fn.__doc__)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"vitlab {args.command}"

    def one_line_warning(message, category, filename, lineno, line=None) -> str:
        # Python's default is two lines (file:line + the source line), which reads like a traceback.
        return f"{prefix}: warning: {message}".replace("\n", " ") + "\n"

    saved_format = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        from .engine.runtime import fit_threads
        fit_threads()  # no more torch threads than this process can keep busy (a container's CPU quota)
        return args.func(args)
    except VitlabError as e:
        print(f"{prefix}: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except (OSError, yaml.YAMLError) as e:  # unwritable --out, a damaged YAML file, ...
        print(f"{prefix}: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    sys.exit(main())
