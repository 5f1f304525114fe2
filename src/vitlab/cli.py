"""The `vitlab` command: a table of subcommands, each a small function over the library.

Library code raises typed errors (vitlab.errors); here they become one line on stderr and a
non-zero exit status, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .errors import VitlabError


def cmd_models(args: argparse.Namespace) -> int:
    """List the presets with their size."""
    from .config import PRESETS
    from .model import VisionTransformer
    import torch
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
    if args.num_heads:
        known["num_heads"] = args.num_heads
    if args.img_size:
        known["img_size"] = args.img_size
    model = convert(args.src, args.source, args.out, preset=args.preset, **known)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {cfg.img_size}px patch {cfg.patch_size}, {cfg.depth}x{cfg.embed_dim} "
          f"({cfg.num_heads} heads), {cfg.num_classes} classes, {n:,} parameters")
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
    }
    for name, (fn, add_args) in commands.items():
        p = sub.add_parser(name, help=fn.__doc__.strip().splitlines()[0], description=fn.__doc__)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("filter", nargs="?", help="only names containing this text")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="state-dict file (.pth/.safetensors) for timm/torchvision; "
                   "save_pretrained directory for hf")
    p.add_argument("--from", dest="source", required=True, choices=["timm", "torchvision", "hf"],
                   help="layout of SRC")
    p.add_argument("--out", required=True, help="model directory to write (config.json + model.safetensors)")
    p.add_argument("--preset", help="preset whose head count, eps and mean/std apply (e.g. vit_base_patch16_224)")
    p.add_argument("--num-heads", type=int, help="attention heads, if not width/64 and no preset")
    p.add_argument("--img-size", type=int, help="input size, for checkpoints with fixed position embeddings")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VitlabError as e:
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
