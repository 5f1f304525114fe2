"""Carry a local data root to a machine that can only receive a few tens of MiB per transfer (a
borrowed GPU box that gets a copy of the working tree and nothing else), then rebuild it there.

    python benchmarks/stage.py pack --data-dir ../shared/datasets --out .stage --max-mib 58
    # send .stage/1, .stage/2, ... one transfer each; on the far side, after each:
    PYTHONPATH=src python3 benchmarks/stage.py unpack .stage/1 --into .stage/data   # vitlab not installed there
    ...
    vitlab train --recipe cifar10 --set data.data_dir=.stage/data     # once every bundle is in

`pack` xz-compresses every file of the chosen datasets (CIFAR-10's binary batches shrink to ~75%)
and fills numbered bundles greedily, largest file first, each under --max-mib; each bundle holds a
manifest of original relative paths, sizes and md5s. `unpack` decompresses one bundle into the
root, checks every file against its manifest before moving it into place, and never replaces a
file that is already there with different content. vitlab checks the official md5s again when it
reads the data.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
from pathlib import Path

from vitlab.data.sources import md5sum  # the checksum vitlab verifies datasets with

MANIFEST = "manifest.json"


def pack(data_dir: Path, out: Path, names: list[str], max_mib: float) -> list[Path]:
    """Compress the files under data_dir/NAME for each name into bundles out/1, out/2, ..."""
    if out.exists():
        raise SystemExit(f"{out} exists: give a new --out (stage never writes over files)")
    files = sorted(p for name in names for p in (data_dir / name).rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"no files under {data_dir} for {names}")
    limit = max_mib * 2**20
    tmp = out / "tmp"
    tmp.mkdir(parents=True)
    packed = []
    for path in files:
        rel = path.relative_to(data_dir)
        dest = tmp / (str(rel).replace(os.sep, "__") + ".xz")
        with open(path, "rb") as src, lzma.open(dest, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        packed.append((dest.stat().st_size, rel, dest, path))
        print(f"{rel}: {path.stat().st_size:,} -> {dest.stat().st_size:,} bytes", flush=True)
    bundles: list[list] = []
    for item in sorted(packed, key=lambda t: t[0], reverse=True):  # first fit, largest first
        if item[0] > limit:
            raise SystemExit(f"{item[1]} is {item[0] / 2**20:.1f} MiB compressed, over --max-mib {max_mib}")
        for b in bundles:
            if sum(i[0] for i in b) + item[0] <= limit:
                b.append(item)
                break
        else:
            bundles.append([item])
    dirs = []
    for n, bundle in enumerate(bundles, 1):
        d = out / str(n)
        d.mkdir()
        manifest = []
        for size, rel, dest, path in bundle:
            dest.rename(d / dest.name)
            manifest.append({"file": dest.name, "path": rel.as_posix(), "size": path.stat().st_size,
                             "md5": md5sum(path)})
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
        dirs.append(d)
        print(f"{d}: {len(bundle)} files, {sum(i[0] for i in bundle) / 2**20:.1f} MiB", flush=True)
    tmp.rmdir()
    return dirs


def unpack(bundle: Path, into: Path) -> int:
    """Rebuild one bundle's files under `into`; the number of files written."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    written = 0
    for entry in manifest:
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise SystemExit(f"{bundle / MANIFEST}: unsafe path {entry['path']!r}")
        target = into / rel
        if target.is_file() and target.stat().st_size == entry["size"] and md5sum(target) == entry["md5"]:
            continue  # already there from an earlier transfer
        if target.exists() or target.is_symlink():
            raise SystemExit(f"{target} exists with other content: not replaced")
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        with lzma.open(bundle / entry["file"], "rb") as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        got = (part.stat().st_size, md5sum(part))
        if got != (entry["size"], entry["md5"]):
            part.unlink()
            raise SystemExit(f"{bundle / entry['file']} unpacked to {got[0]:,} bytes, md5 {got[1]}; "
                             f"expected {entry['size']:,}, {entry['md5']}")
        part.rename(target)
        written += 1
    print(f"{bundle}: {written} of {len(manifest)} files written under {into}", flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--datasets", default="mnist,cifar10", help="comma-separated folders of --data-dir")
    p.add_argument("--max-mib", type=float, default=58.0,
                   help="per bundle; leave room for the working tree that travels with it")
    u = sub.add_parser("unpack")
    u.add_argument("bundle", type=Path)
    u.add_argument("--into", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(args.data_dir, args.out, args.datasets.split(","), args.max_mib)
    else:
        unpack(args.bundle, args.into)


if __name__ == "__main__":
    sys.exit(main())
